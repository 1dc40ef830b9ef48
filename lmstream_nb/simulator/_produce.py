"""How a chat request is answered once it is accepted: the plan made before any waiting, the
models' state (JIT loads, slots), and the one production loop that every chat request runs
(load, queue for a slot, process the prompt step by step, generate, with the scenario's faults
at their positions), framed as OpenAI-style chunks (:class:`EventStream`), as LM Studio 0.4's
native named events (:class:`NativeStream`) or as one body (:func:`complete`).

A stream runs beside a watcher for ``http.disconnect``: when the client goes away the generation
is cancelled at its next await and the request is recorded as ``client_disconnected``. How
requests on one model share its speed, and the progress cadence, are in ``_pace``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import random
import re
import string
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ._pace import LMSTUDIO_BATCH, LOAD_STEPS, Engine, prompt_steps
from ._records import Recorder, Stage
from ._scenario import (
    Scenario,
    ScenarioError,
    SimConfig,
    model_format,
    model_type,
)
from ._text import TextSource
from ._wire import (
    BOM,
    JSON,
    LINE_ENDINGS,
    Abort,
    AbortAfterHeaders,
    dumps,
    json_reply,
    native_error,
)

__all__ = [
    "EventStream",
    "Model",
    "NativeStream",
    "Plan",
    "Sim",
    "complete",
    "marker_overrides",
    "plan_pieces",
    "prompt_tokens_of",
    "reply_pieces",
    "token_intervals",
]

_YIELD_EVERY = 64  # with no delays, let other streams run every this many tokens
_ID_ALPHABET = string.ascii_lowercase + string.digits

# --- server state --------------------------------------------------------------------------------


@dataclasses.dataclass
class Model:
    id: str
    type: str
    format: str
    loaded: bool
    context_length: int
    engine: Engine
    load_lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)


#: Reports a JIT load to the request that caused it: (stage, fraction, seconds so far).
_LoadReport = Callable[[str, float, float], Awaitable[None]]


class Sim:
    """State shared by all requests of one server: config, models, records."""

    def __init__(self, config: SimConfig, recorder: Recorder) -> None:
        self.config = config
        self.recorder = recorder
        self.models: dict[str, Model] = {}
        for i, model_id in enumerate(config.models):
            fmt = model_format(model_id)
            self.models[model_id] = Model(
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
        self, plan: Plan, report: _LoadReport | None = None
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
        model: Model,
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
class Plan:
    """Everything decided about a chat request before any waiting starts."""

    index: int
    id: str
    created: int
    model: Model
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


def prompt_tokens_of(messages: list[Any]) -> int:
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


def marker_overrides(messages: object) -> dict[str, object] | None:
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


def reply_pieces(reply: str) -> list[str]:
    """A fixed reply cut into word pieces (each with the space after it), as tokens arrive."""
    return re.findall(r"\S+\s*|\s+", reply) or [""]


def plan_pieces(
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
        reply = reply_pieces(sc.reply)
        pieces.extend(("content", reply[i % len(reply)]) for i in range(n_answer))
    elif sc.chunk_chars is not None:
        pieces.extend(("content", answer.chars(sc.chunk_chars)) for _ in range(n_answer))
    else:
        words = answer.answer(n_answer) if complete else answer.tokens(n_answer)
        pieces.extend(("content", w) for w in words)
    return pieces


def token_intervals(
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

    def __init__(self, plan: Plan, engine: Engine, recorder: Recorder) -> None:
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


class EventStream(Response):
    """The ``text/event-stream`` reply: headers at once, silence while loading and processing the
    prompt (or llama.cpp's ``prompt_progress`` chunks when asked), then one ``data:`` event per
    token, with the scenario's faults along the way."""

    def __init__(self, sim: Sim, plan: Plan) -> None:
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
        self._newline = LINE_ENDINGS[plan.scenario.line_ending]
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
            raise Abort

    # framing

    async def _emit(self, send: Send, text: str) -> None:
        data = text.replace("\n", self._newline).encode("utf-8")
        if self._bom:
            self._bom = False
            data = BOM + data
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
        data = b"".join(self._held) + (BOM if self._bom else b"")  # BOM: even when empty
        self._held = []
        await send({"type": "http.response.body", "body": data, "more_body": False})

    async def _emit_data(self, send: Send, obj: object) -> None:
        await self._emit(send, "data: " + dumps(obj).decode("utf-8") + "\n\n")

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

    # what the framings write; this class writes OpenAI-style chunks, NativeStream named events

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
        await self._emit(send, "event: error\ndata: " + dumps(error).decode() + "\n\n")
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


class NativeStream(EventStream):
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

    def __init__(self, sim: Sim, plan: Plan) -> None:
        super().__init__(sim, plan)
        self._opened = True  # no opening chunk
        self._block: str | None = None  # "reasoning" or "message" while one is open
        self._done: list[tuple[str, str]] = []

    async def _event(self, send: Send, kind: str, **fields: object) -> None:
        data = dumps({"type": kind, **fields}).decode("utf-8")
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
    plan: Plan,
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
    plan: Plan, t0: float | None, first: float | None, last: float | None, sent: int
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


async def complete(sim: Sim, plan: Plan, request: Request) -> Response:
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
            return AbortAfterHeaders()
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
            return AbortAfterHeaders()
        if error is not None:
            message = (sc.error_message or "Compute error.") + plan.echo
            if plan.native:
                return native_error("internal_error", message, 500)
            body = {
                "error": {"message": message, "type": "server_error", "param": None, "code": None}
            }
            return json_reply(body, 500)
        end = loop.time()
        if plan.native:
            last = deadlines[-1] if deadlines else first_at
            return json_reply(_native_result(plan, plan.pieces, pace.t0, deadlines[:1], last, took))
        return json_reply(_completion_body(plan, plan.model.context_length, pace.t0, first_at, end))

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
    plan: Plan, context_length: int, t0: float, first_at: float, end: float
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
