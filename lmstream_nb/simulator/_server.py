"""Running the simulator: uvicorn in a background thread (``serve``) or in the foreground (``run``).

Why Starlette on uvicorn: it is a well-kept, widely used ASGI stack that speaks plain HTTP/1.1
with chunked streaming, and both sit on anyio and h11, which httpx already brings along, so the
simulator adds almost nothing to the install. Writing our own HTTP server on asyncio streams would
be fewer dependencies but more code to get subtly wrong (keep-alive, chunking, half-closed
sockets) in the very component that is supposed to be the trustworthy reference.

The thread, the socket bound before it and the bounded start-up wait are in
``lmstream_nb._uvicorn``, shared with ``lmstream serve``; it knows nothing of the wire format.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

from .._uvicorn import ThreadedServer
from ._app import build_app
from ._records import Recorder, RequestRecord
from ._scenario import SimConfig

__all__ = ["SimServer", "run", "serve"]

T = TypeVar("T")


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


_CHAT_PATHS = ("/chat/completions", "/api/v1/chat")


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
        self._runner = ThreadedServer(
            build_app(config, self._recorder),
            host=config.host,
            port=config.port,
            what="the simulator",
        )

    # -- addresses

    @property
    def host(self) -> str:
        return self.config.host

    @property
    def port(self) -> int:
        """The port actually listened on (the chosen one when the config said 0)."""
        return self._runner.port

    @property
    def root_url(self) -> str:
        """``http://host:port`` without a path."""
        return self._runner.url

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

    def chats(self) -> list[RequestRecord]:
        """The chat requests among :meth:`records` (``/v1/chat/completions``, its v0 twin and
        the native ``/api/v1/chat``), leaving out model lists, probes and token counts."""
        return [r for r in self._recorder.snapshot() if r.path.endswith(_CHAT_PATHS)]

    def wait_for(
        self, predicate: Callable[[RequestRecord], bool], timeout: float = 5.0
    ) -> RequestRecord:
        """Block until a record matches ``predicate``; the first match in arrival order.

        Raises :class:`TimeoutError` if none matches within ``timeout`` seconds.
        """
        return self._recorder.wait_for(predicate, timeout)

    def wait_until(
        self,
        check: Callable[[list[RequestRecord]], T | None],
        timeout: float = 5.0,
        what: str = "the records never matched",
    ) -> T:
        """Block until ``check`` (given every record so far) returns something other than
        ``None`` or ``False``, and return it, e.g. ``lambda rs: sum(r.stage == "generation" for
        r in rs) == 4 or None``. Raises :class:`TimeoutError` after ``timeout``, starting with
        ``what`` (say what never happened).
        """
        return self._recorder.wait_until(check, timeout, what)

    # -- life cycle

    def start(self) -> SimServer:
        """Start serving in a daemon thread; return once connections are accepted."""
        self._runner.start()
        return self

    def serve_forever(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Serve in the calling thread until Ctrl-C (or :meth:`stop` from another thread);
        ``on_ready`` gets the base URL."""
        self._runner.serve_forever(None if on_ready is None else lambda url: on_ready(url + "/v1"))

    def stop(self) -> None:
        """Stop serving and drop open connections. Idempotent and bounded."""
        self._runner.stop()

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
        runner = self._runner
        state = "stopped" if runner.stopped else "running" if runner.running else "not started"
        where = self.base_url if runner.bound else f"{self.host}:{self.config.port}"
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
