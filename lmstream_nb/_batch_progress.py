"""Progress of a batch or a benchmark: tqdm's text bar in a terminal, an HTML line in a notebook.

In a notebook the progress is an ordinary output (HTML shown through a display handle), not
tqdm's widget: a saved notebook opened without its kernel shows a widget as "Error displaying
widget: model not found", and this line as it ended. Redraws are paced (at most
``NotebookProgress.interval`` apart, so a fast batch does not flood the front end); a count
that arrives between two redraws is drawn by a timer, and closing draws the end at once.
Both bars offer the part of tqdm's interface that the batch and the benchmark use.
"""

from __future__ import annotations

import asyncio
import html
import sys
import time
from collections.abc import Callable
from typing import Any

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
        self._drawn_at = -float("inf")
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        if show is None:
            from IPython.display import display

            handle = display(self.bundle(), raw=True, display_id=True)  # type: ignore[no-untyped-call]
            self._update: Callable[[dict[str, str]], Any] = lambda b: handle.update(b, raw=True)
        else:
            show(self.bundle())
            self._update = show
        self._drawn_at = clock()

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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._draw()

    # -- drawing -------------------------------------------------------------------------------

    def _redraw(self) -> None:
        if self._closed:
            return
        now = self._clock()
        if now - self._drawn_at >= self.interval:
            self._draw()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop to wake us: the next count or close() draws it
            delay = self._drawn_at + self.interval - now
            self._timer = loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if not self._closed:
            self._draw()

    def _draw(self) -> None:
        self._drawn_at = self._clock()
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
