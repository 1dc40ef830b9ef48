"""A private event loop on a daemon thread, for synchronous callers.

A Jupyter kernel already runs an asyncio loop in the cell's thread, so synchronous code there
cannot call ``asyncio.run``. Running the async client on this thread works the same in a plain
script, a kernel and a terminal IPython. A Ctrl-C (KeyboardInterrupt) that arrives while the
caller waits cancels the work on the loop, which closes any HTTP response, before re-raising.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_CANCEL_WAIT_S = 2.0


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="lmstream-loop", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop thread and wait for it; Ctrl-C cancels it there."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            if not future.done():
                future.cancel()
                concurrent.futures.wait([future], timeout=_CANCEL_WAIT_S)
            raise

    def submit(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Start ``coro`` on the loop thread without waiting for it."""
        asyncio.run_coroutine_threadsafe(coro, self.loop)


_shared: LoopThread | None = None
_shared_lock = threading.Lock()


def shared_loop() -> LoopThread:
    """The process-wide loop thread, started on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = LoopThread()
        return _shared
