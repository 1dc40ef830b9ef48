"""The one bounded wait the tests use where no event exists to wait on.

Some things a test waits for offer no event: a row another thread or process writes, a line
in an external server's log, a file a child process creates. For those, and only those, poll
with :func:`wait_until`: it always has a deadline, and when the deadline passes it fails the
test with a sentence saying what never happened, instead of falling through silently and
letting a later assertion fail for an unclear reason. Where an event exists (an
``asyncio.Event``, a queue, a process's exit), wait on the event instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

POLL_S = 0.02


def wait_until(
    check: Callable[[], T | bool | None],
    *,
    timeout: float,
    what: str,
    interval: float = POLL_S,
) -> T:
    """Call ``check`` until it returns something truthy, and return that; fail after ``timeout``.

    ``what`` names the awaited fact ("the run is recorded as cancelled"), for the failure.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s, but never saw that {what}")
        time.sleep(interval)


async def await_until(
    check: Callable[[], T | bool | None],
    *,
    timeout: float,
    what: str,
    interval: float = POLL_S,
) -> T:
    """:func:`wait_until` for async tests: the event loop keeps running while it waits."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if value:
            return value  # type: ignore[return-value]
        if loop.time() > deadline:
            raise AssertionError(f"waited {timeout:g} s, but never saw that {what}")
        await asyncio.sleep(interval)
