"""PromptDiff: what changed between two versions, as text, coloured text and escaped HTML."""

from __future__ import annotations

import dataclasses
import html
import re

import pytest
from store_helpers import one_sentence, store_fixture  # noqa: F401 (the `store` fixture)

from lmstream_nb import Prompt, PromptDiff, PromptStore
from lmstream_nb._diff import compared_fields
from lmstream_nb._errors import PromptNotFound

ANSI = re.compile("\x1b\\[[0-9;]*m")


def test_every_stored_field_but_the_identity_is_compared() -> None:
    assert compared_fields() == (
        "template",
        "system",
        "model",
        "temperature",
        "max_tokens",
        "description",
        "schema",
    )


def test_a_field_added_to_prompts_joins_the_diff_unchanged() -> None:
    """A new field of a version is compared without a change to _diff."""

    @dataclasses.dataclass(frozen=True)
    class WithTags(Prompt):
        tags: dict[str, object] | None = None

    old = WithTags("Hi", name="p", version=1, tags={"team": "docs"})
    new = WithTags("Hi", name="p", version=2, tags={"team": "docs", "owners": ["x"]})
    diff = PromptDiff.between(old, new)
    assert diff.changed == ("tags",)
    text = diff.unified()
    assert "--- p@1 tags\n+++ p@2 tags\n" in text
    assert '+  "owners": [\n' in text, "a nested value is diffed as indented JSON lines"


def test_a_schema_is_diffed_as_indented_json() -> None:
    old = Prompt("Hi", name="p", version=1, schema={"type": "object"})
    new = Prompt("Hi", name="p", version=2, schema={"type": "object", "required": ["x"]})
    diff = PromptDiff.between(old, new)
    assert diff.changed == ("schema",)
    assert '+  "required": [\n' in diff.unified(), "the schema as JSON, not its stored text"


def test_the_store_diffs_two_versions_field_by_field(store: PromptStore) -> None:
    store.save("greet", "Hello {{name}}.\nBe brief.", temperature=0.2, model="m1")
    store.save("greet", "Hello {{name}}!\nBe brief.", temperature=0.7, system="You are kind.")
    diff = store.diff("greet", 1, 2)
    assert isinstance(diff, PromptDiff)
    assert diff.changed == ("template", "system", "temperature")
    assert [(c.field, c.old, c.new) for c in diff.changes][1:] == [
        ("system", None, "You are kind."),
        ("temperature", 0.2, 0.7),
    ]
    assert diff.unified() == (
        "--- greet@1 template\n"
        "+++ greet@2 template\n"
        "@@ -1,2 +1,2 @@\n"
        "-Hello {{name}}.\n"
        "+Hello {{name}}!\n"
        " Be brief.\n"
        "--- greet@1 system\n"
        "+++ greet@2 system\n"
        "@@ -0,0 +1 @@\n"
        "+You are kind.\n"
        "--- greet@1 temperature\n"
        "+++ greet@2 temperature\n"
        "@@ -1 +1 @@\n"
        "-0.2\n"
        "+0.7\n"
    )
    assert str(diff) == diff.unified()
    assert repr(diff) == "<PromptDiff greet@1 -> greet@2: template, system, temperature>"
    assert store.diff("greet", 1).changed == diff.changed, "B left out is the latest"


def test_a_long_template_shows_only_the_changed_lines_in_context(store: PromptStore) -> None:
    lines = [f"line {n}" for n in range(1, 41)]
    store.save("long", "\n".join(lines))
    lines[19] = "line twenty"
    store.save("long", "\n".join(lines))
    text = store.diff("long", 1, 2).unified()
    assert "@@ -17,7 +17,7 @@\n line 17\n line 18\n line 19\n-line 20\n+line twenty\n" in text
    assert "line 1\n" not in text
    assert "line 40" not in text


def test_a_final_line_feed_is_a_difference_too() -> None:
    old, new = Prompt("Hi", name="p", version=1), Prompt("Hi\n", name="p", version=2)
    diff = PromptDiff.between(old, new)
    assert diff.changed == ("template",)
    assert diff.unified().endswith("@@ -1 +1,2 @@\n Hi\n+\n")


def test_identical_versions_say_no_differences(store: PromptStore) -> None:
    store.save("same", "Hi {{x}}", model="m")
    diff = store.diff("same", 1, 1)
    assert not diff
    assert diff.changes == ()
    assert diff.unified() == "No differences between same@1 and same@1.\n"
    assert diff.unified(color=True) == diff.unified()
    assert repr(diff) == "<PromptDiff same@1 -> same@1: no differences>"
    assert "No differences between same@1 and same@1." in diff._repr_html_()


def test_colour_only_when_asked_and_the_text_stays_the_same() -> None:
    old = Prompt("one\ntwo", name="c", version=1)
    new = Prompt("one\nthree", name="c", version=2, max_tokens=50)
    diff = PromptDiff.between(old, new)
    assert "\x1b" not in diff.unified()
    coloured = diff.unified(color=True)
    assert "\x1b[31m-two\x1b[m\n" in coloured
    assert "\x1b[32m+three\x1b[m\n" in coloured
    assert "\x1b[1m--- c@1 template\x1b[m\n" in coloured
    assert "\x1b[36m@@ -1,2 +1,2 @@\x1b[m\n" in coloured
    assert ANSI.sub("", coloured) == diff.unified()


def test_html_escapes_every_piece_of_prompt_text() -> None:
    old = Prompt('<script>alert("a")</script>', name="x<b>", version=1)
    new = Prompt("<img src=x onerror=alert(1)> & done", name="x<b>", version=2, model="<i>m</i>")
    page = PromptDiff.between(old, new)._repr_html_()
    for markup in ("<script", "<img", "<b>", "<i>"):
        assert markup not in page
    assert html.escape('-<script>alert("a")</script>') in page
    assert html.escape("+<img src=x onerror=alert(1)> & done") in page
    assert html.escape("--- x<b>@1 template") in page
    assert page.startswith('<div class="lmstream-diff"')


def test_unknown_name_or_version_is_prompt_not_found(store: PromptStore) -> None:
    store.save("greet", "Hi")
    with pytest.raises(PromptNotFound) as missing_version:
        store.diff("greet", 1, 9)
    assert missing_version.value.version == 9
    one_sentence(str(missing_version.value))
    with pytest.raises(PromptNotFound) as missing_name:
        store.diff("gret", 1, 2)
    assert missing_name.value.suggestions == ("greet",)
    one_sentence(str(missing_name.value))
