"""Who may talk to the service: the token, the Host header and the Origin header.

A server on 127.0.0.1 without a token is reachable by every web page the user opens, because
the browser runs the page's requests from this machine. Three rules keep such pages out:

- **Host.** The Host header must name the server: 127.0.0.1, localhost or [::1] with its
  port, or a host it was started on. DNS rebinding points an attacker's name at 127.0.0.1,
  and the browser then sends that name, so the page cannot read the history (421).
- **Origin.** A request that carries an Origin header must come from the server's own page or
  from an origin listed with ``--cors-origin`` (403); browsers send it on every cross-site
  request and on every POST.
- **Content-Type.** POST and DELETE need ``application/json`` (``_validate``), which a page on
  another site cannot send without a CORS preflight, which this server does not grant.

A token (needed beyond loopback) must survive being typed, pasted and sent in a header: no
surrounding whitespace, printable ASCII, and off loopback at least :data:`MIN_TOKEN_LENGTH`
characters that are not all one character, since anyone who can reach the port can guess.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Iterable

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from ._validate import error_response

__all__ = [
    "LOOPBACK_NAMES",
    "MIN_TOKEN_LENGTH",
    "TOKEN_ENV",
    "SiteGuard",
    "TokenGuard",
    "check_token",
    "is_loopback",
]

TOKEN_ENV = "LMSTREAM_SERVER_TOKEN"
MIN_TOKEN_LENGTH = 16
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]"})
_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[^:\[\]@/\s]+)(?::([0-9]{1,5}))?")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    """``0.0.0.0``, ``::`` or empty: every address of the machine."""
    try:
        return not host or ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def host_name(host: str) -> str:
    """How a Host header names ``host``: lower case, IPv6 in brackets."""
    host = host.lower()
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def check_token(token: str | None, host: str) -> None:
    """Refuse a token no client could send back, or one too weak for an open address."""
    if token is None:
        return
    if token != token.strip():
        raise ValueError(
            "The token starts or ends with whitespace, which no client sends back: remove the "
            f"spaces or line breaks around it (in --token or {TOKEN_ENV})."
        )
    if not token.isascii() or not token.isprintable():
        raise ValueError(
            "The token has characters other than printable ASCII, which a header or URL "
            "cannot carry as they are: use letters, digits and punctuation, such as the "
            "output of `openssl rand -hex 16`."
        )
    if not is_loopback(host) and (len(token) < MIN_TOKEN_LENGTH or len(set(token)) == 1):
        raise ValueError(
            f"A token for {host}, which other machines can reach, must have at least "
            f"{MIN_TOKEN_LENGTH} characters that are not all the same, as anyone there can "
            "try to guess it: use the output of `openssl rand -hex 16`."
        )


class SiteGuard:
    """Refuses requests whose Host does not name this server or whose Origin is foreign.

    ``hosts``: the names accepted besides the loopback ones (``"*"``: any, for a server on
    every address, which needs a token); ``origins``: the CORS origins.
    """

    def __init__(self, app: ASGIApp, hosts: Iterable[str], origins: Iterable[str]) -> None:
        self.app = app
        names = {host_name(h) for h in hosts}
        self._any_host = "*" in names
        self._names = LOOPBACK_NAMES | names
        self._origins = {o.lower().rstrip("/") for o in origins}

    def _host_problem(self, scope: Scope, host: str | None) -> str | None:
        server = scope.get("server")
        port = server[1] if server and server[1] is not None else None
        example = f"127.0.0.1:{port}" if port else "127.0.0.1"
        if not host:
            return (
                f"The request has no Host header: send one naming this server, such as {example}."
            )
        if self._any_host:
            return None
        match = _HOST.fullmatch(host.lower())
        if match is not None and match[1] in self._names:
            given = int(match[2]) if match[2] else 80
            if port is None or given == port:
                return None
        return (
            f"The Host header {host[:60]!r} does not name this server, so the request is refused "
            f"(a web page can rename itself to this address): use http://{example}."
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Request(scope).headers
        host = headers.get("host")
        problem = self._host_problem(scope, host)
        if problem is not None:
            await error_response(421, problem)(scope, receive, send)
            return
        origin = headers.get("origin")
        if origin is not None:
            given = origin.lower().rstrip("/")
            own = f"{scope.get('scheme', 'http')}://{(host or '').lower()}"
            if given != own and given not in self._origins:
                shown = origin[:80] if origin.isascii() else repr(origin[:80])
                await error_response(
                    403,
                    f"Requests from web pages at {shown} are refused: open this server's own "
                    f"page, or start it with --cors-origin {shown} to let that site in.",
                )(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            given = value.strip()
        else:
            given = request.query_params.get("token", "")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), self._token):
            what = "a wrong token" if given else "no token"
            response = error_response(
                401,
                f"This server needs its token and the request had {what}: send "
                "'Authorization: Bearer TOKEN' or add ?token=TOKEN to the URL.",
                {"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
