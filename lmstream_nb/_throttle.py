"""Coalescing of streamed text for a front end: take every chunk at once, paint at a steady pace.

A local model sends 10-150 chunks a second and the simulator many thousands; a browser wants
about 20 repaints a second. The first chunk is painted the moment it arrives (that is the
moment the user is waiting for); later chunks are gathered and painted at most once per
``interval``. Whoever owns a clock and a timer calls ``due()`` when the interval has passed,
so the tail of a burst is never held back until the next chunk.

No clock, no threads: times are passed in, which makes the pacing exact in tests.
"""

from __future__ import annotations

DEFAULT_INTERVAL_S = 0.05  # at most 20 paints a second


class Coalescer:
    """Collects text and reasoning deltas and says when to paint them."""

    __slots__ = ("_last_paint", "_reasoning", "_text", "interval", "painted_once")

    def __init__(self, interval: float = DEFAULT_INTERVAL_S) -> None:
        self.interval = interval
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._last_paint = float("-inf")
        self.painted_once = False

    @property
    def pending(self) -> bool:
        return bool(self._text or self._reasoning)

    def next_paint_at(self) -> float:
        """When the pending text may be painted (for the owner's timer)."""
        return self._last_paint + self.interval

    def add(self, now: float, text: str = "", reasoning: str = "") -> tuple[str, str] | None:
        """Take a delta; returns what to paint now, or None if it must wait for ``due()``."""
        if text:
            self._text.append(text)
        if reasoning:
            self._reasoning.append(reasoning)
        if not self.painted_once or now >= self._last_paint + self.interval:
            return self.take(now)
        return None

    def due(self, now: float) -> tuple[str, str] | None:
        """The pending text if its time has come (call from the owner's timer)."""
        if self.pending and now >= self._last_paint + self.interval:
            return self.take(now)
        return None

    def take(self, now: float) -> tuple[str, str] | None:
        """Everything pending, whatever the time (used for the final paint)."""
        if not self.pending:
            return None
        text, reasoning = "".join(self._text), "".join(self._reasoning)
        self._text.clear()
        self._reasoning.clear()
        self._last_paint = now
        self.painted_once = True
        return text, reasoning
