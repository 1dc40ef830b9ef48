"""How progress reads, in every front end: the words, the numbers and the bar, decided once.

The terminal's live line, the notebook view, the runner and the relay page all show the same
facts about a model that loads or a prompt being processed ("processing prompt 43% · 3,512 /
8,140 tokens · 41 s · about 55 s left"); this module turns a progress event into them, so that
the front ends differ only in how they draw a bar. Where the server reports nothing, an
estimate from the history (:class:`PromptEstimate`) reads the same way and says it is one
("processing prompt (estimate) … · about 1 min 15 s left · estimated from 14 earlier runs").
"""

from __future__ import annotations

import math

from ._events import LoadProgress, PromptEstimate, PromptProgress

__all__ = [
    "TITLES",
    "Shown",
    "bar",
    "duration",
    "moved_on",
    "percent",
    "progress_facts",
    "progress_fraction",
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


Shown = LoadProgress | PromptProgress | PromptEstimate
"""What a progress display shows: a server's report, or an estimate from the history."""


def moved_on(event: Shown, since_s: float) -> tuple[float, float | None]:
    """(time so far, time left) ``since_s`` after the event arrived: a live display moves
    both on between reports, which may be seconds apart, so that it never looks stuck (an
    estimate's only move is this one: nothing else comes to move it)."""
    elapsed = event.elapsed_s + since_s
    if isinstance(event, PromptEstimate):
        return elapsed, max(0.0, event.expected_s - elapsed)
    eta = None if event.eta_s is None else max(0.0, event.eta_s - since_s)
    return elapsed, eta


#: What a phase is called, by the events' ``phase``.
TITLES = {
    LoadProgress.phase: "loading model",
    PromptProgress.phase: "processing prompt",
    PromptEstimate.phase: "processing prompt (estimate)",
}


def progress_title(event: Shown) -> str:
    return TITLES[event.phase]


def progress_fraction(event: Shown, elapsed_s: float | None = None) -> float:
    """How full the bar is: the server's fraction, or an estimate's at ``elapsed_s`` (which a
    live display moves on by its own clock, since nothing arrives to move it)."""
    if isinstance(event, PromptEstimate):
        return event.fraction_at(event.elapsed_s if elapsed_s is None else elapsed_s)
    return min(1.0, max(0.0, event.fraction))


def progress_facts(
    event: Shown,
    elapsed_s: float | None = None,
    eta_s: float | None = None,
) -> list[str]:
    """The facts after the title: percentage, tokens (where counted), time so far, time left;
    for an estimate, what it rests on.

    ``elapsed_s`` and ``eta_s`` default to the event's own; a live display passes values it
    has moved on since the event arrived (an estimate's time left follows from ``elapsed_s``).
    """
    elapsed = event.elapsed_s if elapsed_s is None else elapsed_s
    if isinstance(event, PromptEstimate):
        return _estimate_facts(event, elapsed)
    facts = [percent(event.fraction)]
    if isinstance(event, PromptProgress) and event.processed is not None and event.total:
        facts.append(f"{event.processed:,} / {event.total:,} tokens")
    facts.append(duration(elapsed))
    left = event.eta_s if eta_s is None else eta_s
    if left is not None and event.fraction < 1.0:
        facts.append(f"about {duration(left)} left")
    return facts


def _estimate_facts(event: PromptEstimate, elapsed: float) -> list[str]:
    left = event.expected_s - elapsed
    facts = [percent(event.fraction_at(elapsed)), duration(elapsed)]
    if left >= 0.5:
        facts.append(f"about {duration(left)} left")
    else:  # the bar stops short of full: the estimate was too short, and says so
        facts.append(f"longer than the {duration(event.expected_s)} expected")
    runs = "1 earlier run" if event.runs == 1 else f"{event.runs:,} earlier runs"
    facts.append(f"estimated from {runs}")
    return facts


def progress_line(
    event: Shown,
    elapsed_s: float | None = None,
    eta_s: float | None = None,
    *,
    width: int = 10,
) -> str:
    """The whole line a terminal shows: title, bar, then the facts joined by ``·``."""
    facts = progress_facts(event, elapsed_s, eta_s)
    fraction = progress_fraction(event, elapsed_s)
    return f"{progress_title(event)} {bar(fraction, width)} {' · '.join(facts)}"
