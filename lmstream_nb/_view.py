"""The notebook's streaming view: an anywidget that receives only new text, paced at ~20 Hz.

Why anywidget and custom messages: every standard way to grow text in a notebook resends the
whole text on each update (``Output.append_stdout`` re-syncs its outputs tuple, a display or
a string trait update re-sends the value), so traffic grows with the square of the answer.
A custom message carries just the delta, and the front end appends it to a DOM text node (so
model output can never become HTML or script). anywidget ships its front end as inline ESM, so
nothing has to be built or installed in JupyterLab, Notebook 7 or VS Code.

Custom messages are not widget state: a view opened later does not see them. That is why the
finished answer is also written as an ordinary output (see ``final_bundle``), which is what
saved and headlessly executed notebooks keep, and why the widget then hides its own copy.
"""

from __future__ import annotations

import contextlib
import html
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import anywidget
import traitlets

from ._events import Event, ReasoningDelta, StreamFinished, StreamStarted, TextDelta
from ._throttle import Coalescer

_ESM = r"""
function fmt(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  return seconds < 10 ? seconds.toFixed(2) + " s" : seconds.toFixed(1) + " s";
}
const LABELS = {
  connecting: "connecting", processing: "processing prompt", generating: "generating",
  done: "done", failed: "failed", cancelled: "cancelled",
};
function render({ model, el }) {
  el.classList.add("lmstream-view");
  const status = document.createElement("div");
  status.className = "lmstream-status";
  const reasoning = document.createElement("details");
  reasoning.className = "lmstream-reasoning";
  reasoning.hidden = true;
  const summary = document.createElement("summary");
  summary.textContent = "Reasoning";
  const reasoningText = document.createElement("div");
  reasoningText.className = "lmstream-reasoning-text";
  const reasoningNode = document.createTextNode("");
  reasoningText.appendChild(reasoningNode);
  reasoning.append(summary, reasoningText);
  const body = document.createElement("div");
  body.className = "lmstream-text";
  const textNode = document.createTextNode("");
  const cursor = document.createElement("span");
  cursor.className = "lmstream-cursor";
  cursor.textContent = "\u258d";
  body.append(textNode, cursor);
  const message = document.createElement("div");
  message.className = "lmstream-message";
  el.append(status, reasoning, body, message);

  let live = {};
  let openedAt = performance.now();
  function paint() {
    const s = Object.assign({}, model.get("status"), live);
    const state = s.state || "connecting";
    const parts = [LABELS[state] || state];
    if (s.prompt) parts.push(s.prompt);
    if (s.model) parts.push(s.model);
    const running = !["done", "failed", "cancelled"].includes(state);
    const elapsed = running && s.started_ms
      ? (Date.now() - s.started_ms) / 1000 : (s.elapsed ?? null);
    if (state === "processing" && elapsed !== null) {
      parts.push("waiting for the first token " + fmt(elapsed));
    } else {
      if (s.ttft !== null && s.ttft !== undefined) parts.push("first token " + fmt(s.ttft));
      if (elapsed !== null) parts.push("elapsed " + fmt(elapsed));
    }
    if (s.chunks) parts.push(s.chunks + " chunks");
    if (s.tokens) parts.push(s.tokens + " tokens");
    if (s.tps) parts.push(s.tps.toFixed(1) + " tok/s");
    if (s.run_id) parts.push("run #" + s.run_id);
    status.textContent = parts.join(" \u00b7 ");
    el.dataset.state = state;
    cursor.hidden = !running;
    message.textContent = s.message || "";
    body.hidden = !model.get("show_text");
    reasoning.hidden = reasoningNode.length === 0;  // stays (collapsed) after the end
  }
  model.on("msg:custom", (msg) => {
    if (msg.t) textNode.appendData(msg.t);
    if (msg.r) reasoningNode.appendData(msg.r);
    if (msg.s) Object.assign(live, msg.s);
    paint();
  });
  model.on("change:status", () => { live = {}; paint(); });
  model.on("change:show_text", paint);
  paint();
  const timer = setInterval(paint, 250);
  return () => clearInterval(timer);
}
export default { render };
"""

_CSS = """
.lmstream-view { font-family: var(--jp-content-font-family, sans-serif); margin: 2px 0; }
.lmstream-view .lmstream-status { font-size: 0.85em; color: var(--jp-ui-font-color2, #666); }
.lmstream-view[data-state="failed"] .lmstream-status,
.lmstream-view .lmstream-message { color: var(--jp-error-color1, #c62828); }
.lmstream-view[data-state="cancelled"] .lmstream-status { color: var(--jp-warn-color1, #e65100); }
.lmstream-view div.lmstream-text, .lmstream-view div.lmstream-reasoning-text {
  white-space: pre-wrap; word-break: break-word;
  font-family: var(--jp-code-font-family, monospace); font-size: var(--jp-code-font-size, 13px);
  line-height: var(--jp-code-line-height, 1.4); margin-top: 4px;
}
.lmstream-view div.lmstream-reasoning-text { color: var(--jp-ui-font-color2, #666); }
.lmstream-view .lmstream-reasoning summary { cursor: pointer; font-size: 0.85em; }
.lmstream-view .lmstream-cursor { animation: lmstream-blink 1s steps(1) infinite; }
@keyframes lmstream-blink { 50% { opacity: 0; } }
"""


class StreamView(anywidget.AnyWidget):
    """Live text, reasoning and status of one run; text arrives as deltas in custom messages."""

    _esm = traitlets.Unicode(_ESM).tag(sync=True)
    _css = traitlets.Unicode(_CSS).tag(sync=True)
    status = traitlets.Dict().tag(sync=True)
    show_text = traitlets.Bool(True).tag(sync=True)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        # The plain-text twin must not change from run to run: saved notebooks and nbval
        # compare it. The answer itself follows as its own output when the run ends.
        bundle = super()._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        if isinstance(data, dict):
            data["text/plain"] = "lmstream streaming view"
        return bundle


class NotebookSink:
    """Feeds a StreamView from run events: counters and status now, text at a steady pace.

    ``handle`` is called on the thread that runs the stream (the private loop thread for a
    blocking cell, the kernel's own loop for a background run); ``close`` may be called from
    the cell's thread. A lock keeps the two apart.
    """

    def __init__(
        self,
        view: StreamView,
        *,
        prompt: str = "",
        clock: Callable[[], float] = time.monotonic,
        interval: float | None = None,
    ) -> None:
        self.view = view
        self._clock = clock
        self._coalescer = Coalescer() if interval is None else Coalescer(interval)
        self._lock = threading.Lock()
        self._timer: Any = None
        self._loop: Any = None
        self._chunks = 0
        self._t0 = clock()
        self._first: float | None = None
        self.text_parts: list[str] = []
        self.reasoning_parts: list[str] = []
        self.messages_sent = 0
        view.status = {"state": "connecting", "prompt": prompt, "started_ms": time.time() * 1000}

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def reasoning(self) -> str:
        return "".join(self.reasoning_parts)

    def _set_status(self, **changes: Any) -> None:
        status = dict(self.view.status)
        status.update(changes)
        self.view.status = status

    def handle(self, event: Event) -> None:
        now = self._clock()
        if isinstance(event, TextDelta):
            self._delta(now, text=event.content)
        elif isinstance(event, ReasoningDelta):
            self._delta(now, reasoning=event.content)
        elif isinstance(event, StreamStarted):
            self._set_status(state="processing", model=event.model)
        elif isinstance(event, StreamFinished):
            with self._lock:
                self._flush(now, final=True)

    def _delta(self, now: float, *, text: str = "", reasoning: str = "") -> None:
        with self._lock:
            self._chunks += 1
            if text:
                self.text_parts.append(text)
            if reasoning:
                self.reasoning_parts.append(reasoning)
            first = self._first is None
            if first:
                self._first = now
            paint = self._coalescer.add(now, text, reasoning)
            if paint is not None:
                self._send(paint, now, first=first)
            elif self._timer is None:
                self._arm(now)

    def _arm(self, now: float) -> None:
        import asyncio

        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        delay = max(0.0, self._coalescer.next_paint_at() - now)
        self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            now = self._clock()
            paint = self._coalescer.due(now)
            if paint is not None:
                self._send(paint, now)
            elif self._coalescer.pending:
                self._arm(now)

    def _send(self, paint: tuple[str, str], now: float, *, first: bool = False) -> None:
        text, reasoning = paint
        # Kept small: this rides on every paint (the view keeps what it was told before).
        live: dict[str, Any] = {"chunks": self._chunks}
        if self._first is not None:
            generating = now - self._first
            if generating > 0.2:
                live["tps"] = round((self._chunks - 1) / generating, 1)
        if first:
            live["state"] = "generating"
            if self._first is not None:
                live["ttft"] = round(self._first - self._t0, 3)
        message: dict[str, Any] = {"s": live}
        if text:
            message["t"] = text
        if reasoning:
            message["r"] = reasoning
        self.view.send(message)
        self.messages_sent += 1

    def _flush(self, now: float, *, final: bool) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        paint = self._coalescer.take(now)
        if paint is not None:
            self._send(paint, now)

    def close(
        self,
        *,
        state: str,
        stats: Any = None,
        model: str | None = None,
        run_id: int | None = None,
        message: str | None = None,
        show_text: bool = False,
    ) -> None:
        """Paint what is pending and the final status; hide the live text if it is shown
        elsewhere (the final output)."""
        now = self._clock()
        with self._lock:
            self._flush(now, final=True)
        status: dict[str, Any] = {
            "state": state,
            "elapsed": now - self._t0,
            "chunks": self._chunks,
            "run_id": run_id,
            "message": message,
        }
        if model:
            status["model"] = model
        if stats is not None:
            status.update(
                ttft=stats.ttft_s,
                elapsed=stats.duration_s,
                tokens=stats.completion_tokens,
                tps=stats.tokens_per_s,
            )
        elif self._first is not None:
            status["ttft"] = self._first - self._t0
        with self.view.hold_sync():
            self._set_status(**status)
            self.view.show_text = show_text


def final_bundle(text: str, fmt: str = "text") -> dict[str, Any]:
    """The finished answer as an ordinary output, in the chosen format, never raw HTML.

    ``markdown`` renders with markdown-it in its safe mode (``html`` off: any tag the model
    wrote is shown as text). ``json`` parses the answer (code fences allowed) and falls back to
    plain text when it is not JSON. Every bundle carries the text itself as ``text/plain``.
    """
    bundle: dict[str, Any] = {"text/plain": text}
    if fmt == "markdown":
        from markdown_it import MarkdownIt

        rendered = MarkdownIt("commonmark", {"html": False}).render(text)
        bundle["text/html"] = f'<div class="lmstream-answer">{rendered}</div>'
    elif fmt == "code":
        code = strip_fences(text)
        bundle["text/plain"] = code
        bundle["text/html"] = f"<pre><code>{html.escape(code)}</code></pre>"
    elif fmt == "json":
        with contextlib.suppress(ValueError):
            bundle["application/json"] = json.loads(strip_fences(text))
    return bundle


def strip_fences(text: str) -> str:
    """The inside of a ```fenced``` block when the whole answer is one, else the text."""
    stripped = text.strip()
    if stripped.startswith("```") and stripped.endswith("```") and stripped.count("\n") >= 1:
        inner = stripped[3:-3]
        first_newline = inner.find("\n")
        return inner[first_newline + 1 :].rstrip("\n") if first_newline >= 0 else inner
    return text
