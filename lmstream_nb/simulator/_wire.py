"""Small pieces of the simulator's wire format that its modules share: JSON bodies, LM Studio's
error bodies and fixed texts, SSE line endings, and the deliberate connection drop."""

from __future__ import annotations

import html
import json
import logging
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

__all__ = [
    "BOM",
    "EXPRESS_HEADERS",
    "JSON",
    "JSON_TYPE",
    "LINE_ENDINGS",
    "LLAMACPP_HEADERS",
    "NO_MODELS",
    "OVERFLOW",
    "UVICORN_HEADERS",
    "Abort",
    "AbortAfterHeaders",
    "dumps",
    "error_object",
    "html_page",
    "install_log_filter",
    "json_reply",
    "native_error",
]

JSON = dict[str, Any]

EXPRESS_HEADERS = [
    (b"x-powered-by", b"Express"),
    (b"connection", b"keep-alive"),
    (b"keep-alive", b"timeout=5"),
]
LLAMACPP_HEADERS = [(b"server", b"llama.cpp")]  # what llama-server sends instead
UVICORN_HEADERS = [(b"server", b"uvicorn")]  # llama-cpp-python's server
JSON_TYPE = "application/json; charset=utf-8"
NO_MODELS = (
    "No models loaded. Please load a model in the developer page or use the 'lms load' command."
)
OVERFLOW = (
    "The number of tokens to keep from the initial prompt is greater than the context length. "
    "Try to load the model with a larger context length, or provide a shorter input"
)
LINE_ENDINGS = {"lf": "\n", "crlf": "\r\n", "cr": "\r"}
BOM = "\ufeff".encode()


def dumps(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def json_reply(body: object, status: int = 200) -> Response:
    return Response(dumps(body), status_code=status, media_type=JSON_TYPE)


def error_object(
    message: str, status: int = 400, *, param: str | None = None, code: str | None = None
) -> Response:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }
    return json_reply(body, status)


def native_error(
    kind: str,
    message: str,
    status: int = 400,
    *,
    code: str | None = None,
    param: str | None = None,
) -> Response:
    """The native API's error object (``type`` is one of LM Studio's error types)."""
    return json_reply(
        {"error": {"type": kind, "message": message, "code": code, "param": param}}, status
    )


def html_page(title: str, message: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n</head>\n<body>\n"
        f"<pre>{html.escape(message)}</pre>\n</body>\n</html>\n"
    )


# --- deliberate connection drops ---------------------------------------------------------------


class Abort(Exception):
    """Raised inside the app, after the headers went out, to drop the connection on purpose."""


def _is_abort(exc: BaseException | None) -> bool:
    if isinstance(exc, Abort):
        return True
    group = getattr(exc, "exceptions", None)  # an exception group made only of aborts
    return bool(group) and all(_is_abort(e) for e in group)  # type: ignore[union-attr]


class _HideAborts(logging.Filter):
    """Drops uvicorn's "Exception in ASGI application" record when the exception is an Abort."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and _is_abort(record.exc_info[1]))


_HIDE_ABORTS = _HideAborts()


def install_log_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if _HIDE_ABORTS not in logger.filters:
        logger.addFilter(_HIDE_ABORTS)


class AbortAfterHeaders(Response):
    """A non-streaming reply that announces a body, sends its headers, then drops the connection."""

    def __init__(self) -> None:
        super().__init__(b"{}", media_type=JSON_TYPE)
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"] + [
            (b"content-length", b"4096")
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        raise Abort
