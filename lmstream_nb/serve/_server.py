"""Running the service: uvicorn in a background thread (:func:`serve`) or in the foreground.

This follows the simulator's pattern (``lmstream_nb/simulator/_server.py``) without importing
it, since the simulator must stay independent of client-side code: the listening socket is
bound before the thread starts, so the port is known at once, and :func:`serve` returns only
after uvicorn accepts connections, or raises after a bounded wait.

Why uvicorn: the well-kept ASGI server for Starlette, already a dependency (the simulator), with
write flow control (``send`` waits while a client's socket buffer is full), which is what makes
slow-client detection possible at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
import threading
from collections.abc import Callable, MutableMapping
from types import TracebackType
from typing import Any

import uvicorn

from ._app import create_app
from ._hub import Hub

__all__ = ["ServeHandle", "check_host", "run", "serve"]

TOKEN_ENV = "LMSTREAM_SERVER_TOKEN"
_STARTUP_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token (anyone could run prompts)."""
    if not is_loopback(host) and not token:
        raise ValueError(
            f"Listening on {host} makes the server reachable from other machines, so it needs a "
            f"token: pass --token or set {TOKEN_ENV}, or listen on 127.0.0.1."
        )


class _Uvicorn(uvicorn.Server):
    """uvicorn with a readiness hook, abrupt shutdown, and aborting one request's connection."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started
        self.loop: asyncio.AbstractEventLoop | None = None
        self.hub: Hub | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        self._on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Open event streams would hold a graceful shutdown for its whole timeout: end them,
        # and record the running runs as cancelled, before uvicorn waits for connections.
        if self.hub is not None:
            await self.hub.aclose()
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None and not transport.is_closing():
                transport.close()
        await super().shutdown(sockets=sockets)

    def abort(self, scope: MutableMapping[str, Any]) -> bool:
        """Drop the connection serving ``scope`` at once, unsent bytes and all.

        Linger 0 makes the close a reset: the kernel discards what the client never read
        instead of trickling it out, so a stalled client's buffers are freed now.
        """
        for connection in list(self.server_state.connections):
            if getattr(connection, "scope", None) is scope:
                transport = getattr(connection, "transport", None)
                if transport is None:
                    return False
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        linger = struct.pack("ii", 1, 0)
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                transport.abort()
                return True
        return False


def _bind(host: str, port: int, send_buffer: int | None = None) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if send_buffer is not None:  # inherited by accepted connections
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise OSError(
            exc.errno, f"lmstream serve cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from exc
    return sock


class ServeHandle:
    """One running ``lmstream serve``; use it as a context manager so it is always stopped.

    ``send_buffer`` caps the kernel's send buffer of each connection (bytes; default: the
    system's, which grows to megabytes): with it, what a stalled client can make the server
    hold is bounded by that, uvicorn's 64 KiB write buffer and one event.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        send_buffer: int | None = None,
        **app_kwargs: Any,
    ) -> None:
        check_host(host, app_kwargs.get("token"))
        self.host = host
        self._requested_port = port
        self._send_buffer = send_buffer
        self.app = create_app(abort=self._abort, **app_kwargs)
        self.hub: Hub = self.app.state.hub
        self._sock: socket.socket | None = None
        self._port: int | None = None
        self._server: _Uvicorn | None = None
        self._thread: threading.Thread | None = None
        self._settled = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._stopped = False

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server has not been started")
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _abort(self, scope: MutableMapping[str, Any]) -> bool:
        return self._server is not None and self._server.abort(scope)

    def _uvicorn(self) -> _Uvicorn:
        config = uvicorn.Config(
            self.app,
            http="h11",
            loop="asyncio",
            ws="none",
            lifespan="on",
            log_level="warning",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=3,
        )
        server = _Uvicorn(config, self._settled.set)
        server.hub = self.hub
        return server

    def start(self) -> ServeHandle:
        """Serve in a daemon thread; return once connections are accepted."""
        with self._lock:
            if self._thread is not None or self._stopped:
                raise RuntimeError("a ServeHandle can be started only once")
            self._sock = _bind(self.host, self._requested_port, self._send_buffer)
            self._port = self._sock.getsockname()[1]
            self._server = self._uvicorn()
            self._thread = threading.Thread(
                target=self._thread_main, name=f"lmstream-serve:{self._port}", daemon=True
            )
            self._thread.start()
        if not self._settled.wait(_STARTUP_TIMEOUT_S) or not self._server.started:
            error = self._error
            self.stop()
            detail = f": {error!r}" if error is not None else ""
            raise RuntimeError(
                f"lmstream serve did not start on {self.host}:{self._requested_port} within "
                f"{_STARTUP_TIMEOUT_S:.0f} s{detail}"
            ) from error
        return self

    def _thread_main(self) -> None:
        assert self._server is not None
        assert self._sock is not None
        try:
            asyncio.run(self._server.serve(sockets=[self._sock]))
        except BaseException as exc:  # reported by start(); a thread has nobody else to tell
            self._error = exc
        finally:
            self._settled.set()

    def serve_forever(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Serve in the calling thread until Ctrl-C (the ``lmstream serve`` command)."""
        with self._lock:
            if self._thread is not None or self._server is not None or self._stopped:
                raise RuntimeError("a ServeHandle can be started only once")
            self._sock = _bind(self.host, self._requested_port, self._send_buffer)
            self._port = self._sock.getsockname()[1]
            self._server = self._uvicorn()
        if on_ready is not None:
            url = self.url
            self._server._on_started = lambda: on_ready(url)
        try:
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(self._server.serve(sockets=[self._sock]))
        finally:
            self._close_socket()

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn`` on the server's event loop and return its result (hub access from tests)."""
        server = self._server
        if server is None or server.loop is None:
            raise RuntimeError("the server is not running")

        async def call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), server.loop).result(timeout)

    def drop_listeners(self, run_id: int) -> int:
        """Close every open events connection of a run, server-side; return how many."""
        return int(self.call(lambda: self.hub.drop_listeners(run_id)))

    def snapshot(self) -> dict[int, dict[str, Any]]:
        """The hub's live runs, read on the server's loop."""
        result: dict[int, dict[str, Any]] = self.call(self.hub.snapshot)
        return result

    def stop(self) -> None:
        """Stop serving: end event streams, cancel running runs. Idempotent; bounded."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            server, thread = self._server, self._thread
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(_STOP_TIMEOUT_S)
            if thread.is_alive() and server is not None:
                server.force_exit = True
                thread.join(_STOP_TIMEOUT_S)
            if thread.is_alive():
                raise RuntimeError(f"the server thread did not stop within {_STOP_TIMEOUT_S} s")
        self._close_socket()

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()

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
        state = "stopped" if self._stopped else "running" if self._thread else "not started"
        where = self.url if self._port is not None else f"{self.host}:{self._requested_port}"
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
