"""LMStudioClient: streaming chat completions from LM Studio (or any OpenAI-style server) on httpx.

The one place where httpx exceptions and server replies become lmstream_nb errors.

Time budgets are enforced by a watchdog timer rather than by httpx's read timeout, for two
reasons. First, the first-token budget spans several reads (headers, keep-alive comments, a
role-only chunk) and must not restart on each of them, while the idle budget starts again at
every new piece of text. Second, a per-read cancel scope costs a few microseconds per chunk;
the watchdog costs one float store, because its single timer only re-arms itself when it fires
early (the deadline has moved on meanwhile).
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import html
import json
import math
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from types import TracebackType
from typing import Any

import httpx

from ._config import Budgets, Retries, redact_url, resolve_api_key, resolve_base_url
from ._errors import (
    AuthenticationError,
    FirstTokenTimeout,
    HTTPStatusError,
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
)
from ._events import (
    Completion,
    Event,
    Stats,
    StreamFinished,
    StreamStarted,
)
from ._sse import ChatStreamDecoder, NotJSON, ServerReported, error_message_of

Messages = Sequence[Mapping[str, Any]] | str

RETRY_STATUSES = frozenset({429, 502, 503, 504})
_ERROR_BODY_LIMIT = 1 << 20
_DRAIN_S = 1.0  # how long to wait for the end of the body after [DONE]


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
        try:
            return error_message_of(json.loads(text)) or text
        except ValueError:
            pass
    if "html" in content_type or text[:1] == "<":
        text = _SCRIPT.sub(" ", text)
        stripped = " ".join(_TAG.sub(" ", text).split())
        return html.unescape(stripped) or None
    return text


def _error_code(body: bytes) -> str | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict):
            for key in ("code", "type"):
                value = err.get(key)
                if isinstance(value, str):
                    return value
    return None


def _classify(
    *, status: int, message: str | None, code: str | None, url: str, model: str | None
) -> HTTPStatusError:
    """One HTTP failure → the most specific error, with a sentence saying what to do."""
    low = (message or "").lower()
    said = _quote(message)
    if status in (401, 403) or code == "invalid_api_key":
        return AuthenticationError(
            f"The server at {url} refused the request (HTTP {status}: {said}): set "
            "LMSTREAM_API_KEY, or pass api_key=, to the server's API token and run again.",
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
    if (
        code in ("model_not_found", "not_found_error")
        or "invalid model identifier" in low
        or (status == 404 and "model" in low)
    ):
        return ModelNotFound(
            f"The model {model!r} is not available at {url} ({said}): pick one listed by "
            "`lmstream models` (or load it in LM Studio) and run again.",
            url=url,
            status=status,
            server_message=message,
            model=model or "",
        )
    if code == "exceed_context_size_error" or any(p in low for p in _CONTEXT_PATTERNS):
        return PromptTooLong(
            f"The prompt does not fit the model's context window at {url} ({said}): shorten "
            "the prompt or load the model with a larger context length, then run again.",
            url=url,
            status=status,
            server_message=message,
        )
    if "unexpected endpoint" in low or status == 404:
        return HTTPStatusError(
            f"The server at {url} does not know this endpoint (HTTP {status}: {said}): check "
            "that the base URL points at the OpenAI-compatible API, usually ending in /v1.",
            url=url,
            status=status,
            server_message=message,
        )
    return HTTPStatusError(
        f"The server at {url} answered HTTP {status} ({said}): check the server's log, fix "
        "the request or wait until the server is ready, then run again.",
        url=url,
        status=status,
        server_message=message,
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
        self._decoder = ChatStreamDecoder()
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
        if isinstance(completion_tokens, int) and self._t_first is not None:
            gen_time = now - self._t_first
            if gen_time > 0:
                tps = completion_tokens / gen_time
        return Stats(
            ttft_s=ttft,
            duration_s=max(0.0, now - self.t0),
            chunks=dec.chunks,
            text_chars=dec.text_chars,
            prompt_tokens=prompt_tokens if isinstance(prompt_tokens, int) else None,
            completion_tokens=completion_tokens if isinstance(completion_tokens, int) else None,
            tokens_per_s=tps,
        )

    def _finish(self, loop: asyncio.AbstractEventLoop) -> StreamFinished:
        dec = self._decoder
        self.finished = StreamFinished(
            finish_reason=dec.finish_reason,
            stats=self.stats_at(loop.time()),
            model=dec.model,
            response_id=dec.response_id,
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
            async for event in self._until_first_token(loop, watchdog):
                yield event
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
                events = dec.feed(chunk)
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
        except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError) as exc:
            if self._decoder.complete:
                yield self._finish(loop)  # broke after the finish chunk: nothing was lost
                return
            raise self._interrupted("broke off", exc) from exc
        except NotJSON as exc:
            raise self._protocol_error(exc.line) from None
        except ServerReported as exc:
            raise self._server_reported(exc) from None
        except httpx.HTTPError as exc:
            raise self._interrupted("failed", exc) from exc
        finally:
            watchdog.close()
            if answering:
                client._answering -= 1
                client._progress_at = loop.time()
            if self._response is not None:
                await self._response.aclose()

    async def _until_first_token(
        self, loop: asyncio.AbstractEventLoop, watchdog: _Watchdog
    ) -> AsyncIterator[Event]:
        """Send the request (retrying what is safe to retry) and read up to the first token."""
        attempt = 0
        stale_retried = False
        while True:
            attempt += 1
            try:
                async for event in self._attempt(watchdog):
                    yield event
                return
            except _Retryable as failure:
                if self._response is not None:
                    await self._response.aclose()
                    self._response = None
                if failure.stale and not stale_retried:
                    stale_retried = True
                    attempt -= 1
                    continue
                if attempt > self._retries.attempts:
                    raise failure.error from None
                delay = self._retries.delay(attempt)
                if failure.retry_after is not None:
                    delay = max(delay, failure.retry_after)
                if loop.time() + delay >= watchdog.deadline:
                    raise failure.error from None
                await asyncio.sleep(delay)

    async def _attempt(self, watchdog: _Watchdog) -> AsyncIterator[Event]:
        client = self._client
        url = client.url
        self._decoder = dec = ChatStreamDecoder()
        request = client._http.build_request(
            "POST",
            "/chat/completions",
            json=self._body,
            headers={"X-Request-Id": self.request_id, "Accept": "text/event-stream"},
        )
        watchdog.enter()
        try:
            self._response = response = await client._http.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise _Retryable(client._unreachable(exc)) from exc
        except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError) as exc:
            raise _Retryable(
                self._interrupted("was reset before the first token", exc), stale=True
            ) from exc
        finally:
            watchdog.waiting = False
        if response.status_code >= 400:
            body = await self._read_error_body(response, watchdog)
            error = _classify(
                status=response.status_code,
                message=_body_message(body, response.headers.get("content-type", "")),
                code=_error_code(body),
                url=url,
                model=self.model,
            )
            if response.status_code in RETRY_STATUSES:
                raise _Retryable(error, _retry_after(response))
            raise error
        content_type = response.headers.get("content-type", "")
        if content_type and not content_type.startswith("text/event-stream"):
            for event in await self._not_a_stream(response, content_type, watchdog):
                yield event
            return
        if not self._started:
            self._started = True
            yield StreamStarted(model=self.model, request_id=self.request_id, url=url)
        stream = response.stream
        if (
            isinstance(stream, httpx.AsyncByteStream)
            and response.headers.get("content-encoding", "identity") == "identity"
        ):
            # The response's own byte stream, without aiter_raw's re-chunking layer: one
            # async-generator hop less per chunk. response.aclose() still closes it.
            self._raw = raw = stream.__aiter__()
        else:
            self._raw = raw = response.aiter_bytes()
        while True:
            watchdog.enter()
            try:
                chunk = await raw.__anext__()
            except StopAsyncIteration:
                # Ended cleanly with nothing in it: nothing was received, so a retry is safe.
                raise _Retryable(self._interrupted("ended before the first token")) from None
            except (httpx.ReadError, httpx.RemoteProtocolError) as exc:
                raise _Retryable(
                    self._interrupted("was reset before the first token", exc)
                ) from exc
            finally:
                watchdog.waiting = False
            events = dec.feed(chunk)
            first = dec.saw_output or dec.done
            if first:
                self._t_first = asyncio.get_running_loop().time()
            for event in events:
                yield event
            if first:
                return

    async def _read_error_body(self, response: httpx.Response, watchdog: _Watchdog) -> bytes:
        body = bytearray()
        watchdog.enter()
        try:
            async for part in response.aiter_bytes():
                body += part
                if len(body) >= _ERROR_BODY_LIMIT:
                    break
        except httpx.HTTPError:
            pass  # the status line already says enough
        finally:
            watchdog.waiting = False
        return bytes(body[:_ERROR_BODY_LIMIT])

    async def _not_a_stream(
        self, response: httpx.Response, content_type: str, watchdog: _Watchdog
    ) -> list[Event]:
        """A 2xx answer that is not an event stream: an error in disguise, or a whole answer."""
        body = await self._read_error_body(response, watchdog)
        url = self._client.url
        if "json" in content_type:
            try:
                obj = json.loads(body)
            except ValueError:
                obj = None
            if isinstance(obj, dict) and "error" in obj:
                raise _classify(
                    status=response.status_code,
                    message=error_message_of(obj),
                    code=_error_code(body),
                    url=url,
                    model=self.model,
                )
            if isinstance(obj, dict) and isinstance(obj.get("choices"), list):
                # A server that ignored "stream": true and sent the whole completion.
                events: list[Event] = []
                if not self._started:
                    self._started = True
                    events.append(
                        StreamStarted(model=self.model, request_id=self.request_id, url=url)
                    )
                events.extend(self._decoder.feed_completion(obj))
                self._t_first = asyncio.get_running_loop().time()
                self._raw = _empty()
                return events
        shown = _body_message(body, content_type)
        raise ProtocolError(
            f"The server at {url} answered with {content_type!r} instead of an event stream "
            f"({_quote(shown, 120)}): check that the base URL points at LM Studio's "
            "OpenAI-compatible API (usually ending in /v1).",
            url=url,
            line=(shown or "")[:200],
        )

    # -- errors with context ---------------------------------------------------------------

    def _kept(self) -> str:
        n = self._decoder.text_chars
        if n == 0:
            return "no text had arrived"
        return f"the {n} characters received are kept in .partial_text"

    def _interrupted(self, what: str, exc: BaseException | None = None) -> StreamInterrupted:
        url = self._client.url
        detail = f" ({type(exc).__name__}: {exc})" if exc is not None and str(exc) else ""
        return StreamInterrupted(
            f"The stream from {url} {what}{detail}, and {self._kept()}: check that the server "
            "is still running, then run again.",
            url=url,
            partial_text=self.text,
            partial_reasoning=self.reasoning,
        )

    def _timeout_error(self) -> StreamError:
        url = self._client.url
        if self._t_first is None:
            budget = self._budgets.first_token or 0.0
            return FirstTokenTimeout(
                f"No token arrived from {url} within the first-token budget of {budget:g} s: "
                "the server may still be processing a long prompt, so raise "
                "first_token_timeout (or shorten the prompt) and run again.",
                url=url,
                budget=budget,
                partial_reasoning=self.reasoning,
            )
        budget = self._budgets.idle or 0.0
        return StreamStalled(
            f"The stream from {url} stalled: nothing new arrived for {budget:g} s, and "
            f"{self._kept()}; raise idle_timeout if the server is just slow, then run again.",
            url=url,
            budget=budget,
            partial_text=self.text,
            partial_reasoning=self.reasoning,
        )

    def _protocol_error(self, line: str) -> ProtocolError:
        url = self._client.url
        return ProtocolError(
            f"The server at {url} sent a data line that is not valid JSON ({line!r}), and "
            f"{self._kept()}: check that the base URL points at an OpenAI-compatible API.",
            url=url,
            line=line,
            partial_text=self.text,
            partial_reasoning=self.reasoning,
        )

    def _server_reported(self, exc: ServerReported) -> RequestError:
        url = self._client.url
        low = (exc.message or "").lower()
        if self._decoder.text_chars == 0 and (
            "no models loaded" in low or any(p in low for p in _CONTEXT_PATTERNS)
        ):
            code = None
            if isinstance(exc.body, dict) and isinstance(exc.body.get("error"), dict):
                value = exc.body["error"].get("code")
                code = value if isinstance(value, str) else None
            return _classify(status=200, message=exc.message, code=code, url=url, model=self.model)
        return ServerStreamError(
            f"The server at {url} reported an error during generation ({_quote(exc.message)}), "
            f"and {self._kept()}: check the server's log, then run again.",
            url=url,
            server_message=exc.message,
            partial_text=self.text,
            partial_reasoning=self.reasoning,
        )


async def _empty() -> AsyncIterator[bytes]:
    nothing: tuple[bytes, ...] = ()
    for chunk in nothing:
        yield chunk


class LMStudioClient:
    """Async client for LM Studio's OpenAI-compatible server, with one connection pool.

    ``base_url`` defaults to ``LMSTREAM_BASE_URL`` or ``http://localhost:1234/v1``; ``api_key``
    to ``LMSTREAM_API_KEY`` (sent as a bearer token, never shown in reprs, logs or errors).
    Use ``async with LMStudioClient() as client:`` so the pool is closed at the end.
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
    ) -> None:
        self.base_url = resolve_base_url(base_url)
        self.url = redact_url(self.base_url)  # what messages and records show
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
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            # read=None: budgets are enforced per phase by the stream's watchdog, not per read.
            timeout=httpx.Timeout(connect=budgets.connect, read=None, write=60.0, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
            # A local server must not be routed through a corporate HTTP(S)_PROXY.
            trust_env=False,
        )
        # Streams of this client past their first token, and when one last started or ended:
        # a busy LM Studio queues requests, and a queued one is not stuck while another
        # stream of ours is being answered (see Budgets.first_token).
        self._answering = 0
        self._progress_at = -math.inf

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

    def _unreachable(self, exc: BaseException) -> ServerUnreachable:
        reason = "timed out" if isinstance(exc, httpx.TimeoutException) else "refused or failed"
        return ServerUnreachable(
            f"Cannot connect to the model server at {self.url} (connection {reason}): start "
            "LM Studio's local server (Developer tab → Start Server, or `lms server start`), "
            "or set LMSTREAM_BASE_URL to where it listens.",
            url=self.url,
        )

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

    async def _post_with_retries(self, body: dict[str, Any], model: str) -> httpx.Response:
        """POST a blocking request, retrying what the stream would retry before its first token."""
        attempt = 0
        stale_retried = False
        while True:
            attempt += 1
            retry_after: float | None = None
            try:
                response = await self._http.post("/chat/completions", json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                error: RequestError = self._unreachable(exc)
            except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError) as exc:
                if not stale_retried:  # a kept-alive connection the server had just closed
                    stale_retried = True
                    attempt -= 1
                    continue
                error = RequestError(
                    f"The connection to {self.url} broke before an answer came "
                    f"({type(exc).__name__}: {exc}): check that the server is still running "
                    "and run again.",
                    url=self.url,
                )
            except httpx.HTTPError as exc:
                raise RequestError(
                    f"The request to {self.url} failed ({type(exc).__name__}: {exc}): check "
                    "that the server is running and run again.",
                    url=self.url,
                ) from exc
            else:
                if response.status_code not in RETRY_STATUSES:
                    return response
                content = response.content
                error = _classify(
                    status=response.status_code,
                    message=_body_message(content, response.headers.get("content-type", "")),
                    code=_error_code(content),
                    url=self.url,
                    model=model,
                )
                retry_after = _retry_after(response)
            if attempt > self.retries.attempts:
                raise error
            delay = self.retries.delay(attempt)
            await asyncio.sleep(delay if retry_after is None else max(delay, retry_after))

    async def list_models(self) -> list[str]:
        """Ids of the models the server offers (with JIT loading on: every downloaded model)."""
        try:
            response = await self._http.get(
                "/models", timeout=httpx.Timeout(self.budgets.connect, read=60.0)
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self._unreachable(exc) from exc
        except httpx.HTTPError as exc:
            raise RequestError(
                f"Listing models at {self.url} failed ({type(exc).__name__}: {exc}): check "
                "that the server is running and run again.",
                url=self.url,
            ) from exc
        body = response.content
        content_type = response.headers.get("content-type", "")
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        if response.status_code >= 400 or not isinstance(obj, dict) or "error" in obj:
            raise _classify(
                status=response.status_code if response.status_code >= 400 else 404,
                message=_body_message(body, content_type),
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
                line=body[:200].decode("utf-8", "replace"),
            )
        return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]

    async def default_model(self) -> str:
        """The server's first chat model (embedding models skipped): LM Studio's loaded one."""
        models = await self.list_models()
        for model in models:
            if "embed" not in model.lower():
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
            response = await asyncio.wait_for(self._post_with_retries(body, model), timeout)
        except asyncio.TimeoutError:
            raise RequestTimedOut(
                f"No answer came from {self.url} within the total timeout of {timeout:g} s, "
                "and a blocking request shows nothing until it is complete: stream the "
                "answer instead, or raise the timeout.",
                url=self.url,
                timeout=timeout or 0.0,
            ) from None
        duration = loop.time() - t0
        body_bytes = response.content
        try:
            obj = json.loads(body_bytes)
        except ValueError:
            obj = None
        if response.status_code >= 400 or not isinstance(obj, dict) or "error" in obj:
            raise _classify(
                status=response.status_code,
                message=_body_message(body_bytes, response.headers.get("content-type", "")),
                code=_error_code(body_bytes),
                url=self.url,
                model=model,
            )
        decoder = ChatStreamDecoder()
        decoder.feed_completion(obj)
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
