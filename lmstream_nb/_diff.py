"""What changed between two versions of a prompt, as a value a terminal or a notebook can show.

Every field a version stores is compared except the ones that name it (its name, version and
the time it was saved), read from the prompts' dataclass itself: a field added to prompts
later (a JSON schema, say) is compared without a change here. Text is compared line by line
with the standard library's ``difflib`` in the unified format ``git diff`` prints, so the
output reads as a patch; any other value is one line (JSON, indented when nested).
"""

from __future__ import annotations

import dataclasses
import difflib
import html
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ._template import Prompt

#: Fields that say which version this is, not what it holds.
IDENTITY = frozenset({"name", "version", "created_at"})

# Colours as git shows a diff: headers bold, hunk ranges cyan, removed red, added green.
_ANSI = {"header": "\033[1m", "hunk": "\033[36m", "old": "\033[31m", "new": "\033[32m"}
_ANSI_RESET = "\033[m"
_HTML_STYLE = {
    "header": "font-weight: bold",
    "hunk": "color: var(--jp-mirror-editor-variable-2-color, #05a)",
    "old": "background: rgba(220, 40, 40, 0.15)",
    "new": "background: rgba(40, 170, 60, 0.15)",
    "same": "",
}
_BOX_STYLE = (
    "white-space: pre-wrap; word-break: normal; overflow-wrap: anywhere; "
    "font-family: var(--jp-code-font-family, monospace); "
    "font-size: var(--jp-code-font-size, 13px); line-height: var(--jp-code-line-height, 1.4)"
)


def compared_fields(*prompts: Prompt | type[Prompt]) -> tuple[str, ...]:
    """The fields a diff compares, in the order the dataclass declares them: those of
    ``prompts`` (default: of ``Prompt``), each once."""
    names = (f.name for p in prompts or (Prompt,) for f in dataclasses.fields(p))
    return tuple(dict.fromkeys(name for name in names if name not in IDENTITY))


def _lines(value: object) -> list[str]:
    """A field's value as lines: text split at line feeds only (so a final line feed shows as
    one more, empty, line), None as no lines, anything else as JSON."""
    if value is None:
        return []
    text = (
        value
        if isinstance(value, str)
        else json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    )
    return [line + "\n" for line in text.split("\n")]


def _shown(prompt: Prompt, keys: tuple[str, ...]) -> dict[str, Any]:
    """Each field as the user reads it (``as_dict``: a schema as JSON, not its stored text)."""
    values = prompt.as_dict()
    return {key: values[key] if key in values else getattr(prompt, key, None) for key in keys}


@dataclass(frozen=True)
class FieldChange:
    """One field that differs: its name and both values (``None`` where a version has none)."""

    field: str
    old: Any
    new: Any

    def hunks(self, old_label: str, new_label: str) -> Iterator[tuple[str, str]]:
        """(kind, line without its line feed) of this field's unified diff, headers first."""
        old_name, new_name = f"{old_label} {self.field}", f"{new_label} {self.field}"
        diff = difflib.unified_diff(_lines(self.old), _lines(self.new), old_name, new_name)
        for number, line in enumerate(diff):
            if number < 2:  # "--- old" and "+++ new" come first
                kind = "header"
            elif line.startswith("@@"):
                kind = "hunk"
            else:
                kind = {"-": "old", "+": "new"}.get(line[:1], "same")
            yield kind, line.removesuffix("\n")


@dataclass(frozen=True)
class PromptDiff:
    """What changed from ``old`` to ``new``: one ``FieldChange`` per field that differs.

    ``unified()`` is the text (a unified diff; coloured for a terminal with ``color=True``);
    a notebook shows it as HTML in which every piece of prompt text is escaped. With no
    change it says "No differences between …" instead. ``PromptStore.diff`` makes one.
    """

    old: Prompt
    new: Prompt
    changes: tuple[FieldChange, ...]

    @classmethod
    def between(cls, old: Prompt, new: Prompt) -> PromptDiff:
        """Compare two prompts field by field (see ``compared_fields``)."""
        keys = compared_fields(old, new)
        before, after = _shown(old, keys), _shown(new, keys)
        changes = tuple(
            FieldChange(key, before[key], after[key]) for key in keys if before[key] != after[key]
        )
        return cls(old, new, changes)

    @property
    def changed(self) -> tuple[str, ...]:
        """The names of the fields that differ."""
        return tuple(change.field for change in self.changes)

    def __bool__(self) -> bool:
        return bool(self.changes)

    def _rows(self) -> Iterator[tuple[str, str]]:
        if not self.changes:
            yield "same", f"No differences between {self.old.label} and {self.new.label}."
        for change in self.changes:
            yield from change.hunks(self.old.label, self.new.label)

    def unified(self, *, color: bool = False) -> str:
        """The diff as text, one field after another; ANSI colours only if ``color``."""
        if not color:
            return "".join(line + "\n" for _, line in self._rows())
        return "".join(
            f"{_ANSI[kind]}{line}{_ANSI_RESET}\n" if kind in _ANSI else line + "\n"
            for kind, line in self._rows()
        )

    def as_dict(self) -> dict[str, Any]:
        """The diff as JSON-ready data: both labels, each change with both values as the user
        reads them (a schema as JSON), and the unified text (for ``lmstream serve``)."""
        return {
            "old": self.old.label,
            "new": self.new.label,
            "changes": [{"field": c.field, "old": c.old, "new": c.new} for c in self.changes],
            "unified": self.unified(),
        }

    def __str__(self) -> str:
        return self.unified()

    def __repr__(self) -> str:
        what = ", ".join(self.changed) or "no differences"
        return f"<PromptDiff {self.old.label} -> {self.new.label}: {what}>"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # The notebook's text/plain twin and terminal IPython's display: the diff itself.
        printer.text(self.unified().removesuffix("\n"))

    def _repr_html_(self) -> str:
        rows = "".join(
            f'<div style="{_HTML_STYLE[kind]}">{html.escape(line) or "&nbsp;"}</div>'
            for kind, line in self._rows()
        )
        return f'<div class="lmstream-diff" style="{_BOX_STYLE}">{rows}</div>'
