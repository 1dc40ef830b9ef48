"""Structured output: a json_schema response_format is answered with JSON that matches it,
the same for the same request, and ``schema_fault`` breaks it on purpose."""

from __future__ import annotations

import json

import jsonschema_rs
import pytest
from sim_helpers import chat_body, stream

from lmstream_nb.simulator._scenario import SCHEMA_FAULTS
from lmstream_nb.simulator._schema import schema_reply

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 12},
        "size": {"type": "integer", "minimum": 3, "maximum": 5},
        "price": {"type": ["number", "null"]},
        "kind": {"enum": ["a", "b"]},
        "fixed": {"const": None},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "minItems": 2},
        "open": {"type": "boolean"},
        "either": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
    },
    "required": ["name", "size", "tags"],
    "$defs": {"tag": {"type": "object", "properties": {"label": {"type": "string"}}}},
}


def response_format(schema: dict[str, object]) -> dict[str, object]:
    return {"type": "json_schema", "json_schema": {"name": "t", "strict": True, "schema": schema}}


def test_the_reply_matches_the_schema_and_is_seeded() -> None:
    messages = [{"role": "user", "content": "x"}]
    text = schema_reply(SCHEMA, 1, messages)
    value = json.loads(text)
    jsonschema_rs.validate(SCHEMA, value)
    assert len(value["tags"]) >= 2
    assert text == schema_reply(SCHEMA, 1, messages)
    other = [{"role": "user", "content": "y"}]
    assert any(schema_reply(SCHEMA, 1, [*other] * n) != text for n in range(1, 5))


@pytest.mark.parametrize("fault", SCHEMA_FAULTS)
def test_a_schema_fault_breaks_it(fault: str) -> None:
    text = schema_reply(SCHEMA, 1, None, fault)
    if fault == "invalid_json":
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
    else:
        assert not jsonschema_rs.is_valid(SCHEMA, json.loads(text))


def test_a_streamed_request_gets_the_json_in_pieces_and_is_recorded(sim, client) -> None:
    body = chat_body(response_format=response_format(SCHEMA), seed=4)
    result = stream(client, sim.base_url + "/chat/completions", body)
    text = result.text
    jsonschema_rs.validate(SCHEMA, json.loads(text))
    assert (
        sum(1 for c in result.chunks if c["choices"] and c["choices"][0]["delta"].get("content"))
        > 3
    )
    assert sim.chats()[-1].response_format == response_format(SCHEMA)
    assert stream(client, sim.base_url + "/chat/completions", body).text == text


def test_a_bad_schema_fault_is_refused(sim, client) -> None:
    body = chat_body(sim={"schema_fault": "sometimes"}, response_format=response_format(SCHEMA))
    response = client.post(sim.base_url + "/chat/completions", json=body)
    assert response.status_code == 400
    assert "schema_fault must be one of invalid_json, wrong_type" in response.text
