"""The wait for the first token, estimated from earlier runs: the fit itself (pure figures)."""

from __future__ import annotations

import random

import pytest

from lmstream_nb._estimate import MIN_RUNS, estimate, prompt_chars


def line(a: float, b: float, sizes: list[int]) -> list[tuple[int, float]]:
    return [(x, a + b * x) for x in sizes]


def test_too_few_runs_give_no_estimate() -> None:
    history = line(0.5, 0.001, [1000 * (i + 1) for i in range(MIN_RUNS - 1)])
    assert estimate(history, 3000) is None
    assert estimate([*history, (6000, 6.5)], 3000) is not None


def test_a_clean_linear_history_gives_the_line() -> None:
    history = line(0.5, 0.002, [500, 1000, 2000, 4000, 8000, 16000])
    guess = estimate(history, 10000)
    assert guess is not None
    assert guess.expected_s == pytest.approx(20.5)
    assert guess.runs == 6


def test_outliers_do_not_move_the_line() -> None:
    """A run that loaded the model and one the server had cached are far off the line."""
    rng = random.Random(3)
    sizes = [rng.randrange(1000, 40000) for _ in range(20)]
    history = [(x, (0.3 + x / 1000) * rng.uniform(0.95, 1.05)) for x in sizes]
    history[0] = (history[0][0], history[0][1] + 60.0)  # loaded the model first
    history[1] = (history[1][0], 0.2)  # the prompt was cached
    guess = estimate(history, 30000)
    assert guess is not None
    assert guess.expected_s == pytest.approx(30.3, rel=0.08)


def test_prompts_far_outside_the_history_get_none() -> None:
    history = line(0.5, 0.002, [1000, 1500, 2000, 2500, 3000])
    assert estimate(history, 3000 * 4 + 1) is None
    assert estimate(history, 200) is None
    assert estimate(history, 9000) is not None


def test_one_size_only_gives_its_median_for_that_size() -> None:
    history = [(2000, t) for t in (3.0, 3.2, 2.9, 10.0, 3.1)]
    same = estimate(history, 2100)
    assert same is not None
    assert same.expected_s == pytest.approx(3.1)
    assert estimate(history, 8000) is None, "no slope is known: no guess for another size"


def test_a_negative_slope_is_taken_as_none_and_a_guess_is_never_below_zero() -> None:
    history = line(10.0, -0.001, [1000, 2000, 3000, 4000, 5000])
    guess = estimate(history, 4500)
    assert guess is not None
    assert guess.expected_s > 0
    assert guess.expected_s == pytest.approx(7.0)  # the median wait: no slope at all


def test_prompt_chars_counts_text_content_only() -> None:
    messages = [
        {"role": "system", "content": "abc"},
        {"role": "user", "content": "hello"},
        {"role": "user", "content": [{"type": "image_url"}]},
    ]
    assert prompt_chars(messages) == 8
