"""Error sentences in the words of each interface: one vocabulary, every term worded everywhere."""

from __future__ import annotations

import pytest

from lmstream_nb._errors import (
    _CLOSE,
    _OPEN,
    _WORDS,
    INTERFACES,
    TERM_KINDS,
    TRACEBACK_WIDTH,
    InvalidSetting,
    LMStreamError,
    MissingVariables,
    PromptNotFound,
    StreamStalled,
    render,
    term,
)


@pytest.mark.parametrize("interface", INTERFACES)
def test_every_interface_words_every_kind_of_term(interface: str) -> None:
    assert set(_WORDS[interface]) == set(TERM_KINDS)
    for kind in TERM_KINDS:
        worded = render(LMStreamError(f"Do {term(kind, 'temperature')}."), interface)
        assert _OPEN not in worded
        assert _CLOSE not in worded


def test_str_is_the_python_wording_and_render_follows_the_interface_set() -> None:
    error = StreamStalled(
        f"It stalled, and {term('kept', '7')}; {term('raise', 'idle_timeout')}, then run again.",
        url="http://127.0.0.1:1/v1",
        budget=1.0,
    )
    python = (
        "It stalled, and the 7 characters received are kept in .partial_text; raise "
        "idle_timeout, then run again."
    )
    assert str(error) == render(error) == python
    assert error.args == (python,)
    error.interface = "cli"
    assert render(error) == (
        "It stalled, and the 7 characters received are kept above and in `lmstream history`; "
        "raise --idle-timeout, then run again."
    )
    assert str(error) == python, "str stays Python whatever the interface"
    assert render(error, "runner").endswith("raise Idle s (under Advanced), then run again.")


def test_no_text_kept_reads_the_same_everywhere() -> None:
    for interface in INTERFACES:
        said = render(LMStreamError(f"It broke, and {term('kept', '0')}: run again."), interface)
        assert said == "It broke, and no text had arrived: run again."


def test_each_interface_names_its_own_fix() -> None:
    missing = MissingVariables(["a", "b"])
    assert render(missing, "python").endswith("pass a=... b=... and run again.")
    assert render(missing, "cli").endswith("add --var a=... --var b=... and run again.")
    assert "to the %%lmstream line or define it in the notebook" in render(missing, "magic")
    assert render(missing, "relay").endswith(
        'send "variables": {"a": "...", "b": "..."} and run again.'
    )
    setting = InvalidSetting("max_tokens", 0, "a whole number from 1")
    assert render(setting, "cli").startswith("--max-tokens 0 is not a whole number from 1")
    assert render(setting, "runner").startswith("Max tokens 0 is not")
    assert render(setting, "relay").startswith('"max_tokens": 0 is not')
    gone = PromptNotFound("x", path="/secret/lmstream.db")
    assert "/secret" in str(gone)
    assert "/secret" not in render(gone, "relay"), "a web client never sees the server's path"


def test_plain_exceptions_and_unknown_interfaces() -> None:
    assert render(ValueError("plain")) == "plain"
    with pytest.raises(ValueError, match="interface must be one of python, cli"):
        render(LMStreamError("x"), "web")


def test_a_notebook_error_is_cut_at_spaces_and_keeps_every_word() -> None:
    """Notebooks break a long error line anywhere, inside words too: the lines come cut."""
    url = "http://127.0.0.1:1234/v1/" + "a" * 120  # longer than a line: kept whole
    error = StreamStalled(
        f"The stream from {url} stalled after a long and careful answer that goes on and on "
        "for more words than fit on one line of a notebook's output area, and then some more.",
        url=url,
        budget=1.0,
    )
    lines = error._render_traceback_()
    assert len(lines) > 1
    assert lines[0].startswith("\x1b[0;31mStreamStalled\x1b[0m: The stream from")
    assert all(len(line) <= TRACEBACK_WIDTH for line in lines if url not in line)
    plain = " ".join(lines).replace("\x1b[0;31m", "").replace("\x1b[0m", "")
    assert plain == f"StreamStalled: {render(error)}"
