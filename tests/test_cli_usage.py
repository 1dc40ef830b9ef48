"""Every option of every ``lmstream`` command: a bad value is one line and exit 2, never a
traceback, and every option's help says its default. Run through the real console script."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lmstream_nb import cli

EXIT_USAGE = 2


def _subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command that runs something (``run``, ``prompts add``, ...) with its parser."""
    found = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found = True
            for name, sub in action.choices.items():
                yield from _subcommands(sub, (*path, name))
    if not found:
        yield path, parser


COMMANDS = dict(_subcommands(cli.build_parser()))


def _bad_values(action: argparse.Action) -> list[str]:
    """Values the option must refuse, by what kind of value it takes."""
    if action.choices is not None:
        return ["bogus"]
    kind = getattr(action.type, "__qualname__", "")
    if kind.startswith("_cleared") and action.dest not in ("temperature", "max_tokens"):
        return []  # free text ('' or none drops the setting)
    if kind.startswith(("_prompt_setting", "_cleared")):
        if action.dest == "temperature":
            return ["warm", "nan", "-0.5", "2.5"]
        return ["many", "1.5", "0", "-2"]
    by_kind = {
        "_whole_number.<locals>.parse": ["many", "1.5", "-1"],
        "_number.<locals>.parse": ["x", "-1", "inf", "nan"],
        "seconds_argument": ["soon", "0", "-1", "nan"],
        "_limit_seconds": ["none", "0", "soon"],
        "_rate": ["x", "-0.1", "2"],
        "_port": ["x", "-1", "70000"],
        "_conversation_name": [" ", "\u00a0"],
        "_slots": ["many", "0", "-1", "1.5"],
        "_status": ["bogus", "OK"],
        "_key_value": ["novalue", "=x"],
        "_base_url": ["localhost:1234/v1", "ftp://host/v1", "http://:80/v1", "http://h:99999/v1"],
        "_readable_file": ["/nonexistent/rows.csv"],
        "_writable_file": ["/nonexistent/folder/out.csv", "."],
        "int": ["x", "1.5"],
        "float": ["x"],
    }
    return by_kind.get(kind, [])


def _cases() -> Iterator[tuple[str, list[str], str, str]]:
    for path, parser in COMMANDS.items():
        for action in parser._actions:
            if action.nargs == 0 or isinstance(action, argparse._HelpAction):
                continue
            for value in _bad_values(action):
                name = action.option_strings[0] if action.option_strings else action.metavar
                yield " ".join(path), list(path), str(name or action.dest), value


CASES = list(_cases())


def test_every_option_that_takes_a_checked_value_has_bad_values() -> None:
    """The table below covers every typed option: a new option without bad values fails here."""
    for path, parser in COMMANDS.items():
        for action in parser._actions:
            if action.nargs == 0 or isinstance(action, argparse._HelpAction):
                continue
            free = getattr(action.type, "__qualname__", "").startswith("_cleared") and (
                action.dest not in ("temperature", "max_tokens")
            )
            if (action.type in (None, str, Path) or free) and action.choices is None:
                continue  # free text or a path that is checked when used
            assert _bad_values(action), (path, action.option_strings or action.dest)


def _argv(path: list[str], option: str, value: str, rows: Path) -> list[str]:
    """A command line whose only fault is ``option value`` (the other arguments are valid)."""
    positionals = {
        ("run",): ["Hi"],
        ("prompts", "add"): ["name", "template"],
        ("prompts", "show"): ["name"],
        ("prompts", "diff"): ["name", "1", "2"],
        ("prompts", "versions"): ["name"],
        ("prompts", "rm"): ["name"],
        ("prompts", "export"): ["folder"],
        ("prompts", "import"): ["folder"],
        ("batch",): ["prompt", str(rows)],
    }.get(tuple(path), [])
    if option.startswith("-"):
        return [*path, *positionals, option, value]
    # a positional: replace it
    parser = COMMANDS[tuple(path)]
    names = [a.metavar or a.dest for a in parser._actions if not a.option_strings]
    names = [n for n in names if n not in ("help",)]
    values = list(positionals)
    values[names.index(option)] = value
    return [*path, *values]


def _lmstream(argv: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "lmstream_nb", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "LMSTREAM_HOME": str(home)},
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("command", sorted({c[0] for c in CASES}))
def test_a_bad_value_of_any_option_is_one_line_and_exit_2(command: str, tmp_path: Path) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("name\nAda\n", encoding="utf-8")
    cases = [c for c in CASES if c[0] == command]
    argvs = [_argv(path, option, value, rows) for _, path, option, value in cases]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda argv: _lmstream(argv, tmp_path), argvs))
    for argv, result in zip(argvs, results, strict=True):
        shown = " ".join(argv)
        assert result.returncode == EXIT_USAGE, (shown, result.returncode, result.stderr)
        assert "Traceback" not in result.stderr, shown
        assert result.stderr.count("\n") == 1, (shown, result.stderr)
        assert result.stderr.startswith("lmstream"), (shown, result.stderr)
        assert "usage:" not in result.stderr, shown
        assert result.stdout == "", shown
    assert not (tmp_path / "lmstream.db").exists() or command != "run", "nothing was run"


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["history", "--status", "bogus"], "the status 'bogus' is not known: use one of ok"),
        (["history", "--limit", "-1"], "'-1' is not a number of runs"),
        (["batch", "p", "ROWS", "-c", "0"], "'0' is not a number of rows at once"),
        (["run", "Hi", "--temperature", "nan"], "is not a number from 0 to 2: give --temperature"),
        (["run", "Hi", "--max-tokens", "0"], "or -1 for no limit: give --max-tokens"),
        (["run", "Hi", "--base-url", "localhost:1234"], "does not start with http://"),
        (["serve", "--port", "70000"], "'70000' is not a port"),
        (["bench", "--timeouts", "-1"], "'-1' is not a number above 0"),
        (["bench", "--faults", "2"], "'2' is not a rate from 0 to 1"),
        (["prompts", "add", "x", "--file", "/nonexistent"], "'/nonexistent' is not a file"),
    ],
)
def test_the_sentence_names_the_value_and_the_fix(
    argv: list[str], said: str, tmp_path: Path
) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("name\nAda\n", encoding="utf-8")
    result = _lmstream([str(rows) if a == "ROWS" else a for a in argv], tmp_path)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert said in result.stderr


def test_every_option_has_help_that_says_its_default() -> None:
    for path, parser in COMMANDS.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = (path, action.option_strings or action.dest)
            assert action.help, where
            if not action.option_strings or action.nargs == 0:
                continue  # a positional has no default; a flag is off unless given
            assert "default" in cli.help_text(action), where


def test_help_shows_the_defaults() -> None:
    shown = _lmstream(["batch", "--help"], Path.cwd())
    assert shown.returncode == 0
    text = " ".join(shown.stdout.split())
    assert "rows streaming at once in all (default: as many on each server as it has" in text
    assert "(default: $LMSTREAM_BASE_URL or http://localhost:1234/v1)" in text
    first_token = " ".join(_lmstream(["run", "--help"], Path.cwd()).stdout.split())
    assert "(default 600)" in first_token
