"""Running the service: uvicorn in a background thread (:func:`serve`) or in the foreground.

The thread, the socket bound before it (so the port is known at once) and the bounded start-up
wait are ``lmstream_nb._uvicorn``'s, shared with the simulator.

Why uvicorn: the well-kept ASGI server for Starlette, already a dependency (the simulator), with
write flow control (``send`` waits while a client's socket buffer is full), which is what makes
slow-client detection possible at all.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from types import TracebackType
from typing import Any

from .._uvicorn import ThreadedServer
from ._app import create_app
from ._hub import Hub
from ._security import TOKEN_ENV, check_token, host_name, is_loopback, is_wildcard

__all__ = ["TOKEN_ENV", "ServeHandle", "check_host", "run", "serve"]


def check_host(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token (anyone could run prompts), and a
    token that is weak there or that no client could send back (``_security.check_token``)."""
    if not is_loopback(host) and not token:
        raise ValueError(
            f"Listening on {host} makes the server reachable from other machines, so it needs a "
            f"token: pass --token or set {TOKEN_ENV}, or listen on 127.0.0.1."
        )
    check_token(token, host)


def _hosts(host: str) -> list[str]:
    """Host-header names for a server listening on ``host`` (any, on every address)."""
    return ["*"] if is_wildcard(host) else [host_name(host)]


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
