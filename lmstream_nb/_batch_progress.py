"""Progress of a batch or a benchmark: tqdm's text bar in a terminal, an HTML line in a notebook.

In a notebook the progress is an ordinary output (HTML shown through a display handle), not
tqdm's widget: a saved notebook opened without its kernel shows a widget as "Error displaying
widget: model not found", and this line as it ended. Redraws are paced (at most
``NotebookProgress.interval`` apart, so a fast batch does not flood the front end); a count
that arrives between two redraws is drawn by a timer, and closing draws the end at once.
Both bars offer the part of tqdm's interface that the batch and the benchmark use.

While rows run, the line also says what the rows in flight are doing (:class:`RowsInFlight`):
"3 processing prompt (41%, 12%, 80%) · 1 streaming", in the words of ``_progress``.
"""

from __future__ import annotations

import asyncio
import html
import sys
import time
from collections.abc import Callable
from typing import Any

from ._events import (
    Event,
    LoadProgress,
    PromptEstimate,
    PromptProgress,
    ReasoningDelta,
    StreamStarted,
    TextDelta,
)
from ._progress import TITLES, percent

_BAR_STYLE = (
    "display: inline-block; width: 12em; height: 0.8em; vertical-align: middle; "
    "border: 1px solid var(--jp-border-color1, #999); border-radius: 2px; margin: 0 0.5em"
)
_FILL_COLOR = {
    "running": "var(--jp-brand-color1, #1976d2)",
    "done": "var(--jp-success-color1, #388e3c)",
    "stopped": "var(--jp-warn-color1, #f57c00)",
}


def in_notebook() -> bool:
    """True in a Jupyter kernel (IPython is never imported here just to ask)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and hasattr(shell, "kernel")


def progress_bar(total: int, desc: str, unit: str) -> Any:
    """A bar left in place when it closes: HTML in a notebook, else tqdm's text bar (as wide
    as the terminal at most)."""
    if in_notebook():
        return NotebookProgress(total, desc, unit)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=True, dynamic_ncols=True)


def advance(bar: Any, count: int = 1) -> None:
    """Count ``count`` more on ``bar``; the step that completes it is counted without drawing,
    so ``close()`` draws the finished bar once (drawing it here too printed 100% twice wherever
    a line cannot be redrawn in place: a log, a pipe, a line wider than the terminal)."""
    if bar.total is not None and bar.n + count >= bar.total:
        bar.n += count
    else:
        bar.update(count)


class Pacer:
    """Calls ``draw`` at most once per ``interval``: a request that comes sooner is drawn by a
    timer on the running loop once the interval is up (without a loop, by a later request)."""

    def __init__(
        self, draw: Callable[[], object], interval: float, clock: Callable[[], float]
    ) -> None:
        self.interval = interval
        self._draw = draw
        self._clock = clock
        self._drawn_at = -float("inf")
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def drawn(self) -> None:
        """Say that a draw happened just now (one the pacer did not make)."""
        self._drawn_at = self._clock()

    def request(self) -> None:
        if self._closed:
            return
        now = self._clock()
        if now - self._drawn_at >= self.interval:
            self._now()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop to wake us: the next request or the owner's close draws it
            self._timer = loop.call_later(self._drawn_at + self.interval - now, self._on_timer)

    def close(self) -> None:
        """No draws from now on (the owner draws the end itself)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if not self._closed:
            self._now()

    def _now(self) -> None:
        self.drawn()
        self._draw()


def paced_refresh(bar: Any) -> Pacer:
    """What redraws ``bar`` after its postfix changed, at most ``NotebookProgress.interval``
    apart (progress reports come many times a second). tqdm's own pacing applies only to
    counts; its ``refresh()`` draws at once. A bar already full is left to ``close()``,
    which draws it once (see :func:`advance`)."""

    def draw() -> None:
        if bar.total is None or bar.n < bar.total:
            bar.refresh()

    return Pacer(draw, NotebookProgress.interval, time.monotonic)


class NotebookProgress:
    """``done/total`` with a bar, the rate, the elapsed time and a postfix, as HTML."""

    interval = 0.25  # seconds between redraws: at most four a second

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        show: Callable[[dict[str, str]], Any] | None = None,
    ) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = 0
        self.postfix = ""
        self.draws = 0
        self._clock = clock
        self._t0 = clock()
        self._pacer = Pacer(self._draw, self.interval, clock)
        self._closed = False
        if show is None:
            from IPython.display import display

            handle = display(self.bundle(), raw=True, display_id=True)  # type: ignore[no-untyped-call]
            self._update: Callable[[dict[str, str]], Any] = lambda b: handle.update(b, raw=True)
        else:
            show(self.bundle())
            self._update = show
        self._pacer.drawn()

    # -- tqdm's interface, as far as the batch and the benchmark use it ----------------------

    def update(self, count: int = 1) -> None:
        self.n += count
        self._redraw()

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.set_postfix_str(", ".join(f"{k}={v}" for k, v in values.items()), refresh=refresh)

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = str(text)
        if refresh:
            self._redraw()

    def refresh(self) -> None:
        self._redraw()

    def close(self) -> None:
        """Draw the end now (also when nothing changed since the last redraw)."""
        if self._closed:
            return
        self._closed = True
        self._pacer.close()
        self._draw()

    # -- drawing -------------------------------------------------------------------------------

    def _redraw(self) -> None:
        self._pacer.request()

    def _draw(self) -> None:
        self.draws += 1
        self._update(self.bundle())

    def _state(self) -> str:
        if not self._closed:
            return "running"
        return "done" if self.n >= self.total else "stopped"

    def line(self) -> str:
        """The progress as one line of text (also the output's text/plain)."""
        from tqdm import tqdm

        elapsed = max(0.0, self._clock() - self._t0)
        percent = 100 * self.n / self.total if self.total else 100.0
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}s ({percent:.0f}%)"]
        if self.n and elapsed > 0:
            parts.append(f"{self.n / elapsed:.2f} {self.unit}s/s")
        parts.append(f"{tqdm.format_interval(elapsed)} elapsed")
        if self._closed and self.n < self.total:
            parts.append("stopped")
        if self.postfix:
            parts.append(self.postfix)
        return " · ".join(parts)

    def bundle(self) -> dict[str, str]:
        """The output as it stands: text/html with a bar, and the line as text/plain."""
        state = self._state()
        width = min(100.0, 100 * self.n / self.total) if self.total else 100.0
        fill = (
            f'<span style="display: block; height: 100%; width: {width:.1f}%; '
            f'background: {_FILL_COLOR[state]}"></span>'
        )
        text = self.line()
        head, _, rest = html.escape(text).partition(" · ")
        return {
            "text/plain": text,
            "text/html": (
                f'<div class="lmstream-progress" data-state="{state}" '
                'style="font-size: 0.9em; white-space: pre-wrap; overflow-wrap: break-word">'
                f'{head}<span style="{_BAR_STYLE}">{fill}</span>{rest}</div>'
            ),
        }


# -- what the rows in flight are doing ----------------------------------------------------------

#: At most this many rows' prompt percentages are listed; more are summed up by their mean.
LISTED_ROWS = 3


class RowsInFlight:
    """What each row in flight is doing, from its stream's events, as a few words.

    A row is waiting (sent; queued, or at a server that reports nothing), loading the model,
    processing its prompt (the server's fraction, or the fraction of an estimate, marked ``~``)
    or streaming (its prompt is processed or its first text came). The text stays short
    however many rows run: counts, and the percentages of a few rows or their mean.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        #: row -> its latest progress event and when it came, for the rows that have one.
        self._rows: dict[int, tuple[LoadProgress | PromptProgress | PromptEstimate, float]]
        self._rows = {}
        self._waiting: set[int] = set()
        self._streaming: set[int] = set()

    def start(self, row: int) -> None:
        self._waiting.add(row)

    def end(self, row: int) -> None:
        self._waiting.discard(row)
        self._streaming.discard(row)
        self._rows.pop(row, None)

    def event(self, row: int, event: Event) -> bool:
        """Take one of the row's events; True when what the line says may have changed."""
        if row in self._streaming and not isinstance(event, StreamStarted):
            return False  # the hot path: every text delta of a streaming row
        if isinstance(event, StreamStarted):  # sent (again, after a retry before any text)
            self.end(row)
            self._waiting.add(row)
            return True
        if isinstance(event, TextDelta | ReasoningDelta) or (
            isinstance(event, PromptProgress) and event.fraction >= 1.0
        ):
            self.end(row)
            self._streaming.add(row)
            return True
        if isinstance(event, LoadProgress | PromptProgress | PromptEstimate):
            self._waiting.discard(row)
            self._rows[row] = (event, self._clock())
            return True
        return False

    def _fraction(self, row: int) -> tuple[str, float, bool]:
        event, at = self._rows[row]
        if isinstance(event, PromptEstimate):
            return (
                PromptProgress.phase,
                event.fraction_at(event.elapsed_s + self._clock() - at),
                True,
            )
        return event.phase, event.fraction, False

    def text(self) -> str:
        """E.g. ``3 processing prompt (41%, ~12%, 80%) · 1 streaming · 2 waiting``."""
        phases: dict[str, list[tuple[float, bool]]] = {phase: [] for phase in TITLES}
        for row in sorted(self._rows):
            phase, fraction, guessed = self._fraction(row)
            phases[phase].append((fraction, guessed))
        parts = []
        for phase, fractions in phases.items():
            if not fractions:
                continue
            if len(fractions) <= LISTED_ROWS:
                shown = ", ".join(("~" if guessed else "") + percent(f) for f, guessed in fractions)
            else:
                shown = "mean " + percent(sum(f for f, _ in fractions) / len(fractions))
            parts.append(f"{len(fractions)} {TITLES[phase]} ({shown})")
        if self._streaming:
            parts.append(f"{len(self._streaming)} streaming")
        if self._waiting:
            parts.append(f"{len(self._waiting)} waiting")
        return " · ".join(parts)
