"""``{{variable}}`` templates and Prompt: all missing names at once, values inserted literally."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lmstream_nb._errors import MissingVariables, UnknownVariables
from lmstream_nb._store import PromptStore
from lmstream_nb._template import Prompt, Template


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
