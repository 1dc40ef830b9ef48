"""The notebook's comparison grid: one anywidget whose cells each grow as their run streams.

One widget for every cell, not a view per cell: the front end's traffic bounds are the single
view's (``_view``), for the whole grid. Every cell's new text since the last paint rides in one
custom message per paint (``{"c": {index: text}, "s": {index: status}}``), at most one paint
per ``DEFAULT_INTERVAL_S`` (20 a second) however many cells stream; the front end appends each
piece to its cell's DOM text node, so model output is never HTML. The layout (which version,
model and row each cell is) is state, sent once.

As with the single view, a saved notebook opened without its kernel cannot show the widget,
so when the comparison ends the grid's output is replaced by ordinary HTML that needs none:
the summary table and a snapshot of every cell (``grid_bundle``), all text escaped.
"""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import anywidget
import traitlets

from ._events import Event, StreamStarted, TextDelta
from ._outcome import CANCELLED, CANCELLED_MESSAGE, ending
from ._throttle import DEFAULT_INTERVAL_S
from ._view import PLAIN_PREFIX, status_line

_ESM = r"""
const ENDED = ["done", "failed", "cancelled"];
const LABELS = { waiting: "waiting", connecting: "connecting", processing: "processing prompt",
  generating: "generating", done: "done", failed: "failed", cancelled: "cancelled" };
function fmt(s) { return s < 10 ? s.toFixed(2) + " s" : s.toFixed(1) + " s"; }
function render({ model, el }) {
  el.classList.add("lmstream-grid");
  let cells = [];
  function build() {
    // The layout comes once, when the cells are planned (the grid may be shown before).
    const layout = model.get("layout") || [];
    if (cells.length || !layout.length) return;
    const columns = Math.max(1, model.get("columns") || 1);
    el.style.gridTemplateColumns = `repeat(${columns}, minmax(16em, 1fr))`;
    cells = layout.map((c) => {
      const box = document.createElement("div");
      box.className = "lmstream-grid-cell";
      box.dataset.index = String(c.i);
      // Versions and models side by side (columns), one line per row of variables.
      box.style.gridColumn = String(c.x + 1);
      box.style.gridRow = String(c.r + 1);
      const head = document.createElement("div");
      head.className = "lmstream-grid-head";
      head.textContent = c.v + " \u00b7 " + (c.m || "default model") + " \u00b7 row " + c.r;
      const status = document.createElement("div");
      status.className = "lmstream-grid-status";
      const body = document.createElement("div");
      body.className = "lmstream-grid-text";
      const text = document.createTextNode("");
      body.appendChild(text);
      const message = document.createElement("div");
      message.className = "lmstream-grid-message";
      box.append(head, status, body, message);
      el.appendChild(box);
      return { box, status, text, message, s: { state: "waiting" } };
    });
  }
  function paint(i) {
    const cell = cells[i];
    if (!cell) return;
    const s = cell.s;
    const state = s.state || "waiting";
    cell.box.dataset.state = state;
    if (s.line) { cell.status.textContent = s.line; } else {
      const parts = [LABELS[state] || state];
      if (s.ttft !== undefined && s.ttft !== null) parts.push("first token " + fmt(s.ttft));
      if (s.chunks) parts.push(s.chunks + " chunks");
      if (s.tps) parts.push(s.tps.toFixed(1) + " tok/s");
      cell.status.textContent = parts.join(" \u00b7 ");
    }
    cell.message.textContent = s.message || "";
  }
  function take(msg) {
    const each = (part, f) => {
      if (part) for (const [i, v] of Object.entries(part)) if (cells[i]) f(cells[i], v);
    };
    each(msg.all, (cell, t) => { cell.text.data = t; });
    each(msg.c, (cell, t) => cell.text.appendData(t));
    each(msg.s, (cell, s) => Object.assign(cell.s, s));
    cells.forEach((_, i) => paint(i));
  }
  model.on("msg:custom", take);
  function restore() {
    const ends = model.get("ends") || {};
    for (const [i, s] of Object.entries(ends)) if (cells[i]) Object.assign(cells[i].s, s);
    const texts = model.get("texts") || {};
    for (const [i, t] of Object.entries(texts)) if (cells[i]) cells[i].text.data = t;
    cells.forEach((_, i) => paint(i));
  }
  model.on("change:layout", () => { build(); restore(); });
  model.on("change:ends", restore);
  model.on("change:texts", restore);
  build();
  restore();
  if (!model.get("finished")) model.send({ want: "text" });
}
export default { render };
"""

_CSS = """
.lmstream-grid { display: grid; gap: 6px; overflow-x: auto;
  font-family: var(--jp-content-font-family, sans-serif); margin: 2px 0; }
.lmstream-grid .lmstream-grid-cell { border: 1px solid var(--jp-border-color2, #ddd);
  border-radius: 3px; padding: 4px 6px; min-width: 0; }
.lmstream-grid .lmstream-grid-head { font-weight: 600; font-size: 0.85em; }
.lmstream-grid .lmstream-grid-status { font-size: 0.8em; color: var(--jp-ui-font-color2, #666); }
.lmstream-grid .lmstream-grid-cell[data-state="failed"] .lmstream-grid-status,
.lmstream-grid .lmstream-grid-message { color: var(--jp-error-color1, #c62828); font-size: 0.85em; }
.lmstream-grid .lmstream-grid-text { white-space: pre-wrap; word-break: normal;
  overflow-wrap: break-word; font-family: var(--jp-code-font-family, monospace);
  font-size: var(--jp-code-font-size, 13px); line-height: var(--jp-code-line-height, 1.4);
  margin-top: 4px; max-height: 24em; overflow-y: auto; }
"""

_LIVE_PLAIN = PLAIN_PREFIX + "comparison grid (shown while the kernel runs)"
_LIVE_HTML = (
    '<div class="lmstream-final" data-state="live">'
    "lmstream: this comparison's grid needs its kernel</div>"
)


class CompareGrid(anywidget.AnyWidget):
    """Every cell of a comparison, growing as it streams; text arrives in custom messages.

    ``layout`` (which version, model and row each cell is) is set once; ``ends`` (each finished
    cell's status) and ``texts`` (every cell's text) are set when the comparison ends, so a
    reloaded page keeps them.
    """

    _esm = traitlets.Unicode(_ESM).tag(sync=True)
    _css = traitlets.Unicode(_CSS).tag(sync=True)
    layout: traitlets.List[dict[str, Any]] = traitlets.List().tag(sync=True)
    columns = traitlets.Int(1).tag(sync=True)
    ends = traitlets.Dict().tag(sync=True)
    texts = traitlets.Dict().tag(sync=True)
    finished = traitlets.Bool(False).tag(sync=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.painted: Callable[[], dict[str, Any]] = dict
        self.on_msg(self._on_front_end_message)

    def _on_front_end_message(self, _widget: Any, content: Any, _buffers: Any) -> None:
        # A grid opened mid-run (a reloaded page) asks for what the others already show.
        if isinstance(content, dict) and content.get("want") == "text":
            self.send(self.painted())

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        bundle = super()._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        if isinstance(data, dict):
            data["text/plain"] = _LIVE_PLAIN
            data["text/html"] = _LIVE_HTML
        return bundle


class GridSink:
    """Feeds a CompareGrid from the events of every cell: one paced message for all of them.

    ``watch(i)`` is cell ``i``'s event callback; ``started`` and ``ended`` say when a cell
    starts and how it ended. All run on the loop that runs the cells (a timer there paints the
    tail of a burst); ``close`` may come from the cell's thread, so a lock keeps them apart.
    """

    def __init__(
        self,
        grid: CompareGrid,
        cells: Sequence[Any],
        *,
        columns: int,
        clock: Callable[[], float] = time.monotonic,
        interval: float = DEFAULT_INTERVAL_S,
    ) -> None:
        self.grid = grid
        self._clock = clock
        self.interval = interval
        self._lock = threading.Lock()
        self._loop: Any = None
        self._timer: Any = None
        self._last_paint = float("-inf")
        self.texts: dict[int, list[str]] = {c.index: [] for c in cells}
        self._painted: dict[int, int] = {c.index: 0 for c in cells}
        self._pending: dict[int, list[str]] = {}
        self._status: dict[int, dict[str, Any]] = {}
        self._chunks: dict[int, int] = {}
        self._started: dict[int, float] = {}
        self._first: dict[int, float] = {}
        self.ends: dict[int, dict[str, Any]] = {}
        self.messages_sent = 0
        self.cells = list(cells)
        self.columns = columns
        grid.painted = self._painted_so_far
        with grid.hold_sync():
            grid.layout = [
                {
                    "i": c.index,
                    "v": c.version,
                    "m": c.model,
                    "r": c.row,
                    "x": column(c.index, len(cells), columns),
                }
                for c in cells
            ]
            grid.columns = columns

    def text(self, index: int) -> str:
        return "".join(self.texts[index])

    def _painted_so_far(self) -> dict[str, Any]:
        with self._lock:
            return {
                "all": {str(i): self.text(i)[:n] for i, n in self._painted.items() if n},
                "s": {str(i): s for i, s in self.ends.items()},
            }

    # -- from the cells' loop ------------------------------------------------------------

    def started(self, index: int) -> None:
        with self._lock:
            self._started[index] = self._clock()
            self._status.setdefault(index, {})["state"] = "connecting"
            self._request()

    def watch(self, index: int) -> Callable[[Event], None]:
        def seen(event: Event) -> None:
            if isinstance(event, TextDelta):
                self._delta(index, event.content)
            elif isinstance(event, StreamStarted):
                with self._lock:
                    self._status.setdefault(index, {})["state"] = "processing"
                    self._request()

        return seen

    def _delta(self, index: int, text: str) -> None:
        with self._lock:
            now = self._clock()
            self._chunks[index] = self._chunks.get(index, 0) + 1
            self.texts[index].append(text)
            self._pending.setdefault(index, []).append(text)
            status = self._status.setdefault(index, {})
            status["chunks"] = self._chunks[index]
            if index not in self._first:
                self._first[index] = now
                status["state"] = "generating"
                status["ttft"] = round(now - self._started.get(index, now), 3)
            elif now - self._first[index] > 0.2:
                status["tps"] = round((self._chunks[index] - 1) / (now - self._first[index]), 1)
            self._request()

    def ended(self, index: int, result: Any) -> None:
        end = ending(result)
        stats = result.stats
        final = {
            "state": end.state,
            "ttft": stats.ttft_s,
            "elapsed": stats.duration_s,
            "chunks": stats.chunks,
            "tokens": stats.completion_tokens,
            "tps": stats.tokens_per_s,
            "run_id": end.run_id,
        }
        final["line"] = status_line(final)
        final["message"] = end.message or ""
        with self._lock:
            self.ends[index] = final
            self._status[index] = dict(final)
            self._request()

    # -- pacing: one message for every cell, at most one per interval ---------------------

    def _request(self) -> None:
        """Paint now if the interval has passed since the last paint, else once it has."""
        now = self._clock()
        if now >= self._last_paint + self.interval:
            self._paint(now)
        elif self._timer is None:
            import asyncio

            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            delay = max(0.0, self._last_paint + self.interval - now)
            self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            self._paint(self._clock())

    def _paint(self, now: float) -> None:
        if not self._pending and not self._status:
            return
        message: dict[str, Any] = {}
        if self._pending:
            message["c"] = {str(i): "".join(parts) for i, parts in self._pending.items()}
            for i, parts in self._pending.items():
                self._painted[i] += sum(len(p) for p in parts)
        if self._status:
            message["s"] = {str(i): s for i, s in self._status.items()}
        self._pending = {}
        self._status = {}
        self._last_paint = now
        self.grid.send(message)
        self.messages_sent += 1

    def close(self) -> None:
        """Paint what is pending and keep every cell's text and ending as state. A cell that
        started and never ended was cancelled (Ctrl-C): it says so, its text kept."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            for index in self._started:
                if index not in self.ends:
                    final: dict[str, Any] = {"state": CANCELLED, "chunks": self._chunks.get(index)}
                    final["line"] = status_line(final)
                    final["message"] = CANCELLED_MESSAGE
                    self.ends[index] = final
                    self._status[index] = dict(final)
            self._paint(self._clock())
            texts = {str(i): self.text(i) for i in self.texts}
            ends = {str(i): s for i, s in self.ends.items()}
        with self.grid.hold_sync():
            self.grid.texts = texts
            self.grid.ends = ends
            self.grid.finished = True


def column(index: int, count: int, columns: int) -> int:
    """The grid column of cell ``index`` of ``count``: its (version, model) pair, since cells
    are numbered version first, then model, then row, and each pair has ``count // columns``."""
    return index // max(1, count // max(1, columns))


_TEXT_STYLE = (
    "white-space: pre-wrap; word-break: normal; overflow-wrap: break-word; "
    "font-family: var(--jp-code-font-family, monospace); font-size: var(--jp-code-font-size, 13px)"
)


def grid_bundle(
    summary_plain: str,
    summary_html: str,
    cells: Sequence[Any],
    texts: dict[int, str],
    ends: dict[int, dict[str, Any]],
    columns: int,
) -> dict[str, Any]:
    """What replaces the grid when the comparison ends: the summary and a snapshot of every
    cell as ordinary outputs a saved notebook shows without a kernel (all text escaped)."""
    boxes = []
    plain = [summary_plain]
    for cell in cells:
        end = ends.get(cell.index, {})
        head = f"{cell.version} · {cell.model or 'default model'} · row {cell.row}"
        line = str(end.get("line") or "not run")
        message = str(end.get("message") or "")
        text = texts.get(cell.index, "")
        place = (
            f"grid-column: {column(cell.index, len(cells), columns) + 1}; grid-row: {cell.row + 1}"
        )
        boxes.append(
            f'<div class="lmstream-grid-cell" data-state="{html.escape(str(end.get("state", "")))}"'
            ' style="border: 1px solid var(--jp-border-color2, #ddd); border-radius: 3px; '
            f'padding: 4px 6px; min-width: 0; {place}">'
            f'<div style="font-weight: 600; font-size: 0.85em">{html.escape(head)}</div>'
            f'<div style="font-size: 0.8em; color: var(--jp-ui-font-color2, #666)">'
            f"{html.escape(line)}</div>"
            + (
                f'<div style="font-size: 0.85em; color: var(--jp-error-color1, #c62828)">'
                f"{html.escape(message)}</div>"
                if message
                else ""
            )
            + f'<div class="lmstream-answer" style="{_TEXT_STYLE}">{html.escape(text)}</div>'
            "</div>"
        )
        plain.append(f"--- {head}: {line}" + (f"\n{message}" if message else "") + f"\n{text}")
    grid = (
        '<div class="lmstream-grid-final" style="display: grid; gap: 6px; overflow-x: auto; '
        f'grid-template-columns: repeat({max(1, columns)}, minmax(16em, 1fr))">'
        + "".join(boxes)
        + "</div>"
    )
    return {"text/plain": "\n".join(plain), "text/html": summary_html + grid}
