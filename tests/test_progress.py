"""The one wording of progress: durations, the bar, the facts and the terminal's line."""

from __future__ import annotations

import pytest

from lmstream_nb import LoadProgress, PromptEstimate, PromptProgress
from lmstream_nb._progress import (
    bar,
    duration,
    moved_on,
    progress_facts,
    progress_fraction,
    progress_line,
    progress_title,
)


@pytest.mark.parametrize(
    ("seconds", "said"),
    [(0.4, "0 s"), (41.2, "41 s"), (59.6, "1 min"), (150, "2 min 30 s"), (3900, "1 h 5 min")],
)
def test_durations_read_as_people_say_them(seconds: float, said: str) -> None:
    assert duration(seconds) == said


def test_the_bar_fills_in_eighths_and_keeps_its_width() -> None:
    assert bar(0.0) == "▕          ▏"
    assert bar(0.43) == "▕████▎     ▏"
    assert bar(1.0) == "▕██████████▏"
    assert bar(2.0) == bar(1.0)
    assert bar(float("nan")) == bar(0.0)
    assert {len(bar(f / 100)) for f in range(101)} == {12}


def test_a_prompt_line_has_every_fact_the_server_gave() -> None:
    event = PromptProgress(0.4313, 41.0, 55.0, processed=3512, total=8140, cached=0)
    assert progress_line(event) == (
        "processing prompt ▕████▍     ▏ 43% · 3,512 / 8,140 tokens · 41 s · about 55 s left"
    )
    later = progress_facts(event, elapsed_s=43.0, eta_s=53.0)
    assert later == ["43%", "3,512 / 8,140 tokens", "43 s", "about 53 s left"]


def test_without_counts_or_estimate_only_what_is_known_is_said() -> None:
    assert progress_line(LoadProgress(0.65, 4.0)) == "loading model ▕██████▌   ▏ 65% · 4 s"
    done = PromptProgress(1.0, 9.0, 0.0)
    assert progress_facts(done) == ["100%", "9 s"]  # nothing left to wait for


def test_an_estimate_says_it_is_one_and_what_it_rests_on() -> None:
    event = PromptEstimate(expected_s=116.0, runs=14, elapsed_s=0.2)
    assert progress_title(event) == "processing prompt (estimate)"
    assert progress_line(event, 41.0) == (
        "processing prompt (estimate) ▕███▌      ▏ 35% · 41 s · about 1 min 15 s left · "
        "estimated from 14 earlier runs"
    )
    assert progress_facts(event)[:2] == ["0%", "0 s"], "the event's own time by default"


def test_an_estimate_that_ran_out_never_fills_the_bar_and_says_so() -> None:
    event = PromptEstimate(expected_s=30.0, runs=1, elapsed_s=0.0)
    assert progress_fraction(event, 45.0) == 0.99
    assert progress_facts(event, 45.0) == [
        "99%",
        "45 s",
        "longer than the 30 s expected",
        "estimated from 1 earlier run",
    ]


def test_an_estimate_is_moved_on_by_the_time_since_it_came() -> None:
    event = PromptEstimate(expected_s=60.0, runs=9, elapsed_s=2.0)
    assert moved_on(event, 10.0) == (12.0, 48.0)
    assert moved_on(event, 90.0) == (92.0, 0.0)
