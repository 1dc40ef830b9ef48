"""LMStudioClient: streaming chat completions from LM Studio (or any OpenAI-style server) on httpx.

The one place where httpx exceptions and server replies become lmstream_nb errors: httpx
exceptions are mapped by ``LMStudioClient._translate`` (httpx's own ``map_httpcore_exceptions``
is the model: one table, used by streams, blocking requests and the model list), refusals by
``LMStudioClient._refuse``, and one retry loop (``LMStudioClient._retrying``) serves the stream
before its first token and the blocking request alike.

What a server sends is bounded before it is held: one SSE line or event by ``max_event_bytes``,
a whole JSON body by the same figure, an error body by 1 MiB. A compressed body is refused
rather than decoded (see ``LMStudioClient``), redirects are reported and never followed, and
text the server sends back is scrubbed of the client's own credentials before it reaches any
message or attribute.

Time budgets are enforced by a watchdog timer rather than by httpx's read timeout, for two
reasons. First, the first-token budget spans several reads (headers, keep-alive comments, a
role-only chunk) and must not restart on each of them, while the idle budget starts again at
every new piece of text. Second, a per-read cancel scope costs a few microseconds per chunk;
the watchdog costs one float store, because its single timer only re-arms itself when it fires
early (the deadline has moved on meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import enum
import functools
import html
import math
import re
import ssl
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    Sequence,
)
from dataclasses import replace
from functools import partial
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import certifi
import httpx

from ._config import (
    MIN_SECRET_CHARS,
    Budgets,
    Retries,
    base_url_source,
    parse_base_url,
    redact_url,
    resolve_api_key,
    resolve_base_url,
)
from ._errors import (
    AuthenticationError,
    FirstTokenTimeout,
    HTTPStatusError,
    InvalidBaseURL,
    ModelNotFound,
    ModelNotLoaded,
    PromptTooLong,
    ProtocolError,
    RedirectNotFollowed,
    RequestError,
    RequestTimedOut,
    ServerStreamError,
    ServerUnreachable,
    StreamError,
    StreamInterrupted,
    StreamStalled,
    UnsupportedRequest,
    term,
)
from ._events import (
    Completion,
    Event,
    LoadProgress,
    Progress,
    PromptProgress,
    ServerStats,
    Stats,
    StreamFinished,
    StreamStarted,
)
from ._routes import (
    APIS,
    UNKNOWN,
    Route,
    ServerInfo,
    choose,
    native_root,
    read_llamacpp_props,
    read_native_models,
    reports_progress,
)
from ._sse import (
    DEFAULT_MAX_BYTES,
    BadChunk,
    ChatStreamDecoder,
    NativeChatDecoder,
    NotJSON,
    Reading,
    ServerReported,
    StreamViolation,
    TooLarge,
    error_message_of,
    parse_json,
    parse_object,
)

Messages = Sequence[Mapping[str, Any]] | str
T = TypeVar("T")

RETRY_STATUSES = frozenset({429, 502, 503, 504})
_ERROR_BODY_LIMIT = 1 << 20
_DRAIN_S = 1.0  # how long to wait for the end of the body after [DONE]
_PROGRESS_EVERY_S = 0.25  # progress reaches consumers at most this often (a phase's end always)
_PROBE_S = 15.0  # the most a probe of the server may take; then the client assumes /v1 only
_PROBE_BYTES = 4 * 2**20  # LM Studio's model list with hundreds of models is well under this
# httpx exceptions by what happened: the connection could not be made, or it broke.
_CONNECT = (httpx.ConnectError, httpx.ConnectTimeout)
_BROKEN = (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError)


async def within(awaitable: Awaitable[T], timeout: float | None) -> T:
    """``awaitable``'s result, or ``asyncio.TimeoutError`` after ``timeout`` s (None: no limit).

    Why not ``asyncio.wait_for``: before Python 3.12 it returns the result when its caller is
    cancelled just as the awaitable finishes, so a Ctrl-C or a Stop pressed then was lost.
    Here a cancellation always goes on, after the awaitable has been cancelled too.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        await asyncio.wait({task})
        raise
    if not done:
        task.cancel()
        await asyncio.wait({task})
        raise asyncio.TimeoutError
    return task.result()


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context for every client of the process, with the CA bundle httpx itself uses.

    httpx builds a context per client by default, which loads the whole bundle: about 100 ms a
    client here, more under load, and with the event loop blocked meanwhile (a batch or the
    benchmark makes clients as it goes). A local server is usually plain http anyway.
    """
    return ssl.create_default_context(cafile=certifi.where())


class _Unset(enum.Enum):
    UNSET = 0


_UNSET = _Unset.UNSET


def _as_messages(messages: Messages) -> list[Mapping[str, Any]]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return list(messages)


def _quote(text: str | None, limit: int = 300) -> str:
    if not text:
        return "no message"
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit] + "…"
    return f'"{text}"'


_TAG = re.compile(r"<[^>]+>")
_SCRIPT = re.compile(r"<(script|style)[^>]*>.*?</\1>", re.IGNORECASE | re.DOTALL)
_CONTEXT_PATTERNS = (
    "context length",
    "context size",
    "context window",
    "n_ctx",
    "context the overflows",
    "exceed_context_size",
    "maximum context",
)


def _body_message(body: bytes, content_type: str) -> str | None:
    """The server's own explanation from an error body: JSON, HTML, plain text or nothing."""
    text = body.decode("utf-8", "replace").strip()
    if not text:
        return None
    if "json" in content_type or text[:1] in "{[":
        obj = parse_json(text)
        if obj is not None:
            return error_message_of(obj) or text
    if "html" in content_type or text[:1] == "<":
        text = _SCRIPT.sub(" ", text)
        stripped = " ".join(_TAG.sub(" ", text).split())
        return html.unescape(stripped) or None
    return text


def _error_code(body: bytes) -> str | None:
    obj = parse_json(body)
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict):
            for key in ("code", "type"):
                value = err.get(key)
                if isinstance(value, str):
                    return value
    return None


def _context_counts(body: bytes) -> tuple[int | None, int | None]:
    """llama.cpp's overflow refusal names both numbers (``n_prompt_tokens``, ``n_ctx``)."""
    obj = parse_json(body)
    err = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(err, dict):
        return None, None
    counts = [err.get("n_prompt_tokens"), err.get("n_ctx")]
    prompt, context = (c if type(c) is int and c > 0 else None for c in counts)
    return prompt, context


def _classify(
    *,
    status: int,
    message: str | None,
    code: str | None,
    url: str,
    model: str | None,
    prompt_tokens: int | None = None,
    context_length: int | None = None,
) -> HTTPStatusError:
    """One HTTP failure → the most specific error, with a sentence saying what to do."""
    low = (message or "").lower()
    said = _quote(message)
    if status in (401, 403) or code == "invalid_api_key":
        return AuthenticationError(
            f"The server at {url} refused the request (HTTP {status}: {said}): "
            f"{term('key')} and run again.",
            url=url,
            status=status,
            server_message=message,
        )
    if "no models loaded" in low or "no model loaded" in low:
        return ModelNotLoaded(
            f"No model is loaded in the server at {url} ({said}): load one in LM Studio's "
            "Developer tab (or run `lms load <model>`) and run again.",
            url=url,
            status=status,
            server_message=message,
        )
    if "unexpected endpoint" in low:  # LM Studio's answer; "(GET /models)" is no model
        return _unknown_endpoint(status, message, url)
    if (
        code in ("model_not_found", "not_found_error")
        or "invalid model identifier" in low
        or (status == 404 and "model" in low)
    ):
        return ModelNotFound(
            f"The model {model!r} is not available at {url} ({said}): {term('models')} (or "
            "load it in LM Studio) and run again.",
            url=url,
            status=status,
            server_message=message,
            model=model or "",
        )
    if code == "exceed_context_size_error" or any(p in low for p in _CONTEXT_PATTERNS):
        size = "" if prompt_tokens is None else f" ({prompt_tokens:,} tokens)"
        window = "" if context_length is None else f" of {context_length:,} tokens"
        return PromptTooLong(
            f"The prompt{size} does not fit the model's context window{window} at {url} "
            f"({said}): shorten the prompt or load the model with a larger context length, "
            "then run again.",
            url=url,
            status=status,
            server_message=message,
            prompt_tokens=prompt_tokens,
            context_length=context_length,
        )
    if status == 404:
        return _unknown_endpoint(status, message, url)
    return HTTPStatusError(
        f"The server at {url} answered HTTP {status} ({said}): check the server's log, fix "
        "the request or wait until the server is ready, then run again.",
        url=url,
        status=status,
        server_message=message,
    )


def _unknown_endpoint(status: int, message: str | None, url: str) -> HTTPStatusError:
    """The server has no such endpoint: almost always a base URL without its ``/v1``."""
    path = urlsplit(url).path.rstrip("/")
    if not path.endswith("/v1"):
        fix = f"use {url.rstrip('/')}/v1 as the base URL (LM Studio's API lives under /v1)"
    else:
        fix = "check that the base URL points at the OpenAI-compatible API"
    return HTTPStatusError(
        f"The server at {url} does not know this endpoint (HTTP {status}: {_quote(message)}), "
        f"so the base URL is not its API: {fix}.",
        url=url,
        status=status,
        server_message=message,
    )


def is_chat_model(model_id: str, kind: object = None) -> bool:
    """Whether a listed model can answer chat requests, the one rule every model picker uses.

    ``kind`` is the entry's ``type`` where the server gives one (LM Studio's ``/api/v0``
    listing says ``llm``, ``vlm`` or ``embeddings``); ``/v1/models`` of LM Studio and
    llama.cpp give none, so the id decides: embedding models are named for it
    (``text-embedding-nomic-embed-text-v1.5``, ``bge-m3-embed``).
    """
    if isinstance(kind, str) and kind:
        return "embed" not in kind.lower()
    return "embed" not in model_id.lower()


def describe_model(model_id: str, kind: object = None) -> str:
    """A model's id as listings show it (``lmstream models``, ``%lmstream models``): marked
    when it is not for chat, so nobody picks an embedding model to run a prompt."""
    return (
        model_id
        if is_chat_model(model_id, kind)
        else f"{model_id}  (embedding model, not for chat)"
    )


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _Retryable(Exception):
    """Internal: a failure before the first token that may be retried."""

    def __init__(
        self, error: RequestError, retry_after: float | None = None, *, stale: bool = False
    ) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after
        # The server closed a kept-alive connection just as we reused it: retry at once.
        self.stale = stale


_Phrase = Callable[[BaseException], RequestError]


class _Translating:
    """``with client._translating(...)``: httpx exceptions inside become lmstream errors.

    A class rather than a generator-based context manager: it is entered once per read while
    a stream waits for its first token, and it must let ``StopAsyncIteration`` pass untouched.
    """

    __slots__ = ("broke", "client", "failed", "retry", "stale")

    def __init__(
        self,
        client: LMStudioClient,
        broke: _Phrase,
        failed: _Phrase | None,
        *,
        retry: bool,
        stale: bool,
    ) -> None:
        self.client = client
        self.broke = broke
        self.failed = failed or broke
        self.retry = retry
        self.stale = stale

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, httpx.HTTPError):
            raise self.client._translate(
                exc, self.broke, self.failed, retry=self.retry, stale=self.stale
            ) from exc


class _Watchdog:
    """Cancels the task reading the stream once the server has been silent past ``deadline``.

    ``deadline`` is a loop time that the stream moves forward; ``waiting`` is true only while
    the stream awaits the server, so time the consumer spends on its own work never counts.
    """

    __slots__ = ("deadline", "extend", "fired", "handle", "loop", "task", "waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.deadline = math.inf
        # Asked once the deadline has passed: a later deadline, if the wait is still justified.
        self.extend: Callable[[], float] | None = None
        self.waiting = False
        self.fired = False
        self.handle: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[Any] | None = None

    def move_deadline(self, deadline: float) -> None:
        """Set a deadline that may be earlier than the armed timer (plain stores only go later)."""
        self.deadline = deadline
        if self.handle is not None and deadline < self.handle.when():
            self.handle.cancel()
            self.handle = None

    def enter(self) -> None:
        self.waiting = True
        self.task = asyncio.current_task()
        if self.handle is None and self.deadline != math.inf:
            self.handle = self.loop.call_at(self.deadline, self.check)

    def check(self) -> None:
        self.handle = None
        if not self.waiting or self.deadline == math.inf:
            return  # re-armed by the next enter()
        now = self.loop.time()
        if now >= self.deadline and self.extend is not None:
            self.deadline = max(self.deadline, self.extend())
        if now < self.deadline:
            self.handle = self.loop.call_at(self.deadline, self.check)
            return
        self.fired = True
        if self.task is not None:
            self.task.cancel()

    def owns_cancellation(self) -> bool:
        """True when a CancelledError came from this watchdog alone (not from the user too)."""
        if not self.fired:
            return False
        task = self.task
        uncancel = getattr(task, "uncancel", None)
        if uncancel is None:  # Python 3.10: no cancel counting
            return True
        uncancel()
        return not task.cancelling()  # type: ignore[union-attr]

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.waiting = False


def _number(obj: Mapping[str, Any] | None, key: str) -> float | None:
    """A finite number >= 0 from a server's stats object, else None (never a wrong type)."""
    value = obj.get(key) if obj else None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and math.isfinite(value) and value >= 0:  # type: ignore[arg-type,operator]
        return float(value)  # type: ignore[arg-type]
    return None


def _whole(obj: Mapping[str, Any] | None, key: str) -> int | None:
    value = obj.get(key) if obj else None
    return value if type(value) is int and value >= 0 else None


class _ProgressClock:
    """Dates, paces and estimates one stream's progress readings.

    A reading becomes an event only when it changes something, and at most every
    ``_PROGRESS_EVERY_S`` (the start and the end of a phase always pass). The estimate of the
    time left is a straight line through the first reading of the phase and the latest: prompt
    processing runs at a steady speed once it has started, and a fraction computed on the
    tokens that cost time (not those taken from the cache) keeps that line straight.
    """

    __slots__ = (
        "base_cost",
        "base_t",
        "emitted_at",
        "first_at",
        "fraction",
        "load_end",
        "load_start",
        "phase",
        "processed",
        "prompt_end",
        "prompt_start",
        "total",
    )

    def __init__(self) -> None:
        self.phase: str | None = None
        self.fraction = 0.0
        self.processed: int | None = None
        self.total: int | None = None
        self.base_t = 0.0
        self.base_cost = 0.0
        self.emitted_at: float | None = None
        self.first_at: float | None = None
        self.load_start: float | None = None
        self.load_end: float | None = None
        self.prompt_start: float | None = None
        self.prompt_end: float | None = None

    def take(self, reading: Reading, now: float, t0: float) -> tuple[bool, Progress | None]:
        """(whether the reading advanced, the event to show now or None).

        Only a rise within a phase, or the next phase, advances: a server that sends falling
        or repeating fractions, or goes back to loading, shows it but gains no time by it.
        """
        if reading.phase == self.phase and reading.fraction == self.fraction:
            return False, None
        if self.first_at is None:
            self.first_at = now
        rank, last_rank = _PHASES.index(reading.phase), _PHASES.index(self.phase)
        advanced = rank > last_rank or (rank == last_rank and reading.fraction > self.fraction)
        cost = _cost(reading)
        if reading.phase != self.phase or reading.fraction < self.fraction:
            self.base_t, self.base_cost = now, cost
            self.emitted_at = None  # a new phase is shown at once
            if reading.phase == "loading":
                self.load_start = now
            else:
                self.prompt_start = now
        self.phase, self.fraction = reading.phase, reading.fraction
        self.processed, self.total = reading.processed, reading.total
        done = reading.fraction >= 1.0
        if done:
            if reading.phase == "loading":
                self.load_end = now
            else:
                self.prompt_end = now
        if not done and self.emitted_at is not None and now - self.emitted_at < _PROGRESS_EVERY_S:
            return advanced, None
        self.emitted_at = now
        eta = None
        if done:
            eta = 0.0
        elif cost > self.base_cost and now > self.base_t:
            eta = (1.0 - cost) * (now - self.base_t) / (cost - self.base_cost)
        elapsed = now - t0
        if reading.phase == "loading":
            return advanced, LoadProgress(reading.fraction, elapsed, eta)
        return advanced, PromptProgress(
            reading.fraction, elapsed, eta, reading.processed, reading.total, reading.cached
        )

    def where(self) -> str:
        """Where progress stopped, as a phrase: "prompt processing stopped at 43% (…)"."""
        what = "model loading" if self.phase == "loading" else "prompt processing"
        place = f"{what} stopped at {self.fraction:.0%}"
        if self.processed is not None and self.total is not None:
            place += f" ({self.processed:,} of {self.total:,} prompt tokens)"
        return place


_PHASES = (None, "loading", "prompt")  # the order in which a request goes through them


def _cost(reading: Reading) -> float:
    """The part of the phase that costs time: llama.cpp's cached tokens come for free."""
    total, cached, processed = reading.total, reading.cached, reading.processed
    if total is not None and processed is not None and cached and total > cached:
        return max(0.0, min(1.0, (processed - cached) / (total - cached)))
    return reading.fraction


class ChatStream:
    """One streamed chat completion: an async iterator of events, and the text received so far.

    Use ``async with client.stream_chat(...) as stream: async for event in stream: ...``.
    Leaving the block, breaking out of the loop, cancelling the task or Ctrl-C closes the HTTP
    response at once, so the server stops generating. ``text`` and ``reasoning`` are valid at
    any time, also after a failure (the exception carries them too).

    The work happens in a separate ``_StreamRun`` whose generator never refers back to this
    object: without that cycle, a stream abandoned mid-loop is freed at once, and the event
    loop's async-generator finaliser closes its response right away instead of whenever the
    garbage collector runs.
    """

    def __init__(
        self,
        client: LMStudioClient,
        body: dict[str, Any],
        budgets: Budgets,
        retries: Retries,
    ) -> None:
        self._run = _StreamRun(client, body, budgets, retries)
        self._agen = self._run.generate()
        self.model: str = self._run.model
        self.request_id: str = self._run.request_id

    @property
    def api(self) -> str:
        """The endpoint this stream uses: ``"native"`` (LM Studio's ``/api/v1/chat``) or
        ``"openai"`` (``/chat/completions``); ``api_reason`` says why."""
        return self._run.api

    @property
    def api_reason(self) -> str:
        return self._run.api_reason

    @property
    def context_length(self) -> int | None:
        """The loaded context the prompt must fit, where the server says it (else None)."""
        return self._run.context_length

    @property
    def reports_progress(self) -> bool | None:
        """Whether the server will report prompt processing before the first token (see
        ``_routes.reports_progress``); None until the stream has started and decided."""
        return self._run.reports_progress

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._agen

    async def __anext__(self) -> Event:
        return await self._agen.__anext__()

    async def aclose(self) -> None:
        """Stop the stream and release the connection (the server stops generating)."""
        await self._agen.aclose()

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def text(self) -> str:
        return self._run._decoder.text

    @property
    def reasoning(self) -> str:
        return self._run._decoder.reasoning

    @property
    def response_id(self) -> str | None:
        """The server's completion id (``chatcmpl-…``), known once the first chunk arrived."""
        return self._run._decoder.response_id

    def tail(self, text_pos: int = 0, reasoning_pos: int = 0) -> tuple[str, str, int, int]:
        """Text and reasoning received since two offsets, and the offsets to pass next time.

        Lets a recorder save what is new without keeping its own copy of every chunk.
        """
        return self._run._decoder.tail(text_pos, reasoning_pos)

    @property
    def finished(self) -> StreamFinished | None:
        """The final event once the stream ended normally, else None."""
        return self._run.finished

    def stats(self) -> Stats:
        """Figures measured so far (also meaningful for a failed or cancelled stream)."""
        run = self._run
        return run.stats_at(asyncio.get_running_loop().time() if run.t0 else 0.0)

    async def collect(self) -> Completion:
        """Consume the whole stream and return the finished answer."""
        async with self:
            async for _ in self._agen:
                pass
        finished = self._run.finished
        assert finished is not None
        return Completion(
            text=self.text,
            reasoning=self.reasoning,
            finish_reason=finished.finish_reason,
            model=finished.model,
            response_id=finished.response_id,
            stats=finished.stats,
        )


class _StreamRun:
    """The state and the work of one stream (see ChatStream for why they are apart)."""

    def __init__(
        self,
        client: LMStudioClient,
        body: dict[str, Any],
        budgets: Budgets,
        retries: Retries,
    ) -> None:
        self._client = client
        self._body = body
        self._budgets = budgets
        self._retries = retries
        self.model: str = body["model"]
        self.request_id = uuid.uuid4().hex
        # Decided when the stream starts (the client may first have to probe the server).
        self.api = "pending" if client.api == "auto" else client.api
        self.api_reason = "not decided yet: the stream has not started"
        self.context_length: int | None = None
        self.reports_progress: bool | None = None
        self._route = Route("openai", "")
        self._progress = _ProgressClock()
        self._ended_empty = False  # the last attempt's body ended with no event at all
        self._decoder = ChatStreamDecoder(client.max_event_bytes)
        self._response: httpx.Response | None = None
        self._raw: AsyncIterator[bytes] | None = None
        self._started = False
        self.t0 = 0.0
        self._t_first: float | None = None
        self.finished: StreamFinished | None = None

    @property
    def text(self) -> str:
        return self._decoder.text

    @property
    def reasoning(self) -> str:
        return self._decoder.reasoning

    # -- the work --------------------------------------------------------------------------

    def stats_at(self, now: float) -> Stats:
        dec = self._decoder
        ttft = None if self._t_first is None else self._t_first - self.t0
        usage = dec.usage or {}
        prompt_tokens = usage.get("prompt_tokens")
        completion_tokens = usage.get("completion_tokens")
        tps = None
        # One token says nothing about speed (it would divide by the time of one read).
        if (
            isinstance(completion_tokens, int)
            and completion_tokens > 1
            and self._t_first is not None
        ):
            gen_time = now - self._t_first
            if gen_time > 0:
                tps = completion_tokens / gen_time
        prompt_tokens = prompt_tokens if isinstance(prompt_tokens, int) else None
        clock = self._progress
        sign = clock.first_at if clock.first_at is not None else self._t_first
        load_s = dec.load_s
        if load_s is None and clock.load_start is not None and clock.load_end is not None:
            load_s = clock.load_end - clock.load_start
        timings = dec.timings
        prompt_ms = _number(timings, "prompt_ms")
        prompt_s = None if prompt_ms is None else prompt_ms / 1000
        if prompt_s is None and clock.prompt_start is not None and self._t_first is not None:
            prompt_s = self._t_first - clock.prompt_start
        if prompt_s is None:
            prompt_s = _number(dec.server, "time_to_first_token_seconds")
        prompt_tps = _number(timings, "prompt_per_second")
        if prompt_tps is None and prompt_tokens and prompt_s:
            prompt_tps = prompt_tokens / prompt_s
        return Stats(
            ttft_s=ttft,
            duration_s=max(0.0, now - self.t0),
            chunks=dec.chunks,
            text_chars=dec.text_chars,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens if isinstance(completion_tokens, int) else None,
            tokens_per_s=tps,
            first_progress_s=None if sign is None else sign - self.t0,
            load_s=load_s,
            prompt_s=prompt_s,
            prompt_tokens_per_s=prompt_tps,
        )

    def _server_stats(self) -> ServerStats | None:
        """The server's own figures: LM Studio's ``chat.end`` stats or llama.cpp's timings."""
        dec = self._decoder
        usage = dec.usage
        if dec.server is not None:
            stats = dec.server
            return ServerStats(
                input_tokens=_whole(stats, "input_tokens"),
                output_tokens=_whole(stats, "total_output_tokens"),
                reasoning_tokens=_whole(stats, "reasoning_output_tokens"),
                tokens_per_s=_number(stats, "tokens_per_second"),
                ttft_s=_number(stats, "time_to_first_token_seconds"),
                load_s=_number(stats, "model_load_time_seconds"),
            )
        if dec.timings is not None:
            timings = dec.timings
            details = usage.get("prompt_tokens_details") if usage else None
            prompt_ms = _number(timings, "prompt_ms")
            return ServerStats(
                input_tokens=_whole(usage, "prompt_tokens"),
                output_tokens=_whole(usage, "completion_tokens"),
                cached_tokens=_whole(details, "cached_tokens")
                if isinstance(details, dict)
                else None,
                tokens_per_s=_number(timings, "predicted_per_second"),
                prompt_s=None if prompt_ms is None else prompt_ms / 1000,
                prompt_tokens_per_s=_number(timings, "prompt_per_second"),
            )
        return None

    def _finish(self, loop: asyncio.AbstractEventLoop) -> StreamFinished:
        dec = self._decoder
        self.finished = StreamFinished(
            finish_reason=dec.finish_reason,
            stats=self.stats_at(loop.time()),
            model=dec.model,
            response_id=dec.response_id,
            server_stats=self._server_stats(),
        )
        return self.finished

    async def generate(self) -> AsyncGenerator[Event, None]:
        loop = asyncio.get_running_loop()
        watchdog = _Watchdog(loop)
        self.t0 = loop.time()
        client = self._client
        first_token = self._budgets.first_token
        if first_token is not None:
            watchdog.deadline = self.t0 + first_token
            watchdog.extend = partial(client._first_token_deadline, self.t0, first_token)
        answering = False
        try:
            await self._decide()
            attempts = client._retrying(
                partial(self._attempt, watchdog),
                self._retries,
                deadline=lambda: watchdog.deadline,
            )
            try:
                async with contextlib.aclosing(attempts):
                    async for event in attempts:
                        yield event
            except StreamInterrupted as exc:
                if self._ended_empty:
                    raise await self._empty_stream(exc) from None
                raise
            watchdog.extend = None
            client._answering += 1
            client._progress_at = loop.time()
            answering = True
            dec = self._decoder  # the attempt that succeeded made a fresh one
            raw = self._raw
            assert raw is not None
            read = raw.__anext__
            idle = self._budgets.idle
            now = loop.time
            current_task = asyncio.current_task
            watchdog.move_deadline(math.inf if idle is None else now() + idle)
            ended = False
            while not dec.done:
                # watchdog.enter(), inlined: this loop runs once per chunk.
                watchdog.waiting = True
                watchdog.task = current_task()
                if watchdog.handle is None and idle is not None:
                    watchdog.handle = loop.call_at(watchdog.deadline, watchdog.check)
                try:
                    chunk = await read()
                except StopAsyncIteration:
                    ended = True
                    break
                finally:
                    watchdog.waiting = False
                try:
                    events = dec.feed(chunk)
                except StreamViolation as exc:
                    for event in exc.before:  # the text before the error is the user's
                        yield event
                    raise
                if events:
                    for event in events:
                        yield event
                    if idle is not None:
                        watchdog.deadline = now() + idle
            if not dec.complete:
                raise self._interrupted("ended without a finish signal")
            if not ended:
                # Read the end of the body after [DONE] so httpx can keep the connection for
                # the next request (a closed half-read response costs a new TCP connection).
                watchdog.move_deadline(now() + _DRAIN_S)
                watchdog.enter()
                try:
                    while True:
                        await read()
                except StopAsyncIteration:
                    pass
                finally:
                    watchdog.waiting = False
            yield self._finish(loop)
        except asyncio.CancelledError:
            if not watchdog.owns_cancellation():
                raise
            if self._t_first is not None and self._decoder.complete:
                yield self._finish(loop)  # the answer was whole; only [DONE] was late
                return
            raise self._timeout_error() from None
        except httpx.HTTPError as exc:
            if self._decoder.complete and isinstance(exc, _BROKEN):
                yield self._finish(loop)  # broke after the finish chunk: nothing was lost
                return
            raise client._translate(exc, self._broke_off, self._failed) from exc
        except StreamViolation as exc:
            raise client._violation(
                exc, self.model, self._kept(), self.text, self.reasoning
            ) from None
        finally:
            watchdog.close()
            if answering:
                client._answering -= 1
                client._progress_at = loop.time()
            if self._response is not None:
                await self._response.aclose()

    async def _decide(self) -> None:
        """Where this request goes (see ``_routes.choose``), and the context check before it.

        Against llama.cpp the request asks for ``return_progress``; against a server that says
        its context (LM Studio's model list, llama.cpp's ``/props``) and can count the prompt's
        tokens (llama.cpp), a prompt that cannot fit is refused here, before minutes of prompt
        processing would end in the same refusal.
        """
        client = self._client
        info = await client.server_info()
        route = choose(client.api, info, self._body)
        if client.api == "native" and route.api != "native":
            raise UnsupportedRequest(
                f"This request cannot go to LM Studio's native chat ({route.reason}): use "
                "api='auto' to send such requests to /chat/completions.",
                reason=route.reason,
            )
        self._route = route
        self.api, self.api_reason = route.api, route.reason
        if info.kind == "llamacpp" and route.api == "openai":
            self._body.setdefault("return_progress", True)
        self.reports_progress = reports_progress(route, info, self._body)
        self.context_length = info.context_of(self.model)
        if client.check_context and self.context_length is not None and info.kind == "llamacpp":
            await client._check_fits(self._body, self.context_length)

    async def _empty_stream(self, exc: StreamInterrupted) -> StreamInterrupted:
        """An event stream that ended empty, with no error: name the likely cause.

        llama-cpp-python's server answers a prompt over its context this way (the error goes
        only to its log). It tells no context size, but it counts tokens, so the sentence can
        give the prompt's size; a server that cannot count keeps the general sentence.
        """
        count = await self._client._count_extras(self._body.get("messages") or ())
        if count is None:
            return exc
        url = self._client.url
        return StreamInterrupted(
            f"The stream from {url} ended before the first token with no error, which is "
            f"how llama-cpp-python's server answers a prompt longer than its context: the "
            f"prompt has {count:,} tokens, so shorten it or start the server with a larger "
            "context (--n_ctx), then run again.",
            url=url,
        )

    def _on_reading(self, reading: Reading, watchdog: _Watchdog) -> Progress | None:
        """A progress reading before the first token: the budgets, then maybe an event.

        The rules (see Budgets): progress is a sign of life. While a phase advances, the wait
        ends only once nothing new came for the idle budget (never before the first-token
        budget would have ended it); a finished phase starts the first-token budget again,
        since what follows (a queue, a phase that reports nothing) is silent.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        advanced, event = self._progress.take(reading, now, self.t0)
        if advanced:
            # The server visibly works on one of this client's requests: the ones it queues
            # behind it are waiting their turn, not stuck (see Budgets).
            self._client._progress_at = now
            first_token, idle = self._budgets.first_token, self._budgets.idle
            if reading.fraction >= 1.0:
                watchdog.extend = (
                    None
                    if first_token is None
                    else partial(self._client._first_token_deadline, now, first_token)
                )
                watchdog.move_deadline(math.inf if first_token is None else now + first_token)
            else:
                watchdog.extend = None
                floor = math.inf if first_token is None else self.t0 + first_token
                watchdog.move_deadline(math.inf if idle is None else max(now + idle, floor))
        return event

    async def _attempt(self, watchdog: _Watchdog) -> AsyncGenerator[Event, None]:
        """One request, read up to its first token; a failure that is safe to retry is raised
        as ``_Retryable`` (with this attempt's response closed)."""
        try:
            async with contextlib.aclosing(self._attempt_events(watchdog)) as events:
                async for event in events:
                    yield event
        except _Retryable:
            if self._response is not None:
                await self._response.aclose()
                self._response = None
            raise

    async def _attempt_events(self, watchdog: _Watchdog) -> AsyncGenerator[Event, None]:
        client = self._client
        native = self._route.native_body
        dec: ChatStreamDecoder
        if native is not None:
            limit = native.get("max_output_tokens")
            self._decoder = dec = NativeChatDecoder(
                client.max_event_bytes, limit if isinstance(limit, int) else None
            )
            path, body = client._native_path("/chat"), native
        else:
            self._decoder = dec = ChatStreamDecoder(client.max_event_bytes)
            path, body = client._path("/chat/completions"), self._body
        request = client._http.build_request(
            "POST",
            path,
            json=body,
            headers={"X-Request-Id": self.request_id, "Accept": "text/event-stream"},
        )
        watchdog.enter()
        try:
            with client._translating(self._reset, self._failed, retry=True, stale=True):
                self._response = response = await client._http.send(request, stream=True)
        finally:
            watchdog.waiting = False
        await client._refuse(response, self.model, retry=True, watchdog=watchdog)
        content_type = response.headers.get("content-type", "")
        if content_type and not content_type.startswith("text/event-stream"):
            for event in await self._not_a_stream(response, content_type, watchdog):
                yield event
            return
        if not self._started:
            self._started = True
            yield self._started_event()
        stream = response.stream
        # The response's own byte stream, without aiter_raw's re-chunking layer: one
        # async-generator hop less per chunk. response.aclose() still closes it.
        if isinstance(stream, httpx.AsyncByteStream):
            self._raw = raw = stream.__aiter__()
        else:
            self._raw = raw = response.aiter_raw()
        translating = client._translating(self._reset, self._failed, retry=True, stale=False)
        while True:
            watchdog.enter()
            try:
                with translating:
                    chunk = await raw.__anext__()
            except StopAsyncIteration:
                # Ended cleanly with nothing in it: nothing was received, so a retry is safe.
                self._ended_empty = not dec.chunks and not dec.has_partial_event
                raise _Retryable(self._interrupted("ended before the first token")) from None
            finally:
                watchdog.waiting = False
            try:
                events = dec.feed(chunk)
            except StreamViolation as exc:
                if dec.saw_output:
                    self._t_first = asyncio.get_running_loop().time()
                for event in exc.before:
                    yield event
                raise
            reading = dec.progress
            if reading is not None:
                dec.progress = None
                progress = self._on_reading(reading, watchdog)
                if progress is not None:
                    yield progress
            first = dec.saw_output or dec.done
            if first:
                self._t_first = asyncio.get_running_loop().time()
            for event in events:
                yield event
            if first:
                return

    def _started_event(self) -> StreamStarted:
        return StreamStarted(
            model=self.model,
            request_id=self.request_id,
            url=self._client.url,
            api=self.api,
            context_length=self.context_length,
        )

    async def _not_a_stream(
        self, response: httpx.Response, content_type: str, watchdog: _Watchdog
    ) -> list[Event]:
        """A 2xx answer that is not an event stream: an error in disguise, or a whole answer."""
        client = self._client
        body = await client._read_json_body(response, watchdog)
        url = client.url
        if "json" in content_type:
            obj = parse_json(body)
            if isinstance(obj, dict) and "error" in obj:
                raise _classify(
                    status=response.status_code,
                    message=client._scrub(error_message_of(obj)),
                    code=_error_code(body),
                    url=url,
                    model=self.model,
                )
            if isinstance(obj, dict) and isinstance(obj.get("choices"), list):
                # A server that ignored "stream": true and sent the whole completion.
                events: list[Event] = []
                if not self._started:
                    self._started = True
                    events.append(self._started_event())
                text = body[:400].decode("utf-8", "replace")
                events.extend(self._decoder.feed_completion(obj, text))
                self._t_first = asyncio.get_running_loop().time()
                self._raw = _empty()
                return events
        shown = client._scrub(_body_message(body, content_type))
        raise ProtocolError(
            f"The server at {url} answered with {content_type!r} instead of an event stream "
            f"({_quote(shown, 120)}): check that the base URL points at LM Studio's "
            "OpenAI-compatible API (usually ending in /v1).",
            url=url,
            line=(shown or "")[:200],
        )

    # -- errors with context ---------------------------------------------------------------

    def _kept(self) -> str:
        return term("kept", str(self._decoder.text_chars))

    def _interrupted(self, what: str, exc: BaseException | None = None) -> StreamInterrupted:
        url = self._client.url
        return StreamInterrupted(
            f"The stream from {url} {what}{self._client._detail(exc)}, and {self._kept()}: "
            "check that the server is still running, then run again.",
            url=url,
            partial_text=self.text,
            partial_reasoning=self.reasoning,
        )

    def _reset(self, exc: BaseException) -> StreamInterrupted:
        return self._interrupted("was reset before the first token", exc)

    def _broke_off(self, exc: BaseException) -> StreamInterrupted:
        return self._interrupted("broke off", exc)

    def _failed(self, exc: BaseException) -> StreamInterrupted:
        return self._interrupted("failed", exc)

    def _timeout_error(self) -> StreamError:
        url = self._client.url
        clock = self._progress
        if self._t_first is None and clock.phase is not None and clock.fraction < 1.0:
            budget = self._budgets.idle or 0.0
            return FirstTokenTimeout(
                f"{clock.where().capitalize()}: nothing new came from {url} for {budget:g} s. "
                "The server may be stuck or overloaded: check it, or "
                f"{term('raise', 'idle_timeout')} if it is just slow, then run again.",
                url=url,
                budget=budget,
                partial_reasoning=self.reasoning,
                phase=clock.phase,
                fraction=clock.fraction,
            )
        if self._t_first is None:
            budget = self._budgets.first_token or 0.0
            return FirstTokenTimeout(
                f"No token arrived from {url} within the first-token budget of {budget:g} s: "
                "the server may still be processing a long prompt, so "
                f"{term('raise', 'first_token_timeout')} (or shorten the prompt) and run again.",
                url=url,
                budget=budget,
                partial_reasoning=self.reasoning,
            )
        budget = self._budgets.idle or 0.0
        return StreamStalled(
            f"The stream from {url} stalled: nothing new arrived for {budget:g} s, and "
            f"{self._kept()}; {term('raise', 'idle_timeout')} if the server is just slow, then "
            "run again.",
            url=url,
            budget=budget,
            partial_text=self.text,
            partial_reasoning=self.reasoning,
        )


async def _empty() -> AsyncIterator[bytes]:
    nothing: tuple[bytes, ...] = ()
    for chunk in nothing:
        yield chunk


def _size(n: int) -> str:
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n:,} bytes"


class LMStudioClient:
    """Async client for LM Studio's OpenAI-compatible server, with one connection pool.

    ``base_url`` defaults to ``LMSTREAM_BASE_URL`` or ``http://localhost:1234/v1``; a URL that
    cannot work (no ``http://``/``https://``, no host, a port that is not a number, a broken
    IPv6 literal) is refused at once with :class:`InvalidBaseURL`. ``api_key`` defaults to
    ``LMSTREAM_API_KEY``. Use ``async with LMStudioClient() as client:`` so the pool is closed
    at the end.

    Credentials and secrets:

    - The API key is always sent as ``Authorization: Bearer <key>``. ``user:password@`` in the
      base URL is sent as HTTP Basic authentication only when there is no API key (one
      Authorization header cannot carry both, and the key is what LM Studio checks).
    - A query string in the base URL (``?api-version=…&key=…``) is sent with every request.
    - The key, the userinfo and every query value never appear in messages, reprs, records or
      error attributes: ``url`` is the base URL with the userinfo removed and each query value
      shown as ``***``, and text the server sends back (error bodies, in-stream errors,
      offending lines) has every such secret of four or more characters replaced by ``***``
      before it is put in an error.

    Limits, so a broken or hostile server cannot make the client hold more than the answer:

    - ``max_event_bytes`` (default 16 MiB): the most one SSE line or one event may take, and
      the most a whole JSON body (``complete()``, ``list_models()``) may take; past it the
      request fails with a :class:`ProtocolError` and the text received so far is kept.
      Error bodies are read up to 1 MiB, which is plenty for a message.
    - Compressed bodies are refused with one sentence, not decoded. The client asks for
      ``Accept-Encoding: identity``, so only a server that ignores the request compresses;
      decoding would need a decompressor of its own that stops at the limit (httpx's expands
      each network read whole, and a few KB of gzip can expand into gigabytes), for a saving
      that is nil on a local connection.
    - Redirects (3xx) are never followed, so the API key cannot travel to another address;
      they are reported as :class:`RedirectNotFollowed` with the status and the ``Location``.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        budgets: Budgets | None = None,
        retries: Retries | None = None,
        connect_timeout: float | _Unset | None = _UNSET,
        first_token_timeout: float | _Unset | None = _UNSET,
        idle_timeout: float | _Unset | None = _UNSET,
        max_event_bytes: int = DEFAULT_MAX_BYTES,
        api: str = "auto",
        check_context: bool = True,
    ) -> None:
        if api not in APIS:
            raise ValueError(f"api must be one of {', '.join(map(repr, APIS))}, not {api!r}")
        self.api = api
        self.check_context = bool(check_context)
        self.base_url = resolve_base_url(base_url)
        self._url_source = base_url_source(base_url)  # for advice on fixing it
        parsed = parse_base_url(self.base_url)
        self.url = parsed.shown  # what messages and records show
        self._query = parsed.query
        if (
            not isinstance(max_event_bytes, int)
            or isinstance(max_event_bytes, bool)
            or max_event_bytes < 1
        ):
            raise ValueError(
                f"max_event_bytes must be a whole number of bytes >= 1, not {max_event_bytes!r}"
            )
        self.max_event_bytes = max_event_bytes
        budgets = budgets or Budgets()
        if connect_timeout is not _UNSET:
            budgets = replace(budgets, connect=connect_timeout)
        if first_token_timeout is not _UNSET:
            budgets = replace(budgets, first_token=first_token_timeout)
        if idle_timeout is not _UNSET:
            budgets = replace(budgets, idle=idle_timeout)
        self.budgets = budgets
        self.retries = retries or Retries()
        headers = {"Accept-Encoding": "identity", "User-Agent": "lmstream_nb"}
        key = resolve_api_key(api_key)
        auth: httpx.BasicAuth | None = None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        elif parsed.username is not None:
            auth = httpx.BasicAuth(parsed.username, parsed.password or "")
        secrets = {*parsed.secrets, key or ""}
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = tuple(
            sorted((s for s in secrets if len(s) >= MIN_SECRET_CHARS), key=len, reverse=True)
        )
        try:
            self._http = httpx.AsyncClient(
                base_url=parsed.url,  # no userinfo: httpx would turn it into Basic auth
                headers=headers,
                auth=auth,
                # read=None: budgets are enforced per phase by the stream's watchdog.
                timeout=httpx.Timeout(connect=budgets.connect, read=None, write=60.0, pool=None),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
                # A local server must not be routed through a corporate HTTP(S)_PROXY.
                trust_env=False,
                follow_redirects=False,
                # A plain-http server (the usual local one) never needs the CA bundle, whose
                # loading is a good part of a command's start-up: redirects are not followed,
                # so this client makes no TLS connection.
                verify=_tls_context() if parsed.url.startswith("https://") else False,
            )
            # httpx parses the host (IDNA) only when it builds a request: do it once now.
            self._http.build_request("GET", self._path("/models"))
        except (httpx.InvalidURL, ValueError) as exc:  # what our check lets by and httpx not
            raise InvalidBaseURL(
                f"The base URL {self.url!r} cannot be used ({self._scrub(str(exc))}): "
                "write it like http://localhost:1234/v1.",
                url=self.url,
            ) from None
        # Streams of this client past their first token, and when one last started or ended:
        # a busy LM Studio queues requests, and a queued one is not stuck while another
        # stream of ours is being answered (see Budgets.first_token).
        self._answering = 0
        self._progress_at = -math.inf
        # What the server is, found out once (see server_info); the lock makes concurrent
        # first streams share one probe.
        split = urlsplit(parsed.url)
        self._origin = f"{split.scheme}://{split.netloc}"
        root = native_root(split.path)
        self._native = None if root is None else self._origin + root
        self._info: ServerInfo | None = None
        self._probe_lock = asyncio.Lock()

    def _first_token_deadline(self, t0: float, budget: float) -> float:
        """When a stream that started waiting at ``t0`` may give up on its first token."""
        loop = asyncio.get_running_loop()
        if self._answering:
            return loop.time() + budget
        return max(t0, self._progress_at) + budget

    def __repr__(self) -> str:
        return f"LMStudioClient(base_url={self.url!r})"

    async def __aenter__(self) -> LMStudioClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def _path(self, endpoint: str) -> str:
        """An endpoint with the base URL's query string (httpx would put it before the path)."""
        return f"{endpoint}?{self._query}" if self._query else endpoint

    def _native_path(self, endpoint: str) -> str:
        """A native API endpoint (``/chat`` → ``…/api/v1/chat``), as an absolute URL."""
        assert self._native is not None, "only called once the native API was found"
        return self._path(self._native + endpoint)

    # -- what the server is ----------------------------------------------------------------

    async def server_info(self) -> ServerInfo:
        """What kind of server this is, the context of each loaded model and its slots.

        Found out once per client, at its first stream: ``GET /api/v1/models`` beside the base
        URL answers only on LM Studio 0.4 (its native API), llama.cpp's server names itself in
        a ``Server`` header (then ``GET /props``), and anything else is taken as an
        OpenAI-compatible server. A probe that cannot connect is not kept, so a server started
        later is found out then; the request itself reports the failure.
        """
        if self._info is not None:
            return self._info
        async with self._probe_lock:
            settled = self._settled()  # another stream's probe may have ended meanwhile
            if settled is not None:
                return settled
            try:
                info, final = await within(self._probe(), _PROBE_S)
            except asyncio.TimeoutError:
                info, final = UNKNOWN, False
            if final:
                self._info = info
            return info

    def _settled(self) -> ServerInfo | None:
        return self._info

    async def _probe(self) -> tuple[ServerInfo, bool]:
        """(what the server is, whether that is settled)."""
        if self.api == "openai" and not self.check_context:
            return UNKNOWN, True  # nothing the answer could change
        if self._native is None:
            # Not LM Studio's /v1 address; llama.cpp still names itself on any path.
            status, server, obj = await self._get_json(self._path(self._origin + "/props"))
            if status == 200 and server.lower().startswith("llama.cpp"):
                return read_llamacpp_props(obj), True
            return UNKNOWN, status is not None
        status, server, obj = await self._get_json(self._native_path("/models"))
        if status is None:
            return UNKNOWN, False
        if status == 200:
            native = read_native_models(obj)
            if native is not None:
                return native, True
        if server.lower().startswith("llama.cpp"):
            status, _, props = await self._get_json(self._path(self._origin + "/props"))
            return read_llamacpp_props(props if status == 200 else None), status is not None
        return UNKNOWN, status in (200, 404)

    async def _get_json(self, url: str) -> tuple[int | None, str, object]:
        """(status, ``Server`` header, parsed JSON or None) of a small GET, never raising:
        ``status`` is None when no answer came (the real request will say why)."""
        request = self._http.build_request(
            "GET", url, timeout=httpx.Timeout(self.budgets.connect, read=_PROBE_S)
        )
        try:
            response = await self._http.send(request, stream=True)
        except httpx.HTTPError:
            return None, "", None
        try:
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            body = b""
            if 200 <= response.status_code < 300 and encoding in ("", "identity"):
                body = await self._read_body(response, None, _PROBE_BYTES, partial_ok=False)
            obj = parse_json(body) if 0 < len(body) <= _PROBE_BYTES else None
            return response.status_code, response.headers.get("server", ""), obj
        except httpx.HTTPError:
            return None, "", None
        finally:
            await response.aclose()

    async def _count_extras(self, messages: Sequence[Any]) -> int | None:
        """The prompt's tokens from llama-cpp-python's ``POST /extras/tokenize/count``, or
        None where the server has no such endpoint (or anything goes wrong)."""
        text = "\n".join(
            m["content"]
            for m in messages
            if isinstance(m, Mapping) and isinstance(m.get("content"), str)
        )
        status, obj = await self._post_json(
            self._origin + "/extras/tokenize/count", {"input": text}
        )
        count = obj.get("count") if status == 200 and isinstance(obj, dict) else None
        return count if type(count) is int and count >= 0 else None

    async def _post_json(self, url: str, body: dict[str, Any]) -> tuple[int | None, object]:
        """(status, parsed JSON or None) of a small POST beside the chat, never raising."""
        request = self._http.build_request(
            "POST",
            self._path(url),
            json=body,
            timeout=httpx.Timeout(self.budgets.connect, read=_PROBE_S),
        )
        try:
            response = await self._http.send(request, stream=True)
        except httpx.HTTPError:
            return None, None
        try:
            if response.status_code != 200:
                return response.status_code, None
            return 200, parse_json(await self._read_body(response, None, _PROBE_BYTES))
        except httpx.HTTPError:
            return None, None
        finally:
            await response.aclose()

    async def prompt_tokens(self, messages: Messages) -> int | None:
        """The tokens ``messages`` take, counted by the server before anything is sent, where
        it can count them (llama.cpp); None elsewhere (then nothing is checked beforehand)."""
        if (await self.server_info()).kind != "llamacpp":
            return None
        _, obj = await self._post_json(
            "/chat/completions/input_tokens", {"messages": _as_messages(messages)}
        )
        count = obj.get("input_tokens") if isinstance(obj, dict) else None
        return count if type(count) is int and count >= 0 else None

    async def _check_fits(self, body: dict[str, Any], context_length: int) -> None:
        """Refuse, before sending, a prompt that the server counts as longer than its context.

        llama.cpp counts a chat's tokens with its template at
        ``/chat/completions/input_tokens``; a server that cannot count is not checked.
        """
        _, obj = await self._post_json(
            "/chat/completions/input_tokens", {"messages": body["messages"]}
        )
        count = obj.get("input_tokens") if isinstance(obj, dict) else None
        # llama.cpp refuses a prompt that fills the context exactly, too: nothing is left for
        # the answer (measured: "request (256 tokens) exceeds the available context size
        # (256 tokens)").
        if type(count) is int and count >= context_length:
            raise PromptTooLong(
                f"The prompt has {count:,} tokens, too many for the {context_length:,}-token "
                f"context of the model at {self.url}, so it was not sent: shorten the prompt "
                "or load the model with a larger context length, then run again.",
                url=self.url,
                status=0,
                server_message=None,
                prompt_tokens=count,
                context_length=context_length,
            )

    # -- the boundary: httpx exceptions and refusals become lmstream errors -------------------

    def _scrub(self, text: str | None) -> str | None:
        """Server text without the client's own secrets (a server may echo a key back)."""
        if text:
            for secret in self._secrets:
                text = text.replace(secret, "***")
        return text

    def _detail(self, exc: BaseException | None) -> str:
        if exc is None or not str(exc):
            return ""
        return f" ({type(exc).__name__}: {self._scrub(str(exc))})"

    def _translate(
        self,
        exc: httpx.HTTPError,
        broke: _Phrase,
        failed: _Phrase,
        *,
        retry: bool = False,
        stale: bool = False,
    ) -> Exception:
        """The one place an httpx exception becomes an lmstream error.

        No connection → :class:`ServerUnreachable`; the connection broke → ``broke(exc)``;
        anything else → ``failed(exc)``; each call site words the last two for its phase. With
        ``retry`` the first two come wrapped as ``_Retryable`` (``stale``: a broken connection
        may be a kept-alive one the server had just closed, retried at once).
        """
        if isinstance(exc, _CONNECT):
            error: RequestError = self._unreachable(exc)
        elif isinstance(exc, _BROKEN):
            error = broke(exc)
        else:
            return failed(exc)
        if retry:
            return _Retryable(error, stale=stale and isinstance(exc, _BROKEN))
        return error

    def _translating(
        self, broke: _Phrase, failed: _Phrase | None = None, *, retry: bool, stale: bool = False
    ) -> _Translating:
        """``_translate`` as a context manager, for the call sites that wrap a few lines."""
        return _Translating(self, broke, failed, retry=retry, stale=stale)

    def _unreachable(self, exc: BaseException) -> ServerUnreachable:
        reason = "timed out" if isinstance(exc, httpx.TimeoutException) else "refused or failed"
        return ServerUnreachable(
            f"Cannot connect to the model server at {self.url} (connection {reason}): start "
            "LM Studio's local server (Developer tab → Start Server, or `lms server start`), "
            f"{term('url', self._url_source)}.",
            url=self.url,
        )

    async def _refuse(
        self,
        response: httpx.Response,
        model: str | None,
        *,
        retry: bool,
        watchdog: _Watchdog | None = None,
    ) -> None:
        """Raise what a response's status line and headers already say is a failure.

        A redirect, an error status (with the server's own message from a bounded read of
        the body; 429 and 5xx overloads as ``_Retryable`` when ``retry``), or a compressed
        body. Used by streams, blocking requests and the model list alike.
        """
        status = response.status_code
        if 300 <= status < 400:
            raise self._redirect(response)
        compressed = response.headers.get("content-encoding", "identity").strip().lower()
        compressed = "" if compressed in ("", "identity") else compressed
        if status >= 400:
            body = b"" if compressed else await self._read_body(response, watchdog)
            prompt_tokens, context_length = _context_counts(body)
            if context_length is None and model is not None and self._info is not None:
                context_length = self._info.context_of(model)  # LM Studio's model list
            error = _classify(
                status=status,
                message=self._scrub(_body_message(body, response.headers.get("content-type", ""))),
                code=_error_code(body),
                url=self.url,
                model=model,
                prompt_tokens=prompt_tokens,
                context_length=context_length,
            )
            if retry and status in RETRY_STATUSES:
                raise _Retryable(error, _retry_after(response))
            raise error
        if compressed:
            raise ProtocolError(
                f"The server at {self.url} sent a compressed answer (Content-Encoding: "
                f"{compressed}) although the client asked for none, and lmstream does not "
                "decode compressed answers (a small one can expand without bound): turn "
                "compression off in the server or the proxy in front of it.",
                url=self.url,
                line="",
            )

    def _redirect(self, response: httpx.Response) -> RedirectNotFollowed:
        status = response.status_code
        location = response.headers.get("location")
        if not location:
            return RedirectNotFollowed(
                f"The server at {self.url} answered HTTP {status}, a redirect without a "
                "Location, which lmstream does not follow: check the base URL and the "
                "server's configuration.",
                url=self.url,
                status=status,
                location=None,
            )
        target = urljoin(str(response.request.url), location)
        endpoint = response.request.url.path
        suggested = target.partition("?")[0].partition("#")[0]
        for suffix in ("/chat/completions", "/models"):
            if endpoint.endswith(suffix) and suggested.endswith(suffix):
                suggested = suggested[: -len(suffix)]
                break
        shown = self._scrub(redact_url(target)) or ""
        return RedirectNotFollowed(
            f"The server at {self.url} answered HTTP {status}, a redirect to {shown}, which "
            "lmstream does not follow (the API key must not go to another address): if that "
            f"is the right server, set the base URL to {self._scrub(redact_url(suggested))} "
            "and run again.",
            url=self.url,
            status=status,
            location=shown,
        )

    async def _read_body(
        self,
        response: httpx.Response,
        watchdog: _Watchdog | None,
        limit: int = _ERROR_BODY_LIMIT,
        *,
        partial_ok: bool = True,
    ) -> bytes:
        """Up to ``limit + 1`` bytes of a body as sent (never decompressed), then stop reading.

        With ``partial_ok`` (error bodies) a body that breaks off is kept as far as it came:
        the status says enough. Otherwise the break is raised, for the caller to translate.
        """
        body = bytearray()
        if watchdog is not None:
            watchdog.enter()
        try:
            async for part in response.aiter_raw():
                body += part
                if len(body) > limit:
                    break
        except httpx.HTTPError:
            if not partial_ok:
                raise
        finally:
            if watchdog is not None:
                watchdog.waiting = False
        return bytes(body[: limit + 1])

    async def _read_json_body(self, response: httpx.Response, watchdog: _Watchdog | None) -> bytes:
        """A whole 2xx JSON body (a completion, the model list), at most ``max_event_bytes``."""
        body = await self._read_body(response, watchdog, self.max_event_bytes, partial_ok=False)
        if len(body) > self.max_event_bytes:
            raise ProtocolError(
                f"The answer from {self.url} is larger than the limit of "
                f"{_size(self.max_event_bytes)} (max_event_bytes): raise max_event_bytes if "
                "the server really sends answers that large, or stream the answer instead.",
                url=self.url,
                line=self._scrub(body[:200].decode("utf-8", "replace")) or "",
            )
        return body

    def _violation(
        self,
        exc: StreamViolation,
        model: str,
        kept: str,
        text: str = "",
        reasoning: str = "",
        *,
        where: str | None = None,
    ) -> RequestError:
        """A broken rule of the stream (or of a whole completion: ``where``) as a public error."""
        url = self.url
        if isinstance(exc, ServerReported):
            return self._server_reported(exc, model, kept, text, reasoning)
        fix = "check that the base URL points at an OpenAI-compatible API"
        if isinstance(exc, TooLarge):
            what = (
                f"an SSE {exc.kind} longer than the limit of {_size(exc.limit)} (max_event_bytes)"
            )
            fix = "check the server, or raise max_event_bytes if its events really are that large"
            line = exc.line
        elif isinstance(exc, BadChunk):
            line = exc.line
            what = f"{where or 'a chunk'} of the wrong shape ({exc.what}: {self._scrub(line)!r})"
        else:
            assert isinstance(exc, NotJSON)
            line = exc.line
            what = f"{where or 'a data line'} that is not valid JSON ({self._scrub(line)!r})"
        return ProtocolError(
            f"The server at {url} sent {what}, and {kept}: {fix}.",
            url=url,
            line=self._scrub(line) or "",
            partial_text=text,
            partial_reasoning=reasoning,
        )

    def _server_reported(
        self, exc: ServerReported, model: str, kept: str, text: str, reasoning: str
    ) -> RequestError:
        url = self.url
        message = self._scrub(exc.message)
        low = (message or "").lower()
        if not text and ("no models loaded" in low or any(p in low for p in _CONTEXT_PATTERNS)):
            code = None
            if isinstance(exc.body, dict) and isinstance(exc.body.get("error"), dict):
                value = exc.body["error"].get("code")
                code = value if isinstance(value, str) else None
            return _classify(status=200, message=message, code=code, url=url, model=model)
        return ServerStreamError(
            f"The server at {url} reported an error during generation ({_quote(message)}), "
            f"and {kept}: check the server's log, then run again.",
            url=url,
            server_message=message,
            partial_text=text,
            partial_reasoning=reasoning,
        )

    # -- the retry loop ----------------------------------------------------------------------

    async def _retrying(
        self,
        attempt: Callable[[], AsyncGenerator[T, None]],
        retries: Retries,
        *,
        deadline: Callable[[], float] | None = None,
    ) -> AsyncGenerator[T, None]:
        """The one retry loop, for a stream up to its first token and a blocking request.

        ``attempt()`` yields what it produced; a ``_Retryable`` failure starts it again after
        the backoff (or the server's Retry-After), at most ``retries.attempts`` times and
        never past ``deadline()`` (the stream's first-token budget). A kept-alive connection
        the server had just closed is retried once at once, without counting.
        """
        loop = asyncio.get_running_loop()
        number = 0
        stale_retried = False
        while True:
            number += 1
            try:
                items = attempt()
                async with contextlib.aclosing(items):
                    async for item in items:
                        yield item
                return
            except _Retryable as failure:
                if failure.stale and not stale_retried:
                    stale_retried = True
                    number -= 1
                    continue
                if number > retries.attempts:
                    raise failure.error from None
                delay = retries.delay(number)
                if failure.retry_after is not None:
                    delay = max(delay, failure.retry_after)
                if deadline is not None and loop.time() + delay >= deadline():
                    raise failure.error from None
                await asyncio.sleep(delay)

    # -- requests ----------------------------------------------------------------------------

    def _body(
        self,
        messages: Messages,
        model: str,
        temperature: float | None,
        max_tokens: int | None,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "messages": _as_messages(messages)}
        if temperature is not None:
            body["temperature"] = temperature
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        body.update(extra)
        return body

    def _broke_before_answer(self, exc: BaseException) -> RequestError:
        return RequestError(
            f"The connection to {self.url} broke before an answer came{self._detail(exc)}: "
            "check that the server is still running and run again.",
            url=self.url,
        )

    def _request_failed(self, exc: BaseException) -> RequestError:
        return RequestError(
            f"The request to {self.url} failed{self._detail(exc)}: check that the server is "
            "running and run again.",
            url=self.url,
        )

    def _listing_failed(self, exc: BaseException) -> RequestError:
        return RequestError(
            f"Listing models at {self.url} failed{self._detail(exc)}: check that the server "
            "is running and run again.",
            url=self.url,
        )

    async def _fetch(
        self,
        request: httpx.Request,
        model: str | None,
        broke: _Phrase,
        failed: _Phrase | None = None,
        *,
        retry: bool,
    ) -> tuple[httpx.Response, bytes]:
        """Send a request whose answer is one JSON body: the 2xx response and its bytes.

        As for a stream, only a connection that breaks while the request is sent may be a
        stale kept-alive one (retried at once); one that breaks in the answer counts.
        """
        with self._translating(broke, failed, retry=retry, stale=True):
            response = await self._http.send(request, stream=True)
        try:
            with self._translating(broke, failed, retry=retry):
                await self._refuse(response, model, retry=retry)
                return response, await self._read_json_body(response, None)
        finally:
            await response.aclose()

    async def _post(self, body: dict[str, Any], model: str) -> tuple[httpx.Response, bytes]:
        """POST a blocking request, retrying what the stream would retry before its first token.

        Returns the 2xx response and its body (read whole, within ``max_event_bytes``).
        """

        async def attempt() -> AsyncGenerator[tuple[httpx.Response, bytes], None]:
            request = self._http.build_request("POST", self._path("/chat/completions"), json=body)
            yield await self._fetch(
                request, model, self._broke_before_answer, self._request_failed, retry=True
            )

        results = self._retrying(attempt, self.retries)
        async with contextlib.aclosing(results):
            async for result in results:
                return result
        raise AssertionError("an attempt either yields or raises")  # pragma: no cover

    async def list_models(self) -> list[str]:
        """Ids of the models the server offers (with JIT loading on: every downloaded model)."""
        return [model_id for model_id, _ in await self.list_model_kinds()]

    async def chat_models(self) -> list[str]:
        """Ids of the offered models that can chat (embedding models left out)."""
        return [m for m, kind in await self.list_model_kinds() if is_chat_model(m, kind)]

    async def list_model_kinds(self) -> list[tuple[str, str | None]]:
        """Each offered model's id and its ``type`` where the server says one."""
        request = self._http.build_request(
            "GET", self._path("/models"), timeout=httpx.Timeout(self.budgets.connect, read=60.0)
        )
        response, body = await self._fetch(request, None, self._listing_failed, retry=False)
        obj = parse_json(body)
        if not isinstance(obj, dict) or "error" in obj:
            raise _classify(
                status=response.status_code,
                message=self._scrub(_body_message(body, response.headers.get("content-type", ""))),
                code=_error_code(body),
                url=self.url,
                model=None,
            )
        data = obj.get("data")
        if not isinstance(data, list):
            raise ProtocolError(
                f"The model list from {self.url} has no 'data' array: check that the base URL "
                "points at an OpenAI-compatible API.",
                url=self.url,
                line=self._scrub(body[:200].decode("utf-8", "replace")) or "",
            )
        return [
            (m["id"], m["type"] if isinstance(m.get("type"), str) else None)
            for m in data
            if isinstance(m, dict) and isinstance(m.get("id"), str)
        ]

    async def default_model(self) -> str:
        """The server's first chat model (embedding models skipped): LM Studio's loaded one."""
        for model in await self.chat_models():
            return model
        raise ModelNotLoaded(
            f"The server at {self.url} lists no chat model: load one in LM Studio (or run "
            "`lms load <model>`), or name one with model=.",
            url=self.url,
            status=200,
            server_message=None,
        )

    def stream_chat(
        self,
        messages: Messages,
        *,
        model: str,
        temperature: float | None = None,
        max_tokens: int | None = None,
        budgets: Budgets | None = None,
        **extra: Any,
    ) -> ChatStream:
        """Stream a chat completion. Extra keyword arguments go into the request body as they are.

        Usage is requested with ``stream_options.include_usage`` (servers that do not support it
        ignore it); pass ``stream_options=...`` to override.
        """
        body = self._body(messages, model, temperature, max_tokens, extra)
        body.setdefault("stream", True)
        body.setdefault("stream_options", {"include_usage": True})
        return ChatStream(self, body, budgets or self.budgets, self.retries)

    async def complete(
        self,
        messages: Messages,
        *,
        model: str,
        temperature: float | None = None,
        max_tokens: int | None = None,
        timeout: float | None = None,
        **extra: Any,
    ) -> Completion:
        """One blocking (non-streaming) request with a *total* ``timeout``.

        This is the classic way to call a model, kept as the baseline the streaming path is
        measured against: nothing is visible until the whole answer is ready.
        """
        body = self._body(messages, model, temperature, max_tokens, extra)
        body["stream"] = False
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            response, content = await within(self._post(body, model), timeout)
        except asyncio.TimeoutError:
            raise RequestTimedOut(
                f"No answer came from {self.url} within the total timeout of {timeout:g} s, "
                "and a blocking request shows nothing until it is complete: stream the "
                "answer instead, or raise the timeout.",
                url=self.url,
                timeout=timeout or 0.0,
            ) from None
        duration = loop.time() - t0
        decoder = ChatStreamDecoder()
        try:
            obj = parse_object(content)
            if "error" not in obj:
                decoder.feed_completion(obj, content[:400].decode("utf-8", "replace"))
        except StreamViolation as exc:
            raise self._violation(exc, model, "no text had arrived", where="an answer") from None
        if "error" in obj:  # LM Studio answers an unknown path with 200 and an error
            raise _classify(
                status=response.status_code,
                message=self._scrub(
                    _body_message(content, response.headers.get("content-type", ""))
                ),
                code=_error_code(content),
                url=self.url,
                model=model,
            )
        usage = decoder.usage or {}
        completion_tokens = usage.get("completion_tokens")
        return Completion(
            text=decoder.text,
            reasoning=decoder.reasoning,
            finish_reason=decoder.finish_reason,
            model=decoder.model,
            response_id=decoder.response_id,
            stats=Stats(
                ttft_s=duration,
                duration_s=duration,
                chunks=1,
                text_chars=decoder.text_chars,
                prompt_tokens=usage.get("prompt_tokens"),
                completion_tokens=completion_tokens,
                tokens_per_s=(completion_tokens / duration)
                if isinstance(completion_tokens, int) and duration > 0
                else None,
            ),
        )
