"""What a prompt's fields may hold: one set of checks for saving, importing and exporting.

A prompt name becomes a file name on export and a path segment in ``lmstream serve``'s URLs,
and it is shown in tables and messages, so it must be something a person can read and type
back: no separators, no control characters, nothing invisible or direction-changing (Unicode
format characters, category Cf: bidi controls, zero-width spaces and joiners, the BOM), and not
``.`` or ``..``. The checks raise ``FieldError`` (a ``ValueError``) whose ``key`` lets an import
point at the line of the offending key.
"""

from __future__ import annotations

import enum
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from ._errors import InvalidSchema, InvalidSetting
from ._structured import canonical_schema, schema_of
from ._template import check_placeholders

MAX_NAME_LENGTH = 200

#: The most tokens a run may ask for (what llama.cpp and most servers hold in an int32).
MAX_TOKENS = 2**31 - 1
#: The range of each run setting, in the words every refusal uses (the relay's schema too).
RULES = {
    "temperature": "a number from 0 to 2",
    "max_tokens": f"a whole number from 1 to {MAX_TOKENS}, or -1 for no limit",
}

#: The settings of a prompt version besides its name and template, in the order they are shown.
SETTINGS = ("system", "model", "temperature", "max_tokens", "description", "schema")


class PromptFields(NamedTuple):
    """The checked fields of one prompt version, in the order they are stored."""

    name: str
    template: str
    system: str | None
    model: str | None
    temperature: float | None
    max_tokens: int | None
    description: str | None
    schema: str | None = None  # canonical JSON text (see check_schema)


class FieldError(ValueError):
    """A bad prompt field; ``key`` lets import point at the line, ``fact`` is the bare fact."""

    def __init__(self, key: str, fact: str, fix: str) -> None:
        super().__init__(f"{fact}: {fix}.")
        self.key = key
        self.fact = fact


_BAD_NAME_CHAR = re.compile(r"[/\\\x00-\x1f\x7f-\x9f\u2028\u2029]")


def validate_name(name: object) -> str:
    """``name`` if it can be a prompt name; FieldError saying why not otherwise."""
    if not isinstance(name, str):
        raise FieldError(
            "name", f"The prompt name must be text, not {kind(name)}", "give the prompt a name"
        )
    if not name:
        raise FieldError("name", "The prompt name is empty", "give the prompt a name")
    if len(name) > MAX_NAME_LENGTH:
        raise FieldError(
            "name",
            f"The prompt name is {len(name)} characters long, more than {MAX_NAME_LENGTH}",
            "use a shorter name",
        )
    if name in (".", ".."):
        raise FieldError(
            "name",
            f"The prompt name {name!r} names a folder, not a file",
            "use a name with letters or digits in it",
        )
    bad = _BAD_NAME_CHAR.search(name)
    if bad:
        raise FieldError(
            "name",
            f"The prompt name {name!r} contains {bad.group()!r}",
            "use a name without slashes, backslashes or control characters, since it becomes "
            "a file name on export",
        )
    for char in name:
        if unicodedata.category(char) == "Cf":
            raise FieldError(
                "name",
                f"The prompt name {name!r} contains the invisible character "
                f"U+{ord(char):04X} ({unicodedata.name(char, 'a format character')})",
                "type the name again without it, since invisible or direction-changing "
                "characters make two different names look the same",
            )
    return name


def validate_fields(
    name: object,
    template: object,
    system: object,
    model: object,
    temperature: object,
    max_tokens: object,
    description: object,
    schema: object = None,
) -> PromptFields:
    """The fields of a prompt, checked; raises FieldError (a ValueError) on the first bad one.

    A template or system prompt whose placeholders are not valid names raises
    ``InvalidPlaceholder`` (a TemplateError, also a ValueError) instead.
    """
    checked_name = validate_name(name)
    if not isinstance(template, str):
        raise FieldError(
            "template",
            f"The template must be text, not {kind(template)}",
            "pass the prompt text as a string",
        )
    texts: dict[str, str | None] = {}
    for key, value in (("system", system), ("model", model), ("description", description)):
        if value is not None and not isinstance(value, str):
            raise FieldError(
                key,
                f"The {key} must be text or None, not {kind(value)}",
                f"pass {key} as a string",
            )
        texts[key] = value
    checked_temperature = check_temperature(temperature)
    checked_max_tokens = check_max_tokens(max_tokens)
    checked_schema = check_schema(schema)
    check_placeholders(template, where="template")
    if texts["system"] is not None:
        check_placeholders(texts["system"], where="system prompt")
    return PromptFields(
        checked_name,
        template,
        texts["system"],
        texts["model"],
        checked_temperature,
        checked_max_tokens,
        texts["description"],
        checked_schema,
    )


def check_temperature(value: object) -> float | None:
    """A temperature as stored and sent (a float from 0 to 2), or None; InvalidSetting if not.

    The one range check for every entry point: saving, importing, the CLI, the magic, the
    runner, batches, the relay and ``run()``.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2:
        raise InvalidSetting("temperature", value, RULES["temperature"])
    return float(value)


def check_schema(value: object) -> str | None:
    """A prompt's JSON Schema as stored (canonical JSON text), or None; FieldError (key
    ``schema``) for a value that is not a JSON Schema (see ``_structured.schema_of``)."""
    if value is None:
        return None
    try:
        return canonical_schema(schema_of(value))
    except InvalidSchema as exc:
        raise FieldError(
            "schema", f"The schema {exc.reason}", "give a JSON Schema object"
        ) from None


def check_max_tokens(value: object) -> int | None:
    """Max tokens as sent (1 to MAX_TOKENS, or -1 for no limit), or None; InvalidSetting if not."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON's 200.0 is 200
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not (1 <= value <= MAX_TOKENS or value == -1)
    ):
        raise InvalidSetting("max_tokens", value, RULES["max_tokens"])
    return value


def kind(value: object) -> str:
    """How TOML (and a user) would name the type of ``value``."""
    kinds: list[tuple[type | tuple[type, ...], str]] = [
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (dict, "a table"),
        (list, "an array"),
        (datetime, "a date-time"),
    ]
    for cls, name in kinds:
        if isinstance(value, cls):
            return name
    if value is None:
        return "None"
    return f"a {type(value).__name__}"


# ---------------------------------------------------------------------------------------------
# A new version of a prompt


class Keep(enum.Enum):
    KEEP = "keep"

    def __repr__(self) -> str:
        return "KEEP"


#: "Not given": a new version takes this setting over from the version it revises.
KEEP = Keep.KEEP


@dataclass(frozen=True)
class Revision:
    """The settings of a new version, and which of them were taken over or cleared."""

    values: dict[str, object]
    carried: tuple[str, ...]  # not given, so taken over from the version revised
    dropped: tuple[str, ...]  # cleared (given as None) where the version revised had one


def revise(base: Mapping[str, object] | None, given: Mapping[str, object]) -> Revision:
    """The one rule for what a new version holds: a setting given wins (``None`` clears it), a
    setting not given (absent or ``KEEP``) is the one of ``base``, the version being revised.

    Every way of saving a version (``PromptStore.add`` and ``save``, ``lmstream prompts add``,
    ``%%lmstream --save``, the runner's Save, import) goes through here, so a user who changes
    only the template keeps the system prompt, model, temperature, max tokens and description.
    """
    values: dict[str, object] = {}
    carried: list[str] = []
    dropped: list[str] = []
    for key in SETTINGS:
        value = given.get(key, KEEP)
        old = None if base is None else base.get(key)
        if value is KEEP:
            values[key] = old
            if old is not None:
                carried.append(key)
        else:
            values[key] = value
            if value is None and old is not None:
                dropped.append(key)
    return Revision(values, tuple(carried), tuple(dropped))


def describe_setting(key: str, value: object) -> str:
    """A setting as a sentence names it: ``the system prompt``, ``temperature 0.2``."""
    if key in ("system", "description"):
        return "the system prompt" if key == "system" else "the description"
    if key == "schema":
        return "the schema"
    label = "max tokens" if key == "max_tokens" else key
    return f"{label} {value}"
