"""Running the simulator: uvicorn in a background thread (``serve``) or in the foreground (``run``).

Why Starlette on uvicorn: it is a well-kept, widely used ASGI stack that speaks plain HTTP/1.1
with chunked streaming, and both sit on anyio and h11, which httpx already brings along, so the
simulator adds almost nothing to the install. Writing our own HTTP server on asyncio streams would
be fewer dependencies but more code to get subtly wrong (keep-alive, chunking, half-closed
sockets) in the very component that is supposed to be the trustworthy reference.

The background server runs its own event loop in a daemon thread, so :func:`serve` works from
any thread, including one that already runs an asyncio loop (a Jupyter kernel, an async test).
The listening socket is bound before the thread starts, so the port is known at once, and
``serve`` returns only after uvicorn reports that it is accepting connections.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import uvicorn

from ._app import build_app
from ._records import Recorder, RequestRecord
from ._scenario import SimConfig

__all__ = ["SimServer", "run", "serve"]

_STARTUP_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0


class _Uvicorn(uvicorn.Server):
    """uvicorn's server with a readiness hook and an abrupt shutdown of open connections."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self._on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # A stopped LM Studio drops its connections; don't wait for running streams to end.
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None and not transport.is_closing():
                transport.close()
        await super().shutdown(sockets=sockets)


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise OSError(exc.errno, f"simulator cannot listen on {host}:{port}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise OSError(
            exc.errno, f"simulator cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from exc
    return sock


def summary(record: RequestRecord) -> str:
    """One line about a finished request, e.g. for the ``lmstream sim`` log."""
    seconds = (record.ended_at or time.monotonic()) - (record.started_at or time.monotonic())
    parts = [record.method, record.path]
    if record.model is not None:
        parts += [record.model, f"prompt={record.prompt_tokens}"]
    parts += ["→", record.outcome]
    if record.planned_tokens or record.sent_tokens:
        parts.append(f"tokens={record.sent_tokens}/{record.planned_tokens}")
    parts.append(f"status={record.status_code if record.status_code is not None else '-'}")
    parts.append(f"{seconds:.2f}s")
    return " ".join(parts)


class SimServer:
    """One simulated LM Studio server and what it recorded.

    Create it with :func:`serve` (background thread) or :func:`run` (foreground). Use it as a
    context manager so that it is always stopped.
    """

    def __init__(
        self, config: SimConfig, *, on_finish: Callable[[RequestRecord], None] | None = None
    ) -> None:
        self.config = config
        self._recorder = Recorder(on_finish)
        self._app = build_app(config, self._recorder)
        self._sock: socket.socket | None = None
        self._port: int | None = None
        self._server: _Uvicorn | None = None
        self._thread: threading.Thread | None = None
        self._settled = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._stopped = False

    # -- addresses

    @property
    def host(self) -> str:
        return self.config.host

    @property
    def port(self) -> int:
        """The port actually listened on (the chosen one when the config said 0)."""
        if self._port is None:
            raise RuntimeError("the simulator has not been started")
        return self._port

    @property
    def root_url(self) -> str:
        """``http://host:port`` without a path."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, ``http://host:port/v1``."""
        return self.root_url + "/v1"

    # -- records

    def records(self) -> list[RequestRecord]:
        """Snapshots of every request so far, in arrival order.

        A record leaves ``"running"`` just after its last byte is sent, so a client may see the
        reply a moment before the record is final; use :meth:`wait_for` to wait for that.
        """
        return self._recorder.snapshot()

    def wait_for(
        self, predicate: Callable[[RequestRecord], bool], timeout: float = 5.0
    ) -> RequestRecord:
        """Block until a record matches ``predicate``; the first match in arrival order.

        Raises :class:`TimeoutError` if none matches within ``timeout`` seconds.
        """
        return self._recorder.wait_for(predicate, timeout)

    # -- life cycle

    def _uvicorn(self) -> _Uvicorn:
        config = uvicorn.Config(
            self._app,
            http="h11",
            loop="asyncio",
            ws="none",
            lifespan="off",
            log_level="warning",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=3,
        )
        return _Uvicorn(config, self._settled.set)

    def start(self) -> SimServer:
        """Start serving in a daemon thread; return once connections are accepted."""
        with self._lock:
            if self._thread is not None or self._stopped:
                raise RuntimeError("a SimServer can be started only once")
            self._sock = _bind(self.config.host, self.config.port)
            self._port = self._sock.getsockname()[1]
            self._server = self._uvicorn()
            self._thread = threading.Thread(
                target=self._thread_main, name=f"lmstream-sim:{self.port}", daemon=True
            )
            self._thread.start()
        if not self._settled.wait(_STARTUP_TIMEOUT_S) or not self._server.started:
            error = self._error
            self.stop()
            detail = f": {error!r}" if error is not None else ""
            raise RuntimeError(
                f"the simulator did not start on {self.config.host}:{self.config.port} within "
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
        """Serve in the calling thread until Ctrl-C (or :meth:`stop` from another thread)."""
        with self._lock:
            if self._thread is not None or self._server is not None or self._stopped:
                raise RuntimeError("a SimServer can be started only once")
            self._sock = _bind(self.config.host, self.config.port)
            self._port = self._sock.getsockname()[1]
            self._server = self._uvicorn()
        if on_ready is not None:
            base_url = self.base_url
            self._server._on_started = lambda: on_ready(base_url)
        try:
            asyncio.run(self._server.serve(sockets=[self._sock]))
        except KeyboardInterrupt:
            pass  # uvicorn shut down cleanly and then re-raised the captured Ctrl-C
        finally:
            self._close_socket()

    def stop(self) -> None:
        """Stop serving and drop open connections. Idempotent; waits at most about 10 s."""
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
                raise RuntimeError(f"the simulator thread did not stop within {_STOP_TIMEOUT_S} s")
        self._close_socket()

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()

    def __enter__(self) -> SimServer:
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
        where = self.base_url if self._port is not None else f"{self.host}:{self.config.port}"
        return f"<SimServer {where} profile={self.config.profile!r} {state}>"


def _config(config: SimConfig | None, fields: dict[str, Any]) -> SimConfig:
    base = SimConfig() if config is None else config
    return dataclasses.replace(base, **fields) if fields else base


def serve(config: SimConfig | None = None, /, **fields: Any) -> SimServer:
    """Start a simulated LM Studio server in a background thread and return it, running.

    Pass a :class:`SimConfig`, or its fields as keywords (``serve(profile="test-fast")``), or
    both (the keywords replace the config's fields). Use the result as a context manager::

        with simulator.serve(profile="test-fast") as sim:
            httpx.get(sim.base_url + "/models")
    """
    return SimServer(_config(config, fields)).start()


def run(
    config: SimConfig | None = None,
    *,
    log: Callable[[str], None] | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve in the foreground until Ctrl-C (for the ``lmstream sim`` command).

    ``log`` receives one summary line per finished request; ``on_ready`` receives the base URL
    once the server accepts connections. Nothing else is printed.
    """
    on_finish = None if log is None else (lambda record: log(summary(record)))
    SimServer(config or SimConfig(), on_finish=on_finish).serve_forever(on_ready)
