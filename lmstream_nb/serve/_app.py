"""The ``lmstream serve`` web application: a JSON API over the store and the run pipeline.

Why Starlette: a small, well-kept ASGI toolkit (routing, requests, CORS) that the package
already depends on for the simulator, with no framework-level magic between a request and our
code; the events endpoint is plain ASGI so it controls every write (see ``_events``).

Every request is checked against the OpenAPI description first (``_validate``), and every
error is JSON ``{"error": "<one sentence>"}``, reusing the LMStreamError sentence when there is
one; even a bug answers so (500). Prompt names and variables are only ever data: names are SQL
parameters, values are inserted into the template literally.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from dataclasses import asdict
from typing import Any, cast

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .._client import LMStudioClient
from .._config import Budgets
from .._conversation import check_name
from .._errors import (
    ConversationBusy,
    ConversationTooLong,
    InvalidSchema,
    InvalidSetting,
    LMStreamError,
    PromptNotFound,
    RunNotFound,
    StoreError,
    TemplateError,
    render,
)
from .._run import default_store
from .._store import PromptStore
from .._structured import schema_of
from .._template import Prompt, variable_text
from ._events import BadCursor, Cursor, EventStream, StreamSettings, find_run
from ._hub import Hub
from ._openapi import DEFAULT_MAX_BODY, openapi
from ._security import SiteGuard, TokenGuard, check_token
from ._validate import ApiError, Operation, Operations, error_response

__all__ = ["create_app"]


def _prompt_summary(p: Prompt) -> dict[str, Any]:
    """A prompt in a list: everything but its texts, which one prompt's own answer has."""
    summary = p.as_dict()
    del summary["template"], summary["system"]
    return summary


def _variables(body: dict[str, Any]) -> dict[str, str]:
    """Variables as the template gets them, by the template's own rule (the request's schema
    already allows only strings, numbers and booleans)."""
    return {key: variable_text(key, value) for key, value in body.get("variables", {}).items()}


def _integer(value: Any) -> int | None:
    """A validated JSON integer (``1.0`` is one too) as an int."""
    return None if value is None else int(value)


Args = dict[str, Any]


class _Api:
    """The route handlers; each gets the request's checked arguments (``_validate``) and maps
    our errors to a status, keeping their sentence."""

    def __init__(self, hub: Hub, stream: EventStream, max_body: int) -> None:
        self.hub = hub
        self.store = hub.store
        self.stream = stream
        self.max_body = max_body

    async def page(self, request: Request, args: Args) -> Response:
        resource = importlib.resources.files("lmstream_nb.serve") / "page.html"
        try:
            html = resource.read_text(encoding="utf-8")
        except (FileNotFoundError, OSError):
            html = (
                "<!doctype html><title>lmstream serve</title><p>The page is not installed; "
                'the API is at <a href="/api/openapi.json">/api/openapi.json</a>.</p>'
            )
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    async def openapi(self, request: Request, args: Args) -> Response:
        return JSONResponse(request.app.state.openapi)

    async def prompts(self, request: Request, args: Args) -> Response:
        prompts = await asyncio.to_thread(self.store.list)
        return JSONResponse({"prompts": [_prompt_summary(p) for p in prompts]})

    async def prompt(self, request: Request, args: Args) -> Response:
        versions = await asyncio.to_thread(self.store.versions, args["name"])
        latest = max(versions, key=lambda p: p.version or 0)
        return JSONResponse(
            {
                **latest.as_dict(),
                "versions": sorted(p.version for p in versions if p.version is not None),
            }
        )

    async def diff(self, request: Request, args: Args) -> Response:
        diff = await asyncio.to_thread(self.store.diff, args["name"], args["a"], args.get("b"))
        return JSONResponse(diff.as_dict())

    async def models(self, request: Request, args: Args) -> Response:
        return JSONResponse({"models": await self.hub.client.chat_models()})

    async def start_run(self, request: Request, args: Args) -> Response:
        body = args["body"]
        variables = _variables(body)
        prompt = await asyncio.to_thread(
            self.store.get, args["name"], _integer(body.get("version"))
        )
        if body.get("chat") is None:  # a turn is rendered by its conversation's own rule
            prompt.render(variables)  # refuse missing or unknown variables before a run
        else:
            try:
                check_name(body["chat"])
            except ValueError as exc:
                raise ApiError(422, str(exc)) from None
        model = body.get("model") or prompt.model or await self.hub.client.default_model()
        temperature = body.get("temperature")
        schema = body.get("schema")
        live = await self.hub.start(
            prompt,
            variables,
            model=model,
            temperature=None if temperature is None else float(temperature),
            max_tokens=_integer(body.get("max_tokens")),
            # Checked here, so that a schema that is not one starts nothing (422).
            schema=schema_of(schema) if schema is not None else None,
            chat=body.get("chat"),
            drop_oldest=bool(body.get("drop_oldest", False)),
            include_failed=bool(body.get("include_failed", False)),
        )
        url = f"/api/runs/{live.run_id}"
        return JSONResponse(
            {"run_id": live.run_id, "events_url": url + "/events", "url": url},
            status_code=201,
            headers={"Location": url},
        )

    async def runs(self, request: Request, args: Args) -> Response:
        try:
            runs = await asyncio.to_thread(
                self.store.history,
                prompt=args.get("prompt"),
                status=args.get("status"),
                model=args.get("model"),
                limit=args.get("limit", 50),
            )
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return JSONResponse({"runs": runs.as_dicts()})

    async def run(self, request: Request, args: Args) -> Response:
        run_id = args["run_id"]
        record = await asyncio.to_thread(self.store.get_run, run_id)
        live = self.hub.get(run_id)
        data = asdict(record)
        if live is not None:  # the store's copy lags by up to a second; the hub's does not
            data["text"], data["reasoning"] = str(live.text), str(live.reasoning)
        data["events_url"] = f"/api/runs/{run_id}/events"
        return JSONResponse(data)

    async def cancel(self, request: Request, args: Args) -> Response:
        run_id = args["run_id"]
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

    async def events(self, request: Request, args: Args, send: Send) -> None:
        scope, receive = request.scope, request.receive
        run_id = args["run_id"]
        try:
            cursor = Cursor.parse(args.get("Last-Event-ID") or args.get("last_event_id"))
        except BadCursor as exc:
            await error_response(400, str(exc))(scope, receive, send)
            return
        # Raises RunNotFound before the response starts (the handlers answer 404).
        live, record = await find_run(self.hub, run_id)
        if cursor.phase == "e":
            # The client saw the end; 204 tells an EventSource to stop reconnecting.
            await Response(status_code=204)(scope, receive, send)
            return
        # An id beyond the text is not refused: the store lags up to a second behind what a
        # crashed server had sent, so such a client gets what follows its id, and the end.
        await self.stream.respond(scope, receive, send, cursor=cursor, live=live, record=record)


def _lmstream_error(exc: LMStreamError) -> Response:
    """The status for one of our errors, and its sentence in the API's terms: a web client is
    told where to look in the API, never the path of the server's database."""
    said = render(exc, "relay")  # the API's own ways to look, never the database's path
    if isinstance(exc, (PromptNotFound, RunNotFound)):
        return error_response(404, said)
    if isinstance(exc, (TemplateError, InvalidSetting, InvalidSchema)):
        return error_response(422, said)
    if isinstance(exc, ConversationBusy):
        return error_response(409, said)
    if isinstance(exc, ConversationTooLong) and exc.status == 0:
        return error_response(422, said)  # counted here and not sent: the request's fault
    if isinstance(exc, StoreError):
        return error_response(503, said)  # the database, not the request, is at fault
    return error_response(502, said)  # the model server refused or could not be reached


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"There is no {request.url.path[:200]}: see /api/openapi.json for the routes."
    elif exc.status_code == 405:
        message = (
            f"{request.method} is not allowed on {request.url.path[:200]}: see /api/openapi.json."
        )
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, exc.headers)


async def _lmstream_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LMStreamError)
    return _lmstream_error(exc)


async def _bug(request: Request, exc: Exception) -> Response:
    """Whatever no check foresaw is still one JSON sentence (and is logged as the bug it is)."""
    return error_response(
        500,
        f"lmstream serve failed on this request ({type(exc).__name__}), which is a bug in it: "
        "please report it with the request that caused it.",
    )


Handler = Callable[[Request, Args], Awaitable[Response]]
StreamHandler = Callable[[Request, Args, Send], Awaitable[None]]


class _Checked:
    """A route endpoint that checks its request against its operation, then calls the handler.

    A plain ASGI app rather than a Starlette request/response endpoint, so that the events
    handler (which takes ``send`` as well) can own every write (``_events``).
    """

    def __init__(self, operation: Operation, handler: Handler | StreamHandler) -> None:
        self.operation = operation
        self.handler = handler
        self.streams = len(inspect.signature(handler).parameters) == 3

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        args = await self.operation.check(request)
        if self.streams:
            await cast(StreamHandler, self.handler)(request, args, send)
            return
        response = await cast(Handler, self.handler)(request, args)
        await response(scope, receive, send)


class _Methods:
    """The endpoints of one path by method (HEAD is GET without the body, as Starlette does)."""

    def __init__(self, endpoints: dict[str, _Checked]) -> None:
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        await self.endpoints["GET" if method == "HEAD" else method](scope, receive, send)


def create_app(
    *,
    store: PromptStore | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    token: str | None = None,
    cors_origins: Iterable[str] = (),
    allowed_hosts: Iterable[str] = (),
    grace: float = 60.0,
    keepalive: float = 15.0,
    status_interval: float = 5.0,
    max_body: int = DEFAULT_MAX_BODY,
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
      the API from a browser (none: CORS off); ``allowed_hosts``: names accepted in the Host
      header besides 127.0.0.1, localhost and [::1] (``"*"``: any; see ``_security``).
    - ``grace``: seconds a run with no listener goes on before it is cancelled, counted from
      the POST for a run nobody has listened to yet, and from the moment the last listener left.
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
    if max_body < 2:
        raise ValueError(f"max_body is {max_body}: allow at least the 2 bytes of {{}}.")
    check_token(token, "127.0.0.1")
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
    description = openapi(max_body)
    operations = Operations(description, max_body)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await _end_orphaned_runs(store)
        try:
            yield
        finally:
            await hub.aclose()
            await client.aclose()

    def route(path: str, **handlers: Handler | StreamHandler) -> Route:
        """One route per path, whatever its methods, so a 405 lists them all in ``Allow``."""
        endpoints = {
            method.upper(): _Checked(operations[method.upper(), path], handler)
            for method, handler in handlers.items()
        }
        return Route(path, _Methods(endpoints), methods=list(endpoints))

    routes = [
        route("/", get=api.page),
        route("/api/openapi.json", get=api.openapi),
        route("/api/prompts", get=api.prompts),
        route("/api/prompts/{name}", get=api.prompt),
        route("/api/prompts/{name}/diff", get=api.diff),
        route("/api/prompts/{name}/runs", post=api.start_run),
        route("/api/models", get=api.models),
        route("/api/runs", get=api.runs),
        route("/api/runs/{run_id}", get=api.run, delete=api.cancel),
        route("/api/runs/{run_id}/events", get=api.events),
    ]
    origins = list(cors_origins)
    # Outermost first: foreign hosts and origins are refused before anything else runs.
    middleware = [Middleware(SiteGuard, hosts=list(allowed_hosts), origins=origins)]
    if origins:  # before the token, so a preflight (which carries no token) is answered
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
            Exception: _bug,
        },
        lifespan=lifespan,
    )
    app.state.hub = hub
    app.state.openapi = description
    return app


async def _end_orphaned_runs(store: PromptStore) -> None:
    """Runs left ``unfinished`` by a server that was killed end now, as ``interrupted``, with
    the text they had (the store tells a dead owner from a live one). Opening a store does this
    too; a service handed a store opened long before its start does it again here."""
    await asyncio.to_thread(store.end_orphaned_runs)
