"""Structured output: a JSON Schema a run asks for, how it is sent, and how the answer is checked.

A schema comes as a dict, a pydantic model class (its ``model_json_schema()``; pydantic is
imported only if such a class is given, never required) or, from the magic and the command
line, as one argument that is a path to a ``.json`` file or inline JSON text
(:func:`read_schema_arg`, the one parser both use). It is checked against the JSON Schema
meta-schema with jsonschema-rs before anything is sent or saved, and stored as canonical JSON
(sorted keys, no spaces) so that the same schema always compares, and versions, the same.

It is sent as ``response_format: {"type": "json_schema", ...}``: LM Studio refuses
``json_object`` and llama.cpp's server takes ``json_schema`` as a grammar. The answer still
streams as text; at the end :func:`parse_answer` reads it (one enclosing code fence allowed)
and validates it, and a failure names the first failing place in one sentence.

Pure: values in, values out (a file is read only for :func:`read_schema_arg`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema_rs

from ._errors import InvalidOutput, InvalidSchema

__all__ = [
    "canonical_schema",
    "parse_answer",
    "read_schema_arg",
    "response_format",
    "schema_of",
    "strip_fences",
]

#: The name sent with a schema that has no usable ``title`` (OpenAI's rule for the name).
DEFAULT_NAME = "answer"
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
#: How much of a bad value a sentence quotes.
_QUOTE = 60


def schema_of(value: object) -> dict[str, Any]:
    """The JSON Schema ``value`` stands for, checked: a mapping, canonical JSON text (as
    stored), or a pydantic model class. InvalidSchema (one sentence) otherwise."""
    if isinstance(value, str):
        schema: object = _loads(value)
    elif isinstance(value, Mapping):
        schema = dict(value)
    elif isinstance(value, type) and callable(
        to_schema := getattr(value, "model_json_schema", None)
    ):
        # A pydantic model class, known by its method: pydantic is never imported for this.
        schema = to_schema()
    else:
        raise InvalidSchema(
            f"is {type(value).__name__!r}, not a dict, JSON text or a pydantic model class"
        )
    return _checked(schema)


def _loads(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidSchema(f"is not valid JSON ({exc})") from None


def _checked(schema: object) -> dict[str, Any]:
    if not isinstance(schema, dict):
        raise InvalidSchema(f"is JSON {_json_kind(schema)}, not an object")
    try:
        text = canonical_schema(schema)
    except (TypeError, ValueError) as exc:
        raise InvalidSchema(f"cannot be written as JSON ({exc})") from None
    plain = json.loads(text)
    try:
        jsonschema_rs.meta.validate(plain)
    except jsonschema_rs.ValidationError as exc:
        raise InvalidSchema(
            f"is not a valid JSON Schema at {json_path(exc.instance_path)}: {_short(exc.message)}"
        ) from None
    except jsonschema_rs.ReferencingError as exc:
        raise InvalidSchema(f"refers to a meta-schema this library does not know ({exc})") from None
    return plain  # type: ignore[no-any-return]


def read_schema_arg(arg: str) -> dict[str, Any]:
    """``--schema`` for the magic and ``lmstream run``: inline JSON when it starts with ``{``,
    else a path to a JSON file. One clear sentence for a missing file, bad JSON, not a schema."""
    stripped = arg.strip()
    if stripped.startswith("{"):
        return schema_of(stripped)
    path = Path(arg).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidSchema(
            f"file {str(path)!r} does not exist (pass a .json file or inline JSON such as "
            '\'{"type": "object"}\')'
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidSchema(f"file {str(path)!r} cannot be read ({exc})") from None
    try:
        return schema_of(text)
    except InvalidSchema as exc:
        raise InvalidSchema(f"in {str(path)!r} {exc.reason}") from None


def canonical_schema(schema: Mapping[str, Any]) -> str:
    """The one text a schema is stored and compared as: sorted keys, no spaces, UTF-8."""
    return json.dumps(
        schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def readable_schema(stored: str) -> str:
    """A stored schema (canonical JSON) as a person reads it: indented, keys in order."""
    return json.dumps(json.loads(stored), indent=2, ensure_ascii=False)


def response_format(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The ``response_format`` of a /chat/completions request that asks for ``schema``.

    ``strict`` makes OpenAI-style servers constrain decoding rather than merely hint; the name
    is the schema's ``title`` reduced to the characters such servers accept, else ``answer``.
    """
    title = schema.get("title")
    name = _NAME_CHARS.sub("_", title).strip("_")[:64] if isinstance(title, str) else ""
    return {
        "type": "json_schema",
        "json_schema": {"name": name or DEFAULT_NAME, "strict": True, "schema": dict(schema)},
    }


def parse_answer(text: str, schema: Mapping[str, Any], *, cut_short: bool = False) -> Any:
    """The value of an answer that must match ``schema``; InvalidOutput naming the first
    failing place otherwise (``$`` for an answer that is not JSON at all). ``cut_short``: the
    answer ended at the max tokens limit, which is then the likely cause to name."""
    inner = strip_fences(text)
    try:
        value = json.loads(inner)
    except ValueError as exc:
        if cut_short:
            raise InvalidOutput(
                "The answer stopped at the max tokens limit before its JSON was complete, so "
                "it does not match the schema: the text is kept; raise max tokens and run again.",
                path="$",
                text=text,
            ) from None
        what = "is empty" if not inner.strip() else f"is not valid JSON ({exc})"
        raise InvalidOutput(
            f"The answer {what}, so it does not match the schema: the text is kept; "
            "rerun, or lower the temperature.",
            path="$",
            text=text,
        ) from None
    validator = jsonschema_rs.validator_for(dict(schema))
    error = min(validator.iter_errors(value), key=lambda e: len(e.instance_path), default=None)
    if error is None:
        return value
    path = json_path(error.instance_path)
    raise InvalidOutput(
        f"The answer does not match the schema at {path}: {_short(error.message)}; the text "
        "is kept.",
        path=path,
        text=text,
    )


def json_path(parts: list[str | int] | tuple[str | int, ...]) -> str:
    """``['items', 2, 'price']`` → ``$.items[2].price`` (odd keys quoted: ``$["a b"]``)."""
    out = "$"
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            out += f".{part}"
        else:
            out += f"[{json.dumps(part, ensure_ascii=False)}]"
    return out


def strip_fences(text: str) -> str:
    """The inside of a ```fenced``` block when the whole answer is one, else the text."""
    stripped = text.strip()
    if stripped.startswith("```") and stripped.endswith("```") and stripped.count("\n") >= 1:
        inner = stripped[3:-3]
        first_newline = inner.find("\n")
        return inner[first_newline + 1 :].rstrip("\n") if first_newline >= 0 else inner
    return text


def _short(message: str) -> str:
    line = message.splitlines()[0] if message else "it does not match"
    return line if len(line) <= 4 * _QUOTE else line[: 4 * _QUOTE - 1] + "…"


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"
