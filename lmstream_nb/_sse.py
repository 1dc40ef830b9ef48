"""Sans-IO decoding: bytes → lines → Server-Sent Events → chat-completion chunks → typed events.

Why not httpx-sse: it was the first choice, but measured against the WHATWG rules it drops the
first event of a stream that starts with a UTF-8 BOM, and it sits on httpx's ``aiter_lines``
(incremental text decoding plus a Python line splitter per network read), which costs more per
chunk than the baseline this project must match. This decoder splits *bytes* on line endings
(a multi-byte UTF-8 character can never contain CR or LF bytes, so characters split across
reads are whole again by the time a line is complete) and decodes each finished line once.

Rules implemented (https://html.spec.whatwg.org/multipage/server-sent-events.html, "Parsing an
event stream"): LF, CRLF and CR line endings, also when CR and LF arrive in different reads; one
leading BOM is dropped; lines starting with ``:`` are comments; ``field: value`` with at most one
space removed; ``data`` lines join with LF; ``event``, ``id`` (ignored if it contains NUL) and
``retry`` (ASCII digits only); a blank line dispatches, and an event without data lines is
dropped; an unfinished event at the end of the stream is discarded.

Limits: one line and one event may each take at most ``max_bytes`` (the client's
``max_event_bytes``, 16 MiB by default). A server that sends an endless line, or endless
``data:`` lines without the blank line that ends an event, would otherwise make the decoder
hold everything it sent; past the limit the decoder stops and says which limit was hit.

No clock, no sockets: feed it chunks in any split and it yields the same events, which is what
the property test in tests/test_sse.py checks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ._events import ReasoningDelta, TextDelta

_BOM = b"\xef\xbb\xbf"
DEFAULT_MAX_BYTES = 16 * 2**20


class ServerSentEvent(NamedTuple):
    """One dispatched event. ``id`` is the last event id seen so far, as the spec says."""

    event: str
    data: str
    id: str
    retry: int | None


class SSEDecoder:
    """Incremental event-stream decoder: ``feed(bytes) -> list[ServerSentEvent]``.

    An unfinished line and a multi-line event's data are kept in ``bytearray`` buffers, so what
    they cost is their size in bytes, however small the reads they arrived in.
    """

    __slots__ = (
        "_bom_checked",
        "_data",
        "_event",
        "_head",
        "_last_id",
        "_pending",
        "_retry",
        "_trailing_cr",
        "clean",
        "max_bytes",
        "overflow",
    )

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        # "line" or "event" once that limit was passed; the decoder then takes nothing more.
        self.overflow: str | None = None
        self._pending = bytearray()  # a line not yet terminated
        self._trailing_cr = False  # the previous chunk ended in CR: a leading LF is its partner
        self._bom_checked = False
        self._head = b""  # first bytes held back until we know whether they start with a BOM
        # The data of the event being built: the first line as it came, a bytearray from the
        # second line on (joined with LF as the spec says).
        self._data: bytes | bytearray | None = None
        self._event = ""
        self._last_id = ""
        self._retry: int | None = None
        # True between events: no partial line, field or data pending, BOM question settled.
        # Lets a caller that recognises a whole single event handle it without this decoder.
        self.clean = False

    @property
    def has_partial_event(self) -> bool:
        """True when the bytes fed so far end inside an event (it would be discarded at EOF)."""
        return bool(self._pending) or bool(self._head) or self._data is not None

    def head(self) -> str:
        """The start of the line or event that passed the limit, to name it in a message."""
        held = self._pending if self.overflow == "line" else (self._data or b"")
        return bytes(held[:200]).decode("utf-8", "replace")

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        if self.overflow is not None:
            return []
        events = self._feed(chunk)
        self.clean = (
            self._bom_checked
            and self._data is None
            and not self._pending
            and not self._event
            and not self._trailing_cr
        )
        return events

    def _feed(self, chunk: bytes) -> list[ServerSentEvent]:
        if not self._bom_checked:
            chunk = self._head + chunk
            if len(chunk) < 3 and _BOM.startswith(chunk):
                self._head = chunk  # could still become a BOM; wait for more bytes
                return []
            self._head = b""
            self._bom_checked = True
            if chunk.startswith(_BOM):
                chunk = chunk[3:]
        if not chunk:
            return []
        if self._trailing_cr or b"\r" in chunk:
            chunk = self._normalise_newlines(chunk)
        pending = self._pending
        if b"\n" not in chunk:
            pending += chunk
            if len(pending) > self.max_bytes:
                self.overflow = "line"
            return []
        if pending:
            pending += chunk
            chunk = bytes(pending)
            self._pending = pending = bytearray()
        lines = chunk.split(b"\n")
        rest = lines.pop()
        if len(chunk) > self.max_bytes:  # only then can a finished line be over the limit
            for i, line in enumerate(lines):
                if len(line) > self.max_bytes:
                    events = self._process(lines[:i])
                    self.overflow = "line"
                    self._pending = bytearray(line[:200])  # for head()
                    return events
        if rest:
            pending += rest
        events = self._process(lines)
        if len(pending) > self.max_bytes and self.overflow is None:
            self.overflow = "line"
        return events

    def _normalise_newlines(self, chunk: bytes) -> bytes:
        if self._trailing_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]  # the LF of a CRLF split across two reads
        self._trailing_cr = chunk[-1:] == b"\r"
        return chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")

    def _process(self, lines: list[bytes]) -> list[ServerSentEvent]:
        events: list[ServerSentEvent] = []
        for line in lines:
            if not line:
                if self._data is not None:
                    events.append(self._dispatch())
                else:
                    self._event = ""
            elif line[:5] == b"data:":
                value = line[5:]
                if value[:1] == b" ":
                    value = value[1:]
                if self._data is None:
                    self._data = value
                elif self._more_data(value):
                    break
            elif line[:1] != b":" and self._field(line):
                break
        return events

    def _more_data(self, value: bytes) -> bool:
        """Add a second or later data line; True when the event has passed the limit."""
        data = self._data
        if type(data) is not bytearray:
            data = self._data = bytearray(data or b"")
        data += b"\n"
        data += value
        if len(data) > self.max_bytes:
            self.overflow = "event"
            return True
        return False

    def _field(self, line: bytes) -> bool:
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":  # "data" with no colon: an empty data line
            if self._data is None:
                self._data = value
                return False
            return self._more_data(value)
        if name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id":
            if b"\0" not in value:
                self._last_id = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit() and len(value) <= 15:
            self._retry = int(value)
        return False

    def _dispatch(self) -> ServerSentEvent:
        raw = self._data
        assert raw is not None
        event = ServerSentEvent(
            self._event or "message", raw.decode("utf-8", "replace"), self._last_id, self._retry
        )
        self._data = None
        self._event = ""
        return event


# ---------------------------------------------------------------------------------------------
# Chat-completion chunks


class StreamViolation(Exception):
    """Internal: the stream broke a rule. The client turns it into a public error with context.

    ``before`` holds the deltas decoded from the same read before the violation: the client
    hands them to the consumer first, so no text that arrived is lost.
    """

    before: Sequence[TextDelta | ReasoningDelta] = ()


class NotJSON(StreamViolation):
    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = line


class BadChunk(StreamViolation):
    """A chunk of the wrong shape: ``what`` says what was wrong, ``line`` shows the chunk."""

    def __init__(self, what: str, line: str) -> None:
        super().__init__(what)
        self.what = what
        self.line = line


class TooLarge(StreamViolation):
    """One SSE line or event passed the limit (``kind`` is ``"line"`` or ``"event"``)."""

    def __init__(self, kind: str, limit: int, line: str) -> None:
        super().__init__(kind)
        self.kind = kind
        self.limit = limit
        self.line = line


class ServerReported(StreamViolation):
    """An error object inside the stream (``event: error`` or an ``error`` key in the data)."""

    def __init__(self, message: str | None, body: Any) -> None:
        super().__init__(message)
        self.message = message
        self.body = body


def error_message_of(body: Any) -> str | None:
    """The human message in any of the error shapes servers use, or None.

    Accepts ``{"error": "..."}``, ``{"error": {"message": ...}}``, a top-level ``message`` and
    FastAPI's ``detail``; see lmstudio-wire.md §5 for who sends which.
    """
    if isinstance(body, str):
        return body or None
    if not isinstance(body, dict):
        return None
    err = body.get("error")
    if isinstance(err, str) and err:
        return err
    if isinstance(err, dict):
        msg = err.get("message")
        if isinstance(msg, str) and msg:
            return msg
    for key in ("message", "detail"):
        msg = body.get(key)
        if isinstance(msg, str) and msg:
            return msg
    return None


class TooDeep(ValueError):
    """JSON nested deeper than the parser can follow (it would raise RecursionError)."""


# The C scanner behind json.loads (set by JSONDecoder.__init__, so not in the type stubs).
_scan_once: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _loads(data: str) -> Any:
    """``json.loads`` without its two Python-level wrappers (one call per chunk adds up).

    JSON nested deeper than the interpreter's recursion limit (about a thousand levels; no
    chat server nests more than five or six) raises :class:`TooDeep` instead of
    ``RecursionError``: that is the depth bound, at no cost per chunk.
    """
    try:
        if data[:1] in ("{", "["):
            try:
                obj, end = _scan_once(data, 0)
            except StopIteration:
                raise ValueError("not JSON") from None
            if end == len(data) or data[end:].isspace():
                return obj
            raise ValueError("extra data after JSON")
        return json.loads(data)
    except RecursionError:
        raise TooDeep("nested too deeply") from None


def parse_json(data: str | bytes) -> Any:
    """Parse a body that should be JSON (an error body, a model list): None if it is not.

    Never raises, also not for nesting deeper than the parser can follow.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return _loads(text.strip())
    except ValueError:  # UnicodeDecodeError and TooDeep included
        return None


def _event_object(data: str) -> dict[str, Any]:
    """An event's data (or a whole body) as the JSON object it must be: NotJSON or BadChunk
    if it is not."""
    try:
        obj = _loads(data)
    except TooDeep:
        raise BadChunk(
            "its JSON is nested deeper than any chat server sends", _shorten(data)
        ) from None
    except ValueError:
        raise NotJSON(_shorten(data)) from None
    if type(obj) is not dict:
        raise NotJSON(_shorten(data))
    return obj


def parse_object(body: bytes) -> dict[str, Any]:
    """A whole JSON body that must be an object (a completion): NotJSON or BadChunk if not."""
    return _event_object(body.decode("utf-8", "replace").strip())


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


_KINDS = {str: "a string", int: "a number", float: "a number", bool: "a boolean"}
_KINDS.update({list: "an array", dict: "an object", type(None): "null"})


def _bad(where: str, value: object, expected: str, data: str) -> BadChunk:
    kind = _KINDS.get(type(value), type(value).__name__)
    return BadChunk(f"{where} is {kind}, not {expected}", _shorten(data))


def _text_field(obj: dict[str, Any], key: str, where: str, data: str) -> str | None:
    value = obj.get(key)
    if value is None or type(value) is str:
        return value
    raise _bad(f"{where}.{key}" if where else key, value, "a string or null", data)


def _check_usage(usage: object, data: str) -> dict[str, Any]:
    if type(usage) is not dict:
        raise _bad("usage", usage, "an object or null", data)
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        count = usage.get(key)
        if count is not None and (type(count) is not int or count < 0):
            raise _bad(f"usage.{key}", count, "a whole number >= 0 or null", data)
    return usage


def _shape_error(choices: Any, data: str) -> BadChunk:
    """What made reading ``choices[0].delta.content`` raise, as a sentence naming the field."""
    if type(choices) is not list:
        return _bad("choices", choices, "an array", data)
    choice = choices[0]
    if type(choice) is not dict:
        return _bad("choices[0]", choice, "an object", data)
    delta = choice.get("delta")
    if type(delta) is not dict:
        return _bad("choices[0].delta", delta, "an object or null", data)
    return _bad("choices[0].delta.content", delta.get("content"), "a string or null", data)


class Reading(NamedTuple):
    """One progress report as the server sent it, before the client paces and dates it.

    ``phase`` is ``"loading"`` or ``"prompt"``; the token counts are llama.cpp's.
    """

    phase: str
    fraction: float
    processed: int | None = None
    total: int | None = None
    cached: int | None = None


def _count(obj: dict[str, Any], key: str, where: str, data: str) -> int | None:
    value = obj.get(key)
    if value is None or (type(value) is int and value >= 0):
        return value
    raise _bad(f"{where}.{key}", value, "a whole number >= 0 or null", data)


def _fraction(obj: dict[str, Any], key: str, where: str, data: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if type(value) not in (int, float) or not 0 <= value <= 1:
        raise _bad(f"{where}.{key}", value, "a number from 0 to 1", data)
    return float(value)


def _seconds(obj: dict[str, Any], key: str, where: str, data: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if type(value) not in (int, float) or not 0 <= value < 1e9:
        raise _bad(f"{where}.{key}", value, "a number of seconds >= 0", data)
    return float(value)


class ChatStreamDecoder:
    """Turns the bytes of a ``chat.completion.chunk`` stream into text and reasoning deltas.

    It keeps the running totals (text, reasoning, finish reason, usage, served model) so that a
    failure at any point still has the partial text, and it tolerates every server variant in
    lmstudio-wire.md: role on every delta or only the first, ``content: null``, ``choices: []``
    usage chunks, ``reasoning_content`` or ``reasoning``, comments and unknown keys.

    Every value it reads is type-checked: a chunk of the wrong shape is a :class:`BadChunk`
    naming the field, never an ``AttributeError`` or ``TypeError`` from deep inside. On the
    path every text chunk takes, a wrong type is caught by the exception it raises anyway, so
    those chunks cost what they did before the checks (benchmarks/throughput.py); explicit
    checks cover the rest (falsy wrong types, rarer fields, usage, whole completions).

    Text is accumulated as UTF-8 in a ``bytearray``: one compact buffer instead of a list of
    millions of tiny strings, which keeps a 10 MB answer near 10 MB in memory.
    """

    __slots__ = (
        "_reasoning",
        "_sse",
        "_text",
        "chunks",
        "done",
        "finish_reason",
        "load_s",
        "model",
        "progress",
        "response_id",
        "saw_output",
        "server",
        "text_chars",
        "timings",
        "usage",
    )

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._sse = SSEDecoder(max_event_bytes)
        self._text = bytearray()
        self._reasoning = bytearray()
        self.chunks = 0
        self.text_chars = 0
        self.done = False
        self.saw_output = False  # any content, reasoning or tool call: the first token came
        self.finish_reason: str | None = None
        self.model: str | None = None
        self.response_id: str | None = None
        self.usage: dict[str, Any] | None = None
        self.timings: dict[str, Any] | None = None  # llama.cpp's speeds, with the usage
        self.server: dict[str, Any] | None = None  # LM Studio's own stats (native API)
        self.load_s: float | None = None  # the model load time the server reported
        # The latest progress report not yet taken by the client (only the latest is kept:
        # the client shows a few a second, and a flood of reports must not grow a list).
        self.progress: Reading | None = None

    @property
    def text(self) -> str:
        return self._text.decode("utf-8")

    @property
    def reasoning(self) -> str:
        return self._reasoning.decode("utf-8")

    @property
    def has_partial_event(self) -> bool:
        return self._sse.has_partial_event

    def tail(self, text_pos: int, reasoning_pos: int) -> tuple[str, str, int, int]:
        """Text and reasoning added since the given byte offsets, and the new offsets.

        Deltas are appended whole, so any offset returned here falls between characters.
        """
        text, reasoning = self._text, self._reasoning
        return (
            text[text_pos:].decode("utf-8"),
            reasoning[reasoning_pos:].decode("utf-8"),
            len(text),
            len(reasoning),
        )

    @property
    def complete(self) -> bool:
        """``[DONE]`` arrived, or at least a finish reason: the answer is whole."""
        return self.done or self.finish_reason is not None

    def feed(self, chunk: bytes) -> list[TextDelta | ReasoningDelta]:
        """Decode one network read. A violation is raised only after the whole read was looked
        at up to it, with the deltas decoded before it in ``before``."""
        out: list[TextDelta | ReasoningDelta] = []
        sse = self._sse
        try:
            # Fast path for the usual read: exactly one whole "data: …\n\n" event, LF endings,
            # nothing pending in the SSE decoder. It yields what the general path would,
            # without splitting lines or building an event object (measured: ~0.6 µs of ~10
            # per chunk).
            if (
                sse.clean
                and chunk[:5] == b"data:"
                and chunk[-2:] == b"\n\n"
                and chunk.find(b"\n") == len(chunk) - 2
                and b"\r" not in chunk
                and len(chunk) <= sse.max_bytes
            ):
                start = 6 if chunk[5:6] == b" " else 5
                self._data(chunk[start:-2].decode("utf-8", "replace"), out)
                return out
            for event in sse.feed(chunk):
                if event.event == "error":
                    self._error_event(event.data)
                self._data(event.data, out)
            if sse.overflow is not None:
                raise TooLarge(sse.overflow, sse.max_bytes, _shorten(sse.head()))
        except StreamViolation as exc:
            exc.before = out
            raise
        return out

    def feed_completion(
        self, obj: dict[str, Any], data: str = ""
    ) -> list[TextDelta | ReasoningDelta]:
        """Take a whole non-streaming ``chat.completion`` object as if it had been streamed.

        ``data`` is the body's text (or its start), shown in the message when a field is wrong.
        """
        if "error" in obj:
            raise ServerReported(error_message_of(obj), obj)
        out: list[TextDelta | ReasoningDelta] = []
        self.chunks += 1
        self.response_id = _text_field(obj, "id", "", data)
        self.model = _text_field(obj, "model", "", data)
        choices = obj.get("choices")
        if choices is not None and type(choices) is not list:
            raise _bad("choices", choices, "an array", data)
        choice = choices[0] if choices else {}
        if type(choice) is not dict:
            raise _bad("choices[0]", choice, "an object", data)
        message = choice.get("message")
        if message is None:
            message = {}
        elif type(message) is not dict:
            raise _bad("choices[0].message", message, "an object or null", data)
        where = "choices[0].message"
        reasoning = _text_field(message, "reasoning_content", where, data) or _text_field(
            message, "reasoning", where, data
        )
        if reasoning:
            self._reasoning += reasoning.encode()
            out.append(ReasoningDelta(reasoning))
        content = _text_field(message, "content", where, data)
        if content:
            self._text += content.encode()
            self.text_chars += len(content)
            out.append(TextDelta(content))
        tool_calls = message.get("tool_calls")
        if tool_calls is not None and type(tool_calls) is not list:
            raise _bad(f"{where}.tool_calls", tool_calls, "an array or null", data)
        self.finish_reason = _text_field(choice, "finish_reason", "choices[0]", data) or None
        usage = obj.get("usage")
        self.usage = None if usage is None else _check_usage(usage, data)
        self.saw_output = True
        self.done = True
        return out

    @staticmethod
    def _error_event(data: str) -> None:
        body = parse_json(data)
        if body is None:
            body = data
        raise ServerReported(error_message_of(body), body)

    def _data(self, data: str, out: list[TextDelta | ReasoningDelta]) -> None:
        if self.done:
            return  # nothing after [DONE] is part of the answer
        if data[:1] != "{":
            if data == "[DONE]":
                self.done = True
                return
            if not data or data.isspace():
                return  # a blank event carries nothing
        obj = _event_object(data)
        if "error" in obj:
            raise ServerReported(error_message_of(obj), obj)
        self.chunks += 1
        if self.response_id is None:
            self.response_id = _text_field(obj, "id", "", data)
            self.model = _text_field(obj, "model", "", data)
        choices = obj.get("choices")
        if choices:
            # A wrong type that is truthy raises here at once (a string or number has no
            # .get, a non-string no .encode), so the hot path pays for no extra checks: the
            # exception is turned into a sentence naming the field. Falsy wrong types do not
            # raise and are checked where they fall through.
            try:
                choice = choices[0]
                delta = choice.get("delta")
                if delta:
                    content = delta.get("content")
                    if content:
                        self._text += content.encode()
                        self.text_chars += len(content)
                        out.append(TextDelta(content))
                        self.saw_output = True
                        # LM Studio's delta is {"role", "content"}: skip the rarer keys then.
                        n = len(delta)
                        if n > 2 or (n == 2 and "role" not in delta):
                            self._delta_extras(delta, out, data)
                    else:
                        self._delta_extras(delta, out, data)
                elif delta is not None and type(delta) is not dict:
                    raise _bad("choices[0].delta", delta, "an object or null", data)
                finish = choice.get("finish_reason")
                if finish or (finish is not None and type(finish) is not str):
                    if type(finish) is not str:
                        raise _bad("choices[0].finish_reason", finish, "a string or null", data)
                    self.finish_reason = finish
                    self.saw_output = True
            except (AttributeError, KeyError, TypeError, IndexError):
                raise _shape_error(choices, data) from None
        elif choices is not None and type(choices) is not list:
            raise _bad("choices", choices, "an array", data)
        if not self.saw_output and "prompt_progress" in obj:
            self._prompt_progress(obj["prompt_progress"], data)
        usage = obj.get("usage")
        if usage is not None:
            self._usage(obj, usage, data)

    def _prompt_progress(self, value: object, data: str) -> None:
        """llama.cpp's ``prompt_progress`` (asked for with ``return_progress``): a sign of life
        that comes in a chunk with ``content: null``, so it is never the first token."""
        if value is None:
            return
        if type(value) is not dict:
            raise _bad("prompt_progress", value, "an object or null", data)
        where = "prompt_progress"
        total = _count(value, "total", where, data)
        processed = _count(value, "processed", where, data)
        cached = _count(value, "cache", where, data)
        _seconds({"t": value.get("time_ms")}, "t", f"{where}.time_ms", data)
        if not total or processed is None:
            return  # nothing to measure against
        fraction = min(1.0, processed / total)
        self.progress = Reading("prompt", fraction, processed, total, cached)

    def _usage(self, obj: dict[str, Any], usage: object, data: str) -> None:
        usage = _check_usage(usage, data)
        timings = obj.get("timings")
        if timings is not None and type(timings) is not dict:
            raise _bad("timings", timings, "an object or null", data)
        if usage:
            self.usage = usage
            if timings:
                self.timings = timings

    def _delta_extras(
        self, delta: dict[str, Any], out: list[TextDelta | ReasoningDelta], data: str
    ) -> None:
        where = "choices[0].delta"
        _text_field(delta, "content", where, data)  # here content is empty: is it a string?
        reasoning = _text_field(delta, "reasoning_content", where, data) or _text_field(
            delta, "reasoning", where, data
        )
        if reasoning:
            self._reasoning += reasoning.encode()
            out.append(ReasoningDelta(reasoning))
            self.saw_output = True
        tool_calls = delta.get("tool_calls")
        if tool_calls is not None:
            if type(tool_calls) is not list:
                raise _bad(f"{where}.tool_calls", tool_calls, "an array or null", data)
            if tool_calls:
                self.saw_output = True


_NATIVE_DELTA = b"event: message.delta\ndata: "


class NativeChatDecoder(ChatStreamDecoder):
    """LM Studio 0.4's ``POST /api/v1/chat`` stream: named events instead of chunks.

    ``message.delta`` and ``reasoning.delta`` carry the text; ``model_load.*`` and
    ``prompt_processing.*`` become progress readings; ``chat.end`` ends the answer with the
    server's own stats; ``error`` is raised like an error chunk; every other type (block
    starts and ends, server-side tool calls, types added later) is ignored. An event without
    an ``event:`` line is named by its ``type`` field.

    The native API reports no finish reason, so it is inferred: ``"length"`` when the answer
    used the whole ``max_output_tokens``, else ``"stop"``.
    """

    __slots__ = ("max_output_tokens",)

    def __init__(
        self, max_event_bytes: int = DEFAULT_MAX_BYTES, max_output_tokens: int | None = None
    ) -> None:
        super().__init__(max_event_bytes)
        self.max_output_tokens = max_output_tokens

    def feed(self, chunk: bytes) -> list[TextDelta | ReasoningDelta]:
        out: list[TextDelta | ReasoningDelta] = []
        sse = self._sse
        try:
            # Fast path, as for chunks: one whole message.delta event in one read.
            if (
                sse.clean
                and chunk[:27] == _NATIVE_DELTA
                and chunk[-2:] == b"\n\n"
                and chunk.count(b"\n") == 3
                and b"\r" not in chunk
                and len(chunk) <= sse.max_bytes
            ):
                self._event("message.delta", chunk[27:-2].decode("utf-8", "replace"), out)
                return out
            for event in sse.feed(chunk):
                self._event(event.event, event.data, out)
            if sse.overflow is not None:
                raise TooLarge(sse.overflow, sse.max_bytes, _shorten(sse.head()))
        except StreamViolation as exc:
            exc.before = out
            raise
        return out

    def _event(self, name: str, data: str, out: list[TextDelta | ReasoningDelta]) -> None:
        if self.done:
            return  # nothing after chat.end is part of the answer
        if not data or data.isspace():
            return
        obj = _event_object(data)
        if name == "message":
            kind = obj.get("type")
            name = kind if type(kind) is str else ""
        self.chunks += 1
        if name == "message.delta":
            content = obj.get("content")
            try:
                if content:
                    self._text += content.encode()
                    self.text_chars += len(content)
                    out.append(TextDelta(content))
                    self.saw_output = True
                    return
            except AttributeError:
                pass
            _text_field(obj, "content", name, data)
        elif name == "reasoning.delta":
            content = _text_field(obj, "content", name, data)
            if content:
                self._reasoning += content.encode()
                out.append(ReasoningDelta(content))
                self.saw_output = True
        elif name.startswith(("prompt_processing.", "model_load.")):
            self._progress(name, obj, data)
        elif name == "chat.start":
            self.model = _text_field(obj, "model_instance_id", name, data)
        elif name == "error":
            error = obj.get("error")
            raise ServerReported(error_message_of(obj) or error_message_of(error), obj)
        elif name == "chat.end":
            self._end(obj, data)

    def _progress(self, name: str, obj: dict[str, Any], data: str) -> None:
        phase = "prompt" if name.startswith("prompt") else "loading"
        step = name.partition(".")[2]
        if step == "start":
            self.progress = Reading(phase, 0.0)
        elif step == "progress":
            fraction = _fraction(obj, "progress", name, data)
            if fraction is not None:
                self.progress = Reading(phase, fraction)
        elif step == "end":
            self.progress = Reading(phase, 1.0)
            if phase == "loading":
                self.load_s = _seconds(obj, "load_time_seconds", name, data)

    def _end(self, obj: dict[str, Any], data: str) -> None:
        result = obj.get("result")
        if result is None:
            result = {}
        elif type(result) is not dict:
            raise _bad("chat.end.result", result, "an object", data)
        stats = result.get("stats")
        if stats is not None:
            if type(stats) is not dict:
                raise _bad("chat.end.result.stats", stats, "an object", data)
            where = "chat.end.result.stats"
            prompt = _count(stats, "input_tokens", where, data)
            output = _count(stats, "total_output_tokens", where, data)
            _count(stats, "reasoning_output_tokens", where, data)
            for key in ("tokens_per_second", "time_to_first_token_seconds"):
                _seconds(stats, key, where, data)
            load = _seconds(stats, "model_load_time_seconds", where, data)
            if load is not None:
                self.load_s = load
            self.usage = {"prompt_tokens": prompt, "completion_tokens": output}
            self.server = stats
            limit = self.max_output_tokens
            length = limit is not None and output is not None and 0 < limit <= output
            self.finish_reason = "length" if length else "stop"
        else:
            self.finish_reason = "stop"
        self.response_id = _text_field(result, "response_id", "chat.end.result", data) or (
            _text_field(result, "thread_id", "chat.end.result", data)
        )
        model = _text_field(result, "model_instance_id", "chat.end.result", data)
        if model:
            self.model = model
        if not self.text_chars and not self._reasoning:
            self._whole_output(result.get("output"), data)
        self.saw_output = True
        self.done = True

    def _whole_output(self, output: object, data: str) -> None:
        """A ``chat.end`` whose text came in no delta (a server that sent the answer whole)."""
        if output is None:
            return
        if type(output) is not list:
            raise _bad("chat.end.result.output", output, "an array", data)
        for item in output:
            if type(item) is not dict:
                raise _bad("chat.end.result.output[]", item, "an object", data)
            content = _text_field(item, "content", "chat.end.result.output[]", data)
            if content and item.get("type") == "message":
                self._text += content.encode()
                self.text_chars += len(content)
            elif content and item.get("type") == "reasoning":
                self._reasoning += content.encode()
