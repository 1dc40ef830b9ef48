"""Prompt files: one TOML file per prompt, so a prompt library can live in git.

TOML keeps multi-line templates readable in diffs (they are written as multi-line strings).
Reading uses tomllib (the standard library from Python 3.11; tomli, the same parser, on 3.10),
writing uses tomli-w. ``PromptStore.export`` and ``PromptStore.import_`` are the public way in.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

from ._errors import InvalidPlaceholder, PromptFileError
from ._prompt_fields import FieldError, PromptFields, kind, validate_fields
from ._template import Prompt

if TYPE_CHECKING:
    from ._store import PromptStore

# tomllib is in the standard library from Python 3.11; tomli is the same parser for 3.10.
_tomllib: Any = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "tomli")
_toml_loads: Callable[[str], dict[str, Any]] = _tomllib.loads
_TOMLDecodeError: type[ValueError] = _tomllib.TOMLDecodeError

#: Keys of a prompt file, in the order export writes them.
FILE_KEYS = ("name", "description", "model", "temperature", "max_tokens", "system", "template")


def export_prompts(store: PromptStore, folder: str | os.PathLike[str]) -> list[Path]:
    """Write the latest version of every prompt to ``<folder>/<name>.toml`` (see
    ``PromptStore.export``)."""
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for prompt in store.list():
        document: dict[str, Any] = {}
        for key in FILE_KEYS:
            value = getattr(prompt, key)
            if value is not None:
                document[key] = value
        file = target / f"{prompt.name}.toml"
        file.write_bytes(tomli_w.dumps(document, multiline_strings=True).encode("utf-8"))
        written.append(file)
    return sorted(written)


def import_prompts(store: PromptStore, folder: str | os.PathLike[str]) -> list[Prompt]:
    """Store every ``*.toml`` prompt file in ``folder`` as a new version, all or nothing (see
    ``PromptStore.import_``)."""
    source = Path(folder)
    if not source.is_dir():
        raise PromptFileError(
            f"The folder {source} does not exist or is not a folder: pass the folder that "
            "holds the .toml prompt files.",
            path=str(store.path),
            file=str(source),
            line=None,
        )
    parsed = [_parse_file(store, file) for file in sorted(source.glob("*.toml"))]
    return store.save_all(parsed)


def _parse_file(store: PromptStore, file: Path) -> PromptFields:
    def fail(problem: str, line: int | None, fix: str = "fix it") -> PromptFileError:
        where = f" at line {line}" if line is not None else ""
        return PromptFileError(
            f"The prompt file {file} {problem}{where}: {fix} and import again "
            "(nothing was imported).",
            path=str(store.path),
            file=str(file),
            line=line,
        )

    try:
        data = file.read_bytes()
    except OSError as exc:
        raise fail(f"cannot be read ({exc.strerror or exc})", None) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise fail("is not UTF-8 text", line, "save it as UTF-8") from exc
    try:
        document = _toml_loads(text)
    except _TOMLDecodeError as exc:
        message = str(exc)
        match = re.search(r"\(at line (\d+), column \d+\)", message)
        # Errors at the very end say "(at end of document)": point at the last line.
        line = int(match.group(1)) if match else max(1, len(text.splitlines()))
        reason = re.sub(r"\s*\(at [^)]*\)$", "", message)
        raise fail(f"is not valid TOML ({reason})", line) from exc

    for key in document:
        if key not in FILE_KEYS:
            raise fail(
                f"has the unknown key {key!r} (allowed: {', '.join(FILE_KEYS)})",
                _key_line(text, key),
                "fix or remove the key",
            )
    if "template" not in document:
        raise fail("has no 'template' key", 1, 'add template = "..."')
    values = {"name": file.stem, **document}
    for key in ("name", "description", "model", "system", "template"):
        if key in values and not isinstance(values[key], str):
            raise fail(
                f"gives {key!r} {kind(values[key])} where text is expected",
                _key_line(text, key),
                "write the value in quotes",
            )
    try:
        return validate_fields(
            values["name"],
            values["template"],
            values.get("system"),
            values.get("model"),
            values.get("temperature"),
            values.get("max_tokens"),
            values.get("description"),
        )
    except InvalidPlaceholder as exc:
        key = "system" if exc.where == "system prompt" else "template"
        line = _text_line(text, exc.placeholder, after_line=_key_line(text, key))
        raise fail(
            f"has a placeholder that is not a variable name in {key!r} ({exc.placeholder})",
            line,
            "use a name of ASCII letters, digits, _, . or - (or write \\{{ for a literal {{)",
        ) from exc
    except FieldError as exc:
        line = _key_line(text, exc.key) if exc.key in document else 1
        if exc.key == "name" and "name" not in document:
            problem = f"has a file name that is not a valid prompt name ({exc.fact})"
            raise fail(problem, line, 'add a valid name = "..." key or rename the file') from exc
        raise fail(f"has a bad {exc.key!r} ({exc.fact})", line) from exc


def _key_line(text: str, key: str) -> int:
    """The line where a top-level ``key`` (or table ``[key]``) is written, else 1."""
    quoted = re.escape(key)
    pattern = re.compile(
        rf"^[ \t]*\[*[ \t]*(?:{quoted}|\"{quoted}\"|'{quoted}')[ \t]*[.=\]]", re.MULTILINE
    )
    match = pattern.search(text)
    if match is None:
        return 1
    return text.count("\n", 0, match.start()) + 1


def _text_line(text: str, fragment: str, *, after_line: int) -> int:
    """The line where ``fragment`` is written, from ``after_line`` on (else ``after_line``)."""
    start = 0
    for _ in range(after_line - 1):
        start = text.index("\n", start) + 1
    found = text.find(fragment, start)
    return after_line if found < 0 else text.count("\n", 0, found) + 1
