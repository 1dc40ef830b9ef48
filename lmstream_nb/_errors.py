"""Every error lmstream_nb raises on purpose, in one tree.

    LMStreamError
    ├── TemplateError
    │   ├── MissingVariables         .names
    │   └── UnknownVariables         .names
    └── RequestError                 .url
        ├── ServerUnreachable
        ├── RequestTimedOut          .timeout          (blocking requests only)
        ├── HTTPStatusError          .status, .server_message
        │   ├── AuthenticationError
        │   ├── ModelNotFound        .model
        │   ├── ModelNotLoaded
        │   └── PromptTooLong
        └── StreamError              .partial_text, .partial_reasoning
            ├── FirstTokenTimeout    .budget
            ├── StreamStalled        .budget
            ├── StreamInterrupted
            ├── ServerStreamError    .server_message
            └── ProtocolError        .line

Each message is one sentence: what happened, the concrete fact (URL, status, names, the offending
line) and what to do. The same facts ride on attributes so code never has to parse the message.
A stream that fails after text has arrived keeps that text in ``partial_text``: nothing the user
saw is lost. Cancellation (Ctrl-C, Stop, a cancelled task) is deliberately *not* an error here:
it propagates unchanged as ``KeyboardInterrupt`` / ``asyncio.CancelledError``.
"""

from __future__ import annotations

from collections.abc import Iterable


class LMStreamError(Exception):
    """Base class of every error raised by lmstream_nb."""


# ---------------------------------------------------------------------------------------------
# Templates


class TemplateError(LMStreamError):
    """A template could not be rendered with the variables given."""


class MissingVariables(TemplateError):
    """Placeholders without a value; all of them are named, so one fix is enough."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = tuple(sorted(set(names)))
        listed = ", ".join(self.names)
        plural = "s" if len(self.names) > 1 else ""
        super().__init__(
            f"The template needs a value for the variable{plural} {listed}: "
            f"pass {' '.join(f'{n}=...' for n in self.names)} and run again."
        )


class UnknownVariables(TemplateError):
    """Values for names the template does not use (usually a typo)."""

    def __init__(self, names: Iterable[str], known: Iterable[str]) -> None:
        self.names = tuple(sorted(set(names)))
        self.known = tuple(sorted(set(known)))
        listed = ", ".join(self.names)
        uses = ", ".join(self.known) if self.known else "no variables"
        super().__init__(
            f"The template has no variable named {listed} (it uses {uses}): "
            "fix the name, or allow extra variables explicitly."
        )


# ---------------------------------------------------------------------------------------------
# Requests


class RequestError(LMStreamError):
    """A request to the model server failed; ``url`` says which server."""

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url


class ServerUnreachable(RequestError):
    """No TCP connection could be made (server off, wrong port, wrong host)."""


class RequestTimedOut(RequestError):
    """A blocking (non-streaming) request hit its total timeout."""

    def __init__(self, message: str, *, url: str, timeout: float) -> None:
        super().__init__(message, url=url)
        self.timeout = timeout


class HTTPStatusError(RequestError):
    """The server refused the request; ``server_message`` is its own explanation."""

    def __init__(
        self, message: str, *, url: str, status: int, server_message: str | None
    ) -> None:
        super().__init__(message, url=url)
        self.status = status
        self.server_message = server_message


class AuthenticationError(HTTPStatusError):
    """The server requires an API token and did not accept ours."""


class ModelNotFound(HTTPStatusError):
    """The requested model id is not known to the server."""

    def __init__(
        self, message: str, *, url: str, status: int, server_message: str | None, model: str
    ) -> None:
        super().__init__(message, url=url, status=status, server_message=server_message)
        self.model = model


class ModelNotLoaded(HTTPStatusError):
    """The server has no model loaded (and could not load one just in time)."""


class PromptTooLong(HTTPStatusError):
    """The prompt does not fit the loaded model's context window."""


class StreamError(RequestError):
    """A stream failed; whatever text had arrived is kept on the exception."""

    def __init__(
        self, message: str, *, url: str, partial_text: str = "", partial_reasoning: str = ""
    ) -> None:
        super().__init__(message, url=url)
        self.partial_text = partial_text
        self.partial_reasoning = partial_reasoning


class FirstTokenTimeout(StreamError):
    """No token arrived within the first-token budget (prompt processing took too long)."""

    def __init__(
        self, message: str, *, url: str, budget: float, partial_reasoning: str = ""
    ) -> None:
        super().__init__(message, url=url, partial_reasoning=partial_reasoning)
        self.budget = budget


class StreamStalled(StreamError):
    """Text had started to arrive, then nothing new came within the idle budget."""

    def __init__(
        self,
        message: str,
        *,
        url: str,
        budget: float,
        partial_text: str = "",
        partial_reasoning: str = "",
    ) -> None:
        super().__init__(
            message, url=url, partial_text=partial_text, partial_reasoning=partial_reasoning
        )
        self.budget = budget


class StreamInterrupted(StreamError):
    """The connection broke, or the stream ended without a finish signal."""


class ServerStreamError(StreamError):
    """The server reported an error inside the event stream."""

    def __init__(
        self,
        message: str,
        *,
        url: str,
        server_message: str | None,
        partial_text: str = "",
        partial_reasoning: str = "",
    ) -> None:
        super().__init__(
            message, url=url, partial_text=partial_text, partial_reasoning=partial_reasoning
        )
        self.server_message = server_message


class ProtocolError(StreamError):
    """The server's answer is not an OpenAI-style event stream; ``line`` is the offending part."""

    def __init__(
        self,
        message: str,
        *,
        url: str,
        line: str,
        partial_text: str = "",
        partial_reasoning: str = "",
    ) -> None:
        super().__init__(
            message, url=url, partial_text=partial_text, partial_reasoning=partial_reasoning
        )
        self.line = line
