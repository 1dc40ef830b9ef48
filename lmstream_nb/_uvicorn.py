"""An ASGI app on uvicorn, in a background thread or in the foreground, on a socket bound first.

Shared by the simulator and ``lmstream serve``. It knows nothing of either app or of the wire
format, which is why the simulator may import it (its one import from outside itself).

Why bind first: the port is known before the thread starts (port 0 picks a free one), and a
port that is taken fails at once in the caller's thread with a sentence naming it. ``start``
returns only once uvicorn accepts connections, or raises after a bounded wait. The server runs
its own event loop in a daemon thread, so it works from any thread, including one that already
runs a loop (a Jupyter kernel, an async test).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Literal

import uvicorn

__all__ = ["ThreadedServer"]

_STARTUP_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0


class _Uvicorn(uvicorn.Server):
    """uvicorn with a readiness hook, a hook before shutdown, and an abrupt end of connections.

    A stopped LM Studio drops its connections, and open event streams would hold a graceful
    shutdown for its whole timeout, so open connections are closed rather than awaited.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        on_started: Callable[[], None],
        before_shutdown: Callable[[], Awaitable[None]] | None,
    ) -> None:
        super().__init__(config)
        self.on_started = on_started
        self._before_shutdown = before_shutdown
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        self.on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._before_shutdown is not None:
            await self._before_shutdown()
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None and not transport.is_closing():
                transport.close()
        await super().shutdown(sockets=sockets)


def _bind(host: str, port: int, what: str, send_buffer: int | None) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise OSError(exc.errno, f"{what} cannot listen on {host}:{port}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if send_buffer is not None:  # inherited by the accepted connections
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise OSError(
            exc.errno, f"{what} cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from exc
    return sock


class ThreadedServer:
    """One uvicorn server for ``app``; ``what`` names it in messages ("the simulator").

    ``http`` is uvicorn's HTTP protocol: ``"h11"``, or a subclass of its h11 protocol (the
    service's adds request deadlines and a connection cap; see ``serve._server``).
    """

    def __init__(
        self,
        app: Any,
        *,
        host: str,
        port: int,
        what: str,
        lifespan: Literal["on", "off"] = "off",
        send_buffer: int | None = None,
        before_shutdown: Callable[[], Awaitable[None]] | None = None,
        http: type[asyncio.Protocol] | str = "h11",
    ) -> None:
        self.host = host
        self.what = what
        self._requested_port = port
        self._send_buffer = send_buffer
        config = uvicorn.Config(
            app,
            http=http,
            loop="asyncio",
            ws="none",
            lifespan=lifespan,
            log_level="warning",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=3,
        )
        self._settled = threading.Event()
        self._server = _Uvicorn(config, self._settled.set, before_shutdown)
        self._sock: socket.socket | None = None
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._began = False
        self.stopped = False

    @property
    def port(self) -> int:
        """The port actually listened on (a free one when 0 was asked for)."""
        if self._port is None:
            raise RuntimeError(f"{self.what} has not been started")
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port`` without a path."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        """Started in a thread (and maybe stopped since)."""
        return self._thread is not None

    @property
    def bound(self) -> bool:
        """The socket is bound, so ``port`` and ``url`` are known."""
        return self._port is not None

    def _bind(self) -> None:
        with self._lock:
            if self._began or self.stopped:
                raise RuntimeError(f"{self.what} can be started only once")
            self._began = True
            self._sock = _bind(self.host, self._requested_port, self.what, self._send_buffer)
            self._port = self._sock.getsockname()[1]

    def start(self) -> None:
        """Serve in a daemon thread; return once connections are accepted."""
        self._bind()
        with self._lock:
            self._thread = threading.Thread(
                target=self._thread_main,
                name=f"lmstream:{self.what}:{self._port}",
                daemon=True,
            )
            self._thread.start()
        if not self._settled.wait(_STARTUP_TIMEOUT_S) or not self._server.started:
            error = self._error
            self.stop()
            detail = f": {error!r}" if error is not None else ""
            raise RuntimeError(
                f"{self.what} did not start on {self.host}:{self._requested_port} within "
                f"{_STARTUP_TIMEOUT_S:.0f} s{detail}"
            ) from error

    def _thread_main(self) -> None:
        assert self._sock is not None
        try:
            asyncio.run(self._server.serve(sockets=[self._sock]))
        except BaseException as exc:  # reported by start(); a thread has nobody else to tell
            self._error = exc
        finally:
            self._settled.set()

    def serve_forever(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Serve in the calling thread until Ctrl-C (or :meth:`stop` from another thread);
        ``on_ready`` gets the URL once connections are accepted."""
        self._bind()
        if on_ready is not None:
            url = self.url
            self._server.on_started = lambda: on_ready(url)
        assert self._sock is not None
        try:
            # uvicorn shuts down cleanly on Ctrl-C, then re-raises it.
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(self._server.serve(sockets=[self._sock]))
        finally:
            self._close_socket()

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn`` on the server's event loop and return its result."""
        loop = self._server.loop
        if loop is None or not self.running:
            raise RuntimeError(f"{self.what} is not running")

        async def call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), loop).result(timeout)

    def write_buffers(self) -> list[int]:
        """Bytes waiting to be sent in each open connection (what slow clients cost us)."""

        def sizes() -> list[int]:
            return [
                transport.get_write_buffer_size()
                for connection in self._server.server_state.connections
                if (transport := getattr(connection, "transport", None)) is not None
            ]

        result: list[int] = self.call(sizes)
        return result

    def connections(self) -> int:
        """Connections open right now (each one waiting, reading or answering)."""
        count: int = self.call(lambda: len(self._server.server_state.connections))
        return count

    def abort(self, scope: MutableMapping[str, Any]) -> bool:
        """Drop the connection serving ``scope`` at once, unsent bytes and all.

        Linger 0 makes the close a reset: the kernel discards what the client never read
        instead of trickling it out, so a stalled client's buffers are freed now.
        """
        for connection in list(self._server.server_state.connections):
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

    def stop(self) -> None:
        """Stop serving and drop open connections. Idempotent; waits at most about 20 s."""
        with self._lock:
            if self.stopped:
                return
            self.stopped = True
            thread = self._thread
        self._server.should_exit = True
        if thread is not None:
            thread.join(_STOP_TIMEOUT_S)
            if thread.is_alive():
                self._server.force_exit = True
                thread.join(_STOP_TIMEOUT_S)
            if thread.is_alive():
                raise RuntimeError(f"{self.what} did not stop within {2 * _STOP_TIMEOUT_S:g} s")
        self._close_socket()

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
