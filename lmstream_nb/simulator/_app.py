"""The simulated LM Studio server as a Starlette (ASGI) application.

Endpoints, bodies, headers and error shapes follow LM Studio's wire format: ``GET /v1/models``,
``GET /api/v0/models[/{id}]``, ``POST /v1/chat/completions`` and ``POST /api/v0/chat/completions``,
and LM Studio 0.4's native API: ``POST /api/v1/chat`` (named SSE events with load and prompt
progress, or one JSON body), ``GET /api/v1/models`` (with ``loaded_instances`` and their
``config``), ``POST /api/v1/models/load`` and ``/unload``. Express-style headers go on every
response, and unknown paths get LM Studio's ``200`` with a string error. A server whose default
dialect is ``"llamacpp"`` is a llama.cpp server instead: ``Server: llama.cpp`` rather than
Express's headers, no native API, 404 for unknown paths, any model name served, and ``GET
/props``, ``GET /slots``, ``POST /tokenize`` and ``POST /v1/chat/completions/input_tokens``.
Timing (JIT load, queue, prompt processing, token pace), text and faults come from the
request's :class:`~._scenario.Scenario` and, for requests sharing a model, ``_pace``.

Every chat request, on either API and streaming or not, runs the same production loop: load,
queue for a slot, process the prompt step by step, generate, with the scenario's faults at their
positions. :class:`_EventStream` frames it as OpenAI-style chunks, :class:`_NativeStream` as the
native API's named events, :func:`_complete` as one body. A stream runs beside a watcher for
``http.disconnect``: when the client goes away the generation is cancelled at its next await and
the request is recorded as ``client_disconnected``. Faults that must break the connection raise
:class:`_Abort` after the headers went out; uvicorn then closes the transport without finishing
the chunked body, and a logging filter keeps that deliberate exception out of the server's error
log.

Error shapes the native API's documentation leaves open are assumed: status 404 for an unknown
model (``model_not_found``), 400 for other invalid requests, 500 for a non-streaming failure,
``internal_error`` as the type of a failure during generation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import html
import http
import json
import logging
import math
import random
import re
import string
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._pace import LLAMACPP_BATCH, LMSTUDIO_BATCH, LOAD_STEPS, Engine, prompt_steps
from ._records import Outcome, Recorder, Stage
from ._scenario import (
    Scenario,
    ScenarioError,
    SimConfig,
    apply_overrides,
    model_format,
    model_type,
)
from ._text import TextSource

__all__ = ["build_app"]

JSON = dict[str, Any]

_EXPRESS_HEADERS = [
    (b"x-powered-by", b"Express"),
    (b"connection", b"keep-alive"),
    (b"keep-alive", b"timeout=5"),
]
_LLAMACPP_HEADERS = [(b"server", b"llama.cpp")]  # what llama-server sends instead
_JSON_TYPE = "application/json; charset=utf-8"
_NO_MODELS = (
    "No models loaded. Please load a model in the developer page or use the 'lms load' command."
)
_OVERFLOW = (
    "The number of tokens to keep from the initial prompt is greater than the context length. "
    "Try to load the model with a larger context length, or provide a shorter input"
)
_DEFAULT_OUTPUT_TOKENS = 150
_YIELD_EVERY = 64  # with no delays, let other streams run every this many tokens
_ID_ALPHABET = string.ascii_lowercase + string.digits
_LINE_ENDINGS = {"lf": "\n", "crlf": "\r\n", "cr": "\r"}
_BOM = "\ufeff".encode()


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _json(body: object, status: int = 200) -> Response:
    return Response(_dumps(body), status_code=status, media_type=_JSON_TYPE)


def _error_object(
    message: str, status: int = 400, *, param: str | None = None, code: str | None = None
) -> Response:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }
    return _json(body, status)


def _native_error(
    kind: str,
    message: str,
    status: int = 400,
    *,
    code: str | None = None,
    param: str | None = None,
) -> Response:
    """The native API's error object (``type`` is one of LM Studio's error types)."""
    return _json(
        {"error": {"type": kind, "message": message, "code": code, "param": param}}, status
    )


def _html_page(title: str, message: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n</head>\n<body>\n"
        f"<pre>{html.escape(message)}</pre>\n</body>\n</html>\n"
    )


# --- deliberate connection drops ---------------------------------------------------------------


class _Abort(Exception):
    """Raised inside the app, after the headers went out, to drop the connection on purpose."""


def _is_abort(exc: BaseException | None) -> bool:
    if isinstance(exc, _Abort):
        return True
    group = getattr(exc, "exceptions", None)  # an exception group made only of aborts
    return bool(group) and all(_is_abort(e) for e in group)  # type: ignore[union-attr]


class _HideAborts(logging.Filter):
    """Drops uvicorn's "Exception in ASGI application" record when the exception is an _Abort."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and _is_abort(record.exc_info[1]))


_HIDE_ABORTS = _HideAborts()


def _install_log_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if _HIDE_ABORTS not in logger.filters:
        logger.addFilter(_HIDE_ABORTS)


class _AbortAfterHeaders(Response):
    """A non-streaming reply that announces a body, sends its headers, then drops the connection."""

    def __init__(self) -> None:
        super().__init__(b"{}", media_type=_JSON_TYPE)
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"] + [
            (b"content-length", b"4096")
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        raise _Abort


# --- server state --------------------------------------------------------------------------------


@dataclasses.dataclass
class _Model:
    id: str
    type: str
    format: str
    loaded: bool
    context_length: int
    engine: Engine
    load_lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)


#: Reports a JIT load to the request that caused it: (stage, fraction, seconds so far).
_LoadReport = Callable[[str, float, float], Awaitable[None]]


class _Sim:
    """State shared by all requests of one server: config, models, records."""

    def __init__(self, config: SimConfig, recorder: Recorder) -> None:
        self.config = config
        self.recorder = recorder
        self.models: dict[str, _Model] = {}
        for i, model_id in enumerate(config.models):
            fmt = model_format(model_id)
            self.models[model_id] = _Model(
                id=model_id,
                type=model_type(model_id),
                format=fmt,
                loaded=i == 0 and not config.defaults.no_model,
                context_length=config.context_length,
                engine=Engine(self.parallel_of(fmt)),
            )
        self._ids = random.Random(f"lmstream-sim-ids|{config.seed}")
        # Requests seen per identical message list, for ``fault_attempts``.
        self.attempts: dict[str, int] = {}

    def parallel_of(self, fmt: str) -> int | None:
        """Slots of a model in this format: MLX models answer one request at a time."""
        return 1 if fmt == "mlx" else self.config.parallel

    def transient(self, sc: Scenario, messages: object) -> Scenario:
        """``sc``, or ``sc`` without its faults once this prompt has met them often enough."""
        if sc.fault_attempts is None:
            return sc
        key = hashlib.sha256(
            json.dumps(messages, sort_keys=True, default=str).encode("utf-8")
        ).hexdigest()
        seen = self.attempts[key] = self.attempts.get(key, 0) + 1
        return sc if seen <= sc.fault_attempts else sc.without_faults()

    def new_id(self, prefix: str = "chatcmpl-") -> str:
        return prefix + "".join(self._ids.choices(_ID_ALPHABET, k=20))

    def loaded_llm(self) -> str | None:
        for model in self.models.values():
            if model.loaded and model.type == "llm":
                return model.id
        return None

    async def acquire(
        self, plan: _Plan, report: _LoadReport | None = None
    ) -> tuple[float | None, Engine]:
        """JIT-load the plan's model if needed (one load at a time), then take a slot.

        Returns the load's duration when this request loaded the model (else ``None``) and the
        engine whose slot it took.
        """
        model = plan.model
        took = None
        if not model.loaded:
            self.recorder.update(plan.index, stage="loading")
            async with model.load_lock:
                if not model.loaded:
                    took = await self.load(model, plan.load_s, report, plan.context_length)
        engine = model.engine
        if engine.slots is not None and engine.slots.locked():
            self.recorder.update(plan.index, stage="queued")
        await engine.acquire()
        return took, engine

    async def load(
        self,
        model: _Model,
        seconds: float,
        report: _LoadReport | None = None,
        context_length: int | None = None,
    ) -> float:
        """Load ``model`` in ``seconds`` (real, scaled), reporting :data:`LOAD_STEPS` steps."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        if report is None:
            await asyncio.sleep(seconds)
        else:
            await report("start", 0.0, 0.0)
            for k in range(1, LOAD_STEPS + 1):
                await _sleep_until(start + seconds * k / LOAD_STEPS)
                await report("progress", k / LOAD_STEPS, loop.time() - start)
        if not model.loaded or context_length is not None:
            model.engine = Engine(self.parallel_of(model.format))
        if context_length is not None:
            model.context_length = context_length
        elif not model.loaded:  # a fresh load takes the server's default context
            model.context_length = self.config.context_length
        model.loaded = True
        took = loop.time() - start
        if report is not None:
            await report("end", 1.0, took)
        return took


# --- one chat request ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Plan:
    """Everything decided about a chat request before any waiting starts."""

    index: int
    id: str
    created: int
    model: _Model
    v0: bool
    include_usage: bool
    scenario: Scenario
    scale: float
    load_s: float
    prefill_s: float
    intervals: list[float]  # intervals[i]: wait before token i, after token i-1 (intervals[0] = 0)
    pieces: list[tuple[str, str]]  # (kind, text); kind "reasoning" or "content"
    finish_reason: str
    prompt_tokens: int
    echo: str = ""  # appended to every error text when the scenario echoes the request
    native: bool = False  # LM Studio's /api/v1/chat (named events) instead of /v1
    return_progress: bool = False  # llama.cpp's prompt_progress chunks were asked for
    batch: int = LMSTUDIO_BATCH  # prompt tokens per processing step
    context_length: int | None = None  # the context a native request loads its model with

    @property
    def fingerprint(self) -> str:
        dialect = self.scenario.dialect
        if dialect == "llamacpp":
            return "b1-lmstream-sim"
        if dialect == "openai":
            return "fp_lmstreamsim"
        return self.model.id

    def stall(self, position: int) -> float:
        sc = self.scenario
        return sc.stall_s * self.scale if sc.stall_at == position else 0.0


def _prompt_tokens(messages: list[Any]) -> int:
    chars = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    chars += len(part["text"])
    return max(1, chars // 4)


_MARKER = re.compile(r"\[\[sim (\{.*?\})\]\]", re.DOTALL)


def _marker_overrides(messages: object) -> dict[str, object] | None:
    """Scenario fields written into a prompt as ``[[sim {"stall_at": 3}]]``.

    Higher-level code (batch rows, notebooks, widgets) varies only the prompt text, so this is
    how one row or one cell asks for its own fault. Later markers win; the marker stays in the
    prompt (it is just text to everything else).
    """
    if not isinstance(messages, list):
        return None
    found: dict[str, object] = {}
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str) or "[[sim " not in content:
            continue
        for match in _MARKER.finditer(content):
            try:
                value = json.loads(match.group(1))
            except ValueError as exc:
                raise ScenarioError(f"a [[sim …]] marker is not valid JSON: {exc}") from None
            if not isinstance(value, dict):
                raise ScenarioError("a [[sim …]] marker must hold a JSON object")
            found.update(value)
    return found or None


def _reply_pieces(reply: str) -> list[str]:
    """A fixed reply cut into word pieces (each with the space after it), as tokens arrive."""
    return re.findall(r"\S+\s*|\s+", reply) or [""]


def _pieces(
    sc: Scenario, seed: int, model: str, messages: object, n_answer: int
) -> list[tuple[str, str]]:
    pieces: list[tuple[str, str]] = []
    if sc.reasoning != "off" and sc.reasoning_tokens > 0:
        thinking = TextSource(seed=seed, model=model, messages=messages, kind="reasoning")
        words = thinking.tokens(sc.reasoning_tokens)
        if sc.reasoning == "inline":
            words[0] = "<think>" + words[0]
            words[-1] = words[-1] + "</think>\n\n"
            pieces.extend(("content", w) for w in words)
        else:
            pieces.extend(("reasoning", w) for w in words)
    answer = TextSource(seed=seed, model=model, messages=messages)
    if sc.reply is not None:
        reply = _reply_pieces(sc.reply)
        pieces.extend(("content", reply[i % len(reply)]) for i in range(n_answer))
    elif sc.chunk_chars is not None:
        pieces.extend(("content", answer.chars(sc.chunk_chars)) for _ in range(n_answer))
    else:
        pieces.extend(("content", w) for w in answer.tokens(n_answer))
    return pieces


def _intervals(
    sc: Scenario, gen_tps: float, scale: float, seed: int, model: str, n: int
) -> list[float]:
    if n == 0:
        return []
    base = 0.0 if math.isinf(gen_tps) else scale / gen_tps
    if base == 0.0:
        return [0.0] * n
    rng = random.Random(f"lmstream-sim-timing|{seed}|{model}")
    return [0.0] + [base * (1 + sc.jitter * rng.uniform(-1.0, 1.0)) for _ in range(n - 1)]


async def _sleep_until(deadline: float) -> None:
    delay = deadline - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)


class _Pacing:
    """One request's way through its model: the steps of its prompt processing, then the pace of
    its tokens, each decided from how many requests share the model at that moment (``_pace``).

    ``phase`` is ``"waiting"`` (loading, queued), ``"prefill"``, ``"generation"`` or ``"done"``;
    the engine counts the request in the phase it is in until :meth:`leave`.
    """

    def __init__(self, plan: _Plan, engine: Engine, recorder: Recorder) -> None:
        self.plan = plan
        self.recorder = recorder
        self.engine = engine  # the one whose slot it holds (a reload replaces the model's)
        self.phase = "waiting"
        self.t0 = 0.0
        self.mark = 0  # prompt tokens processed once the current step ends
        self.step_end = 0.0
        self._per_token = plan.prefill_s / max(1, plan.prompt_tokens)

    async def prompt(
        self,
        wait: Callable[[float], Awaitable[None]],
        report: Callable[[int, float], Awaitable[None]],
    ) -> float:
        """Process the prompt step by step; ``report(processed, seconds)`` at 0 and after each
        step. Returns the loop time at which processing ended."""
        plan, engine = self.plan, self.engine
        self.t0 = self.step_end = deadline = asyncio.get_running_loop().time()
        engine.prefilling += 1
        self.phase = "prefill"
        self._stage("prefill")
        await report(0, 0.0)
        done = 0
        marks = prompt_steps(plan.prompt_tokens, plan.batch, bounded=plan.native)
        hang = plan.scenario.prompt_stall_at
        if hang is not None and 0 < hang < plan.prompt_tokens and hang not in marks:
            marks = sorted([*marks, hang])  # report where it stops
        for mark in marks:
            if done == hang:
                deadline += plan.scenario.stall_s * plan.scale
            deadline += (mark - done) * self._per_token * engine.prefill_factor()
            self.step_end, self.mark = deadline, mark
            await wait(deadline)
            done = mark
            await report(done, deadline - self.t0)
        engine.leave_prefill()
        engine.generating += 1
        self.phase = "generation"
        self._stage("generation")
        return deadline

    def _stage(self, stage: Stage) -> None:
        self.recorder.update(self.plan.index, stage=stage)

    def token_wait(self, i: int) -> float:
        """The simulated wait before token ``i``, at the pace the model gives it now."""
        return self.plan.intervals[i] * self.engine.gen_factor() + self.plan.stall(i)

    def leave(self) -> float | None:
        """Leave the model; return when the slot frees: ``None`` now, or the loop time at which
        prompt processing ends (the server finishes it even when the client left)."""
        phase, self.phase = self.phase, "done"
        self._stage("done")
        if phase == "prefill":
            left = self.plan.prompt_tokens - self.mark
            end = self.step_end + left * self._per_token * self.engine.prefill_factor()
            self.engine.leave_prefill(end)
            return end
        if phase == "generation":
            self.engine.generating -= 1
        return None


class _EventStream(Response):
    """The ``text/event-stream`` reply: headers at once, silence while loading and processing the
    prompt (or llama.cpp's ``prompt_progress`` chunks when asked), then one ``data:`` event per
    token, with the scenario's faults along the way."""

    def __init__(self, sim: _Sim, plan: _Plan) -> None:
        self.sim = sim
        self.plan = plan
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream"),
            (b"cache-control", b"no-cache"),
        ]
        self._client_gone = False
        self._sent = 0
        self._batch = plan.scenario.write_events
        self._held: list[bytes] = []  # events gathered for one write (write_events)
        self._bom = plan.scenario.bom
        self._newline = _LINE_ENDINGS[plan.scenario.line_ending]
        self._opened = plan.scenario.dialect == "lmstudio"  # other dialects send an opening chunk
        self._first_at: float | None = None
        self._last_at: float | None = None
        self._t0: float | None = None
        self._load_took: float | None = None  # seconds, when this request JIT-loaded the model
        self._next_ping: float | None = None
        self._ping_step = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        abort = False
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        self._client_gone = True
                        group.cancel_scope.cancel()
                        return

            group.start_soon(watch)
            try:
                abort = await self._produce(send)
            finally:
                group.cancel_scope.cancel()
        if abort:
            raise _Abort

    # framing

    async def _emit(self, send: Send, text: str) -> None:
        data = text.replace("\n", self._newline).encode("utf-8")
        if self._bom:
            self._bom = False
            data = _BOM + data
        if self._batch is None:
            await send({"type": "http.response.body", "body": data, "more_body": True})
            return
        self._held.append(data)
        if len(self._held) >= self._batch:
            await self._flush(send)

    async def _flush(self, send: Send) -> None:
        """Write the events gathered by ``write_events`` (before a pause, an end or a drop)."""
        if self._held:
            data, self._held = b"".join(self._held), []
            await send({"type": "http.response.body", "body": data, "more_body": True})

    async def _pause_until(self, send: Send, deadline: float) -> None:
        await self._flush(send)
        await _sleep_until(deadline)

    async def _end(self, send: Send) -> None:
        """End the chunked body cleanly (the terminating zero-length chunk)."""
        data = b"".join(self._held) + (_BOM if self._bom else b"")  # BOM: even when empty
        self._held = []
        await send({"type": "http.response.body", "body": data, "more_body": False})

    async def _emit_data(self, send: Send, obj: object) -> None:
        await self._emit(send, "data: " + _dumps(obj).decode("utf-8") + "\n\n")

    def _chunk(self, delta: JSON, finish_reason: str | None = None) -> JSON:
        plan = self.plan
        return {
            "id": plan.id,
            "object": "chat.completion.chunk",
            "created": plan.created,
            "model": plan.model.id,
            "system_fingerprint": plan.fingerprint,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }

    def _delta(self, kind: str, text: str) -> JSON:
        sc = self.plan.scenario
        key = "content"
        if kind == "reasoning":
            key = "reasoning" if sc.reasoning == "reasoning" else "reasoning_content"
        if sc.dialect == "lmstudio":
            return {"role": "assistant", key: text}
        return {key: text}

    async def _open(self, send: Send) -> None:
        if self._opened:
            return
        self._opened = True
        content = "" if self.plan.scenario.dialect == "openai" else None
        await self._emit_data(send, self._chunk({"role": "assistant", "content": content}))

    def _usage(self) -> JSON:
        plan = self.plan
        body: JSON = {
            "id": plan.id,
            "object": "chat.completion.chunk",
            "created": plan.created,
            "model": plan.model.id,
            "system_fingerprint": plan.fingerprint,
            "choices": [],
            "usage": {
                "prompt_tokens": plan.prompt_tokens,
                "completion_tokens": self._sent,
                "total_tokens": plan.prompt_tokens + self._sent,
            },
        }
        if plan.scenario.dialect == "llamacpp":
            body["timings"] = _timings(plan, self._t0, self._first_at, self._last_at, self._sent)
        return body

    # the generation

    def _count_sent(self) -> None:
        self._sent += 1
        self.sim.recorder.update(self.plan.index, sent_tokens=self._sent)

    async def _wait_prefill(self, send: Send, until: float) -> None:
        """Silence (or ``: ping`` comments every ``ping_s``) until loop time ``until``."""
        if self._next_ping is not None:
            while self._next_ping < until:
                await self._pause_until(send, self._next_ping)
                await self._emit(send, ": ping\n\n")
                self._next_ping += self._ping_step
        await self._pause_until(send, until)

    # what the framings write; this class writes OpenAI-style chunks, _NativeStream named events

    async def _on_start(self, send: Send) -> None:
        """Before the model is loaded and a slot taken (the native API's ``chat.start``)."""

    def _load_report(self, send: Send) -> _LoadReport | None:
        """What reports a JIT load this request causes (OpenAI-style streams stay silent)."""
        return None

    async def _on_prompt(self, send: Send, processed: int, seconds: float) -> None:
        """llama.cpp's ``prompt_progress`` chunk, when the request asked for it."""
        plan = self.plan
        if not plan.return_progress:
            return
        chunk = self._chunk({"role": "assistant", "content": None})
        chunk["prompt_progress"] = {
            "total": plan.prompt_tokens,
            "cache": 0,
            "processed": processed,
            "time_ms": round(seconds * 1000),
        }
        self._opened = True  # a progress chunk opens the stream as the opening chunk would
        await self._emit_data(send, chunk)

    async def _on_token(self, send: Send, kind: str, text: str) -> None:
        await self._open(send)
        await self._emit_data(send, self._chunk(self._delta(kind, text)))

    async def _on_malformed(self, send: Send, bad: str) -> None:
        await self._emit(send, f"data: {bad}\n\n")

    async def _on_error(self, send: Send, message: str) -> None:
        """A failure after the headers: ``event: error``, then the end without ``[DONE]``."""
        error = {"error": {"message": message, "type": "server_error"}, "message": message}
        await self._emit(send, "event: error\ndata: " + _dumps(error).decode() + "\n\n")
        await self._end(send)

    async def _on_finish(self, send: Send) -> None:
        plan = self.plan
        await self._open(send)
        await self._emit_data(send, self._chunk({}, plan.finish_reason))
        if plan.include_usage and not plan.v0:
            await self._emit_data(send, self._usage())
        await self._emit(send, "data: [DONE]\n\n")
        await self._end(send)

    async def _produce(self, send: Send) -> bool:
        """Write the whole stream; return True when the connection must be dropped.

        The one production loop of every stream: load, queue, process the prompt, generate,
        with the scenario's faults at their positions; the ``_on_*`` hooks frame it.
        """
        sim, plan, sc = self.sim, self.plan, self.plan.scenario
        recorder, index = sim.recorder, plan.index
        loop = asyncio.get_running_loop()
        pacing: _Pacing | None = None
        release_at: float | None = None
        n = len(plan.pieces)
        try:
            if sc.disconnect_at == 0:
                recorder.finish(index, "fault_disconnect")
                return True
            await self._on_start(send)
            self._load_took, engine = await sim.acquire(plan, self._load_report(send))
            pacing = _Pacing(plan, engine, sim.recorder)
            if plan.scenario.ping_s is not None:
                self._ping_step = plan.scenario.ping_s * plan.scale
                self._next_ping = loop.time() + self._ping_step if self._ping_step > 0 else None
            self._t0 = loop.time()
            deadline = await pacing.prompt(
                lambda until: self._wait_prefill(send, until),
                lambda done, seconds: self._on_prompt(send, done, seconds),
            )
            self._next_ping = None
            for i in range(n + 1):
                if i > 0 and sc.disconnect_at == i:
                    await self._flush(send)
                    recorder.finish(index, "fault_disconnect")
                    return True
                if sc.end_at == i:
                    await self._end(send)
                    recorder.finish(index, "truncated")
                    return False
                if sc.error_at == i:
                    await self._on_error(send, (sc.error_message or "Compute error.") + plan.echo)
                    recorder.finish(index, "stream_error")
                    return False
                if i == n:
                    break
                deadline += pacing.token_wait(i)
                if deadline > loop.time():
                    await self._pause_until(send, deadline)
                elif i % _YIELD_EVERY == _YIELD_EVERY - 1:
                    await asyncio.sleep(0)
                if sc.malformed_at == i:
                    await self._open(send)
                    bad = sc.malformed_data if sc.malformed_data is not None else '{"id": broken'
                    await self._on_malformed(send, bad + plan.echo)
                kind, text = plan.pieces[i]
                await self._on_token(send, kind, text)
                now = loop.time()
                if self._first_at is None:
                    self._first_at = now
                self._last_at = now
                self._count_sent()
            await self._on_finish(send)
            recorder.finish(index, "completed")
            return False
        except BaseException:
            if self._client_gone:
                phase = "prefill" if self._sent == 0 else "generation"
                recorder.finish(index, "client_disconnected", disconnect_phase=phase)
            else:
                recorder.finish(index, "http_error" if self._sent == 0 else "stream_error")
            raise
        finally:
            if pacing is not None:
                release_at = pacing.leave()  # generation stops at once, prompt processing not
                pacing.engine.release(release_at)


class _NativeStream(_EventStream):
    """LM Studio 0.4's ``POST /api/v1/chat`` stream: named events (``event: <type>`` and
    ``data: <json>`` with the same ``type``), ``chat.start`` first and ``chat.end`` last, with
    the load and prompt-processing progress between them (cadence in ``_pace``).

    ``model_load.*`` go only to the request whose arrival started a JIT load; one that arrives
    while that load runs waits for it in silence. Reasoning and answer come as blocks
    (``reasoning.start``/``delta``/``end``, then ``message.*``). A mid-stream failure sends
    ``error`` and then still ``chat.end`` with what was generated, as LM Studio documents;
    ``end_at`` and ``disconnect_at`` cut the stream with neither. A ``malformed_at`` line is a
    ``message.delta`` event whose data is not JSON.
    """

    def __init__(self, sim: _Sim, plan: _Plan) -> None:
        super().__init__(sim, plan)
        self._opened = True  # no opening chunk
        self._block: str | None = None  # "reasoning" or "message" while one is open
        self._done: list[tuple[str, str]] = []

    async def _event(self, send: Send, kind: str, **fields: object) -> None:
        data = _dumps({"type": kind, **fields}).decode("utf-8")
        await self._emit(send, f"event: {kind}\ndata: {data}\n\n")

    async def _on_start(self, send: Send) -> None:
        await self._event(send, "chat.start", model_instance_id=self.plan.model.id)

    def _load_report(self, send: Send) -> _LoadReport | None:
        model_id = self.plan.model.id

        async def report(stage: str, fraction: float, seconds: float) -> None:
            if stage == "start":
                await self._event(send, "model_load.start", model_instance_id=model_id)
            elif stage == "progress":
                await self._event(
                    send, "model_load.progress", model_instance_id=model_id, progress=fraction
                )
            else:
                await self._event(
                    send,
                    "model_load.end",
                    model_instance_id=model_id,
                    load_time_seconds=round(seconds, 3),
                )

        return report

    async def _on_prompt(self, send: Send, processed: int, seconds: float) -> None:
        total = self.plan.prompt_tokens
        if processed == 0:
            await self._event(send, "prompt_processing.start")
        await self._event(send, "prompt_processing.progress", progress=round(processed / total, 4))
        if processed >= total:
            await self._event(send, "prompt_processing.end")

    async def _close_block(self, send: Send) -> None:
        if self._block is not None:
            await self._event(send, f"{self._block}.end")
            self._block = None

    async def _on_token(self, send: Send, kind: str, text: str) -> None:
        block = "reasoning" if kind == "reasoning" else "message"
        if block != self._block:
            await self._close_block(send)
            self._block = block
            await self._event(send, f"{block}.start")
        await self._event(send, f"{block}.delta", content=text)
        self._done.append((kind, text))

    async def _on_malformed(self, send: Send, bad: str) -> None:
        await self._emit(send, f"event: message.delta\ndata: {bad}\n\n")

    def _result(self) -> JSON:
        firsts = [] if self._first_at is None else [self._first_at]
        last = self._last_at if self._last_at is not None else asyncio.get_running_loop().time()
        t0 = self._t0 if self._t0 is not None else last
        return _native_result(self.plan, self._done, t0, firsts, last, self._load_took)

    async def _on_error(self, send: Send, message: str) -> None:
        error = {"type": "internal_error", "message": message, "code": None, "param": None}
        await self._event(send, "error", error=error)
        await self._event(send, "chat.end", result=self._result())
        await self._end(send)

    async def _on_finish(self, send: Send) -> None:
        await self._close_block(send)
        await self._event(send, "chat.end", result=self._result())
        await self._end(send)


def _native_result(
    plan: _Plan,
    pieces: list[tuple[str, str]],
    t0: float,
    first: list[float],
    last: float,
    load_took: float | None,
) -> JSON:
    """The body of a non-streaming ``/api/v1/chat`` reply, and ``chat.end``'s ``result``.

    ``first`` holds the loop time of the first token, if there was one; ``time_to_first_token_
    seconds`` counts from the start of prompt processing (after the load and the queue).
    """
    reasoning = "".join(text for kind, text in pieces if kind == "reasoning")
    content = "".join(text for kind, text in pieces if kind != "reasoning")
    output: list[JSON] = []
    if reasoning:
        output.append({"type": "reasoning", "content": reasoning})
    output.append({"type": "message", "content": content})
    n = len(pieces)
    start = first[0] if first else last
    generation = last - start
    stats: JSON = {
        "input_tokens": plan.prompt_tokens,
        "total_output_tokens": n,
        "reasoning_output_tokens": sum(1 for kind, _ in pieces if kind == "reasoning"),
        "tokens_per_second": round(n / generation, 3) if n and generation > 0 else 0.0,
        "time_to_first_token_seconds": round(start - t0, 3),
    }
    if load_took is not None:
        stats["model_load_time_seconds"] = round(load_took, 3)
    return {
        "model_instance_id": plan.model.id,
        "output": output,
        "stats": stats,
        "response_id": plan.id,
    }


def _timings(
    plan: _Plan, t0: float | None, first: float | None, last: float | None, sent: int
) -> JSON:
    """llama.cpp's ``timings`` object, from the measured times."""
    prompt_ms = ((first or t0 or 0.0) - (t0 or 0.0)) * 1000
    predicted_ms = ((last or 0.0) - (first or 0.0)) * 1000
    return {
        "prompt_n": plan.prompt_tokens,
        "prompt_ms": round(prompt_ms, 3),
        "prompt_per_token_ms": round(prompt_ms / plan.prompt_tokens, 3),
        "prompt_per_second": round(plan.prompt_tokens / (prompt_ms / 1000), 3)
        if prompt_ms
        else 0.0,
        "predicted_n": sent,
        "predicted_ms": round(predicted_ms, 3),
        "predicted_per_token_ms": round(predicted_ms / sent, 3) if sent else 0.0,
        "predicted_per_second": round(sent / (predicted_ms / 1000), 3) if predicted_ms else 0.0,
    }


# --- non-streaming -------------------------------------------------------------------------------


async def _watching_disconnect(
    request: Request, work: Callable[[], Awaitable[Response]]
) -> tuple[Response | None, bool]:
    """Run ``work`` while watching for the client to go away; (response, client_gone)."""
    result: list[Response] = []
    gone = False
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            nonlocal gone
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    gone = True
                    group.cancel_scope.cancel()
                    return

        group.start_soon(watch)
        try:
            result.append(await work())
        finally:
            group.cancel_scope.cancel()
    return (result[0] if result else None), gone


async def _complete(sim: _Sim, plan: _Plan, request: Request) -> Response:
    """Answer a non-streaming request after the whole simulated generation time."""
    sc = plan.scenario
    recorder, index = sim.recorder, plan.index
    loop = asyncio.get_running_loop()
    n = len(plan.pieces)
    pacing: list[_Pacing] = []
    deadlines: list[float] = []  # when each token is (or was) produced
    first: list[float] = []

    def produced(now: float) -> int:
        return sum(1 for d in deadlines if d <= now)

    async def quiet(_done: int, _seconds: float) -> None:
        return None

    disconnect = (
        sc.disconnect_at if sc.disconnect_at is not None and sc.disconnect_at <= n else None
    )
    error = sc.error_at if sc.error_at is not None and sc.error_at <= n else None
    if disconnect is not None and error is not None and error < disconnect:
        disconnect = None

    async def work() -> Response:
        if disconnect == 0:
            recorder.finish(index, "fault_disconnect", status_code=200)
            return _AbortAfterHeaders()
        took, engine = await sim.acquire(plan)
        pace = _Pacing(plan, engine, sim.recorder)
        pacing.append(pace)
        first_at = await pace.prompt(_sleep_until, quiet)
        first.append(first_at)
        stop = disconnect if disconnect is not None else error
        count = n if stop is None else stop
        deadline = first_at
        # Alone on its model a request's pace is fixed: one sleep to the end. When requests
        # share the model, each token's pace depends on the others at that moment.
        shared = pace.engine.shared
        for i in range(count):
            deadline += pace.token_wait(i)
            deadlines.append(deadline)
            if shared and deadline > loop.time():
                await _sleep_until(deadline)
        await _sleep_until(deadline if count else first_at + plan.stall(0))
        recorder.update(index, sent_tokens=count)
        if disconnect is not None:
            recorder.finish(index, "fault_disconnect", status_code=200)
            return _AbortAfterHeaders()
        if error is not None:
            message = (sc.error_message or "Compute error.") + plan.echo
            if plan.native:
                return _native_error("internal_error", message, 500)
            body = {
                "error": {"message": message, "type": "server_error", "param": None, "code": None}
            }
            return _json(body, 500)
        end = loop.time()
        if plan.native:
            last = deadlines[-1] if deadlines else first_at
            return _json(_native_result(plan, plan.pieces, pace.t0, deadlines[:1], last, took))
        return _json(_completion_body(plan, plan.model.context_length, pace.t0, first_at, end))

    response: Response | None = None
    gone = False
    try:
        response, gone = await _watching_disconnect(request, work)
    finally:
        if pacing:
            pacing[0].engine.release(pacing[0].leave())
    if response is None or gone:
        now = loop.time()
        phase = "prefill" if not first or now < first[0] else "generation"
        recorder.finish(
            index, "client_disconnected", disconnect_phase=phase, sent_tokens=produced(now)
        )
        return Response(b"", status_code=499)  # nobody is listening any more
    return response  # the front door records the outcome once the reply is sent


def _completion_body(
    plan: _Plan, context_length: int, t0: float, first_at: float, end: float
) -> JSON:
    sc = plan.scenario
    reasoning = "".join(text for kind, text in plan.pieces if kind == "reasoning")
    content = "".join(text for kind, text in plan.pieces if kind == "content")
    n = len(plan.pieces)
    message: JSON = {"role": "assistant", "content": content}
    if sc.reasoning == "reasoning":
        message["reasoning"] = reasoning
    else:
        message["reasoning_content"] = reasoning
    body: JSON = {
        "id": plan.id,
        "object": "chat.completion",
        "created": plan.created,
        "model": plan.model.id,
        "choices": [
            {"index": 0, "logprobs": None, "finish_reason": plan.finish_reason, "message": message}
        ],
        "usage": {
            "prompt_tokens": plan.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": plan.prompt_tokens + n,
        },
        "system_fingerprint": plan.fingerprint,
    }
    if sc.dialect == "llamacpp":
        body["timings"] = _timings(plan, t0, first_at, end, n)
    if plan.v0:
        generation = max(end - first_at, 1e-9)
        body["stats"] = {
            "tokens_per_second": round(n / generation, 3) if n else 0.0,
            "time_to_first_token": round(first_at - t0, 3),
            "generation_time": round(end - first_at, 3),
            "stop_reason": "maxPredictedTokensReached"
            if plan.finish_reason == "length"
            else "eosFound",
        }
        body["model_info"] = {
            "arch": "llama",
            "quant": "Q4_K_M",
            "format": "gguf",
            "context_length": context_length,
        }
        body["runtime"] = {
            "name": "llama.cpp-lmstream-sim",
            "version": "1.0.0",
            "supported_formats": ["gguf"],
        }
    return body


# --- hostile servers ----------------------------------------------------------------------------

_FLOOD_PIECE = 1 << 16
_FLOOD_LINE = b"data: " + b"a" * 1017 + b"\n"  # 1 KiB: endless data lines, no blank line
_GZIP_MAX = 1 << 30  # compressing takes ~5 s per GiB, so a bomb inflates to at most this


@functools.lru_cache(maxsize=4)
def _gzip_bomb(prefix: bytes, inflated: int) -> bytes:
    """``prefix`` and then ``a`` up to ``inflated`` bytes, gzip-compressed (~1 KB per MB)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [compressor.compress(prefix)]
    block = b"a" * (1 << 20)
    left = inflated - len(prefix)
    while left > 0:
        parts.append(compressor.compress(block if left >= len(block) else block[:left]))
        left -= len(block)
    parts.append(compressor.flush())
    return b"".join(parts)


class _Flood(Response):
    """A body that never ends properly (the ``flood`` scenarios), for clients' memory bounds.

    It stops by itself after ``flood_bytes`` (inflated) or when the client goes away, so a
    client without a bound costs a test time and memory, but never hangs it.
    """

    def __init__(self, sim: _Sim, index: int, sc: Scenario, *, stream: bool, status: int) -> None:
        self.sim = sim
        self.index = index
        self.kind = sc.flood
        self.total = sc.flood_bytes
        self.status_code = status
        self.background = None
        content_type = b"text/event-stream" if stream else _JSON_TYPE.encode()
        self.raw_headers = [(b"content-type", content_type)]
        if self.kind == "gzip":
            self.raw_headers.append((b"content-encoding", b"gzip"))
        self.prefix = b'data: {"choices":[{"delta":{"content":"' if stream else b""
        if not stream:
            self.prefix = b'{"choices":[{"message":{"content":"'

    async def _pieces(self) -> list[bytes] | None:
        """The whole body for gzip (small), None for the generated floods."""
        if self.kind != "gzip":
            return None
        inflated = min(self.total, _GZIP_MAX)
        bomb = await anyio.to_thread.run_sync(_gzip_bomb, self.prefix, inflated)
        return [bomb[i : i + _FLOOD_PIECE] for i in range(0, len(bomb), _FLOOD_PIECE)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pieces = await self._pieces()
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        gone = False
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                nonlocal gone
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone = True
                group.cancel_scope.cancel()

            group.start_soon(watch)
            try:
                await self._write(send, pieces)
            finally:
                group.cancel_scope.cancel()
        if gone:
            self.sim.recorder.finish(self.index, "client_disconnected")

    async def _write(self, send: Send, pieces: list[bytes] | None) -> None:
        async def body(data: bytes, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": more})

        if pieces is None:
            piece = _FLOOD_LINE * (_FLOOD_PIECE // len(_FLOOD_LINE))
            if self.kind == "line" or self.prefix[:1] == b"{":
                await body(self.prefix)
                piece = b"a" * _FLOOD_PIECE
            count = max(1, self.total // len(piece))
        else:
            count = len(pieces)
        for i in range(count):
            await body(piece if pieces is None else pieces[i])
            # Let a broken connection be noticed before the next write (uvicorn then drops
            # writes quietly instead of asyncio logging each one that fails).
            await asyncio.sleep(0)
        await body(b"", more=False)


def _with_content_type(response: Response, content_type: str) -> Response:
    response.raw_headers = [(k, v) for k, v in response.raw_headers if k != b"content-type"]
    response.raw_headers.append((b"content-type", content_type.encode("latin-1")))
    return response


def _raw_body(sc: Scenario, stream: bool) -> Response:
    body = (sc.raw_body or "").encode("utf-8")
    content_type = sc.content_type or ("text/event-stream" if stream else _JSON_TYPE)
    return _with_content_type(Response(body, 200), content_type)


def _redirect(sc: Scenario) -> Response:
    status = sc.http_status if sc.http_status is not None and 300 <= sc.http_status < 400 else 307
    return Response(b"", status, headers={"location": sc.redirect_to or "/"})


def _echo(request: Request) -> str:
    """What a careless server repeats back: the credentials and the URL it was sent."""
    auth = request.headers.get("authorization") or "none"
    return f" (the request had Authorization: {auth}, URL: {request.url})"


# --- request handling ----------------------------------------------------------------------------


class _BadRequest(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


def _status_fault(sc: Scenario, status: int, echo: str = "") -> Response:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    message = (sc.error_message or f"Simulated {status} {phrase}.") + echo
    if sc.error_body == "string":
        return _json({"error": message}, status)
    if sc.error_body == "html":
        return Response(
            _html_page(f"{status} {phrase}", message), status, media_type="text/html; charset=utf-8"
        )
    if sc.error_body == "empty":
        return Response(b"", status)
    return _error_object(message, status)


def _content_type_fault(sc: Scenario, content_type: str, echo: str = "") -> Response:
    message = (sc.error_message or "This reply is not an event stream.") + echo
    if "html" in content_type:
        body = _html_page("LM Studio", message).encode()
    elif "json" in content_type:
        body = _dumps(
            {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
        )
    else:
        body = message.encode()
    return _with_content_type(Response(body, 200), content_type)


_REASONING_EFFORTS = ("off", "low", "medium", "high", "on")


def _native_field(
    body: JSON,
    name: str,
    kinds: tuple[type, ...],
    what: str,
    invalid: Callable[[str, str | None, str | None], Response],
) -> Any:
    value = body.get(name)
    if value is not None and (
        not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
    ):
        raise _BadRequest(invalid(f'"{name}" must be {what}', "invalid_type", name))
    return value


def _native_messages(
    body: JSON, invalid: Callable[[str, str | None, str | None], Response]
) -> list[Any]:
    """A native request's ``system_prompt`` and ``input`` as an OpenAI-style message list, so that
    text, scenario markers and retries are counted as for the same prompt on ``/v1``."""
    system = body.get("system_prompt")
    if system is not None and not isinstance(system, str):
        raise _BadRequest(
            invalid('"system_prompt" must be a string', "invalid_type", "system_prompt")
        )
    raw = body.get("input")
    if raw is None:
        raise _BadRequest(invalid('"input" is required', "missing_required_parameter", "input"))
    parts: list[str] = []
    if isinstance(raw, str):
        parts.append(raw)
    elif isinstance(raw, list) and raw:
        for item in raw:
            if not isinstance(item, dict) or item.get("type") not in ("message", "image"):
                raise _BadRequest(
                    invalid(
                        'every item of "input" must be {"type": "message", "content": …} '
                        'or {"type": "image", "data_url": …}',
                        "invalid_type",
                        "input",
                    )
                )
            if item["type"] == "message":
                if not isinstance(item.get("content"), str):
                    raise _BadRequest(
                        invalid('a message item needs a string "content"', "invalid_type", "input")
                    )
                parts.append(item["content"])
    else:
        raise _BadRequest(
            invalid('"input" must be a string or a non-empty array', "invalid_type", "input")
        )
    messages: list[Any] = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": "\n".join(parts)})
    return messages


def _llamacpp_overflow(prompt_tokens: int, n_ctx: int) -> Response:
    """llama-server's answer to a prompt over its context (plain JSON even for a stream)."""
    message = (
        f"request ({prompt_tokens} tokens) exceeds the available context size ({n_ctx} tokens), "
        "try increasing it"
    )
    body = {
        "error": {
            "code": 400,
            "message": message,
            "type": "exceed_context_size_error",
            "n_prompt_tokens": prompt_tokens,
            "n_ctx": n_ctx,
        }
    }
    return _json(body, 400)


def _field(body: JSON, name: str, kinds: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is not None and (
        not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
    ):
        raise _BadRequest(
            _error_object(f"'{name}' must be {what}, got {json.dumps(value)}", param=name)
        )
    return value


class _Handlers:
    def __init__(self, sim: _Sim) -> None:
        self.sim = sim

    # models

    def _v0_entry(self, model: _Model) -> JSON:
        embeddings = model.type == "embeddings"
        return {
            "id": model.id,
            "object": "model",
            "type": model.type,
            "publisher": "lmstream-sim",
            "arch": "nomic-bert" if embeddings else "llama",
            "compatibility_type": model.format,
            "quantization": "F16" if embeddings else "Q4_K_M",
            "state": "loaded" if model.loaded else "not-loaded",
            "max_context_length": 2048 if embeddings else self.sim.config.context_length,
        }

    def _hostile_listing(self, request: Request) -> Response | None:
        """The server-wide ``redirect_to`` and ``flood`` apply to the model lists too."""
        sc = self.sim.config.defaults
        if sc.redirect_to is not None:
            return _redirect(sc)
        if sc.flood is not None:
            index: int = request.scope["state"]["sim_record"]
            return _Flood(self.sim, index, sc, stream=False, status=200)
        return None

    async def list_models(self, request: Request) -> Response:
        hostile = self._hostile_listing(request)
        if hostile is not None:
            return hostile
        data = [
            {"id": m.id, "object": "model", "owned_by": "organization_owner"}
            for m in self.sim.models.values()
        ]
        return _json({"data": data, "object": "list"})

    async def list_models_v0(self, request: Request) -> Response:
        hostile = self._hostile_listing(request)
        if hostile is not None:
            return hostile
        data = [self._v0_entry(m) for m in self.sim.models.values()]
        return _json({"object": "list", "data": data})

    async def get_model_v0(self, request: Request) -> Response:
        model_id = request.path_params["model_id"]
        model = self.sim.models.get(model_id)
        if model is None:
            return _error_object(
                f'Model "{model_id}" not found.', 404, param="model", code="model_not_found"
            )
        return _json(self._v0_entry(model))

    async def unexpected(self, request: Request, exc: Exception) -> Response:
        if self.sim.config.defaults.dialect == "llamacpp":  # as llama-server answers
            body = {"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}}
            return _json(body, 404)
        return _json(
            {"error": f"Unexpected endpoint or method. ({request.method} {request.url.path})"}
        )

    # chat

    async def chat(self, request: Request) -> Response:
        try:
            return await self._chat(request)
        except _BadRequest as bad:
            return bad.response

    async def native_chat(self, request: Request) -> Response:
        try:
            return await self._native_chat(request)
        except _BadRequest as bad:
            return bad.response

    async def _body(self, request: Request, bad: Callable[[str], Response]) -> JSON:
        raw = await request.body()
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise _BadRequest(bad(f"Invalid JSON in request body: {exc}")) from None
        if not isinstance(body, dict):
            raise _BadRequest(bad("The request body must be a JSON object."))
        return body

    def _before_stream(
        self, sc: Scenario, index: int, stream: bool, echo: str, *, native: bool = False
    ) -> Response | None:
        """The whole-response faults, which act before any model work."""
        sim = self.sim
        if sc.redirect_to is not None:
            return _redirect(sc)
        if sc.http_status is not None:
            sim.recorder.finish(index, "http_error", status_code=sc.http_status)
            if sc.flood is not None:
                return _Flood(sim, index, sc, stream=stream, status=sc.http_status)
            return _status_fault(sc, sc.http_status, echo)
        if sc.no_model:
            if native:
                return _native_error("invalid_request", _NO_MODELS, param="model")
            return _json({"error": _NO_MODELS}, 400)
        if sc.raw_body is not None:
            return _raw_body(sc, stream)
        if sc.flood is not None:
            return _Flood(sim, index, sc, stream=stream, status=200)
        return None

    def _make_plan(
        self,
        index: int,
        sc: Scenario,
        model: _Model,
        messages: list[Any],
        *,
        max_tokens: int | None,
        seed: int | None,
        **fields: Any,
    ) -> _Plan:
        sim, config = self.sim, self.sim.config
        prompt_tokens = _prompt_tokens(messages)
        seed = config.seed if seed is None else seed
        if sc.reply is not None and sc.output_tokens is None:
            n_answer = len(_reply_pieces(sc.reply))
        else:
            n_answer = _DEFAULT_OUTPUT_TOKENS if sc.output_tokens is None else sc.output_tokens
        finish_reason = "stop"
        if max_tokens is not None and max_tokens > 0 and max_tokens < n_answer:
            n_answer, finish_reason = max_tokens, "length"
        profile = config.speeds
        scale = config.time_scale if sc.time_scale is None else sc.time_scale
        prefill_tps = profile.prefill_tps if sc.prefill_tps is None else sc.prefill_tps
        gen_tps = profile.gen_tps if sc.gen_tps is None else sc.gen_tps
        load_s = profile.load_s if sc.load_s is None else sc.load_s
        pieces = _pieces(sc, seed, model.id, messages, n_answer)
        batch = sc.batch_size
        if batch is None:
            batch = LLAMACPP_BATCH if sc.dialect == "llamacpp" else LMSTUDIO_BATCH
        native = bool(fields.get("native"))
        plan = _Plan(
            index=index,
            id=sim.new_id("resp_" if native else "chatcmpl-"),
            created=int(time.time()),
            model=model,
            scenario=sc,
            scale=scale,
            load_s=load_s * scale,
            prefill_s=0.0 if math.isinf(prefill_tps) else prompt_tokens / prefill_tps * scale,
            intervals=_intervals(sc, gen_tps, scale, seed, model.id, len(pieces)),
            pieces=pieces,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            batch=batch,
            **fields,
        )
        sim.recorder.update(index, id=plan.id, planned_tokens=len(pieces))
        return plan

    async def _chat(self, request: Request) -> Response:
        sim = self.sim
        config = sim.config
        recorder = sim.recorder
        index: int = request.scope["state"]["sim_record"]
        v0 = request.url.path.startswith("/api/v0/")

        body = await self._body(request, _error_object)
        try:
            sc = apply_overrides(config.defaults, body.get("sim"))
            sc = apply_overrides(sc, _marker_overrides(body.get("messages")))
        except ScenarioError as exc:
            return _error_object(str(exc), param="sim")
        stream = _field(body, "stream", (bool,), "true or false") or False
        recorder.update(index, stream=stream)
        sc = sim.transient(sc, body.get("messages"))
        echo = _echo(request) if sc.echo_request else ""
        early = self._before_stream(sc, index, stream, echo)
        if early is not None:
            return early

        messages = body.get("messages")
        if messages is None:
            return _error_object("'messages' field is required", param="messages")
        if not isinstance(messages, list) or not messages:
            return _error_object("'messages' must be a non-empty array", param="messages")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            return _error_object(
                "Every entry of 'messages' must be an object with a 'role'", param="messages"
            )

        model = self._resolve_model(_field(body, "model", (str,), "a string"))
        prompt_tokens = _prompt_tokens(messages)
        recorder.update(index, model=model.id, prompt_tokens=prompt_tokens)
        if prompt_tokens > model.context_length:
            if sc.dialect == "llamacpp":
                return _llamacpp_overflow(prompt_tokens, model.context_length)
            return _json({"error": _OVERFLOW}, 400)

        stream_options = _field(body, "stream_options", (dict,), "an object") or {}
        plan = self._make_plan(
            index,
            sc,
            model,
            messages,
            max_tokens=_field(body, "max_tokens", (int,), "an integer"),
            seed=_field(body, "seed", (int,), "an integer"),
            v0=v0,
            include_usage=bool(stream_options.get("include_usage")),
            echo=echo,
            return_progress=sc.dialect == "llamacpp" and body.get("return_progress") is True,
        )
        if stream:
            if sc.content_type is not None:
                return _content_type_fault(sc, sc.content_type, echo)
            return _EventStream(sim, plan)
        return await _complete(sim, plan, request)

    # the native API

    async def _native_chat(self, request: Request) -> Response:
        """``POST /api/v1/chat``: the native request shape, the same production loop."""
        sim = self.sim
        recorder = sim.recorder
        index: int = request.scope["state"]["sim_record"]

        def invalid(message: str, code: str | None = None, param: str | None = None) -> Response:
            return _native_error("invalid_request", message, code=code, param=param)

        body = await self._body(request, invalid)
        model_id = body.get("model")
        if model_id is None:
            return invalid('"model" is required', "missing_required_parameter", "model")
        if not isinstance(model_id, str):
            return invalid('"model" must be a string', "invalid_type", "model")
        messages = _native_messages(body, invalid)
        try:
            sc = apply_overrides(sim.config.defaults, body.get("sim"))
            sc = apply_overrides(sc, _marker_overrides(messages))
        except ScenarioError as exc:
            return invalid(str(exc), param="sim")
        stream = _native_field(body, "stream", (bool,), "true or false", invalid) or False
        for name in ("temperature", "top_p", "min_p", "repeat_penalty"):
            _native_field(body, name, (int, float), "a number", invalid)
        for name in ("top_k", "max_output_tokens", "context_length"):
            _native_field(body, name, (int,), "an integer", invalid)
        _native_field(body, "store", (bool,), "true or false", invalid)
        reasoning = _native_field(body, "reasoning", (str,), "a string", invalid)
        if reasoning is not None and reasoning not in _REASONING_EFFORTS:
            return invalid(
                f'"reasoning" must be one of {", ".join(_REASONING_EFFORTS)}',
                "invalid_value",
                "reasoning",
            )
        recorder.update(index, stream=stream)
        sc = sim.transient(sc, messages)
        echo = _echo(request) if sc.echo_request else ""
        early = self._before_stream(sc, index, stream, echo, native=True)
        if early is not None:
            return early

        model = sim.models.get(model_id)
        if model is None:
            known = ", ".join(sim.models)
            return _native_error(
                "model_not_found",
                f'Model "{model_id}" not found. Please specify a valid downloaded model '
                f"(e.g., {known}).",
                404,
                code="model_not_found",
                param="model",
            )
        if model.type != "llm":
            return invalid(
                f'Model "{model_id}" is an embedding model and cannot be used for chat.',
                "invalid_model_type",
                "model",
            )
        context_length = body.get("context_length")
        if reasoning == "off" or sc.reasoning == "inline":
            # the native API always parses reasoning out of the answer
            sc = dataclasses.replace(sc, reasoning="off" if reasoning == "off" else "separate")
        prompt_tokens = _prompt_tokens(messages)
        recorder.update(index, model=model.id, prompt_tokens=prompt_tokens)
        fits = model.context_length
        if not model.loaded:  # this request loads it, with its own context or the default
            fits = context_length or sim.config.context_length
        if prompt_tokens > fits:
            return invalid(_OVERFLOW, "context_length_exceeded", "input")
        plan = self._make_plan(
            index,
            sc,
            model,
            messages,
            max_tokens=body.get("max_output_tokens"),
            seed=_field(body, "seed", (int,), "an integer"),
            v0=False,
            include_usage=False,
            echo=echo,
            native=True,
            context_length=context_length,
        )
        if stream:
            if sc.content_type is not None:
                return _content_type_fault(sc, sc.content_type, echo)
            return _NativeStream(sim, plan)
        return await _complete(sim, plan, request)

    def _native_entry(self, model: _Model) -> JSON:
        embeddings = model.type == "embeddings"
        config = self.sim.config
        entry: JSON = {
            "type": "embedding" if embeddings else "llm",
            "publisher": "lmstream-sim",
            "key": model.id,
            "display_name": model.id,
            "architecture": "nomic-bert" if embeddings else "llama",
            "quantization": (
                {"name": "F16", "bits_per_weight": 16}
                if embeddings
                else {"name": "4bit" if model.format == "mlx" else "Q4_K_M", "bits_per_weight": 4}
            ),
            "size_bytes": 274_290_560 if embeddings else 4_920_734_816,
            "params_string": None if embeddings else "8B",
            "max_context_length": 2048 if embeddings else max(131072, config.context_length),
            "format": model.format,
        }
        if not embeddings:
            entry["capabilities"] = {
                "vision": False,
                "trained_for_tool_use": True,
                "reasoning": config.defaults.reasoning != "off",
            }
        instances: list[JSON] = []
        if model.loaded:
            instance_config: JSON = {"context_length": model.context_length}
            if not embeddings:
                instance_config.update(
                    eval_batch_size=config.defaults.batch_size or LMSTUDIO_BATCH,
                    parallel=model.engine.parallel,
                    flash_attention=True,
                )
            instances.append({"id": model.id, "config": instance_config})
        entry["loaded_instances"] = instances
        return entry

    async def list_models_native(self, request: Request) -> Response:
        hostile = self._hostile_listing(request)
        if hostile is not None:
            return hostile
        return _json({"models": [self._native_entry(m) for m in self.sim.models.values()]})

    async def load_model(self, request: Request) -> Response:
        """``POST /api/v1/models/load``: load (or reload with a new context) one instance."""

        def invalid(message: str, code: str | None = None, param: str | None = None) -> Response:
            return _native_error("invalid_request", message, code=code, param=param)

        try:
            body = await self._body(request, invalid)
            model_id = body.get("model")
            if not isinstance(model_id, str):
                return invalid('"model" is required', "missing_required_parameter", "model")
            context_length = _native_field(body, "context_length", (int,), "an integer", invalid)
        except _BadRequest as bad:
            return bad.response
        model = self.sim.models.get(model_id)
        if model is None:
            return _native_error(
                "model_not_found",
                f'Model "{model_id}" not found.',
                404,
                code="model_not_found",
                param="model",
            )
        if context_length is not None and context_length < 1:
            return invalid('"context_length" must be at least 1', "invalid_value", "context_length")
        sim = self.sim
        profile = sim.config.speeds
        sc = sim.config.defaults
        scale = sim.config.time_scale if sc.time_scale is None else sc.time_scale
        load_s = (profile.load_s if sc.load_s is None else sc.load_s) * scale
        async with model.load_lock:
            took = await sim.load(model, load_s, context_length=context_length)
        return _json(
            {
                "type": "embedding" if model.type == "embeddings" else "llm",
                "instance_id": model.id,
                "load_time_seconds": round(took, 3),
                "status": "loaded",
            }
        )

    async def unload_model(self, request: Request) -> Response:
        """``POST /api/v1/models/unload``: the next request for it loads it just in time."""

        def invalid(message: str, code: str | None = None, param: str | None = None) -> Response:
            return _native_error("invalid_request", message, code=code, param=param)

        try:
            body = await self._body(request, invalid)
        except _BadRequest as bad:
            return bad.response
        instance_id = body.get("instance_id")
        if not isinstance(instance_id, str):
            return invalid('"instance_id" is required', "missing_required_parameter", "instance_id")
        model = self.sim.models.get(instance_id)
        if model is None or not model.loaded:
            return _native_error(
                "model_not_found",
                f'No loaded model instance "{instance_id}".',
                404,
                code="model_not_found",
                param="instance_id",
            )
        model.loaded = False
        return _json({"instance_id": instance_id})

    # llama.cpp's extras (a server whose default dialect is "llamacpp")

    async def props(self, request: Request) -> Response:
        """``GET /props``: the context a prompt must fit and the number of slots."""
        model = self.sim.models[self.sim.config.models[0]]
        slots = model.engine.parallel or 1
        return _json(
            {
                "default_generation_settings": {"n_ctx": model.context_length},
                "total_slots": slots,
                "n_ctx": model.context_length,
                "model_path": f"/models/{model.id}.gguf",
                "build_info": "b1-lmstream-sim",
            }
        )

    async def slots(self, request: Request) -> Response:
        """``GET /slots``: each slot's context and whether a request holds it."""
        model = self.sim.models[self.sim.config.models[0]]
        engine = model.engine
        count = engine.parallel or max(1, engine.busy)
        return _json(
            [
                {"id": i, "n_ctx": model.context_length, "is_processing": i < engine.busy}
                for i in range(count)
            ]
        )

    async def tokenize(self, request: Request) -> Response:
        """``POST /tokenize {"content": text}``: as many token ids as the simulator counts."""
        body = await self._body(request, _error_object)
        content = body.get("content")
        if not isinstance(content, str):
            return _error_object("'content' must be a string", param="content")
        count = len(content) // 4 if content else 0
        return _json({"tokens": [1000 + i for i in range(max(1, count) if content else 0)]})

    async def input_tokens(self, request: Request) -> Response:
        """``POST /v1/chat/completions/input_tokens``: the prompt's size before sending it."""
        body = await self._body(request, _error_object)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error_object("'messages' is required", param="messages")
        return _json({"input_tokens": _prompt_tokens(messages), "object": "response.input_tokens"})

    def _resolve_model(self, requested: str | None) -> _Model:
        sim = self.sim
        if requested and requested in sim.models:
            model = sim.models[requested]
            if model.type != "llm":
                raise _BadRequest(
                    _error_object(
                        f'Model "{requested}" is an embedding model and cannot be used for chat '
                        "completions.",
                        param="model",
                    )
                )
            return model
        # llama-server answers any model name with the model it serves, as measured
        any_model = sim.config.any_model or sim.config.defaults.dialect == "llamacpp"
        if requested and not any_model:
            known = ", ".join(sim.models)
            raise _BadRequest(
                _error_object(
                    f'Invalid model identifier "{requested}". '
                    f"Please specify a valid downloaded model (e.g., {known}).",
                    param="model",
                    code="model_not_found",
                )
            )
        loaded = sim.loaded_llm()
        if loaded is None:
            raise _BadRequest(_json({"error": _NO_MODELS}, 400))
        return sim.models[loaded]


# --- the front door: records, Express headers, API key -------------------------------------------


class _FrontDoor:
    """Outermost middleware: records each request, adds Express's headers, checks the API key."""

    def __init__(self, app: ASGIApp, sim: _Sim) -> None:
        self.app = app
        self.sim = sim

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        recorder = self.sim.recorder
        auth = None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                auth = value.decode("latin-1").partition(" ")[0] or None
        query = scope.get("query_string", b"").decode("latin-1")
        index = recorder.add(scope["method"], scope["path"], auth=auth, query=query)
        scope.setdefault("state", {})["sim_record"] = index

        llamacpp = self.sim.config.defaults.dialect == "llamacpp"
        extra = _LLAMACPP_HEADERS if llamacpp else _EXPRESS_HEADERS

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", []), *extra]
                if recorder.get(index).outcome == "running":
                    recorder.update(index, status_code=message["status"])
            await send(message)

        key = self.sim.config.api_key
        if key is not None and not _authorized(scope, key):
            body = {
                "error": {
                    "type": "invalid_request",
                    "code": "invalid_api_key",
                    "message": "An LM Studio API token is required to access this server. Send it "
                    "as 'Authorization: Bearer <token>'.",
                }
            }
            await _json(body, 401)(scope, receive, send_with_headers)
            recorder.finish(index, "http_error")
            return
        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            record = recorder.get(index)
            if record.outcome == "running":
                status = record.status_code or 500
                outcome: Outcome = "http_error" if status >= 400 else "completed"
                recorder.finish(index, outcome)


def _authorized(scope: Scope, key: str) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            return bool(value.decode("latin-1").strip() == f"Bearer {key}")
    return False


def build_app(config: SimConfig, recorder: Recorder) -> Starlette:
    """The ASGI application for one simulated server."""
    _install_log_filter()
    sim = _Sim(config, recorder)
    handlers = _Handlers(sim)
    routes = [
        Route("/v1/models", handlers.list_models, methods=["GET"]),
        Route("/api/v0/models", handlers.list_models_v0, methods=["GET"]),
        Route("/api/v0/models/{model_id:path}", handlers.get_model_v0, methods=["GET"]),
        Route("/v1/chat/completions", handlers.chat, methods=["POST"]),
        Route("/api/v0/chat/completions", handlers.chat, methods=["POST"]),
    ]
    if config.defaults.dialect == "llamacpp":
        routes += [
            Route("/props", handlers.props, methods=["GET"]),
            Route("/slots", handlers.slots, methods=["GET"]),
            Route("/tokenize", handlers.tokenize, methods=["POST"]),
            Route("/v1/chat/completions/input_tokens", handlers.input_tokens, methods=["POST"]),
        ]
    else:
        routes += [
            Route("/api/v1/chat", handlers.native_chat, methods=["POST"]),
            Route("/api/v1/models", handlers.list_models_native, methods=["GET"]),
            Route("/api/v1/models/load", handlers.load_model, methods=["POST"]),
            Route("/api/v1/models/unload", handlers.unload_model, methods=["POST"]),
        ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(_FrontDoor, sim=sim)],
        exception_handlers={404: handlers.unexpected, 405: handlers.unexpected},
    )
    app.router.redirect_slashes = False
    return app
