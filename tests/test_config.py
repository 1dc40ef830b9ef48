"""Settings: the one rule for a time budget typed by a person."""

from __future__ import annotations

import argparse

import pytest

from lmstream_nb._config import parse_seconds, seconds_argument


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 30.0),
        (" 0.5 ", 0.5),
        ("1e3", 1000.0),
        ("none", None),
        ("None", None),
        (" NONE ", None),
        ("", None),
        ("inf", None),
        ("Infinity", None),
        ("1e400", None),  # overflows to infinity: no limit, as typed
    ],
)
def test_positive_seconds_or_no_limit(text: str, seconds: float | None) -> None:
    assert parse_seconds(text) == seconds


@pytest.mark.parametrize("text", ["0", "0.0", "-1", "-inf", "nan", "abc", "10s", "1,5"])
def test_anything_else_is_one_sentence(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a time budget") as caught:
        parse_seconds(text)
    message = str(caught.value)
    assert repr(text) in message
    assert message.endswith("use a positive number of seconds, or none for no limit.")


def test_as_an_argparse_type_the_sentence_is_the_error() -> None:
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--budget", type=seconds_argument)
    assert parser.parse_args(["--budget", "none"]).budget is None
    assert parser.parse_args(["--budget", "2"]).budget == 2.0
    with pytest.raises(argparse.ArgumentError, match="'0' is not a time budget"):
        parser.parse_args(["--budget", "0"])
