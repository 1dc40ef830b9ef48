"""Answers to structured-output requests: JSON made to match a requested schema, or to break it.

A request with ``response_format: {"type": "json_schema", "json_schema": {"schema": ...}}`` is
answered with a value built from the schema (deterministic from the seed, the messages and
the schema), as a
server that constrains decoding would. The scenario's ``schema_fault`` breaks it on purpose:
``"invalid_json"`` cuts the text short, ``"wrong_type"`` puts a value of the wrong type at the
first property (or in place of the whole value), so clients can be tested on both failures.

Covered: ``type`` (one or a list), ``properties``, ``items``, ``enum``, ``const``, ``anyOf`` /
``oneOf`` / ``allOf`` (the first branch), local ``$ref`` (``#/$defs/...``, ``#/definitions/...``),
``minimum`` / ``maximum``, ``minItems`` / ``maxItems``, ``minLength``. Enough for the schemas a
test or a demo asks for; this is a simulator, not a JSON Schema engine.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

__all__ = ["requested_schema", "schema_reply"]

_WORDS = ("river", "garden", "lantern", "café", "kettle", "meadow", "harbor", "Zürich")
_DEPTH = 12


def requested_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The schema a /chat/completions body asks the answer to match, if it asks for one."""
    fmt = body.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return None
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    return schema if isinstance(schema, dict) else None


def schema_reply(
    schema: dict[str, Any], seed: int, messages: object = None, fault: str | None = None
) -> str:
    """The answer text for ``schema``: matching JSON, or broken as ``fault`` says. The same
    seed, messages and schema give the same answer; other messages another one."""
    material = json.dumps(
        [seed, messages, schema], sort_keys=True, ensure_ascii=False, default=repr
    )
    rng = random.Random(hashlib.sha256(material.encode()).hexdigest())
    value = _instance(schema, schema, rng, 0)
    if fault == "wrong_type":
        value = _break(value)
    text = json.dumps(value, ensure_ascii=False)  # ", " and ": " give word pieces to stream
    if fault == "invalid_json":
        text = text[: max(1, len(text) // 2)]
    return text


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return node
    target: Any = root
    for part in ref[2:].split("/"):
        target = target.get(part) if isinstance(target, dict) else None
    return target if isinstance(target, dict) else {}


def _instance(node: object, root: dict[str, Any], rng: random.Random, depth: int) -> Any:
    if not isinstance(node, dict) or depth > _DEPTH:
        return None
    node = _resolve(node, root)
    if "const" in node:
        return node["const"]
    if isinstance(node.get("enum"), list) and node["enum"]:
        return rng.choice(node["enum"])
    for key in ("anyOf", "oneOf", "allOf"):
        branches = node.get(key)
        if isinstance(branches, list) and branches:
            return _instance(branches[0], root, rng, depth + 1)
    kind = node.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in node else "array" if "items" in node else "string"
    if kind == "object":
        props = node.get("properties")
        props = props if isinstance(props, dict) else {}
        return {k: _instance(v, root, rng, depth + 1) for k, v in props.items()}
    if kind == "array":
        low = node.get("minItems", 1)
        high = node.get("maxItems", max(low, 3))
        count = rng.randint(low, max(low, min(high, low + 2)))
        return [_instance(node.get("items", {}), root, rng, depth + 1) for _ in range(count)]
    if kind == "integer":
        low = int(node.get("minimum", 0))
        return rng.randint(low, int(node.get("maximum", low + 100)))
    if kind == "number":
        low = float(node.get("minimum", 0))
        return round(rng.uniform(low, float(node.get("maximum", low + 100))), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    word = rng.choice(_WORDS)
    while len(word) < int(node.get("minLength", 0)):
        word += " " + rng.choice(_WORDS)
    return word


def _break(value: Any) -> Any:
    """``value`` with a wrong type at its first property (or in its place)."""
    if isinstance(value, dict) and value:
        first = next(iter(value))
        return {**value, first: 12345 if isinstance(value[first], str) else "not the right type"}
    return "not the right type" if not isinstance(value, str) else 12345
