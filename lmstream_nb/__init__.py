"""lmstream_nb: stream prompts to LM Studio from Jupyter, honestly and without a total timeout."""

import contextlib

from ._client import ChatStream, LMStudioClient
from ._config import Budgets, Retries
from ._errors import (
    AuthenticationError,
    FirstTokenTimeout,
    HTTPStatusError,
    LMStreamError,
    MissingVariables,
    ModelNotFound,
    ModelNotLoaded,
    PromptTooLong,
    ProtocolError,
    RequestError,
    RequestTimedOut,
    ServerStreamError,
    ServerUnreachable,
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
from ._sync import SyncChatStream, SyncLMStudioClient

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "Budgets",
    "ChatStream",
    "Completion",
    "Event",
    "FirstTokenTimeout",
    "HTTPStatusError",
    "LMStreamError",
    "LMStudioClient",
    "MissingVariables",
    "ModelNotFound",
    "ModelNotLoaded",
    "PromptTooLong",
    "ProtocolError",
    "ReasoningDelta",
    "RequestError",
    "RequestTimedOut",
    "Retries",
    "ServerStreamError",
    "ServerUnreachable",
    "Stats",
    "StreamError",
    "StreamFinished",
    "StreamInterrupted",
    "StreamStalled",
    "StreamStarted",
    "SyncChatStream",
    "SyncLMStudioClient",
    "TemplateError",
    "TextDelta",
    "UnknownVariables",
]

for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("lmstream_nb._"):
        with contextlib.suppress(AttributeError, TypeError):
            _obj.__module__ = "lmstream_nb"
del _name, _obj
