"""lmstream_nb: stream prompts to LM Studio from Jupyter, honestly and without a total timeout."""

import contextlib

from ._batch import BatchResult, arun_many, run_many
from ._client import ChatStream, LMStudioClient
from ._config import Budgets, Retries
from ._errors import (
    AuthenticationError,
    FirstTokenTimeout,
    HTTPStatusError,
    InvalidBaseURL,
    InvalidPlaceholder,
    InvalidSetting,
    InvalidVariables,
    LMStreamError,
    MissingVariables,
    ModelNotFound,
    ModelNotLoaded,
    PromptFileError,
    PromptNotFound,
    PromptTooLong,
    ProtocolError,
    RedirectNotFollowed,
    RequestError,
    RequestTimedOut,
    RunNotFound,
    ServerStreamError,
    ServerUnreachable,
    StoreError,
    StoreUnavailable,
    StreamError,
    StreamInterrupted,
    StreamStalled,
    TemplateError,
    UnknownVariables,
)
from ._events import (
    Completion,
    Event,
    ReasoningDelta,
    Stats,
    StreamFinished,
    StreamStarted,
    TextDelta,
)
from ._run import RunResult, arun, history, run, stats
from ._store import (
    GroupStats,
    History,
    PromptStore,
    RunRecord,
    RunStats,
    RunSummary,
    SavedVersion,
)
from ._sync import SyncChatStream, SyncLMStudioClient
from ._template import Prompt, Template

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``lmstream_nb.PromptRunner`` is imported on first use (it pulls in ipywidgets)."""
    if name == "PromptRunner":
        from ._widget import PromptRunner

        PromptRunner.__module__ = "lmstream_nb"
        return PromptRunner
    raise AttributeError(f"module 'lmstream_nb' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "PromptRunner"})


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext lmstream_nb``: register ``%%lmstream`` / ``%lmstream`` (imported lazily, so
    importing the package never pulls in IPython or widgets)."""
    from ._magics import load

    load(ipython)


__all__ = [
    "AuthenticationError",
    "BatchResult",
    "Budgets",
    "ChatStream",
    "Completion",
    "Event",
    "FirstTokenTimeout",
    "GroupStats",
    "HTTPStatusError",
    "History",
    "InvalidBaseURL",
    "InvalidPlaceholder",
    "InvalidSetting",
    "InvalidVariables",
    "LMStreamError",
    "LMStudioClient",
    "MissingVariables",
    "ModelNotFound",
    "ModelNotLoaded",
    "Prompt",
    "PromptFileError",
    "PromptNotFound",
    "PromptRunner",
    "PromptStore",
    "PromptTooLong",
    "ProtocolError",
    "ReasoningDelta",
    "RedirectNotFollowed",
    "RequestError",
    "RequestTimedOut",
    "Retries",
    "RunNotFound",
    "RunRecord",
    "RunResult",
    "RunStats",
    "RunSummary",
    "SavedVersion",
    "ServerStreamError",
    "ServerUnreachable",
    "Stats",
    "StoreError",
    "StoreUnavailable",
    "StreamError",
    "StreamFinished",
    "StreamInterrupted",
    "StreamStalled",
    "StreamStarted",
    "SyncChatStream",
    "SyncLMStudioClient",
    "Template",
    "TemplateError",
    "TextDelta",
    "UnknownVariables",
    "arun",
    "arun_many",
    "history",
    "run",
    "run_many",
    "stats",
]

for _name in __all__:
    if _name not in globals():
        continue  # provided lazily by __getattr__
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("lmstream_nb._"):
        with contextlib.suppress(AttributeError, TypeError):
            _obj.__module__ = "lmstream_nb"
del _name, _obj
