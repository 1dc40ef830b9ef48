"""``{{variable}}`` templates: list the variables, render with values, refuse what is missing.

The rules, which the README repeats:

* ``{{`` starts a placeholder that ends at the next ``}}`` on the same line (at most 256
  characters later; spaces and tabs inside the braces are ignored). What is inside must be a
  variable name: ASCII letters, digits, ``_``, ``.`` and ``-``, starting with a letter or
  ``_`` (``{{doc}}``, ``{{user.name}}``, ``{{top-k}}``). ``{{my var}}``, ``{{ü}}``, ``{{1x}}`` and
  ``{{}}`` are refused with ``InvalidPlaceholder`` instead of being sent as typed. Names stay
  ASCII because they are typed on command lines (``--var name=...``) and in JSON, where a
  look-alike letter from another script would make two names that read the same.
* In a run of three or more ``{``, the placeholder starts at the last two, so ``{{{x}}}`` is
  the value in single braces. A ``{{`` with no ``}}`` after it on its line is plain text when
  a template is rendered, but saving a prompt refuses it (``check_placeholders(strict=True)``):
  an unclosed ``{{x`` in a stored prompt is a typo far more often than meant, and stored
  prompts are where a typo would otherwise be kept and sent unnoticed.
* Before a ``{{``, ``\\{{`` writes a literal ``{{`` and ``\\\\`` writes one backslash, so
  ``\\\\{{x}}`` is a backslash followed by the value. Backslashes anywhere else are plain text.
* Values are inserted as they are and never read again, so a value that itself contains
  ``{{x}}`` stays as typed, and nothing in a template or value can run code or read files.
  A value must be text, a number or a boolean (``str(value)`` is inserted); ``None``, dicts,
  lists, bytes and other objects are refused, as ``lmstream serve`` refuses them. An empty
  value is a value, in every front end alike: it is inserted as nothing (an optional part
  of a prompt, a blank cell in a batch file); only a value that is missing is refused.

A template is parsed once into literal pieces and names, so rendering is one join, linear in
the length of the text and in the number of placeholders.
"""

from __future__ import annotations

import functools
import json
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._errors import InvalidPlaceholder, InvalidVariables, MissingVariables, UnknownVariables
from ._structured import canonical_schema, schema_of

# The opening braces (the last two of a run of "{"), then optionally the inside and "}}".
# The inside may not contain "{{" or "}}" and is bounded, so scanning stays linear.
_PLACEHOLDER = re.compile(r"\{\{(?!\{)(?:[ \t]*((?:(?!\{\{|\}\})[^\n]){0,256}?)[ \t]*\}\})?")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def variable_text(name: str, value: object) -> str:
    """The text a variable's value is rendered as; InvalidVariables for a non-text value."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, numbers.Real)):
        return str(value)
    raise InvalidVariables({name: value})


def _texts(values: Mapping[str, Any]) -> dict[str, str]:
    texts: dict[str, str] = {}
    bad: dict[str, object] = {}
    for name, value in values.items():
        try:
            texts[name] = variable_text(name, value)
        except InvalidVariables:
            bad[name] = value
    if bad:
        raise InvalidVariables(bad)
    return texts


class Template:
    """A prompt text with ``{{name}}`` placeholders (whitespace inside the braces allowed)."""

    __slots__ = ("_invalid", "_parts", "_unclosed", "text", "variables")

    def __init__(self, text: str) -> None:
        self.text = text
        # Literal text at even indices, variable names at odd ones.
        parts: list[str] = []
        literal: list[str] = []
        seen: dict[str, None] = {}
        # The first bad placeholder and the first unclosed "{{": (text, line, column).
        self._invalid: tuple[str, int, int] | None = None
        self._unclosed: tuple[str, int, int] | None = None
        pos = 0
        for match in _PLACEHOLDER.finditer(text):
            start = match.start()
            slashes = start
            while slashes > pos and text[slashes - 1] == "\\":
                slashes -= 1
            count = start - slashes
            literal.append(text[pos:slashes])
            literal.append("\\" * (count // 2))
            inside = match.group(1)
            if count % 2 or inside is None:  # escaped, or no closing braces: plain text
                if not count % 2 and self._unclosed is None:
                    end = text.find("\n", start)
                    rest = text[start : end if end >= 0 else len(text)]
                    shown = rest if len(rest) <= 24 else rest[:23] + "…"
                    self._unclosed = (shown, *_position(text, start))
                literal.append(match.group())
            elif _NAME.fullmatch(inside):
                parts.append("".join(literal))
                parts.append(inside)
                literal = []
                seen.setdefault(inside, None)
            else:
                if self._invalid is None:
                    self._invalid = (match.group(), *_position(text, start))
                literal.append(match.group())
            pos = match.end()
        literal.append(text[pos:])
        parts.append("".join(literal))
        self._parts = parts
        self.variables: tuple[str, ...] = tuple(seen)

    def __repr__(self) -> str:
        return f"Template(variables={list(self.variables)!r})"

    def check(self, where: str = "template", *, strict: bool = False) -> None:
        """Raise InvalidPlaceholder if a ``{{...}}`` holds something that is not a name, and,
        when ``strict`` (saving), if a ``{{`` is not closed on its line."""
        if self._invalid is not None:
            placeholder, line, column = self._invalid
            raise InvalidPlaceholder(placeholder, line=line, column=column, where=where)
        if strict and self._unclosed is not None:
            placeholder, line, column = self._unclosed
            raise InvalidPlaceholder(
                placeholder, line=line, column=column, where=where, unclosed=True
            )

    def render(self, values: Mapping[str, Any] | None = None, *, allow_extra: bool = False) -> str:
        """The text with every placeholder replaced by ``str(value)``.

        Raises InvalidPlaceholder for a placeholder that is not a name, MissingVariables
        naming every placeholder without a value, UnknownVariables (unless ``allow_extra``)
        for values the template does not use, and InvalidVariables for values that are not
        text, numbers or booleans.
        """
        self.check()
        values = values or {}
        _check_names(self.variables, values, allow_extra=allow_extra)
        return self._fill(_texts(values))

    def _fill(self, texts: Mapping[str, str]) -> str:
        parts = self._parts
        out = parts.copy()
        for i in range(1, len(parts), 2):
            out[i] = texts[parts[i]]
        return "".join(out)


def _check_names(used: tuple[str, ...], values: Mapping[str, Any], *, allow_extra: bool) -> None:
    missing = [name for name in used if name not in values]
    if missing:
        raise MissingVariables(missing)
    if not allow_extra:
        known = frozenset(used)
        extra = [name for name in values if name not in known]
        if extra:
            raise UnknownVariables(extra, used)


def _position(text: str, index: int) -> tuple[int, int]:
    """The 1-based line and column of ``text[index]``."""
    line_start = text.rfind("\n", 0, index) + 1
    return text.count("\n", 0, index) + 1, index - line_start + 1


def check_placeholders(text: str, *, where: str = "template", strict: bool = True) -> None:
    """Raise InvalidPlaceholder if ``text`` has a placeholder that is not a variable name or,
    when ``strict`` (the default: this is the check for saving), a ``{{`` left unclosed."""
    Template(text).check(where, strict=strict)


@dataclass(frozen=True)
class Prompt:
    """A prompt: a template, an optional system prompt, and the settings to run it with
    (the model, temperature, max tokens and the JSON Schema the answer must match).

    A prompt read from a ``PromptStore`` has a ``name`` and ``version``; one made in code (or
    from a notebook cell) has neither and is recorded with its literal template.
    """

    template: str
    system: str | None = None
    name: str | None = None
    version: int | None = None
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    description: str | None = None
    created_at: float | None = None  # unix time the version was saved
    #: The JSON Schema the answer must match, as canonical JSON text, or None. A dict or a
    #: pydantic model class may be given: it is checked and kept as that text.
    schema: str | None = None

    def __post_init__(self) -> None:
        given: object = self.schema  # a dict or a model class too, despite the annotation
        if given is not None and not isinstance(given, str):
            object.__setattr__(self, "schema", canonical_schema(schema_of(given)))

    @functools.cached_property
    def _templates(self) -> tuple[Template | None, Template]:
        """The system prompt and the template, parsed once per Prompt."""
        return (Template(self.system) if self.system else None, Template(self.template))

    @property
    def variables(self) -> tuple[str, ...]:
        """Placeholders of the system prompt, then of the template, each once, in order."""
        seen: dict[str, None] = {}
        for template in self._templates:
            if template is not None:
                seen.update(dict.fromkeys(template.variables))
        return tuple(seen)

    @property
    def label(self) -> str:
        """``name@version`` for a stored prompt, else ``(inline)`` (see :func:`prompt_label`)."""
        return prompt_label(self.name, self.version)

    def as_dict(self) -> dict[str, Any]:
        """Every field and the variables, as JSON-ready data (``--json`` and the web API)."""
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "model": self.model,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "system": self.system,
            "template": self.template,
            "schema": None if self.schema is None else json.loads(self.schema),
            "variables": list(self.variables),
            "created_at": self.created_at,
        }

    def render(
        self, variables: Mapping[str, Any] | None = None, *, allow_extra: bool = False
    ) -> list[dict[str, str]]:
        """The chat messages with every placeholder filled (system message first, if any).

        Every missing variable is named at once; values the prompt does not use are refused
        unless ``allow_extra``; a placeholder that is not a name and a value that is not text,
        a number or a boolean are refused too (see the module docstring for the rules).
        """
        system, user = self._templates
        if system is not None:
            system.check("system prompt")
        user.check()
        values = dict(variables or {})
        _check_names(self.variables, values, allow_extra=allow_extra)
        texts = _texts(values)
        messages: list[dict[str, str]] = []
        if system is not None:
            messages.append({"role": "system", "content": system._fill(texts)})
        messages.append({"role": "user", "content": user._fill(texts)})
        return messages


def prompt_label(name: str | None, version: int | None, conversation: str | None = None) -> str:
    """How a prompt, or the prompt a run used, is named on screen: ``name@version``, ``name``
    when the version is not known, ``(inline)`` for a template that was never stored; a turn
    of a conversation says so: ``chat NAME`` for a typed message, ``tutor@1 (chat NAME)``.

    The one label for the CLI, the magic, the runner and run results, so a run reads the same
    wherever it is listed.
    """
    if not name:
        return "(inline)" if conversation is None else f"chat {conversation}"
    label = name if version is None else f"{name}@{version}"
    return label if conversation is None else f"{label} (chat {conversation})"


_VERSION_SUFFIX = re.compile(r"@([0-9]+)\Z")


def parse_version_ref(text: str) -> tuple[str, int | None]:
    """``NAME@N`` as (name, N); a text without an ``@`` and a number at its end is a name
    alone (the latest version). The one reading of a version reference, for Python, the magic
    and the CLI; a name may hold ``@`` itself (``team@work``), so only a trailing number counts.
    """
    found = _VERSION_SUFFIX.search(text)
    if found is None or found.start() == 0:
        return text, None
    return text[: found.start()], int(found.group(1))
