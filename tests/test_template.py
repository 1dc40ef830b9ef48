"""``{{variable}}`` templates and Prompt: all missing names at once, values inserted literally."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from lmstream_nb import run
from lmstream_nb._errors import (
    InvalidPlaceholder,
    InvalidVariables,
    MissingVariables,
    TemplateError,
    UnknownVariables,
)
from lmstream_nb._store import PromptStore
from lmstream_nb._template import Prompt, Template, check_placeholders, prompt_label


def one_sentence(message: str) -> None:
    assert "\n" not in message, message
    assert ": " in message, message
    assert message.endswith("."), message


def test_variables_are_listed_once_in_order_system_first() -> None:
    prompt = Prompt(
        template="Summarize {{ text }} for {{audience}}; again: {{text}}",
        system="You are {{role}} writing for {{audience}}.",
    )
    assert prompt.variables == ("role", "audience", "text")
    assert Template("{{a}} {{ b.c }} {{a}}").variables == ("a", "b.c")


def test_render_builds_system_and_user_messages() -> None:
    prompt = Prompt(template="Hi {{name}}", system="You are {{role}}.")
    assert prompt.render({"name": "Ada", "role": "kind"}) == [
        {"role": "system", "content": "You are kind."},
        {"role": "user", "content": "Hi Ada"},
    ]
    assert Prompt(template="no variables").render() == [{"role": "user", "content": "no variables"}]


def test_every_missing_variable_is_named_at_once() -> None:
    prompt = Prompt(template="{{b}} and {{a}}", system="{{c}}")
    with pytest.raises(MissingVariables) as caught:
        prompt.render({"a": 1})
    assert caught.value.names == ("b", "c")
    assert "b, c" in str(caught.value)
    assert "b=... c=..." in str(caught.value)


def test_unknown_variables_are_refused_unless_allowed() -> None:
    prompt = Prompt(template="Hello {{name}}")
    with pytest.raises(UnknownVariables) as caught:
        prompt.render({"name": "x", "nmae": "y"})
    assert caught.value.names == ("nmae",)
    assert "it uses name" in str(caught.value)
    assert prompt.render({"name": "x", "nmae": "y"}, allow_extra=True)[-1]["content"] == "Hello x"


def test_values_are_inserted_literally_never_re_expanded() -> None:
    prompt = Prompt(template="A={{a}} B={{b}}")
    content = prompt.render({"a": "{{b}}", "b": "\\{{a}}"})[-1]["content"]
    assert content == "A={{b}} B=\\{{a}}"


def test_escaped_double_braces_and_single_braces() -> None:
    template = Template('\\{{not_a_var}} {"json": {"k": 1}} f(x) = {x} {{v}}')
    assert template.variables == ("v",)
    assert template.render({"v": "ok"}) == '{{not_a_var}} {"json": {"k": 1}} f(x) = {x} ok'


def test_values_are_converted_with_str() -> None:
    assert Template("{{n}} {{f}}").render({"n": 3, "f": 0.5}) == "3 0.5"


def test_label_of_stored_and_inline_prompts() -> None:
    assert Prompt(template="x").label == "(inline)"
    assert Prompt(template="x", name="sum", version=3).label == "sum@3"


def test_a_10_mb_value_renders_and_round_trips_through_the_store(tmp_path: Path) -> None:
    big = ("lorem {{x}} ipsum \\{{ ünïcode ✓\n" * 300_000)[: 10 * 1024 * 1024]
    prompt = Prompt(template="Summarize:\n{{doc}}\nEnd.", system="Reader of {{kind}}")
    variables = {"doc": big, "kind": "reports"}
    start = time.perf_counter()
    messages = prompt.render(variables)
    assert time.perf_counter() - start < 5
    assert messages[-1]["content"] == f"Summarize:\n{big}\nEnd."
    with PromptStore(tmp_path / "big.db") as store:
        run_id = store.start_run(
            prompt_name=None,
            prompt_version=None,
            template=prompt.template,
            system=prompt.system,
            messages=messages,
            variables=variables,
            model=None,
            base_url="http://127.0.0.1:1/v1",
            started_at=time.time(),
        )
        record = store.get_run(run_id)
    assert record.messages == messages
    assert record.variables == variables
    assert record.system == "Reader of {{kind}}"


@pytest.mark.parametrize(
    ("text", "placeholder", "line"),
    [
        ("Hello {{my var}}!", "{{my var}}", 1),
        ("Hello {{ü}}", "{{ü}}", 1),
        ("first\nsecond {{1x}}", "{{1x}}", 2),
        ("{{}}", "{{}}", 1),
        ("{{   }}", "{{   }}", 1),
        ('JSON {{"k": 1}}', '{{"k": 1}}', 1),
        ("{{a{b}}", "{{a{b}}", 1),
        ("{{ok}} then {{not ok}} and {{bad too}}", "{{not ok}}", 1),
    ],
)
def test_a_placeholder_that_is_no_name_is_refused(text: str, placeholder: str, line: int) -> None:
    with pytest.raises(InvalidPlaceholder) as caught:
        Template(text).render({"ok": 1}, allow_extra=True)
    assert (caught.value.placeholder, caught.value.line) == (placeholder, line)
    assert placeholder in str(caught.value)
    assert f"line {line}" in str(caught.value)
    one_sentence(str(caught.value))
    with pytest.raises(InvalidPlaceholder):
        Prompt(template=text).render({"ok": 1}, allow_extra=True)
    # Listing what a (perhaps older, stored) template uses still works: only names count.
    assert "my var" not in Prompt(template=text).variables


@pytest.mark.parametrize(
    ("text", "shown", "line", "column"),
    [
        ("Hello {{name", "{{name", 1, 7),
        ("Hello {{name}", "{{name}", 1, 7),
        ("one\ntwo {{ x\n}}", "{{ x", 2, 5),
        ("{{ok}} and {{" + "a" * 40, "{{" + "a" * 21 + "…", 1, 12),
    ],
)
def test_an_unclosed_placeholder_is_refused_by_the_save_check_with_its_position(
    text: str, shown: str, line: int, column: int
) -> None:
    with pytest.raises(InvalidPlaceholder) as caught:
        check_placeholders(text)
    error = caught.value
    assert (error.placeholder, error.line, error.column, error.unclosed) == (
        shown,
        line,
        column,
        True,
    )
    assert f"{shown} at line {line}, column {column}" in str(error)
    assert "{{my_var}}" in str(error)  # the allowed form
    one_sentence(str(error))
    # Rendering keeps the documented rule (plain text), so older stored prompts still run.
    Template(text).render({"ok": 1, "x": 1}, allow_extra=True)


def test_an_escaped_or_closed_placeholder_passes_the_save_check() -> None:
    check_placeholders("\\{{ literal, {{x}}, {{{y}}}, \\{{ no close")


def test_a_bad_name_is_reported_with_its_column() -> None:
    with pytest.raises(InvalidPlaceholder) as caught:
        check_placeholders("ab\ncd {{ 1x }}")
    assert (caught.value.line, caught.value.column, caught.value.unclosed) == (2, 4, False)
    assert "{{ 1x }} at line 2, column 4" in str(caught.value)


def test_an_invalid_placeholder_in_the_system_prompt_says_so() -> None:
    with pytest.raises(InvalidPlaceholder, match=r"^The system prompt has") as caught:
        Prompt(template="{{x}}", system="You are {{a role}}.").render({"x": 1})
    assert isinstance(caught.value, TemplateError)


def test_valid_names_and_brace_runs() -> None:
    template = Template("{{a.b}} {{top-k}} {{ _x }} {{\tT9 }} {{{v}}} {{{{v}}}}")
    assert template.variables == ("a.b", "top-k", "_x", "T9", "v")
    values = {"a.b": 1, "top-k": 2, "_x": 3, "T9": 4, "v": "V"}
    assert template.render(values) == "1 2 3 4 {V} {{V}}"


@pytest.mark.parametrize(
    ("text", "rendered"),
    [
        ("\\{{x}}", "{{x}}"),  # an escaped placeholder is literal text
        ("\\\\{{x}}", "\\X"),  # an escaped backslash, then the value
        ("\\\\\\{{x}}", "\\{{x}}"),  # an escaped backslash, then a literal {{
        ("\\\\\\\\{{x}}", "\\\\X"),
        ("C:\\dir\\ {{x}} \\n \\\\", "C:\\dir\\ X \\n \\\\"),  # elsewhere: untouched
        ("a {{ b", "a {{ b"),  # no closing braces on the line: plain text
        ("a {{ b\n}}", "a {{ b\n}}"),
        ("\\{{ no close", "{{ no close"),
        ("{{x}}}", "X}"),
    ],
)
def test_backslashes_before_a_placeholder(text: str, rendered: str) -> None:
    assert Template(text).render({"x": "X"}, allow_extra=True) == rendered


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (None, "None"),
        ({"k": 1}, "a dict"),
        (["a"], "a list"),
        (b"bytes", "a bytes"),
        (object(), "an object"),
        ({1, 2}, "a set"),
    ],
)
def test_values_that_are_not_text_are_refused(value: object, kind: str) -> None:
    prompt = Prompt(template="Say {{x}} and {{y}}")
    with pytest.raises(InvalidVariables) as caught:
        prompt.render({"x": value, "y": "fine"})
    assert caught.value.names == ("x",)
    assert f"x ({kind})" in str(caught.value)
    one_sentence(str(caught.value))
    with pytest.raises(InvalidVariables):
        Template("{{x}}").render({"x": value})
    with pytest.raises(InvalidVariables):  # also a value nobody uses
        prompt.render({"x": 1, "y": 2, "z": value}, allow_extra=True)


def test_text_numbers_and_booleans_are_accepted() -> None:
    rendered = Template("{{s}} {{i}} {{f}} {{b}}").render({"s": "a", "i": 3, "f": 0.5, "b": True})
    assert rendered == "a 3 0.5 True"


def test_run_refuses_a_non_text_value_before_anything_is_recorded(tmp_path: Path) -> None:
    with PromptStore(tmp_path / "refuse.db") as store:
        with pytest.raises(InvalidVariables, match="x \\(None\\)"):
            # No server listens on port 9: the refusal comes before any request is made.
            run(Prompt("Say {{x}}"), {"x": None}, store=store, base_url="http://127.0.0.1:9/v1")
        assert store.history() == []


class CountingName(str):
    """A variable name that counts how often it is compared or hashed."""

    calls = 0

    def __eq__(self, other: object) -> bool:
        CountingName.calls += 1
        return str.__eq__(self, other)

    def __hash__(self) -> int:
        CountingName.calls += 1
        return str.__hash__(self)


def comparisons_to_render(count: int) -> int:
    names = [f"v{i}" for i in range(count)]
    prompt = Prompt(template=" ".join(f"{{{{{n}}}}}" for n in names), system="{{v0}}")
    values: dict[str, Any] = {CountingName(n): n for n in names}
    CountingName.calls = 0
    messages = prompt.render(values)
    Template(prompt.template).render(values)
    assert messages[-1]["content"] == " ".join(names)
    return CountingName.calls


def test_rendering_is_linear_in_the_number_of_placeholders() -> None:
    """Counts name comparisons, not time: a membership test on a tuple per name (as once) would
    make 4,000 placeholders cost about 8 million comparisons instead of a few per name."""
    small, large = comparisons_to_render(1000), comparisons_to_render(4000)
    assert large <= 20 * 4000, large  # two renders, a handful of look-ups per name each
    assert large <= 5 * small, (small, large)


def test_a_turn_is_labelled_with_its_conversation() -> None:
    assert prompt_label(None, None) == "(inline)"
    assert prompt_label(None, None, "lesson") == "chat lesson"
    assert prompt_label("tutor", 2, "lesson") == "tutor@2 (chat lesson)"
    assert prompt_label("tutor", None) == "tutor"
