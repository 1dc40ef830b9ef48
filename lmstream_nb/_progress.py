"""How progress reads, in every front end: the words, the numbers and the bar, decided once.

The terminal's live line, the notebook view, the runner and the relay page all show the same
facts about a model that loads or a prompt being processed ("processing prompt 43% · 3,512 /
8,140 tokens · 41 s · about 55 s left"); this module turns a progress event into them, so that
the front ends differ only in how they draw a bar.
"""

from __future__ import annotations

import math

from ._events import LoadProgress, PromptProgress

__all__ = [
    "TITLES",
    "bar",
    "duration",
    "percent",
    "progress_facts",
    "progress_line",
    "progress_title",
]

_EIGHTHS = " ▏▎▍▌▋▊▉"


def duration(seconds: float) -> str:
    """A wait as people say it: ``41 s``, ``2 min 30 s``, ``1 h 5 min``."""
    seconds = max(0.0, seconds)
    if seconds < 59.5:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def percent(fraction: float) -> str:
    """A fraction as the whole percentage shown everywhere: ``43%`` (kept within 0-100)."""
    return f"{0.0 if math.isnan(fraction) else min(1.0, max(0.0, fraction)):.0%}"


def bar(fraction: float, width: int = 10) -> str:
    """A text bar ``▕████▍     ▏`` that fills in eighths of a cell."""
    fraction = min(1.0, max(0.0, fraction)) if math.isfinite(fraction) else 0.0
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    cells = "█" * full + (_EIGHTHS[part] if part else "")
    return "▕" + cells.ljust(width) + "▏"


#: What a phase is called, by the events' ``phase``.
TITLES = {LoadProgress.phase: "loading model", PromptProgress.phase: "processing prompt"}


def progress_title(event: LoadProgress | PromptProgress) -> str:
    return TITLES[event.phase]


def progress_facts(
    event: LoadProgress | PromptProgress,
    elapsed_s: float | None = None,
    eta_s: float | None = None,
) -> list[str]:
    """The facts after the title: percentage, tokens (where counted), time so far, time left.

    ``elapsed_s`` and ``eta_s`` default to the event's own; a live display passes values it
    has moved on since the event arrived.
    """
    facts = [percent(event.fraction)]
    if isinstance(event, PromptProgress) and event.processed is not None and event.total:
        facts.append(f"{event.processed:,} / {event.total:,} tokens")
    facts.append(duration(event.elapsed_s if elapsed_s is None else elapsed_s))
    left = event.eta_s if eta_s is None else eta_s
    if left is not None and event.fraction < 1.0:
        facts.append(f"about {duration(left)} left")
    return facts


def progress_line(
    event: LoadProgress | PromptProgress,
    elapsed_s: float | None = None,
    eta_s: float | None = None,
    *,
    width: int = 10,
) -> str:
    """The whole line a terminal shows: title, bar, then the facts joined by ``·``."""
    facts = progress_facts(event, elapsed_s, eta_s)
    return f"{progress_title(event)} {bar(event.fraction, width)} {' · '.join(facts)}"
