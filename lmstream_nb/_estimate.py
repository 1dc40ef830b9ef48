"""How long a prompt should wait for its first token, from how long earlier prompts waited.

Where the server reports nothing while it processes the prompt (its OpenAI-compatible
endpoint, LM Studio 0.3, Ollama, a proxy), the history of the same model on the same server
still tells how the wait grows with the prompt: a line ``ttft = a + b · chars`` through the
last runs. The line is fitted by Theil-Sen (the median of the slopes between pairs of runs),
not least squares, because the history has outliers least squares follows: the run that
loaded the model first, a prompt the server had cached, a request that queued behind another
(``benchmarks/estimate.py`` measures both). No tokenizer is needed: the client knows the
prompt's characters before it sends, and characters grow with tokens.

Too little history gives no estimate rather than a wrong one: fewer than :data:`MIN_RUNS`
runs, or a prompt far outside the sizes the history has seen.

Pure: figures in, an estimate out; the store reads the history.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_EXTRAPOLATION", "MIN_RUNS", "WINDOW", "Estimate", "estimate", "prompt_chars"]

#: Fewer earlier runs than this give no estimate.
MIN_RUNS = 5
#: How many of the latest runs the fit reads: recent enough to follow a changed setup (another
#: quantisation, a GPU in use), and a bounded cost however long the history.
WINDOW = 40
#: A prompt more than this many times the largest (or less than its inverse times the smallest)
#: the history has seen gets no estimate: the line is not known there.
MAX_EXTRAPOLATION = 4.0
#: Sizes closer together than this ratio measure no slope: the estimate is then their median
#: wait, for prompts of about that size only.
_SAME_SIZE = 1.25


@dataclass(frozen=True, slots=True)
class Estimate:
    """The expected time from the request to the first token, and how many runs it rests on."""

    expected_s: float
    runs: int


def prompt_chars(messages: Iterable[Mapping[str, Any]]) -> int:
    """The characters of a chat's text content: the size the history relates waits to.

    Non-text content (images, tool calls) is not counted; it is rare on the routes that have
    no progress, and a wrong count only makes the estimate rarer, never the request fail.
    """
    return sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))


def estimate(history: Sequence[tuple[int, float]], chars: int) -> Estimate | None:
    """The wait for a prompt of ``chars`` characters, from ``(chars, ttft_s)`` of earlier
    successful runs of the same model and server; None when they cannot say."""
    points = [(x, y) for x, y in history if x >= 0 and y >= 0]
    if len(points) < MIN_RUNS or chars < 0:
        return None
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    low, high = min(xs), max(xs)
    if chars > high * MAX_EXTRAPOLATION or chars * MAX_EXTRAPOLATION < low:
        return None
    if high < low * _SAME_SIZE:  # one size only: no slope, only that size's wait
        if chars > high * _SAME_SIZE or chars * _SAME_SIZE < low:
            return None
        return Estimate(statistics.median(ys), len(points))
    slope = max(0.0, theil_sen_slope(points))
    intercept = statistics.median(y - slope * x for x, y in points)
    expected = intercept + slope * chars
    if expected <= 0:  # a small prompt below a line whose intercept is noise: unknown
        return None
    return Estimate(expected, len(points))


def theil_sen_slope(points: Sequence[tuple[int, float]]) -> float:
    """The median slope between every two points of different size (0 when there are none)."""
    slopes = [
        (y2 - y1) / (x2 - x1)
        for i, (x1, y1) in enumerate(points)
        for x2, y2 in points[i + 1 :]
        if x2 != x1
    ]
    return statistics.median(slopes) if slopes else 0.0
