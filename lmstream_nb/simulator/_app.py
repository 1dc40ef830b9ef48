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

The handlers here read and check a request, answer the whole-response faults (status, redirect,
raw body, floods), make the request's plan and hand it to ``_produce``, where every chat
request, on either API and streaming or not, runs the same production loop. Faults that must
break the connection raise ``Abort`` after the headers went out; uvicorn then closes the
transport without finishing the chunked body, and a logging filter keeps that deliberate
exception out of the server's error log.

Error shapes the native API's documentation leaves open are assumed: status 404 for an unknown
model (``model_not_found``), 400 for other invalid requests, 500 for a non-streaming failure,
``internal_error`` as the type of a failure during generation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import http
import json
import math
import time
import zlib
from collections.abc import Callable
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._pace import LLAMACPP_BATCH, LMSTUDIO_BATCH
from ._produce import (
    EventStream,
    Model,
    NativeStream,
    Plan,
    Sim,
    complete,
    marker_overrides,
    plan_pieces,
    prompt_tokens_of,
    reply_pieces,
    token_intervals,
)
from ._records import MESSAGES_KEPT_CHARS, Outcome, Recorder
from ._scenario import (
    Scenario,
    ScenarioError,
    SimConfig,
    apply_overrides,
)
from ._schema import requested_schema, schema_reply
from ._wire import (
    EXPRESS_HEADERS,
    JSON,
    JSON_TYPE,
    LLAMACPP_HEADERS,
    NO_MODELS,
    OVERFLOW,
    UVICORN_HEADERS,
    dumps,
    error_object,
    html_page,
    install_log_filter,
    json_reply,
    native_error,
)

__all__ = ["build_app"]

_DEFAULT_OUTPUT_TOKENS = 150

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

    def __init__(self, sim: Sim, index: int, sc: Scenario, *, stream: bool, status: int) -> None:
        self.sim = sim
        self.index = index
        self.kind = sc.flood
        self.total = sc.flood_bytes
        self.status_code = status
        self.background = None
        content_type = b"text/event-stream" if stream else JSON_TYPE.encode()
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
    content_type = sc.content_type or ("text/event-stream" if stream else JSON_TYPE)
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
        return json_reply({"error": message}, status)
    if sc.error_body == "html":
        return Response(
            html_page(f"{status} {phrase}", message), status, media_type="text/html; charset=utf-8"
        )
    if sc.error_body == "empty":
        return Response(b"", status)
    return error_object(message, status)


def _content_type_fault(sc: Scenario, content_type: str, echo: str = "") -> Response:
    message = (sc.error_message or "This reply is not an event stream.") + echo
    if "html" in content_type:
        body = html_page("LM Studio", message).encode()
    elif "json" in content_type:
        body = dumps(
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


def _pairs(messages: list[Any]) -> tuple[tuple[str, str], ...]:
    """What a request's messages said, for its record: (role, text) pairs; none when they
    are longer than a record keeps."""
    pairs = tuple(
        (str(m.get("role")), m["content"] if isinstance(m.get("content"), str) else "")
        for m in messages
    )
    return pairs if sum(len(text) for _, text in pairs) <= MESSAGES_KEPT_CHARS else ()


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
    return json_reply(body, 400)


def _field(body: JSON, name: str, kinds: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is not None and (
        not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
    ):
        raise _BadRequest(
            error_object(f"'{name}' must be {what}, got {json.dumps(value)}", param=name)
        )
    return value


class _Handlers:
    def __init__(self, sim: Sim) -> None:
        self.sim = sim

    # models

    def _v0_entry(self, model: Model) -> JSON:
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
        return json_reply({"data": data, "object": "list"})

    async def list_models_v0(self, request: Request) -> Response:
        hostile = self._hostile_listing(request)
        if hostile is not None:
            return hostile
        data = [self._v0_entry(m) for m in self.sim.models.values()]
        return json_reply({"object": "list", "data": data})

    async def get_model_v0(self, request: Request) -> Response:
        model_id = request.path_params["model_id"]
        model = self.sim.models.get(model_id)
        if model is None:
            return error_object(
                f'Model "{model_id}" not found.', 404, param="model", code="model_not_found"
            )
        return json_reply(self._v0_entry(model))

    async def unexpected(self, request: Request, exc: Exception) -> Response:
        if self.sim.config.defaults.dialect == "llamacpp-python":  # FastAPI's answer
            return json_reply({"detail": "Not Found"}, 404)
        if self.sim.config.defaults.dialect == "llamacpp":  # as llama-server answers
            body = {"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}}
            return json_reply(body, 404)
        return json_reply(
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
                return native_error("invalid_request", NO_MODELS, param="model")
            return json_reply({"error": NO_MODELS}, 400)
        if sc.raw_body is not None:
            return _raw_body(sc, stream)
        if sc.flood is not None:
            return _Flood(sim, index, sc, stream=stream, status=200)
        return None

    def _make_plan(
        self,
        index: int,
        sc: Scenario,
        model: Model,
        messages: list[Any],
        *,
        max_tokens: int | None,
        seed: int | None,
        **fields: Any,
    ) -> Plan:
        sim, config = self.sim, self.sim.config
        prompt_tokens = prompt_tokens_of(messages)
        seed = config.seed if seed is None else seed
        if sc.reply is not None and sc.output_tokens is None:
            n_answer = len(reply_pieces(sc.reply))
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
        pieces = plan_pieces(sc, seed, model.id, messages, n_answer, finish_reason == "stop")
        batch = sc.batch_size
        if batch is None:
            batch = LLAMACPP_BATCH if sc.dialect == "llamacpp" else LMSTUDIO_BATCH
        native = bool(fields.get("native"))
        plan = Plan(
            index=index,
            id=sim.new_id("resp_" if native else "chatcmpl-"),
            created=int(time.time()),
            model=model,
            scenario=sc,
            scale=scale,
            load_s=load_s * scale,
            prefill_s=0.0 if math.isinf(prefill_tps) else prompt_tokens / prefill_tps * scale,
            intervals=token_intervals(sc, gen_tps, scale, seed, model.id, len(pieces)),
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

        body = await self._body(request, error_object)
        try:
            sc = apply_overrides(config.defaults, body.get("sim"))
            sc = apply_overrides(sc, marker_overrides(body.get("messages")))
        except ScenarioError as exc:
            return error_object(str(exc), param="sim")
        stream = _field(body, "stream", (bool,), "true or false") or False
        recorder.update(index, stream=stream)
        sc = sim.transient(sc, body.get("messages"))
        recorder.update(index, response_format=body.get("response_format"))
        schema = requested_schema(body)
        if schema is not None and sc.reply is None:
            given = body.get("seed")
            seed = given if isinstance(given, int) and not isinstance(given, bool) else config.seed
            sc = dataclasses.replace(
                sc, reply=schema_reply(schema, seed, body.get("messages"), sc.schema_fault)
            )
        echo = _echo(request) if sc.echo_request else ""
        early = self._before_stream(sc, index, stream, echo)
        if early is not None:
            return early

        messages = body.get("messages")
        if messages is None:
            return error_object("'messages' field is required", param="messages")
        if not isinstance(messages, list) or not messages:
            return error_object("'messages' must be a non-empty array", param="messages")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            return error_object(
                "Every entry of 'messages' must be an object with a 'role'", param="messages"
            )

        model = self._resolve_model(_field(body, "model", (str,), "a string"))
        prompt_tokens = prompt_tokens_of(messages)
        recorder.update(
            index, model=model.id, prompt_tokens=prompt_tokens, messages=_pairs(messages)
        )
        # llama-server refuses a prompt that fills its context exactly, too (measured)
        if sc.dialect == "llamacpp" and prompt_tokens >= model.context_length:
            return _llamacpp_overflow(prompt_tokens, model.context_length)
        if prompt_tokens > model.context_length:
            if sc.dialect == "llamacpp-python" and stream:
                # 200 and an event stream with nothing in it, as measured on that server
                return Response(b"", media_type="text/event-stream")
            return json_reply({"error": OVERFLOW}, 400)

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
            return EventStream(sim, plan)
        return await complete(sim, plan, request)

    # the native API

    async def _native_chat(self, request: Request) -> Response:
        """``POST /api/v1/chat``: the native request shape, the same production loop."""
        sim = self.sim
        recorder = sim.recorder
        index: int = request.scope["state"]["sim_record"]

        def invalid(message: str, code: str | None = None, param: str | None = None) -> Response:
            return native_error("invalid_request", message, code=code, param=param)

        body = await self._body(request, invalid)
        model_id = body.get("model")
        if model_id is None:
            return invalid('"model" is required', "missing_required_parameter", "model")
        if not isinstance(model_id, str):
            return invalid('"model" must be a string', "invalid_type", "model")
        messages = _native_messages(body, invalid)
        try:
            sc = apply_overrides(sim.config.defaults, body.get("sim"))
            sc = apply_overrides(sc, marker_overrides(messages))
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
            return native_error(
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
        prompt_tokens = prompt_tokens_of(messages)
        recorder.update(
            index, model=model.id, prompt_tokens=prompt_tokens, messages=_pairs(messages)
        )
        fits = model.context_length
        if not model.loaded:  # this request loads it, with its own context or the default
            fits = context_length or sim.config.context_length
        if prompt_tokens > fits:
            return invalid(OVERFLOW, "context_length_exceeded", "input")
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
            return NativeStream(sim, plan)
        return await complete(sim, plan, request)

    def _native_entry(self, model: Model) -> JSON:
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
        return json_reply({"models": [self._native_entry(m) for m in self.sim.models.values()]})

    async def load_model(self, request: Request) -> Response:
        """``POST /api/v1/models/load``: load (or reload with a new context) one instance."""

        def invalid(message: str, code: str | None = None, param: str | None = None) -> Response:
            return native_error("invalid_request", message, code=code, param=param)

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
            return native_error(
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
        return json_reply(
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
            return native_error("invalid_request", message, code=code, param=param)

        try:
            body = await self._body(request, invalid)
        except _BadRequest as bad:
            return bad.response
        instance_id = body.get("instance_id")
        if not isinstance(instance_id, str):
            return invalid('"instance_id" is required', "missing_required_parameter", "instance_id")
        model = self.sim.models.get(instance_id)
        if model is None or not model.loaded:
            return native_error(
                "model_not_found",
                f'No loaded model instance "{instance_id}".',
                404,
                code="model_not_found",
                param="instance_id",
            )
        model.loaded = False
        return json_reply({"instance_id": instance_id})

    # llama.cpp's extras (a server whose default dialect is "llamacpp")

    async def props(self, request: Request) -> Response:
        """``GET /props``: the context a prompt must fit and the number of slots."""
        model = self.sim.models[self.sim.config.models[0]]
        slots = model.engine.parallel or 1
        return json_reply(
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
        return json_reply(
            [
                {"id": i, "n_ctx": model.context_length, "is_processing": i < engine.busy}
                for i in range(count)
            ]
        )

    async def tokenize(self, request: Request) -> Response:
        """``POST /tokenize {"content": text}``: as many token ids as the simulator counts."""
        body = await self._body(request, error_object)
        content = body.get("content")
        if not isinstance(content, str):
            return error_object("'content' must be a string", param="content")
        count = len(content) // 4 if content else 0
        return json_reply({"tokens": [1000 + i for i in range(max(1, count) if content else 0)]})

    async def tokenize_count(self, request: Request) -> Response:
        """llama-cpp-python's ``POST /extras/tokenize/count {"input": text}`` → ``{"count"}``."""
        body = await self._body(request, error_object)
        text = body.get("input")
        if not isinstance(text, str):
            return error_object("'input' must be a string", param="input")
        return json_reply({"count": prompt_tokens_of([{"role": "user", "content": text}])})

    async def input_tokens(self, request: Request) -> Response:
        """``POST /v1/chat/completions/input_tokens``: the prompt's size before sending it."""
        body = await self._body(request, error_object)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return error_object("'messages' is required", param="messages")
        return json_reply(
            {"input_tokens": prompt_tokens_of(messages), "object": "response.input_tokens"}
        )

    def _resolve_model(self, requested: str | None) -> Model:
        sim = self.sim
        if requested and requested in sim.models:
            model = sim.models[requested]
            if model.type != "llm":
                raise _BadRequest(
                    error_object(
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
                error_object(
                    f'Invalid model identifier "{requested}". '
                    f"Please specify a valid downloaded model (e.g., {known}).",
                    param="model",
                    code="model_not_found",
                )
            )
        loaded = sim.loaded_llm()
        if loaded is None:
            raise _BadRequest(json_reply({"error": NO_MODELS}, 400))
        return sim.models[loaded]


# --- the front door: records, Express headers, API key -------------------------------------------


class _FrontDoor:
    """Outermost middleware: records each request, adds Express's headers, checks the API key."""

    def __init__(self, app: ASGIApp, sim: Sim) -> None:
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

        dialect = self.sim.config.defaults.dialect
        extra = {"llamacpp": LLAMACPP_HEADERS, "llamacpp-python": UVICORN_HEADERS}.get(
            dialect, EXPRESS_HEADERS
        )

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
            await json_reply(body, 401)(scope, receive, send_with_headers)
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
    install_log_filter()
    sim = Sim(config, recorder)
    handlers = _Handlers(sim)
    routes = [
        Route("/v1/models", handlers.list_models, methods=["GET"]),
        Route("/api/v0/models", handlers.list_models_v0, methods=["GET"]),
        Route("/api/v0/models/{model_id:path}", handlers.get_model_v0, methods=["GET"]),
        Route("/v1/chat/completions", handlers.chat, methods=["POST"]),
        Route("/api/v0/chat/completions", handlers.chat, methods=["POST"]),
    ]
    if config.defaults.dialect == "llamacpp-python":
        routes += [
            Route("/extras/tokenize/count", handlers.tokenize_count, methods=["POST"]),
        ]
    elif config.defaults.dialect == "llamacpp":
        routes += [
            Route("/props", handlers.props, methods=["GET"]),
            Route("/slots", handlers.slots, methods=["GET"]),
            Route("/tokenize", handlers.tokenize, methods=["POST"]),
            Route("/v1/chat/completions/input_tokens", handlers.input_tokens, methods=["POST"]),
        ]
    elif config.native_api:
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
