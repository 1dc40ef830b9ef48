"""What the simulator saw: one ``RequestRecord`` per HTTP request, safe to read from any thread.

Tests use the records to prove what happened on the server side, for example that closing a
response really stopped generation. The server's event loop updates them; test threads read
snapshots and block in :meth:`Recorder.wait_for` until a record matches.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

__all__ = ["Outcome", "Phase", "Recorder", "RequestRecord", "Stage"]

Outcome = Literal[
    "running",
    "completed",
    "client_disconnected",
    "fault_disconnect",
    "http_error",
    "stream_error",
    "truncated",
]
Phase = Literal["prefill", "generation"]
Stage = Literal["loading", "queued", "prefill", "generation", "done"]
T = TypeVar("T")


#: The most text of a request's messages its record keeps (see ``RequestRecord.messages``).
MESSAGES_KEPT_CHARS = 64 * 1024


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """A snapshot of one request as the simulator handled it.

    - ``id``: the ``chatcmpl-…`` id of a chat completion, ``""`` for other requests.
    - ``method``, ``path``: as received. ``model``: the model that served it (``None`` if none).
    - ``stream``: whether the client asked for a stream.
    - ``prompt_tokens``: estimated prompt size; ``planned_tokens``: reasoning plus answer tokens
      the simulator meant to generate; ``sent_tokens``: those actually written (streams) or
      generated before the end (non-streaming).
    - ``outcome``: ``"running"`` until it ends, then ``"completed"``, ``"client_disconnected"``
      (the client went away), ``"fault_disconnect"`` (the ``disconnect_at`` fault dropped it),
      ``"http_error"`` (an error status), ``"stream_error"`` (an ``event: error`` was sent) or
      ``"truncated"`` (``end_at`` ended the body early).
    - ``disconnect_phase``: for ``client_disconnected``, ``"prefill"`` if no token had been
      produced yet (loading, queueing, prompt processing), else ``"generation"``.
    - ``stage``: where a chat request is on its model: ``"loading"`` (a JIT load it waits
      for), ``"queued"`` (every slot taken: it waits for one), ``"prefill"``, ``"generation"``,
      ``"done"`` once it left the model; ``None`` before (or for other requests).
    - ``started_at``, ``ended_at``: :func:`time.monotonic` times; ``ended_at`` is ``None`` while
      running.
    - ``status_code``: the HTTP status sent, ``None`` before the headers went out.
    - ``auth``: the scheme of the request's ``Authorization`` header (``"Bearer"``,
      ``"Basic"``), ``None`` without one; ``query``: the query string as received.
    - ``response_format``: a chat request's ``response_format`` as received (structured output).
    - ``messages``: a chat request's messages as (role, text) pairs, as the model read them
      (the native chat's system prompt and input become a system and a user message); kept
      only up to ``MESSAGES_KEPT_CHARS`` characters in all (else empty), so a long-running
      simulator fed long prompts does not hold them all.
    """

    id: str
    method: str
    path: str
    model: str | None = None
    stream: bool = False
    prompt_tokens: int = 0
    planned_tokens: int = 0
    sent_tokens: int = 0
    outcome: Outcome = "running"
    disconnect_phase: Phase | None = None
    stage: Stage | None = None
    started_at: float | None = None
    ended_at: float | None = None
    status_code: int | None = None
    auth: str | None = None
    query: str = ""
    response_format: Any = None
    messages: tuple[tuple[str, str], ...] = ()


class Recorder:
    """Thread-safe list of records; every change wakes :meth:`wait_for` callers.

    ``on_finish`` is called (on the server's thread, outside the lock) once per request when its
    outcome leaves ``"running"``.
    """

    def __init__(self, on_finish: Callable[[RequestRecord], None] | None = None) -> None:
        self._cond = threading.Condition()
        self._records: list[RequestRecord] = []
        self._on_finish = on_finish

    def add(self, method: str, path: str, *, auth: str | None = None, query: str = "") -> int:
        """Start a record for a request that just arrived; return its index."""
        record = RequestRecord(
            id="",
            method=method,
            path=path,
            started_at=time.monotonic(),
            auth=auth,
            query=query,
        )
        with self._cond:
            self._records.append(record)
            self._cond.notify_all()
            return len(self._records) - 1

    def get(self, index: int) -> RequestRecord:
        with self._cond:
            return self._records[index]

    def update(self, index: int, **changes: Any) -> RequestRecord:
        """Replace fields of one record. A first terminal ``outcome`` also sets ``ended_at``."""
        with self._cond:
            old = self._records[index]
            finishing = old.outcome == "running" and changes.get("outcome", "running") != "running"
            if finishing and "ended_at" not in changes:
                changes["ended_at"] = time.monotonic()
            new = dataclasses.replace(old, **changes)
            self._records[index] = new
            self._cond.notify_all()
        if finishing and self._on_finish is not None:
            self._on_finish(new)
        return new

    def finish(self, index: int, outcome: Outcome, **changes: Any) -> RequestRecord:
        """Set the outcome unless an earlier one already ended the record."""
        with self._cond:
            if self._records[index].outcome != "running":
                return self._records[index]
        return self.update(index, outcome=outcome, **changes)

    def snapshot(self) -> list[RequestRecord]:
        with self._cond:
            return list(self._records)

    def wait_until(
        self, check: Callable[[list[RequestRecord]], T | None], timeout: float, what: str
    ) -> T:
        """Block until ``check(records)`` returns something other than ``None`` or ``False``
        (e.g. "four requests generate at once"); return it. ``what`` names it for the
        :class:`TimeoutError` raised after ``timeout`` seconds, which lists the records."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = check(list(self._records))
                if value is not None and value is not False:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = "; ".join(
                        f"{r.method} {r.path} {r.stage} {r.outcome} sent={r.sent_tokens}"
                        for r in self._records
                    )
                    raise TimeoutError(
                        f"{what} within {timeout} s (records so far: {seen or 'none'})"
                    )
                self._cond.wait(remaining)

    def wait_for(self, predicate: Callable[[RequestRecord], bool], timeout: float) -> RequestRecord:
        """Block until some record satisfies ``predicate``; return the first such, in arrival order.

        Raises :class:`TimeoutError` after ``timeout`` seconds, listing the records seen so far.
        """
        return self.wait_until(
            lambda records: next((r for r in records if predicate(r)), None),
            timeout,
            "no request record matched",
        )
