"""The notebook's streaming view: an anywidget that receives only new text, paced at ~20 Hz.

Why anywidget and custom messages: every standard way to grow text in a notebook resends the
whole text on each update (``Output.append_stdout`` re-syncs its outputs tuple, a display or
a string trait update re-sends the value), so traffic grows with the square of the answer.
A custom message carries just the delta, and the front end appends it to a DOM text node (so
model output can never become HTML or script). anywidget ships its front end as inline ESM, so
nothing has to be built or installed in JupyterLab, Notebook 7 or VS Code.

Custom messages are not widget state: a view opened later (a reloaded page) does not see them.
So a view that opens while its run streams asks the kernel for the text so far, and the
finished text becomes state (``text``), which a reload and saved widget state keep. A saved
notebook opened without a kernel cannot show a widget at all ("model not found"), so when a
run ends in a cell its view is replaced by ordinary outputs that need no kernel: the final
status line (``status_bundle``) and the answer (``final_bundle``).
"""

from __future__ import annotations

import contextlib
import html
import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import anywidget
import traitlets

from ._events import (
    Event,
    LoadProgress,
    PromptEstimate,
    PromptProgress,
    ReasoningDelta,
    Stats,
    StreamFinished,
    StreamStarted,
    TextDelta,
)
from ._progress import Shown, moved_on, progress_facts, progress_fraction, progress_title
from ._structured import strip_fences
from ._throttle import Coalescer

# Between progress reports the view's time so far and time left move on once a second.
_PROGRESS_TICK_S = 1.0

_ESM = r"""
function fmt(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  return seconds < 10 ? seconds.toFixed(2) + " s" : seconds.toFixed(1) + " s";
}
const LABELS = {
  connecting: "connecting", processing: "processing prompt", generating: "generating",
  done: "done", failed: "failed", cancelled: "cancelled",
};
const ENDED = ["done", "failed", "cancelled"];
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
  // While the model loads or processes the prompt: a bar and the facts the kernel words.
  const progress = document.createElement("div");
  progress.className = "lmstream-progress";
  progress.hidden = true;
  const track = document.createElement("span");
  track.className = "lmstream-progress-track";
  const fill = document.createElement("span");
  fill.className = "lmstream-progress-fill";
  track.appendChild(fill);
  const facts = document.createElement("span");
  facts.className = "lmstream-progress-facts";
  progress.append(track, facts);
  el.append(status, progress, reasoning, body, message);
  let shownProgress = null;

  let live = {};
  let openedAt = performance.now();
  function line(s, state, running) {
    // The final line comes from the kernel (status_line), so what stays is what was recorded.
    if (!running && s.line) return s.line;
    // While a bar shows, it says the phase and the times: the line names what happens.
    const barred = shownProgress && (state === "processing" || state === "connecting");
    const parts = [barred ? shownProgress.w : LABELS[state] || state];
    if (s.prompt) parts.push(s.prompt);
    if (s.model) parts.push(s.model);
    const elapsed = running && s.started_ms
      ? (Date.now() - s.started_ms) / 1000 : (s.elapsed ?? null);
    if (barred) {
      // the bar's facts carry the time so far
    } else if (state === "processing" && elapsed !== null) {
      parts.push("waiting for the first token " + fmt(elapsed));
    } else if (state !== "connecting") {
      if (s.ttft !== null && s.ttft !== undefined) parts.push("first token " + fmt(s.ttft));
      if (elapsed !== null) parts.push("elapsed " + fmt(elapsed));
    }
    if (s.chunks) parts.push(s.chunks + " chunks");
    if (s.tokens) parts.push(s.tokens + " tokens");
    if (s.tps) parts.push(s.tps.toFixed(1) + " tok/s");
    if (s.run_id) parts.push("run #" + s.run_id);
    return parts.join(" \u00b7 ");
  }
  function paint() {
    const s = Object.assign({}, model.get("status"), live);
    const state = s.state || "connecting";
    const running = !ENDED.includes(state);
    status.textContent = line(s, state, running);
    el.dataset.state = state;
    cursor.hidden = !running;
    message.textContent = s.message || "";
    const waiting = state === "processing" || state === "connecting";
    progress.hidden = !(waiting && shownProgress);
    if (!progress.hidden) {
      fill.style.width = (Math.min(1, Math.max(0, shownProgress.f)) * 100).toFixed(1) + "%";
      facts.textContent = shownProgress.x;
      el.dataset.progress = String(shownProgress.f);
    }
    body.hidden = !model.get("show_text");
    reasoning.hidden = reasoningNode.length === 0;  // stays (collapsed) after the end
  }
  function restore() {
    // The finished text is state; while streaming, the kernel resends what it sent so far.
    if (model.get("text")) textNode.data = model.get("text");
    if (model.get("reasoning")) reasoningNode.data = model.get("reasoning");
  }
  model.on("msg:custom", (msg) => {
    if (msg.all) {
      textNode.data = msg.all.t;
      reasoningNode.data = msg.all.r;
    }
    if (msg.t) textNode.appendData(msg.t);
    if (msg.r) reasoningNode.appendData(msg.r);
    if (msg.s) Object.assign(live, msg.s);
    if (msg.p) shownProgress = msg.p;
    paint();
  });
  model.on("change:status", () => { live = {}; paint(); });
  model.on("change:show_text", paint);
  model.on("change:text", () => { restore(); paint(); });
  model.on("change:reasoning", () => { restore(); paint(); });
  restore();
  const state = (model.get("status") || {}).state;
  if (!model.get("text") && state && !ENDED.includes(state)) model.send({ want: "text" });
  paint();
  const timer = setInterval(paint, 250);
  return () => clearInterval(timer);
}
export default { render };
"""

_CSS = """
.lmstream-view { font-family: var(--jp-content-font-family, sans-serif); margin: 2px 0; }
.lmstream-view .lmstream-status { font-size: 0.85em; color: var(--jp-ui-font-color2, #666); }
.lmstream-view[data-state="connecting"] .lmstream-status,
.lmstream-view[data-state="processing"] .lmstream-status {
  font-size: 0.95em; font-weight: 600; color: var(--jp-brand-color1, #1976d2);
  border-left: 3px solid var(--jp-brand-color1, #1976d2); padding: 2px 0 2px 6px;
  animation: lmstream-pulse 1.6s ease-in-out infinite;
}
.lmstream-view[data-state="failed"] .lmstream-status,
.lmstream-view[data-state="failed"] .lmstream-message { color: var(--jp-error-color1, #c62828); }
.lmstream-view .lmstream-message { font-size: 0.9em; overflow-wrap: break-word; }
.lmstream-view[data-state="cancelled"] .lmstream-status,
.lmstream-view[data-state="cancelled"] .lmstream-message { color: var(--jp-ui-font-color1, #333); }
.lmstream-view div.lmstream-text, .lmstream-view div.lmstream-reasoning-text {
  white-space: pre-wrap; word-break: normal; overflow-wrap: break-word;
  font-family: var(--jp-code-font-family, monospace); font-size: var(--jp-code-font-size, 13px);
  line-height: var(--jp-code-line-height, 1.4); margin-top: 4px;
}
.lmstream-view div.lmstream-reasoning-text { color: var(--jp-ui-font-color2, #666); }
.lmstream-view .lmstream-reasoning summary { cursor: pointer; font-size: 0.85em; }
.lmstream-view .lmstream-cursor { animation: lmstream-blink 1s steps(1) infinite; }
.lmstream-view .lmstream-progress { display: flex; align-items: center; gap: 8px;
  font-size: 0.85em; color: var(--jp-ui-font-color2, #666); margin-top: 3px; }
.lmstream-view .lmstream-progress[hidden] { display: none; }
.lmstream-view .lmstream-progress-track { flex: 0 0 12em; height: 0.6em; border-radius: 3px;
  background: var(--jp-layout-color3, #ddd); overflow: hidden; }
.lmstream-view .lmstream-progress-fill { display: block; height: 100%; width: 0;
  background: var(--jp-brand-color1, #1976d2); transition: width 0.2s linear; }
@keyframes lmstream-blink { 50% { opacity: 0; } }
@keyframes lmstream-pulse { 50% { opacity: 0.55; } }
"""


LABELS = {
    "connecting": "connecting",
    "processing": "processing prompt",
    "generating": "generating",
    "done": "done",
    "failed": "failed",
    "cancelled": "cancelled",
}

#: The text/plain of a live view, and the start of every final status line's text/plain: a
#: view is replaced by its status line when its run ends, so the two take turns in one output.
PLAIN_PREFIX = "lmstream: "

_LIVE_PLAIN = PLAIN_PREFIX + "streaming view (shown while the kernel runs)"
_LIVE_HTML = (
    '<div class="lmstream-final" data-state="live">'
    "lmstream: this run's view needs its kernel</div>"
)

# Outputs saved in a notebook are shown without the widget's CSS, so what they need is inline.
# Text is wrapped at word boundaries (a <pre> in an output area breaks inside words).
_WRAP = "white-space: pre-wrap; word-break: normal; overflow-wrap: break-word"
_TEXT_STYLE = (
    f"{_WRAP}; font-family: var(--jp-code-font-family, monospace); "
    "font-size: var(--jp-code-font-size, 13px); line-height: var(--jp-code-line-height, 1.4)"
)
_STATE_COLOR = {
    "failed": "var(--jp-error-color1, #c62828)",
    "cancelled": "var(--jp-ui-font-color1, #333)",
}


def seconds(value: float) -> str:
    """Seconds as every status line shows them (the view's ``fmt`` does the same)."""
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


def status_line(status: Mapping[str, Any]) -> str:
    """The one-line status of a run, from a view's ``status``: what the final output keeps."""
    state = str(status.get("state") or "connecting")
    parts = [LABELS.get(state, state)]
    for key in ("prompt", "model"):
        if status.get(key):
            parts.append(str(status[key]))
    if status.get("ttft") is not None:
        parts.append("first token " + seconds(float(status["ttft"])))
    if status.get("elapsed") is not None:
        parts.append("elapsed " + seconds(float(status["elapsed"])))
    if status.get("chunks"):
        parts.append(f"{status['chunks']} chunks")
    if status.get("tokens"):
        parts.append(f"{status['tokens']} tokens")
    if status.get("tps"):
        parts.append(f"{float(status['tps']):.1f} tok/s")
    if status.get("run_id"):
        parts.append(f"run #{status['run_id']}")
    return " \u00b7 ".join(parts)


def status_bundle(status: Mapping[str, Any], reasoning: str = "") -> dict[str, Any]:
    """A finished run's status line (and its sentence, and any reasoning) as an ordinary
    output: what stays in a cell when the view is gone, and needs no kernel to show."""
    state = str(status.get("state") or "")
    line = status.get("line") or status_line(status)
    message = status.get("message") or ""
    color = _STATE_COLOR.get(state, "var(--jp-ui-font-color2, #666)")
    parts = [
        f'<div class="lmstream-final" data-state="{html.escape(state)}" '
        f'style="font-size: 0.85em; color: {color}; {_WRAP}">'
        f'<div class="lmstream-final-status">{html.escape(line)}</div>'
    ]
    if message:
        parts.append(f'<div class="lmstream-final-message">{html.escape(message)}</div>')
    if reasoning:
        parts.append(
            "<details><summary>Reasoning</summary>"
            f'<div style="{_TEXT_STYLE}">{html.escape(reasoning)}</div></details>'
        )
    parts.append("</div>")
    plain = PLAIN_PREFIX + line + (f"\n{message}" if message else "")
    return {"text/plain": plain, "text/html": "".join(parts)}


def text_html(text: str) -> str:
    """Text as HTML that keeps its line breaks and wraps at word boundaries, never markup."""
    return f'<div class="lmstream-answer" style="{_TEXT_STYLE}">{html.escape(text)}</div>'


class StreamView(anywidget.AnyWidget):
    """Live text, reasoning and status of one run; text arrives as deltas in custom messages.

    ``text`` and ``reasoning`` are set once, when the run ends (so a reloaded page keeps them).
    """

    _esm = traitlets.Unicode(_ESM).tag(sync=True)
    _css = traitlets.Unicode(_CSS).tag(sync=True)
    status = traitlets.Dict().tag(sync=True)
    show_text = traitlets.Bool(True).tag(sync=True)
    text = traitlets.Unicode("").tag(sync=True)
    reasoning = traitlets.Unicode("").tag(sync=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.painted: Callable[[], tuple[str, str]] = lambda: ("", "")
        self.on_msg(self._on_front_end_message)

    def _on_front_end_message(self, _widget: Any, content: Any, _buffers: Any) -> None:
        # A view opened mid-run (a reloaded page) asks for what the others already show.
        if isinstance(content, dict) and content.get("want") == "text":
            text, reasoning = self.painted()
            self.send({"all": {"t": text, "r": reasoning}})

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        # Constant twins (saved notebooks and nbval compare them): the view is replaced by the
        # final status line when the run ends; until then this is what a reader without the
        # kernel sees.
        bundle = super()._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        if isinstance(data, dict):
            data["text/plain"] = _LIVE_PLAIN
            data["text/html"] = _LIVE_HTML
        return bundle


class NotebookSink:
    """Feeds a StreamView from run events: counters and status now, text at a steady pace.

    ``handle`` is called on the thread that runs the stream (the private loop thread for a
    blocking cell, the kernel's own loop for a background run); ``close`` may be called from
    the cell's thread. A lock keeps the two apart.

    Times come from the stream itself once it is attached (``attach``): the first token and
    the elapsed time shown live are the ones the run records, measured from the same moment.
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
        self._stream_stats: Callable[[], Stats] | None = None
        self.text_parts: list[str] = []
        self.reasoning_parts: list[str] = []
        self._painted_text = 0
        self._painted_reasoning = 0
        self.messages_sent = 0
        self._shown_progress: tuple[Shown, float] | None = None
        self._progress_sent_at = 0.0
        self._ticker: Any = None
        self._ended = False
        view.painted = self._painted
        view.status = {"state": "connecting", "prompt": prompt, "started_ms": time.time() * 1000}

    def attach(self, stream: Any) -> None:
        """Take the run's times from its stream (``ChatStream.stats``) from now on."""
        self._stream_stats = stream.stats

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def reasoning(self) -> str:
        return "".join(self.reasoning_parts)

    def _painted(self) -> tuple[str, str]:
        with self._lock:
            return self.text[: self._painted_text], self.reasoning[: self._painted_reasoning]

    def _measured(self) -> Stats | None:
        if self._stream_stats is None:
            return None
        try:
            return self._stream_stats()
        except RuntimeError:  # asked outside the stream's loop: no time to read
            return None

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
            changes: dict[str, Any] = {"state": "processing", "model": event.model}
            measured = self._measured()
            if measured is not None:  # the clock starts when the request was sent
                changes["started_ms"] = (time.time() - measured.duration_s) * 1000
            self._set_status(**changes)
        elif isinstance(event, (LoadProgress, PromptProgress, PromptEstimate)):
            self._progress(event)
        elif isinstance(event, StreamFinished):
            with self._lock:
                self._flush(now, final=True)

    def _progress(self, event: Shown) -> None:
        """A progress report (or an estimate from the history) before the first token: one
        small message with the bar's fraction and the words. The client passes a few a second
        at most, so this adds no pacing of its own; between reports a tick each second moves
        the time so far and the time left on (reports can be many seconds apart, and an
        estimate's bar only moves so). The final outputs do not keep any of it (what a saved
        notebook shows stays the same from run to run)."""
        import asyncio

        now = self._clock()
        with self._lock:
            if self._first is not None or self._ended:
                return  # the text has started: the bar is gone
            self._shown_progress = (event, now)
            self._send_progress(now)
            if self._ticker is None:
                if self._loop is None:
                    self._loop = asyncio.get_running_loop()
                self._ticker = self._loop.call_later(_PROGRESS_TICK_S, self._on_tick)

    def _send_progress(self, now: float) -> None:
        assert self._shown_progress is not None
        event, at = self._shown_progress
        elapsed, eta = moved_on(event, now - at)
        words = " \u00b7 ".join(progress_facts(event, elapsed, eta))
        fraction = round(progress_fraction(event, elapsed), 4)
        self.view.send({"p": {"f": fraction, "w": progress_title(event), "x": words}})
        self.messages_sent += 1
        self._progress_sent_at = now

    def _on_tick(self) -> None:
        with self._lock:
            self._ticker = None
            if self._first is not None or self._ended or self._shown_progress is None:
                return
            now = self._clock()
            if now - self._progress_sent_at >= 0.9 * _PROGRESS_TICK_S:
                self._send_progress(now)
            self._ticker = self._loop.call_later(_PROGRESS_TICK_S, self._on_tick)

    def _stop_ticking(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

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
                self._stop_ticking()
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

    def _ttft(self) -> float | None:
        measured = self._measured()
        if measured is not None and measured.ttft_s is not None:
            return measured.ttft_s
        return None if self._first is None else self._first - self._t0

    def _send(self, paint: tuple[str, str], now: float, *, first: bool = False) -> None:
        text, reasoning = paint
        self._painted_text += len(text)
        self._painted_reasoning += len(reasoning)
        # Kept small: this rides on every paint (the view keeps what it was told before).
        live: dict[str, Any] = {"chunks": self._chunks}
        if self._first is not None:
            generating = now - self._first
            if generating > 0.2:
                live["tps"] = round((self._chunks - 1) / generating, 1)
        if first:
            live["state"] = "generating"
            ttft = self._ttft()
            if ttft is not None:
                live["ttft"] = round(ttft, 3)
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
        stats: Stats | None = None,
        model: str | None = None,
        run_id: int | None = None,
        message: str | None = None,
        show_text: bool = False,
    ) -> dict[str, Any]:
        """Paint what is pending and the final status; hide the live text if it is shown
        elsewhere (the final output). ``stats`` are the run's (``RunResult.stats``); without
        them (a run that raised) the stream's own figures are used, as the run records them.
        Returns the final status (with its ``line``)."""
        now = self._clock()
        with self._lock:
            self._ended = True
            self._stop_ticking()
            self._flush(now, final=True)
        measured = stats if stats is not None else self._measured()
        status: dict[str, Any] = {
            "state": state,
            "elapsed": now - self._t0,
            "chunks": self._chunks,
            "run_id": run_id,
            "message": message,
        }
        if model:
            status["model"] = model
        if measured is not None:
            status.update(ttft=measured.ttft_s, elapsed=measured.duration_s)
            if stats is not None:
                status.update(tokens=stats.completion_tokens, tps=stats.tokens_per_s)
        elif self._first is not None:
            status["ttft"] = self._first - self._t0
        final = dict(self.view.status)
        final.update(status)
        final.pop("started_ms", None)
        final["line"] = status_line(final)
        with self.view.hold_sync():
            self.view.status = final
            if show_text:  # the view keeps showing it: as state, a reloaded page has it too
                self.view.text = self.text
                self.view.reasoning = self.reasoning
            self.view.show_text = show_text
        return final


#: Above this many characters a plain answer is kept once, as text/plain only: its HTML twin
#: would only wrap it at words, and would double what the notebook stores and what every front
#: end receives (the live deltas plus two copies would pass the 3 bytes per text byte bound).
ONE_COPY_CHARS = 256 * 1024


def final_bundle(text: str, fmt: str = "text") -> dict[str, Any]:
    """The finished answer as an ordinary output, in the chosen format, never raw HTML.

    ``text`` is escaped into HTML that wraps at word boundaries, up to ``ONE_COPY_CHARS``
    characters (a longer plain answer is text/plain only). ``markdown`` renders with
    markdown-it in its safe mode (``html`` off: any tag the model wrote is shown as text).
    ``json`` parses the answer (code fences allowed) and falls back to plain text when it is
    not JSON. Every bundle carries the text itself as ``text/plain``.
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
        if "application/json" not in bundle:
            bundle["text/html"] = text_html(text)
    elif len(text) <= ONE_COPY_CHARS:
        bundle["text/html"] = text_html(text)
    return bundle


def parsed_bundle(value: Any) -> dict[str, Any]:
    """A structured answer, validated, as an ordinary output: pretty-printed JSON as text (and
    escaped HTML), and the value itself as ``application/json`` for front ends that show it."""
    pretty = json.dumps(value, indent=2, ensure_ascii=False)
    return {
        "text/plain": pretty,
        "text/html": f'<pre class="lmstream-json"><code>{html.escape(pretty)}</code></pre>',
        "application/json": value,
    }
