"""The ``lmstream serve`` web application: a JSON API over the store and the run pipeline.

Why Starlette: a small, well-kept ASGI toolkit (routing, requests, CORS) that the package
already depends on for the simulator, with no framework-level magic between a request and our
code; the events endpoint is plain ASGI so it controls every write (see ``_events``).

Every error is JSON ``{"error": "<one sentence>"}`` and reuses the LMStreamError sentence when
there is one. Prompt names and variables are only ever data: names are SQL parameters, values
are inserted into the template literally.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.resources
import json
import math
from collections.abc import AsyncIterator, Callable, Iterable, MutableMapping
from dataclasses import asdict
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .._client import LMStudioClient
from .._config import Budgets
from .._errors import LMStreamError, PromptNotFound, RunNotFound, StoreError, TemplateError
from .._run import default_store
from .._store import PromptStore
from .._template import Prompt
from ._events import BadCursor, Cursor, EventStream, StreamSettings, find_run
from ._hub import Hub
from ._openapi import openapi

__all__ = ["create_app"]

_RUN_FIELDS = {"variables", "model", "version", "temperature", "max_tokens"}


class ApiError(Exception):
    """An answer other than success: an HTTP status and one sentence."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class TokenGuard:
    """Every request needs the token (``Authorization: Bearer`` or ``?token=``) when one is set.

    EventSource cannot send headers, hence the query form. Compared in constant time.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        given = ""
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            given = value.strip()
        else:
            given = request.query_params.get("token", "")
        if not hmac.compare_digest(given.encode("utf-8"), self._token):
            what = "a wrong token" if given else "no token"
            response = _error(
                401,
                f"This server needs its token and the request had {what}: send "
                "'Authorization: Bearer TOKEN' or add ?token=TOKEN to the URL.",
                {"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _prompt_summary(p: Prompt) -> dict[str, Any]:
    """A prompt in a list: everything but its texts, which one prompt's own answer has."""
    summary = p.as_dict()
    del summary["template"], summary["system"]
    return summary


async def _read_json(request: Request, limit: int) -> Any:
    """The request body as JSON, refusing more than ``limit`` bytes before reading them all."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(
            413,
            f"The request body has {length} bytes, more than the {limit} "
            "this server accepts: send fewer or shorter variables.",
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(
                413,
                f"The request body is longer than the {limit} bytes this "
                "server accepts: send fewer or shorter variables.",
            )
    if not body:
        return {}
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(
            400,
            f"The request body is not valid JSON ({exc}): send a JSON object "
            'such as {"variables": {"name": "value"}}.',
        ) from None


def _run_request(body: Any) -> dict[str, Any]:
    """Check a run request's fields; every value is data, and only scalars are variables."""
    if not isinstance(body, dict):
        raise ApiError(
            400, 'The request body must be a JSON object such as {"variables": {"name": "value"}}.'
        )
    unknown = sorted(set(body) - _RUN_FIELDS)
    if unknown:
        raise ApiError(
            400,
            f"The request body has unknown field(s) {', '.join(unknown)}: use "
            f"{', '.join(sorted(_RUN_FIELDS))}.",
        )
    variables = body.get("variables", {})
    if not isinstance(variables, dict):
        raise ApiError(400, '"variables" must be a JSON object of names to values.')
    for key, value in variables.items():
        if value is None or isinstance(value, (dict, list)):
            raise ApiError(
                400,
                f"The variable {key!r} must be a string, number or boolean, "
                "not a JSON object, array or null.",
            )
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise ApiError(400, '"model" must be a model id (a non-empty string).')
    version = body.get("version")
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or version < 1
    ):
        raise ApiError(400, '"version" must be a whole number of 1 or more.')
    temperature = body.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ApiError(400, '"temperature" must be a number of 0 or more.')
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise ApiError(400, '"max_tokens" must be a whole number of 1 or more.')
    return {
        "variables": {
            str(k): v if isinstance(v, str) else json.dumps(v) for k, v in variables.items()
        },
        "model": model,
        "version": version,
        "temperature": temperature,
        "max_tokens": max_tokens,
    }


def _run_id(request: Request) -> int:
    value: int = request.path_params["run_id"]
    return value


class _Api:
    """The route handlers; each maps our errors to a status and keeps their sentence."""

    def __init__(self, hub: Hub, stream: EventStream, max_body: int) -> None:
        self.hub = hub
        self.store = hub.store
        self.stream = stream
        self.max_body = max_body

    async def page(self, request: Request) -> Response:
        resource = importlib.resources.files("lmstream_nb.serve") / "page.html"
        try:
            html = resource.read_text(encoding="utf-8")
        except (FileNotFoundError, OSError):
            html = (
                "<!doctype html><title>lmstream serve</title><p>The page is not installed; "
                'the API is at <a href="/api/openapi.json">/api/openapi.json</a>.</p>'
            )
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi())

    async def prompts(self, request: Request) -> Response:
        prompts = await asyncio.to_thread(self.store.list)
        return JSONResponse({"prompts": [_prompt_summary(p) for p in prompts]})

    async def prompt(self, request: Request) -> Response:
        name = request.path_params["name"]
        versions = await asyncio.to_thread(self.store.versions, name)
        latest = max(versions, key=lambda p: p.version or 0)
        return JSONResponse(
            {
                **latest.as_dict(),
                "versions": sorted(p.version for p in versions if p.version is not None),
            }
        )

    async def models(self, request: Request) -> Response:
        return JSONResponse({"models": await self.hub.client.list_models()})

    async def start_run(self, request: Request) -> Response:
        name = request.path_params["name"]
        fields = _run_request(await _read_json(request, self.max_body))
        prompt = await asyncio.to_thread(self.store.get, name, fields["version"])
        prompt.render(fields["variables"])  # refuse missing or unknown variables before a run
        model = fields["model"] or prompt.model or await self.hub.client.default_model()
        live = await self.hub.start(
            prompt,
            fields["variables"],
            model=model,
            temperature=fields["temperature"],
            max_tokens=fields["max_tokens"],
        )
        url = f"/api/runs/{live.run_id}"
        return JSONResponse(
            {"run_id": live.run_id, "events_url": url + "/events", "url": url},
            status_code=201,
            headers={"Location": url},
        )

    async def runs(self, request: Request) -> Response:
        query = request.query_params
        limit_text = query.get("limit", "50")
        if not limit_text.isdigit():
            raise ApiError(400, f"limit is {limit_text!r}: use a whole number of runs.")
        try:
            runs = await asyncio.to_thread(
                self.store.history,
                prompt=query.get("prompt"),
                status=query.get("status"),
                model=query.get("model"),
                limit=int(limit_text),
            )
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return JSONResponse({"runs": runs.as_dicts()})

    async def run(self, request: Request) -> Response:
        run_id = _run_id(request)
        record = await asyncio.to_thread(self.store.get_run, run_id)
        live = self.hub.get(run_id)
        data = asdict(record)
        if live is not None:  # the store's copy lags by up to a second; the hub's does not
            data["text"], data["reasoning"] = str(live.text), str(live.reasoning)
        data["events_url"] = f"/api/runs/{run_id}/events"
        return JSONResponse(data)

    async def cancel(self, request: Request) -> Response:
        run_id = _run_id(request)
        if await self.hub.cancel(run_id):
            return JSONResponse({"run_id": run_id, "status": "cancelled"})
        record = await asyncio.to_thread(self.store.get_run, run_id)
        if record.status == "unfinished":
            raise ApiError(
                409,
                f"Run {run_id} is not running in this server (another process "
                "runs it, or it stopped without finishing), so it cannot be "
                "cancelled here.",
            )
        raise ApiError(
            409,
            f"Run {run_id} has already ended (status {record.status}): there is nothing to cancel.",
        )

    async def events(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        run_id = _run_id(request)
        try:
            cursor = Cursor.parse(
                request.headers.get("last-event-id") or request.query_params.get("last_event_id")
            )
            live, record = await find_run(self.hub, run_id)
            if live is not None:
                cursor.check(run_id, len(live.text), len(live.reasoning))
            elif record is not None:
                cursor.check(run_id, len(record.text), len(record.reasoning))
        except BadCursor as exc:
            await _error(400, str(exc))(scope, receive, send)
            return
        except LMStreamError as exc:
            await _lmstream_error(request, exc)(scope, receive, send)
            return
        if cursor.phase == "e":
            # The client saw the end; 204 tells an EventSource to stop reconnecting.
            await Response(status_code=204)(scope, receive, send)
            return
        await self.stream.respond(scope, receive, send, cursor=cursor, live=live, record=record)


def _lmstream_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LMStreamError)
    if isinstance(exc, PromptNotFound) and exc.version is None:
        # The store's sentence names its file; a web client gets the API's own way to look.
        fix = (
            "did you mean " + " or ".join(repr(s) for s in exc.suggestions) + "?"
            if exc.suggestions
            else "see GET /api/prompts for the names there are."
        )
        return _error(404, f"No prompt is named {exc.name!r}: {fix}")
    if isinstance(exc, (PromptNotFound, RunNotFound)):
        return _error(404, str(exc))
    if isinstance(exc, TemplateError):
        return _error(422, str(exc))
    if isinstance(exc, StoreError):
        return _error(500, str(exc))
    return _error(502, str(exc))  # the model server refused or could not be reached


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error(exc.status, exc.message)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"There is no {request.url.path}: see /api/openapi.json for the routes."
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}: see /api/openapi.json."
    else:
        message = str(exc.detail)
    return _error(exc.status_code, message, dict(exc.headers or {}))


async def _lmstream_error_handler(request: Request, exc: Exception) -> Response:
    return _lmstream_error(request, exc)


class _AsgiRoute:
    """Adapts a bound ``(scope, receive, send)`` method to a Starlette route endpoint."""

    def __init__(self, handler: Callable[[Scope, Receive, Send], Any]) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


def create_app(
    *,
    store: PromptStore | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    token: str | None = None,
    cors_origins: Iterable[str] = (),
    grace: float = 60.0,
    keepalive: float = 15.0,
    status_interval: float = 5.0,
    max_body: int = 65536,
    slow_client_limit: float = 30.0,
    max_event_chars: int = 16384,
    retry_ms: int = 3000,
    budgets: Budgets | None = None,
    abort: Callable[[MutableMapping[str, Any]], bool] | None = None,
) -> Starlette:
    """The ASGI app of ``lmstream serve``.

    - ``store``: the prompt and run database (default: the default location); ``base_url`` and
      ``api_key``: the model server (defaults as for ``LMStudioClient``).
    - ``token``: required on every request when set; ``cors_origins``: origins allowed to call
      the API from a browser (none: CORS off).
    - ``grace``: seconds a run with no listener goes on before it is cancelled.
    - ``keepalive``: seconds between comment lines on an events stream (proxies close idle
      connections); ``status_interval``: seconds between ``status`` events while waiting.
    - ``max_body``: request body limit in bytes (413 beyond).
    - ``slow_client_limit``: seconds a client may refuse writes before it is disconnected;
      ``max_event_chars``: the most text in one event (a catching-up client gets several).
    - ``abort``: drops the connection of a request scope (set by :func:`serve`).
    """
    if keepalive <= 0 or status_interval <= 0 or slow_client_limit <= 0 or grace < 0:
        raise ValueError(
            "keepalive, status_interval and slow_client_limit must be positive, "
            "and grace 0 or more."
        )
    store = store or default_store()
    client = LMStudioClient(base_url, api_key=api_key, budgets=budgets)
    hub = Hub(store, client, grace=grace, budgets=budgets)
    settings = StreamSettings(
        keepalive=keepalive,
        status_interval=status_interval,
        slow_client_limit=slow_client_limit,
        retry_ms=retry_ms,
        max_event_chars=max_event_chars,
    )
    api = _Api(hub, EventStream(hub, settings, abort), max_body)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await hub.aclose()
            await client.aclose()

    routes = [
        Route("/", api.page, methods=["GET"]),
        Route("/api/openapi.json", api.openapi, methods=["GET"]),
        Route("/api/prompts", api.prompts, methods=["GET"]),
        Route("/api/prompts/{name}", api.prompt, methods=["GET"]),
        Route("/api/prompts/{name}/runs", api.start_run, methods=["POST"]),
        Route("/api/models", api.models, methods=["GET"]),
        Route("/api/runs", api.runs, methods=["GET"]),
        Route("/api/runs/{run_id:int}", api.run, methods=["GET"]),
        Route("/api/runs/{run_id:int}", api.cancel, methods=["DELETE"]),
        Route("/api/runs/{run_id:int}/events", _AsgiRoute(api.events), methods=["GET"]),
    ]
    origins = list(cors_origins)
    middleware = []
    if origins:  # outermost, so a preflight (which carries no token) is answered
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=origins,
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
            )
        )
    if token:
        middleware.append(Middleware(TokenGuard, token=token))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            LMStreamError: _lmstream_error_handler,
        },
        lifespan=lifespan,
    )
    app.state.hub = hub
    return app
