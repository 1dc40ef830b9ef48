"""Running the service: uvicorn in a background thread (:func:`serve`) or in the foreground.

The thread, the socket bound before it (so the port is known at once) and the bounded start-up
wait are ``lmstream_nb._uvicorn``'s, shared with the simulator.

Why uvicorn: the well-kept ASGI server for Starlette, already a dependency (the simulator), with
write flow control (``send`` waits while a client's socket buffer is full), which is what makes
slow-client detection possible at all.

Why a protocol subclass (:class:`GuardedH11Protocol`): uvicorn has no deadline for receiving a
request. Its keep-alive timer is armed only after a response and stopped by the first byte of
the next request, so a client that sends its headers a byte a second (slowloris) holds a
connection for ever, and its ``limit_concurrency`` answers 503 to *new* requests once the cap is
reached, which lets a few hundred such sockets lock the real clients out. The only layer that
sees a connection before its request is complete is the protocol, so that is where the deadline
and the cap live: here, because they are this service's policy (the simulator keeps uvicorn's
plain protocol).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, MutableMapping
from types import TracebackType
from typing import Any, ClassVar, cast

import h11
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from .._uvicorn import ThreadedServer
from ._app import create_app
from ._hub import Hub
from ._security import TOKEN_ENV, check_token, host_name, is_loopback, is_wildcard

__all__ = ["TOKEN_ENV", "GuardedH11Protocol", "ServeHandle", "check_host", "run", "serve"]

DEFAULT_REQUEST_TIMEOUT = 5.0
DEFAULT_MAX_CONNECTIONS = 1000


def check_host(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token (anyone could run prompts), and a
    token that is weak there or that no client could send back (``_security.check_token``)."""
    if not is_loopback(host) and not token:
        raise ValueError(
            f"Listening on {host} makes the server reachable from other machines, so it needs a "
            f"token: pass --token or set {TOKEN_ENV}, or listen on 127.0.0.1."
        )
    check_token(token, host)


def _raw_response(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, for a client whose request never
    arrived (so h11 has no request to answer)."""
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {STATUS_PHRASES[status].decode()}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline per request and a cap on open connections.

    - Every request must arrive whole (headers and body) within ``request_timeout`` seconds of
      the connection opening or of the previous response ending; otherwise the connection is
      closed, with a 408 if part of a request had come. Once a request is in, the deadline is
      off, so a long event stream is never cut by it.
    - Beyond ``max_connections`` open connections, a new one closes the connection that has been
      idle longest (waiting for a request, or part-way through its headers): idle sockets cannot
      crowd out clients that send a request. If none is idle, the new one gets a 503.
    - A request that is not HTTP at all gets uvicorn's 400, in JSON like every other answer.

    Subclass it with other class attributes (:func:`guarded_protocol`) to change the limits.
    """

    request_timeout: ClassVar[float] = DEFAULT_REQUEST_TIMEOUT
    max_connections: ClassVar[int] = DEFAULT_MAX_CONNECTIONS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._idle_since = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._idle_since = self.loop.time()
        self._arm()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._disarm()  # the whole request is in (or the connection failed)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            self._idle_since = self.loop.time()
            self._arm()  # the next request has the same time to arrive

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self._disarm()
        body = json.dumps(
            {
                "error": "The request is not valid HTTP/1.1, or its headers are longer than "
                "16 KiB: send a well-formed request."
            }
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=STATUS_PHRASES[400]),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()

    # -- the deadline -----------------------------------------------------------------------

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _idle(self) -> bool:
        """No request is being answered: waiting for one, or part-way through its headers."""
        return (
            self.conn.their_state is h11.IDLE
            and self.conn.our_state is h11.IDLE
            and not self.transport.is_closing()
        )

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            return
        partial = bool(self.conn.trailing_data[0]) or self.conn.their_state is h11.SEND_BODY
        answering = self.cycle is not None and self.cycle.response_started
        if partial and not (answering and not self.cycle.response_complete):
            self.transport.write(
                _raw_response(
                    408,
                    f"The request did not arrive whole within {self.request_timeout:g} s, so "
                    "the connection is closed: send each request at once.",
                )
            )
        self.transport.close()

    # -- the cap ----------------------------------------------------------------------------

    def _make_room(self) -> None:
        open_ = [c for c in self.connections if not c.transport.is_closing()]
        if len(open_) <= self.max_connections:
            return
        idle = [
            c for c in open_ if c is not self and isinstance(c, GuardedH11Protocol) and c._idle()
        ]
        if idle:
            min(idle, key=lambda c: c._idle_since).transport.close()
            return
        self._disarm()
        self.transport.write(
            _raw_response(
                503,
                f"The server has {len(open_) - 1} connections open, its limit, and all of "
                "them are busy: try again in a moment.",
            )
        )
        self.transport.close()


def guarded_protocol(
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> type[GuardedH11Protocol]:
    """:class:`GuardedH11Protocol` with these limits (uvicorn takes a class, not an instance)."""
    if request_timeout <= 0 or max_connections < 1:
        raise ValueError(
            f"request_timeout is {request_timeout} and max_connections {max_connections}: "
            "both must be positive."
        )
    attributes = {"request_timeout": request_timeout, "max_connections": max_connections}
    return cast(
        "type[GuardedH11Protocol]", type("GuardedH11Protocol", (GuardedH11Protocol,), attributes)
    )


def _hosts(host: str) -> list[str]:
    """Host-header names for a server listening on ``host`` (any, on every address)."""
    return ["*"] if is_wildcard(host) else [host_name(host)]


class ServeHandle:
    """One running ``lmstream serve``; use it as a context manager so it is always stopped.

    ``send_buffer`` caps the kernel's send buffer of each connection (bytes; default: the
    system's, which grows to megabytes): with it, what a stalled client can make the server
    hold is bounded by that, uvicorn's 64 KiB write buffer and one event. ``request_timeout``
    and ``max_connections`` bound what clients that never finish a request can hold (see
    :class:`GuardedH11Protocol`).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        send_buffer: int | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        **app_kwargs: Any,
    ) -> None:
        check_host(host, app_kwargs.get("token"))
        self.host = host
        hosts = [*_hosts(host), *app_kwargs.pop("allowed_hosts", ())]
        self.app = create_app(abort=self._abort, allowed_hosts=hosts, **app_kwargs)
        self.hub: Hub = self.app.state.hub
        # Before uvicorn waits for connections: end the event streams (they would hold a
        # graceful shutdown for its whole timeout) and record the running runs as cancelled.
        self._runner = ThreadedServer(
            self.app,
            host=host,
            port=port,
            what="lmstream serve",
            lifespan="on",
            send_buffer=send_buffer,
            before_shutdown=self.hub.aclose,
            http=guarded_protocol(request_timeout, max_connections),
        )

    @property
    def port(self) -> int:
        return self._runner.port

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server."""
        return self._runner.url

    def _abort(self, scope: MutableMapping[str, Any]) -> bool:
        return self._runner.abort(scope)

    def start(self) -> ServeHandle:
        """Serve in a daemon thread; return once connections are accepted."""
        self._runner.start()
        return self

    def serve_forever(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Serve in the calling thread until Ctrl-C (the ``lmstream serve`` command)."""
        self._runner.serve_forever(on_ready)

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn`` on the server's event loop and return its result (hub access from tests)."""
        return self._runner.call(fn, timeout)

    def drop_listeners(self, run_id: int) -> int:
        """Close every open events connection of a run, server-side; return how many."""
        return int(self.call(lambda: self.hub.drop_listeners(run_id)))

    def snapshot(self) -> dict[int, dict[str, Any]]:
        """The hub's live runs, read on the server's loop."""
        result: dict[int, dict[str, Any]] = self.call(self.hub.snapshot)
        return result

    def connections(self) -> int:
        """Connections open right now (for tests and monitoring)."""
        return self._runner.connections()

    def write_buffers(self) -> list[int]:
        """Bytes waiting to be sent in each open connection (for tests and monitoring)."""
        return self._runner.write_buffers()

    def stop(self) -> None:
        """Stop serving: end event streams, cancel running runs. Idempotent; bounded."""
        self._runner.stop()

    def __enter__(self) -> ServeHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        runner = self._runner
        state = "stopped" if runner.stopped else "running" if runner.running else "not started"
        where = self.url if runner.bound else self.host
        return f"<ServeHandle {where} {state}>"


def serve(*, host: str = "127.0.0.1", port: int = 0, **app_kwargs: Any) -> ServeHandle:
    """Start ``lmstream serve`` in a background thread and return it, running.

    The keywords are :func:`create_app`'s. Use the result as a context manager::

        with serve(base_url=sim.base_url) as server:
            httpx.get(server.url + "/api/prompts")
    """
    return ServeHandle(host=host, port=port, **app_kwargs).start()


def run(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    on_ready: Callable[[str], None] | None = None,
    **app_kwargs: Any,
) -> None:
    """Serve in the foreground until Ctrl-C (the ``lmstream serve`` command)."""
    ServeHandle(host=host, port=port, **app_kwargs).serve_forever(on_ready)
