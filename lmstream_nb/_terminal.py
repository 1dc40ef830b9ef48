"""Terminal rendering shared by the ``lmstream`` command and the magic in terminal IPython.

A sink in the presentation layer: it consumes run events and formats finished runs (a stats
line, fixed-width tables), and knows nothing of argparse, IPython or where runs come from, so
every front end that writes to a terminal can use it without importing another front end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
from collections.abc import Sequence
from typing import Any, TextIO

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
from ._progress import Shown, moved_on, progress_line


def format_stats(stats: Stats, finished: StreamFinished | None = None) -> str:
    """One human line: tokens, time, TTFT, speed, chunks, model, finish reason."""
    parts = stats.summary()
    if stats.prompt_tokens is not None:
        parts.append(f"{stats.prompt_tokens} prompt tokens")
    parts.append(f"{stats.chunks} chunks")
    if finished is not None:
        if finished.model:
            parts.append(f"model {finished.model}")
        parts.append(f"finish: {finished.finish_reason or 'unknown'}")
    return ", ".join(parts)


class _Waiting:
    """The line a terminal's stderr shows until text arrives: "waiting for the first token… N s",
    or, once the server reports progress, a live bar ("processing prompt ▕████▍     ▏ 43% ·
    3,512 / 8,140 tokens · 41 s · about 55 s left"). Where the server reports nothing but the
    history has an estimate, the bar fills against it ("processing prompt (estimate) …"). Seconds
    and the time left move on every second between reports (an estimate's bar too: nothing else
    moves it); the text replaces the line when it starts."""

    def __init__(self, err: TextIO, enabled: bool) -> None:
        self._err = err
        self._enabled = enabled
        self._task: asyncio.Task[None] | None = None
        self._shown = False
        self._t0 = 0.0
        self._progress: Shown | None = None
        self._progress_at = 0.0

    def start(self) -> None:
        if self._enabled and self._task is None:
            loop = asyncio.get_running_loop()
            self._t0 = loop.time()
            self._task = loop.create_task(self._tick())

    def progress(self, event: Shown) -> None:
        if self._task is None:
            return
        self._progress = event
        self._progress_at = asyncio.get_running_loop().time()
        self._draw()

    def _draw(self) -> None:
        now = asyncio.get_running_loop().time()
        event = self._progress
        if event is None:
            line = f"waiting for the first token… {now - self._t0:.0f} s"
        else:
            line = progress_line(event, *moved_on(event, now - self._progress_at))
        self._err.write(f"\r\033[2m{line}\033[0m\033[K")
        self._err.flush()
        self._shown = True

    async def _tick(self) -> None:
        while True:
            self._draw()
            await asyncio.sleep(1.0)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._shown:
            self._err.write("\r\033[K")
            self._err.flush()
            self._shown = False


class TerminalSink:
    """Writes a stream's events to a terminal as they arrive: text to ``out`` (flushed per
    chunk), reasoning dimmed on ``err``, or one JSON object per event with ``as_json``."""

    def __init__(self, out: TextIO, err: TextIO, *, as_json: bool) -> None:
        self.out = out
        self.err = err
        self.as_json = as_json
        self.tty = err.isatty()
        self.waiting = _Waiting(err, self.tty and not as_json)
        self.in_reasoning = False
        self.wrote_text = False
        self.finished: StreamFinished | None = None

    def _json(self, record: dict[str, Any]) -> None:
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.out.flush()

    def handle(self, event: Event) -> None:
        if isinstance(event, TextDelta):
            self.waiting.stop()
            if self.in_reasoning:
                self.err.write("\033[0m\n" if self.tty else "\n")
                self.in_reasoning = False
            if self.as_json:
                self._json({"event": "text", "content": event.content})
            else:
                self.out.write(event.content)
                self.out.flush()
                self.wrote_text = True
        elif isinstance(event, ReasoningDelta):
            self.waiting.stop()
            if self.as_json:
                self._json({"event": "reasoning", "content": event.content})
                return
            if not self.in_reasoning and self.tty:
                self.err.write("\033[2m")
            self.in_reasoning = True
            self.err.write(event.content)
            self.err.flush()
        elif isinstance(event, StreamStarted):
            if self.as_json:
                self._json(
                    {
                        "event": "start",
                        "model": event.model,
                        "request_id": event.request_id,
                        "url": event.url,
                        "api": event.api,
                        "context_length": event.context_length,
                    }
                )
            self.waiting.start()
        elif isinstance(event, (LoadProgress, PromptProgress, PromptEstimate)):
            if self.as_json:
                self._json(event.as_dict())
            else:
                self.waiting.progress(event)
        elif isinstance(event, StreamFinished):
            self.finished = event
            self.close()
            if self.as_json:
                self._json(
                    {
                        "event": "done",
                        "finish_reason": event.finish_reason,
                        "model": event.model,
                        "response_id": event.response_id,
                        "stats": event.stats.as_dict(),
                        "server_stats": None
                        if event.server_stats is None
                        else dataclasses.asdict(event.server_stats),
                    }
                )

    def close(self) -> None:
        self.waiting.stop()
        if self.in_reasoning:
            self.err.write("\033[0m\n" if self.tty else "\n")
            self.in_reasoning = False

    def end_text(self) -> None:
        """Finish the text with a newline so the shell prompt starts on its own line."""
        if self.wrote_text:
            self.out.write("\n")
            self.out.flush()
            self.wrote_text = False


def dim(err: TextIO, text: str) -> str:
    """``text`` dimmed when ``err`` is a terminal (stats lines), else as it is."""
    return f"\033[2m{text}\033[0m" if err.isatty() else text


# -- tables ----------------------------------------------------------------------------------


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """A plain fixed-width table (None shows as a dash)."""
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, v in enumerate(row):
            widths[i] = max(widths[i], len(v))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )
    return "\n".join(lines) + "\n"


def when(ts: float | None) -> str:
    """A unix time as local ``YYYY-MM-DD HH:MM:SS`` (a dash for none)."""
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def secs(value: float | None) -> str | None:
    """Seconds with two decimals for a table cell (None stays None: the table shows a dash)."""
    return None if value is None else f"{value:.2f}"


# -- stats -----------------------------------------------------------------------------------

#: The columns of a stats table, in the CLI and in the magic.
STATS_HEADERS = [
    "prompt",
    "model",
    "runs",
    "ok",
    "ttft p50",
    "ttft p95",
    "total p50",
    "total p95",
    "failures",
]

#: How the row of every run together is labelled (an inline template is ``(inline)``).
ALL_RUNS = "(all)"


def stats_label(group: Any, overall: bool) -> tuple[str, str]:
    """The prompt and model cells of a stats row: ``name`` or ``(inline)`` (see
    ``prompt_label``) and the model, or ``(all)`` for the overall row."""
    from ._template import prompt_label

    if overall:
        return ALL_RUNS, ALL_RUNS
    # ``version`` is set when stats were grouped by version: the row then names it too.
    return prompt_label(group.prompt, getattr(group, "version", None)), group.model or "-"


def stats_rows(report: Any) -> list[tuple[object, ...]]:
    """A stats report as table rows (one per prompt and model, then every run together): the
    one layout the CLI and the magic show."""

    def row(group: Any, overall: bool) -> tuple[object, ...]:
        prompt, model = stats_label(group, overall)
        failures = ", ".join(f"{k} {v}" for k, v in sorted(group.by_status.items()) if k != "ok")
        return (
            prompt,
            model,
            group.runs,
            f"{group.success_rate:.0%}" if group.runs else "-",
            secs(group.ttft_p50),
            secs(group.ttft_p95),
            secs(group.duration_p50),
            secs(group.duration_p95),
            failures or "-",
        )

    return [*(row(g, False) for g in report.groups), row(report.overall, True)]
