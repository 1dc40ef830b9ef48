"""The one wording of progress: durations, the bar, the facts and the terminal's line."""

from __future__ import annotations

import pytest

from lmstream_nb import LoadProgress, PromptProgress
from lmstream_nb._progress import bar, duration, progress_facts, progress_line


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
