"""The simulated LM Studio server as a Starlette (ASGI) application.

Endpoints, bodies, headers and error shapes follow LM Studio's wire format: ``GET /v1/models``,
``GET /api/v0/models[/{id}]``, ``POST /v1/chat/completions`` and ``POST /api/v0/chat/completions``,
with Express-style headers on every response and LM Studio's habit of answering unknown paths
with ``200`` and a string error. Timing (JIT load, prompt processing, token pace), text and faults
come from the request's :class:`~._scenario.Scenario`.

Streams are written by :class:`_EventStream`, a small ASGI response that runs the generation and a
watcher for ``http.disconnect`` side by side: when the client goes away the generation is
cancelled at its next await and the request is recorded as ``client_disconnected``. Faults that
must break the connection raise :class:`_Abort` after the headers went out; uvicorn then closes
the transport without finishing the chunked body, and a logging filter keeps that deliberate
exception out of the server's error log.
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

from ._records import Outcome, Recorder
from ._scenario import Scenario, ScenarioError, SimConfig, apply_overrides, model_type
from ._text import TextSource

__all__ = ["build_app"]

JSON = dict[str, Any]

_EXPRESS_HEADERS = [
    (b"x-powered-by", b"Express"),
    (b"connection", b"keep-alive"),
    (b"keep-alive", b"timeout=5"),
]
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
    loaded: bool
    load_lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    slots: asyncio.Semaphore | None = None


class _Sim:
    """State shared by all requests of one server: config, models, records."""

    def __init__(self, config: SimConfig, recorder: Recorder) -> None:
        self.config = config
        self.recorder = recorder
        self.models: dict[str, _Model] = {}
        for i, model_id in enumerate(config.models):
            kind = model_type(model_id)
            self.models[model_id] = _Model(
                id=model_id,
                type=kind,
                loaded=i == 0 and not config.defaults.no_model,
                slots=None
                if config.max_parallel is None
                else asyncio.Semaphore(config.max_parallel),
            )
        self._ids = random.Random(f"lmstream-sim-ids|{config.seed}")
        # Requests seen per identical message list, for ``fault_attempts``.
        self.attempts: dict[str, int] = {}

    def transient(self, sc: Scenario, messages: object) -> Scenario:
        """``sc``, or ``sc`` without its faults once this prompt has met them often enough."""
        if sc.fault_attempts is None:
            return sc
        key = hashlib.sha256(
            json.dumps(messages, sort_keys=True, default=str).encode("utf-8")
        ).hexdigest()
        seen = self.attempts[key] = self.attempts.get(key, 0) + 1
        return sc if seen <= sc.fault_attempts else sc.without_faults()

    def new_id(self) -> str:
        return "chatcmpl-" + "".join(self._ids.choices(_ID_ALPHABET, k=20))

    def loaded_llm(self) -> str | None:
        for model in self.models.values():
            if model.loaded and model.type == "llm":
                return model.id
        return None

    async def acquire(self, model: _Model, load_s: float) -> None:
        """JIT-load ``model`` if needed (one load at a time), then take a generation slot."""
        if not model.loaded:
            async with model.load_lock:
                if not model.loaded:
                    await asyncio.sleep(load_s)
                    model.loaded = True
        if model.slots is not None:
            await model.slots.acquire()

    @staticmethod
    def release(model: _Model, at: float | None = None) -> None:
        """Free a generation slot now, or at loop time ``at`` (prefill can't be interrupted)."""
        if model.slots is None:
            return
        loop = asyncio.get_running_loop()
        if at is None or at <= loop.time():
            model.slots.release()
        else:
            loop.call_at(at, model.slots.release)


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
    sc: Scenario, seed: int, model: str, messages: object, n_answer: int, complete: bool
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
        words = answer.answer(n_answer) if complete else answer.tokens(n_answer)
        pieces.extend(("content", w) for w in words)
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


class _EventStream(Response):
    """The ``text/event-stream`` reply: headers at once, silence while loading and processing the
    prompt, then one ``data:`` event per token, with the scenario's faults along the way."""

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
        ping_s = self.plan.scenario.ping_s
        if ping_s is None:
            await self._pause_until(send, until)
            return
        loop = asyncio.get_running_loop()
        step = ping_s * self.plan.scale
        next_ping = loop.time() + step
        while step > 0 and next_ping < until:
            await self._pause_until(send, next_ping)
            await self._emit(send, ": ping\n\n")
            next_ping += step
        await self._pause_until(send, until)

    async def _produce(self, send: Send) -> bool:
        """Write the whole stream; return True when the connection must be dropped."""
        sim, plan, sc = self.sim, self.plan, self.plan.scenario
        recorder, index = sim.recorder, plan.index
        loop = asyncio.get_running_loop()
        holding = False
        release_at: float | None = None
        n = len(plan.pieces)
        try:
            if sc.disconnect_at == 0:
                recorder.finish(index, "fault_disconnect")
                return True
            await sim.acquire(plan.model, plan.load_s)
            holding = True
            self._t0 = loop.time()
            deadline = self._t0 + plan.prefill_s
            release_at = deadline
            await self._wait_prefill(send, deadline)
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
                    message = (sc.error_message or "Compute error.") + plan.echo
                    error = {
                        "error": {"message": message, "type": "server_error"},
                        "message": message,
                    }
                    await self._emit(send, "event: error\ndata: " + _dumps(error).decode() + "\n\n")
                    await self._end(send)
                    recorder.finish(index, "stream_error")
                    return False
                if i == n:
                    break
                deadline += plan.intervals[i] + plan.stall(i)
                if deadline > loop.time():
                    await self._pause_until(send, deadline)
                elif i % _YIELD_EVERY == _YIELD_EVERY - 1:
                    await asyncio.sleep(0)
                await self._open(send)
                if sc.malformed_at == i:
                    bad = sc.malformed_data if sc.malformed_data is not None else '{"id": broken'
                    await self._emit(send, f"data: {bad}{plan.echo}\n\n")
                kind, text = plan.pieces[i]
                await self._emit_data(send, self._chunk(self._delta(kind, text)))
                now = loop.time()
                if self._first_at is None:
                    self._first_at = now
                self._last_at = now
                self._count_sent()
            await self._open(send)
            await self._emit_data(send, self._chunk({}, plan.finish_reason))
            if plan.include_usage and not plan.v0:
                await self._emit_data(send, self._usage())
            await self._emit(send, "data: [DONE]\n\n")
            await self._end(send)
            recorder.finish(index, "completed")
            return False
        except BaseException:
            if self._client_gone:
                phase = "prefill" if self._sent == 0 else "generation"
                recorder.finish(index, "client_disconnected", disconnect_phase=phase)
            else:
                recorder.finish(index, "http_error" if self._sent == 0 else "stream_error")
            if self._sent > 0:
                release_at = None  # generation stops at once; prompt processing would not
            raise
        finally:
            if holding:
                sim.release(plan.model, release_at)


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
    state: JSON = {"holding": False, "first_at": None, "deadlines": []}

    def produced(now: float) -> int:
        return sum(1 for d in state["deadlines"] if d <= now)

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
        await sim.acquire(plan.model, plan.load_s)
        state["holding"] = True
        t0 = loop.time()
        first_at = t0 + plan.prefill_s
        state["first_at"] = first_at
        deadlines: list[float] = []
        deadline = first_at
        for i in range(n):
            deadline += plan.intervals[i] + plan.stall(i)
            deadlines.append(deadline)
        state["deadlines"] = deadlines
        stop = disconnect if disconnect is not None else error
        if stop is not None:
            await _sleep_until(deadlines[stop - 1] if stop > 0 else first_at + plan.stall(0))
            recorder.update(index, sent_tokens=stop)
            if disconnect is not None:
                recorder.finish(index, "fault_disconnect", status_code=200)
                return _AbortAfterHeaders()
            message = (sc.error_message or "Compute error.") + plan.echo
            body = {
                "error": {"message": message, "type": "server_error", "param": None, "code": None}
            }
            return _json(body, 500)
        end = deadlines[-1] if deadlines else first_at + plan.stall(0)
        await _sleep_until(end)
        recorder.update(index, sent_tokens=n)
        return _json(_completion_body(plan, sim.config.context_length, t0, first_at, loop.time()))

    try:
        response, gone = await _watching_disconnect(request, work)
    finally:
        if state["holding"]:
            first_at = state["first_at"]
            now = loop.time()
            sim.release(plan.model, first_at if first_at is not None and now < first_at else None)
    if response is None or gone:
        now = loop.time()
        first_at = state["first_at"]
        phase = "prefill" if first_at is None or now < first_at else "generation"
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
            "compatibility_type": "gguf",
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
        return _json(
            {"error": f"Unexpected endpoint or method. ({request.method} {request.url.path})"}
        )

    # chat

    async def chat(self, request: Request) -> Response:
        try:
            return await self._chat(request)
        except _BadRequest as bad:
            return bad.response

    async def _chat(self, request: Request) -> Response:
        sim = self.sim
        config = sim.config
        recorder = sim.recorder
        index: int = request.scope["state"]["sim_record"]
        v0 = request.url.path.startswith("/api/v0/")

        raw = await request.body()
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            return _error_object(f"Invalid JSON in request body: {exc}")
        if not isinstance(body, dict):
            return _error_object("The request body must be a JSON object.")
        try:
            sc = apply_overrides(config.defaults, body.get("sim"))
            sc = apply_overrides(sc, _marker_overrides(body.get("messages")))
        except ScenarioError as exc:
            return _error_object(str(exc), param="sim")
        stream = _field(body, "stream", (bool,), "true or false") or False
        recorder.update(index, stream=stream)
        sc = sim.transient(sc, body.get("messages"))
        echo = _echo(request) if sc.echo_request else ""

        if sc.redirect_to is not None:
            return _redirect(sc)
        if sc.http_status is not None:
            recorder.finish(index, "http_error", status_code=sc.http_status)
            if sc.flood is not None:
                return _Flood(sim, index, sc, stream=stream, status=sc.http_status)
            return _status_fault(sc, sc.http_status, echo)
        if sc.no_model:
            return _json({"error": _NO_MODELS}, 400)
        if sc.raw_body is not None:
            return _raw_body(sc, stream)
        if sc.flood is not None:
            return _Flood(sim, index, sc, stream=stream, status=200)

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
        if prompt_tokens > config.context_length:
            return _json({"error": _OVERFLOW}, 400)

        max_tokens = _field(body, "max_tokens", (int,), "an integer")
        seed = _field(body, "seed", (int,), "an integer")
        stream_options = _field(body, "stream_options", (dict,), "an object") or {}
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
        pieces = _pieces(sc, seed, model.id, messages, n_answer, finish_reason == "stop")
        plan = _Plan(
            index=index,
            id=sim.new_id(),
            created=int(time.time()),
            model=model,
            v0=v0,
            include_usage=bool(stream_options.get("include_usage")),
            scenario=sc,
            scale=scale,
            load_s=load_s * scale,
            prefill_s=0.0 if math.isinf(prefill_tps) else prompt_tokens / prefill_tps * scale,
            intervals=_intervals(sc, gen_tps, scale, seed, model.id, len(pieces)),
            pieces=pieces,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            echo=echo,
        )
        recorder.update(index, id=plan.id, planned_tokens=len(pieces))

        if stream:
            if sc.content_type is not None:
                return _content_type_fault(sc, sc.content_type, echo)
            return _EventStream(sim, plan)
        return await _complete(sim, plan, request)

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
        if requested and not sim.config.any_model:
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

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", []), *_EXPRESS_HEADERS]
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
    app = Starlette(
        routes=routes,
        middleware=[Middleware(_FrontDoor, sim=sim)],
        exception_handlers={404: handlers.unexpected, 405: handlers.unexpected},
    )
    app.router.redirect_slashes = False
    return app
