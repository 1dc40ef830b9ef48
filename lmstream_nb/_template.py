"""``{{variable}}`` templates: list the variables, render with values, refuse what is missing.

Rendering is one pass over the template: a value is inserted as it is and never read again,
so a value that itself contains ``{{x}}`` stays as typed, and nothing in a template or value
can run code or read files. ``\\{{`` writes a literal ``{{``. Single braces are ordinary text,
so code, JSON and LaTeX in a prompt need no escaping.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._errors import MissingVariables, UnknownVariables

_TOKEN = re.compile(r"\\\{\{|\{\{\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*\}\}")


class Template:
    """A prompt text with ``{{name}}`` placeholders (whitespace inside the braces allowed)."""

    __slots__ = ("text", "variables")

    def __init__(self, text: str) -> None:
        self.text = text
        seen: dict[str, None] = {}
        for match in _TOKEN.finditer(text):
            name = match.group(1)
            if name is not None:
                seen.setdefault(name, None)
        self.variables: tuple[str, ...] = tuple(seen)

    def __repr__(self) -> str:
        return f"Template(variables={list(self.variables)!r})"

    def render(self, values: Mapping[str, Any] | None = None, *, allow_extra: bool = False) -> str:
        """The text with every placeholder replaced by ``str(value)``.

        Raises MissingVariables naming every placeholder without a value, and (unless
        ``allow_extra``) UnknownVariables for values the template does not use.
        """
        values = values or {}
        missing = [name for name in self.variables if name not in values]
        if missing:
            raise MissingVariables(missing)
        if not allow_extra:
            extra = [name for name in values if name not in self.variables]
            if extra:
                raise UnknownVariables(extra, self.variables)

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            return "{{" if name is None else str(values[name])

        return _TOKEN.sub(substitute, self.text)


@dataclass(frozen=True)
class Prompt:
    """A prompt: a template, an optional system prompt, and the settings to run it with.

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

    @property
    def variables(self) -> tuple[str, ...]:
        """Placeholders of the system prompt, then of the template, each once, in order."""
        seen: dict[str, None] = {}
        for text in (self.system, self.template):
            if text:
                for name in Template(text).variables:
                    seen.setdefault(name, None)
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
            "variables": list(self.variables),
            "created_at": self.created_at,
        }

    def render(
        self, variables: Mapping[str, Any] | None = None, *, allow_extra: bool = False
    ) -> list[dict[str, str]]:
        """The chat messages with every placeholder filled (system message first, if any).

        Every missing variable is named at once; values the prompt does not use are refused
        unless ``allow_extra``.
        """
        values = dict(variables or {})
        used = self.variables
        missing = [name for name in used if name not in values]
        if missing:
            raise MissingVariables(missing)
        if not allow_extra:
            extra = [name for name in values if name not in used]
            if extra:
                raise UnknownVariables(extra, used)
        messages: list[dict[str, str]] = []
        if self.system:
            system = Template(self.system).render(values, allow_extra=True)
            messages.append({"role": "system", "content": system})
        user = Template(self.template).render(values, allow_extra=True)
        messages.append({"role": "user", "content": user})
        return messages


def prompt_label(name: str | None, version: int | None) -> str:
    """How a prompt, or the prompt a run used, is named on screen: ``name@version``, ``name``
    when the version is not known, ``(inline)`` for a template that was never stored.

    The one label for the CLI, the magic, the runner and run results, so a run reads the same
    wherever it is listed.
    """
    if not name:
        return "(inline)"
    return name if version is None else f"{name}@{version}"
