"""lmstream_nb: stream prompts to LM Studio from Jupyter, honestly and without a total timeout."""

import importlib as _importlib
import typing as _typing
from contextlib import suppress as _suppress

if _typing.TYPE_CHECKING:
    from ._batch import BatchResult, arun_many, run_many
    from ._client import ChatStream, LMStudioClient
    from ._compare import Comparison, acompare, compare
    from ._config import Budgets, Retries
    from ._conversation import Conversation, Turn
    from ._diff import PromptDiff
    from ._errors import (
        AuthenticationError,
        ConversationBusy,
        ConversationNotFound,
        ConversationTooLong,
        FirstTokenTimeout,
        HTTPStatusError,
        InvalidBaseURL,
        InvalidOutput,
        InvalidPlaceholder,
        InvalidSchema,
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
        UnsupportedRequest,
    )
    from ._events import (
        Completion,
        Event,
        LoadProgress,
        Progress,
        PromptEstimate,
        PromptProgress,
        ReasoningDelta,
        ServerStats,
        Stats,
        StreamFinished,
        StreamStarted,
        TextDelta,
    )
    from ._routes import ServerInfo
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
    from ._widget import PromptRunner

__version__ = "0.1.0"

#: Where each public name lives. Names are imported on first use (PEP 562), so ``import
#: lmstream_nb`` (and so every ``lmstream`` command, ``--help`` too) pays only for what it uses:
#: the HTTP client, the database, IPython and widgets are loaded when something needs them.
_HOMES: dict[str, tuple[str, ...]] = {
    "_batch": ("BatchResult", "arun_many", "run_many"),
    "_client": ("ChatStream", "LMStudioClient"),
    "_compare": ("Comparison", "acompare", "compare"),
    "_config": ("Budgets", "Retries"),
    "_conversation": ("Conversation", "Turn"),
    "_diff": ("PromptDiff",),
    "_errors": (
        "AuthenticationError",
        "ConversationBusy",
        "ConversationNotFound",
        "ConversationTooLong",
        "FirstTokenTimeout",
        "HTTPStatusError",
        "InvalidBaseURL",
        "InvalidOutput",
        "InvalidPlaceholder",
        "InvalidSchema",
        "InvalidSetting",
        "InvalidVariables",
        "LMStreamError",
        "MissingVariables",
        "ModelNotFound",
        "ModelNotLoaded",
        "PromptFileError",
        "PromptNotFound",
        "PromptTooLong",
        "ProtocolError",
        "RedirectNotFollowed",
        "RequestError",
        "RequestTimedOut",
        "RunNotFound",
        "ServerStreamError",
        "ServerUnreachable",
        "StoreError",
        "StoreUnavailable",
        "StreamError",
        "StreamInterrupted",
        "StreamStalled",
        "TemplateError",
        "UnknownVariables",
        "UnsupportedRequest",
    ),
    "_events": (
        "Completion",
        "Event",
        "LoadProgress",
        "Progress",
        "PromptEstimate",
        "PromptProgress",
        "ReasoningDelta",
        "ServerStats",
        "Stats",
        "StreamFinished",
        "StreamStarted",
        "TextDelta",
    ),
    "_routes": ("ServerInfo",),
    "_run": ("RunResult", "arun", "history", "run", "stats"),
    "_store": (
        "GroupStats",
        "History",
        "PromptStore",
        "RunRecord",
        "RunStats",
        "RunSummary",
        "SavedVersion",
    ),
    "_sync": ("SyncChatStream", "SyncLMStudioClient"),
    "_template": ("Prompt", "Template"),
    "_widget": ("PromptRunner",),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}
_SUBMODULES = ("bench", "cli", "serve", "simulator")


def __getattr__(name: str) -> _typing.Any:
    """Import a public name's module on first use; its classes then claim the package (so
    reprs and docs say ``lmstream_nb.Prompt``, not a private module)."""
    if name in _SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    module_name = _HOME_OF.get(name)
    if module_name is None:
        raise AttributeError(f"module 'lmstream_nb' has no attribute {name!r}")
    module = _importlib.import_module(f"{__name__}.{module_name}")
    for exported in _HOMES[module_name]:
        value = getattr(module, exported)
        if isinstance(value, type) or callable(value):
            with _suppress(AttributeError, TypeError):
                value.__module__ = __name__
        globals()[exported] = value
    return globals()[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME_OF})


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
    "Comparison",
    "Completion",
    "Conversation",
    "ConversationBusy",
    "ConversationNotFound",
    "ConversationTooLong",
    "Event",
    "FirstTokenTimeout",
    "GroupStats",
    "HTTPStatusError",
    "History",
    "InvalidBaseURL",
    "InvalidOutput",
    "InvalidPlaceholder",
    "InvalidSchema",
    "InvalidSetting",
    "InvalidVariables",
    "LMStreamError",
    "LMStudioClient",
    "LoadProgress",
    "MissingVariables",
    "ModelNotFound",
    "ModelNotLoaded",
    "Progress",
    "Prompt",
    "PromptDiff",
    "PromptEstimate",
    "PromptFileError",
    "PromptNotFound",
    "PromptProgress",
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
    "ServerInfo",
    "ServerStats",
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
    "Turn",
    "UnknownVariables",
    "UnsupportedRequest",
    "acompare",
    "arun",
    "arun_many",
    "compare",
    "history",
    "run",
    "run_many",
    "stats",
]
