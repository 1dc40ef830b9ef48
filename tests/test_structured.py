"""Schemas as given, checked, sent and matched: the pure half of structured output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmstream_nb import InvalidOutput, InvalidSchema
from lmstream_nb._structured import (
    canonical_schema,
    json_path,
    parse_answer,
    read_schema_arg,
    response_format,
    schema_of,
)

ITEMS = {
    "title": "Price list",
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "price": {"type": "number"}},
                "required": ["name", "price"],
            },
        }
    },
    "required": ["items"],
}


def test_a_dict_is_checked_and_canonical_text_reads_back_the_same() -> None:
    assert schema_of(ITEMS) == ITEMS
    text = canonical_schema(ITEMS)
    assert " " not in text.replace("Price list", "")
    assert schema_of(text) == ITEMS
    assert canonical_schema(json.loads(json.dumps(ITEMS, indent=4))) == text


def test_a_pydantic_model_class_gives_its_schema() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Item(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        name: str
        price: float

    schema = schema_of(Item)
    assert schema["properties"]["price"]["type"] == "number"
    assert schema["required"] == ["name", "price"]


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "is JSON an array, not an object"),
        ({"type": "nope"}, "is not a valid JSON Schema at $.type"),
        ({"properties": {"a": {"minimum": "zero"}}}, "at $.properties.a.minimum"),
        (42, "is 'int', not a dict"),
    ],
)
def test_what_is_not_a_schema_is_refused_in_one_sentence(value: object, said: str) -> None:
    with pytest.raises(InvalidSchema) as info:
        schema_of(value)
    message = str(info.value)
    assert said in message
    assert message.count(". ") == 0
    assert message.endswith(".")
    assert "Traceback" not in message


def test_the_argument_is_inline_json_or_a_file(tmp_path: Path) -> None:
    path = tmp_path / "items.json"
    path.write_text(json.dumps(ITEMS), encoding="utf-8")
    assert read_schema_arg(str(path)) == ITEMS
    assert read_schema_arg(' {"type": "object"}') == {"type": "object"}
    with pytest.raises(InvalidSchema, match="does not exist"):
        read_schema_arg(str(tmp_path / "missing.json"))
    path.write_text("{oops", encoding="utf-8")
    with pytest.raises(InvalidSchema, match=r"items\.json' is not valid JSON"):
        read_schema_arg(str(path))


def test_response_format_is_strict_json_schema_named_for_the_title() -> None:
    assert response_format(ITEMS) == {
        "type": "json_schema",
        "json_schema": {"name": "Price_list", "strict": True, "schema": ITEMS},
    }
    assert response_format({"type": "object"})["json_schema"]["name"] == "answer"


def test_an_answer_is_parsed_fences_allowed() -> None:
    answer = {"items": [{"name": "tea", "price": 2.5}]}
    assert parse_answer(json.dumps(answer), ITEMS) == answer
    assert parse_answer(f"```json\n{json.dumps(answer)}\n```", ITEMS) == answer


def test_a_mismatch_names_the_first_failing_path() -> None:
    text = json.dumps(
        {
            "items": [
                {"name": "a", "price": 1},
                {"name": "b", "price": 2},
                {"name": "c", "price": "x"},
            ]
        }
    )
    with pytest.raises(InvalidOutput) as info:
        parse_answer(text, ITEMS)
    assert info.value.path == "$.items[2].price"
    assert str(info.value).startswith(
        'The answer does not match the schema at $.items[2].price: "x" is not of type "number"'
    )
    assert info.value.text == text


def test_an_answer_that_is_not_json_fails_at_the_root() -> None:
    with pytest.raises(InvalidOutput) as info:
        parse_answer('{"items": [', ITEMS)
    assert info.value.path == "$"
    assert "is not valid JSON" in str(info.value)
    with pytest.raises(InvalidOutput, match="The answer is empty"):
        parse_answer("", ITEMS)


def test_json_paths_quote_odd_keys() -> None:
    assert json_path(["a", 0, "b c"]) == '$.a[0]["b c"]'
    assert json_path([]) == "$"
