"""Prompt files: one TOML file per prompt, so a prompt library can live in git.

TOML keeps multi-line templates readable in diffs (they are written as multi-line strings).
Reading uses tomllib (the standard library from Python 3.11; tomli, the same parser, on 3.10),
writing uses tomli-w. ``PromptStore.export`` and ``PromptStore.import_`` are the public way in.

Import is all or nothing, and it only reads what a prompt file can be: a regular file of at
most 1 MiB (``MAX_FILE_BYTES``), UTF-8, TOML nested no deeper than ``MAX_NESTING`` (tomllib
parses nested arrays and tables recursively, so a deeply nested file would otherwise end in a
RecursionError), and no two files giving the same prompt name.

A prompt's JSON Schema (structured output) is written as a multi-line string of indented JSON:
TOML has no ``null``, which a schema may hold (``"const": null``), and JSON reads as what it is.
Import takes that string, or a TOML table for a schema written by hand.

Export writes only inside the folder and only files it can tell are its own: it never follows
a symbolic link (a ``<name>.toml`` that is a link is refused, whatever it points at), and it
overwrites an existing ``<name>.toml`` only if that file is a prompt file for that very prompt
(valid TOML of prompt keys with a template, whose ``name`` key, or else file name, is the
prompt's name). Anything else there is left alone unless ``force=True`` (``--force``). Every
file is checked before the first one is written.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

from ._errors import InvalidPlaceholder, InvalidSetting, PromptFileError
from ._prompt_fields import FieldError, PromptFields, kind, validate_fields, validate_name

if TYPE_CHECKING:
    from ._store import PromptStore, SavedVersion

# tomllib is in the standard library from Python 3.11; tomli is the same parser for 3.10.
_tomllib: Any = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "tomli")
_toml_loads: Callable[[str], dict[str, Any]] = _tomllib.loads
_TOMLDecodeError: type[ValueError] = _tomllib.TOMLDecodeError

#: Keys of a prompt file, in the order export writes them.
FILE_KEYS = (
    "name",
    "description",
    "model",
    "temperature",
    "max_tokens",
    "system",
    "template",
    "schema",
)
#: The largest prompt file import reads (a template is text for a person to edit, not data).
MAX_FILE_BYTES = 1024 * 1024
#: The deepest nesting of arrays and inline tables import passes to the TOML parser.
MAX_NESTING = 32

# Strings and comments (whose brackets do not nest) and the brackets that do.
_TOML_TOKEN = re.compile(
    r'"""(?:\\.|[^\\])*?"""|\'\'\'.*?\'\'\'|"(?:\\.|[^"\\\n])*"|\'[^\'\n]*\'|#[^\n]*|[\[\]{}]',
    re.DOTALL,
)


class _FileProblem(Exception):
    """What is wrong with a file, as parts of the sentence the caller completes."""

    def __init__(self, problem: str, line: int | None, fix: str = "fix it") -> None:
        super().__init__(problem)
        self.problem = problem
        self.line = line
        self.fix = fix


# ---------------------------------------------------------------------------------------------
# Export


def export_prompts(
    store: PromptStore, folder: str | os.PathLike[str], *, force: bool = False
) -> list[Path]:
    """Write the latest version of every prompt to ``<folder>/<name>.toml`` (see
    ``PromptStore.export``)."""
    target = Path(folder)

    def fail(file: Path, problem: str, fix: str) -> PromptFileError:
        return PromptFileError(
            f"The file {file} {problem}: {fix} and export again (nothing was written).",
            path=str(store.path),
            file=str(file),
            line=None,
        )

    planned: list[tuple[Path, bytes]] = []
    for prompt in store.list():
        name = prompt.name or ""
        file = target / f"{name}.toml"
        try:
            validate_name(name)
        except FieldError as exc:
            raise fail(
                file,
                f"would be written for a prompt whose name cannot be a file name ({exc.fact})",
                "save the prompt under another name and delete this one",
            ) from exc
        refusal = _refusal_to_overwrite(file, name, force=force)
        if refusal is not None:
            raise fail(file, *refusal)
        document: dict[str, Any] = {}
        for key in FILE_KEYS:
            value = getattr(prompt, key)
            if value is not None:
                document[key] = value
        planned.append((file, _toml_text(document).encode("utf-8")))
    try:
        target.mkdir(parents=True, exist_ok=True)
        for file, data in planned:
            _write_in_place(file, data)
    except OSError as exc:
        where = Path(exc.filename) if exc.filename else target
        raise fail(where, f"cannot be written ({exc.strerror or exc})", "fix the folder") from exc
    return sorted(file for file, _ in planned)


def _toml_text(document: dict[str, Any]) -> str:
    """A prompt file's text; the schema (the last key) as a literal multi-line string of
    indented JSON, which needs no escapes (JSON escapes every control character itself)."""
    schema = document.pop("schema", None)
    text = tomli_w.dumps(document, multiline_strings=True)
    if schema is None:
        return text
    pretty = json.dumps(json.loads(schema), indent=2, ensure_ascii=False)
    if "'''" in pretty or "\x7f" in pretty:  # cannot be a literal string: a basic one
        return text + tomli_w.dumps({"schema": pretty + "\n"}, multiline_strings=True)
    return f"{text}schema = '''\n{pretty}\n'''\n"


def _refusal_to_overwrite(file: Path, name: str, *, force: bool) -> tuple[str, str] | None:
    """Why export must not write ``file`` (the problem and the fix), or None if it may."""
    try:
        info = file.lstat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return (f"cannot be examined ({exc.strerror or exc})", "fix the folder")
    if stat.S_ISLNK(info.st_mode):
        return (
            "is a symbolic link, and export never writes through one",
            "remove the link or export to another folder",
        )
    if not stat.S_ISREG(info.st_mode):
        return ("exists and is not a regular file", "move it away or export to another folder")
    if force:
        return None
    try:
        _text, document = _read_document(file)
    except _FileProblem as exc:
        reason = exc.problem
    else:
        found = document.get("name", file.stem)
        if found == name:
            return None
        reason = f"is the prompt file of {found!r}"
    return (
        f"exists and is not a prompt file for {name!r} (it {reason}), so export leaves it alone",
        "move it away, or pass --force (force=True) to overwrite it",
    )


def _write_in_place(file: Path, data: bytes) -> None:
    """Write ``data`` to ``file`` without ever following a symbolic link at its name."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    descriptor = os.open(file, flags, 0o666)
    with os.fdopen(descriptor, "wb") as handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(0, "not a regular file", str(file))
        handle.truncate(0)
        handle.write(data)


# ---------------------------------------------------------------------------------------------
# Import


def import_prompts(store: PromptStore, folder: str | os.PathLike[str]) -> list[SavedVersion]:
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
    parsed: list[PromptFields] = []
    first_file: dict[str, Path] = {}
    for file in sorted(source.glob("*.toml")):
        try:
            text, fields = _parse_file(file)
            earlier = first_file.setdefault(fields.name, file)
            if earlier != file:
                raise _FileProblem(
                    f"holds the prompt {fields.name!r}, and so does {earlier}",
                    _key_line(text, "name") if _has_key(text, "name") else 1,
                    "rename one of them (or its name key)",
                )
        except _FileProblem as exc:
            where = f" at line {exc.line}" if exc.line is not None else ""
            raise PromptFileError(
                f"The prompt file {file} {exc.problem}{where}: {exc.fix} and import again "
                "(nothing was imported).",
                path=str(store.path),
                file=str(file),
                line=exc.line,
            ) from exc
        parsed.append(fields)
    return store.save_all(parsed)


def _read_document(file: Path) -> tuple[str, dict[str, Any]]:
    """The text and TOML document of a prompt file, with its keys checked; _FileProblem if not."""
    try:
        # Non-blocking, so a FIFO named like a prompt file is refused instead of waited on.
        descriptor = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(descriptor, "rb") as handle:
            info = os.fstat(descriptor)
            if not stat.S_ISREG(info.st_mode):
                raise _FileProblem("is not a regular file", None, "replace it with a text file")
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise _FileProblem(f"cannot be read ({exc.strerror or exc})", None) from exc
    if len(data) > MAX_FILE_BYTES:
        size = max(info.st_size, len(data))
        raise _FileProblem(
            f"is {size / 1024 / 1024:.1f} MiB, more than the 1 MiB a prompt file may hold",
            None,
            "shorten it",
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _FileProblem("is not UTF-8 text", line, "save it as UTF-8") from exc
    deep = _too_deep(text)
    if deep is not None:
        raise _FileProblem(
            f"is not valid TOML (arrays or tables nested more than {MAX_NESTING} deep)",
            deep,
        )
    try:
        document = _toml_loads(text)
    except _TOMLDecodeError as exc:
        message = str(exc)
        match = re.search(r"\(at line (\d+), column \d+\)", message)
        # Errors at the very end say "(at end of document)": point at the last line.
        line = int(match.group(1)) if match else max(1, len(text.splitlines()))
        reason = re.sub(r"\s*\(at [^)]*\)$", "", message)
        raise _FileProblem(f"is not valid TOML ({reason})", line) from exc
    except RecursionError as exc:  # nesting the scan above did not see (it is a safety net)
        raise _FileProblem("is not valid TOML (nested too deeply)", 1) from exc
    for key in document:
        if key not in FILE_KEYS:
            raise _FileProblem(
                f"has the unknown key {key!r} (allowed: {', '.join(FILE_KEYS)})",
                _key_line(text, key),
                "fix or remove the key",
            )
    if "template" not in document:
        raise _FileProblem("has no 'template' key", 1, 'add template = "..."')
    return text, document


def _parse_file(file: Path) -> tuple[str, PromptFields]:
    text, document = _read_document(file)
    values = {"name": file.stem, **document}
    for key in ("name", "description", "model", "system", "template"):
        if key in values and not isinstance(values[key], str):
            raise _FileProblem(
                f"gives {key!r} {kind(values[key])} where text is expected",
                _key_line(text, key),
                "write the value in quotes",
            )
    try:
        return text, validate_fields(
            values["name"],
            values["template"],
            values.get("system"),
            values.get("model"),
            values.get("temperature"),
            values.get("max_tokens"),
            values.get("description"),
            values.get("schema"),
        )
    except InvalidPlaceholder as exc:
        key = "system" if exc.where == "system prompt" else "template"
        problem = "is not closed on its line" if exc.unclosed else "is not a variable name"
        fix = (
            "close it as {{my_var}}"
            if exc.unclosed
            else "use a name of ASCII letters, digits, _, . or -"
        )
        raise _FileProblem(
            f"has a placeholder in {key!r} that {problem} ({exc.placeholder})",
            _text_line(text, exc.placeholder.rstrip("…"), after_line=_key_line(text, key)),
            f"{fix} (or write \\{{{{ for a literal {{{{)",
        ) from exc
    except InvalidSetting as exc:
        raise _FileProblem(
            f"has a bad {exc.setting!r} ({exc.value!r} is not {exc.rule})",
            _key_line(text, exc.setting),
        ) from exc
    except FieldError as exc:
        line = _key_line(text, exc.key) if exc.key in document else 1
        if exc.key == "name" and "name" not in document:
            raise _FileProblem(
                f"has a file name that is not a valid prompt name ({exc.fact})",
                line,
                'add a valid name = "..." key or rename the file',
            ) from exc
        raise _FileProblem(f"has a bad {exc.key!r} ({exc.fact})", line) from exc


def _too_deep(text: str) -> int | None:
    """The line where arrays or inline tables nest deeper than MAX_NESTING, else None."""
    depth = 0
    for match in _TOML_TOKEN.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > MAX_NESTING:
                return text.count("\n", 0, match.start()) + 1
        elif token in ("]", "}"):
            depth = max(0, depth - 1)
    return None


def _key_pattern(key: str) -> re.Pattern[str]:
    quoted = re.escape(key)
    return re.compile(
        rf"^[ \t]*\[*[ \t]*(?:{quoted}|\"{quoted}\"|'{quoted}')[ \t]*[.=\]]", re.MULTILINE
    )


def _has_key(text: str, key: str) -> bool:
    return _key_pattern(key).search(text) is not None


def _key_line(text: str, key: str) -> int:
    """The line where a top-level ``key`` (or table ``[key]``) is written, else 1."""
    match = _key_pattern(key).search(text)
    if match is None:
        return 1
    return text.count("\n", 0, match.start()) + 1


def _text_line(text: str, fragment: str, *, after_line: int) -> int:
    """The line where ``fragment`` is written, from ``after_line`` on (else ``after_line``)."""
    start = 0
    for _ in range(after_line - 1):
        start = text.find("\n", start) + 1
        if start == 0:
            return after_line
    found = text.find(fragment, start)
    return after_line if found < 0 else text.count("\n", 0, found) + 1
