"""The one boundary every request passes: its parameters and body checked against the OpenAPI
description the server publishes, before any handler sees them.

Why a JSON Schema library: OpenAPI 3.1 schemas are JSON Schema 2020-12, so the very schemas in
``/api/openapi.json`` are what is enforced (one source of truth; a hand-written check per field
is how out-of-range ids and lone surrogates slipped through before). Why ``jsonschema-rs``
rather than the pure-Python ``jsonschema``: measured here, importing ``jsonschema`` took 2-3 s
and 30 MB, because Jupyter installs it with its format extras and one of them builds a parser
at import time; ``jsonschema-rs`` (a well-kept Rust implementation, MIT, by the author of
schemathesis) imports in 25 ms for 5 MB and validates faster. Why not a whole OpenAPI request
validator such as openapi-core: a stack of dependencies for a dozen parameters and one body,
and its messages are not the one sentence a user of this server gets.

What JSON Schema cannot say is done here, once, for every request:

- the address is UTF-8 once percent-decoded, and the body is UTF-8 JSON nested at most
  :data:`MAX_DEPTH` deep (deeper JSON was a RecursionError), with no ``NaN``/``Infinity``;
- every string in the body is Unicode text, so a lone surrogate (``"\\ud800"``, which SQLite
  and UTF-8 cannot store) is refused, and every number is finite (``1e400`` parses as
  infinity), in one walk over the parsed body;
- query and path parameters arrive as text: those the schema calls integers are read as such
  (at most 40 digits) before the bounds are checked.

Every refusal is an :class:`ApiError`: a status and one sentence saying what was wrong and
what the rule is, built from the schema's own ``description``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

import jsonschema_rs
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from .._errors import InvalidSetting, render
from .._prompt_fields import RULES

__all__ = ["MAX_DEPTH", "ApiError", "Operation", "Operations", "error_response"]

_LONE = "a lone surrogate such as \\ud800"
_TEXT = "send text as UTF-8, or escape whole characters"
_SEND = 'send a JSON object such as {"variables": {"name": "value"}}'

#: The deepest JSON nesting a body may have (a run request needs 2).
MAX_DEPTH = 32
_SURROGATE = re.compile("[\ud800-\udfff]")
_INTEGER = re.compile(r"-?[0-9]{1,40}")


class ApiError(Exception):
    """An answer other than success: an HTTP status and one sentence."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """``{"error": message}``; ASCII-escaped, so no sentence can fail to encode."""
    body = json.dumps({"error": message}, ensure_ascii=True)
    return Response(
        body, status_code=status, headers=dict(headers or {}), media_type="application/json"
    )


def _resolve(description: Mapping[str, Any], schema: Mapping[str, Any]) -> Mapping[str, Any]:
    """A schema with its own ``$ref`` (``#/components/...``) looked up in the description."""
    while "$ref" in schema:
        target: Any = description
        for part in str(schema["$ref"]).removeprefix("#/").split("/"):
            target = target[part]
        schema = target
    return schema


def _validator(schema: Mapping[str, Any]) -> Any:
    return jsonschema_rs.validator_for(dict(schema))


def _first(errors: Iterable[Any]) -> Any:
    """The most telling error: the one highest in the instance (as jsonschema's best_match)."""
    return min(errors, key=lambda e: len(e.instance_path), default=None)


def _subschema(schema: Mapping[str, Any], keyword_path: list[Any]) -> Mapping[str, Any]:
    """The schema that holds the failing keyword (the last part of its path)."""
    target: Any = schema
    for part in keyword_path[:-1]:
        target = target[part]
    return target if isinstance(target, Mapping) else {}


def _shown(value: object) -> str:
    """A value as a sentence quotes it: short, and ASCII-safe for lone surrogates."""
    shown = repr(value) if isinstance(value, str) else json.dumps(value, default=repr)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _sentence(error: Any, schema: Mapping[str, Any], subject: str) -> str:
    """One sentence for a failure of ``subject`` (a parameter, or ``"body"``)."""
    path = list(error.instance_path)
    keyword_path = list(error.schema_path)
    keyword = type(error.kind).__name__
    instance: Any = error.instance
    rule_schema = _subschema(schema, keyword_path)
    if "propertyNames" in keyword_path:
        rule_of_names = _subschema(schema, keyword_path[: keyword_path.index("propertyNames") + 2])
        check = _validator(rule_of_names)
        bad = next((name for name in instance if not check.is_valid(name)), "")
        return (
            f"The variable name {_shown(bad)} is not valid: a variable name must be "
            f"{rule_of_names.get('description', 'text')}."
        )
    if subject == "body":
        if keyword == "AdditionalProperties" and not path:
            allowed = sorted(rule_schema.get("properties", {}))
            unknown = sorted(set(instance) - set(allowed))
            use = f"use {', '.join(allowed)}" if allowed else "send {}"
            names = ", ".join(_shown(name) for name in unknown)
            return f"The request body has unknown field(s) {names}: {use}."
        if not path:
            what = rule_schema.get("description") or "a JSON object"
            return f"The request body must be {what}."
        if len(path) == 1 and path[0] in RULES:  # a run setting: the words every front end uses
            return render(InvalidSetting(path[0], instance, RULES[path[0]]), "relay")
        if path[0] == "variables" and len(path) == 2:
            subject = f"The variable {path[1]!r}"
        else:
            subject = f'"{path[0]}"'
    rule = rule_schema.get("description")
    if rule is None:  # a schema without words for its rule: say what the validator said
        return f"{subject} is not valid ({error.message[:120]})."
    return f"{subject} is {_shown(instance)}: it must be {rule}."


def _at(path: tuple[str, ...]) -> str:
    return "at " + ".".join(path) if path else "at its top"


def _walk_problem(value: Any, limit: int) -> str | None:
    """What JSON Schema cannot say about a parsed body: too deep, not text, not finite."""
    stack: list[tuple[Any, int, tuple[str, ...]]] = [(value, 1, ())]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return f"holds a string that is not Unicode text {_at(path)} ({_LONE}): {_TEXT}"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"holds a number too large to be finite {_at(path)}: send a smaller one"
        elif isinstance(item, (dict, list)):
            if depth > limit:
                return f"nests JSON more than {limit} levels deep: {_SEND}"
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                if isinstance(key, str) and _SURROGATE.search(key):
                    return f"holds a name that is not Unicode text {_at(path)} ({_LONE}): {_TEXT}"
                name = key if isinstance(key, str) and key.isidentifier() else _shown(key)
                stack.append((child, depth + 1, (*path, name)))
    return None


@dataclass(frozen=True)
class _Parameter:
    name: str
    where: str  # path, query or header
    required: bool
    integer: bool
    schema: Mapping[str, Any]
    validator: Any

    @property
    def subject(self) -> str:
        if self.where == "header":
            return f"The {self.name} header"
        if self.where == "path":
            return f"The {self.name} in the path"
        return f"The query parameter {self.name}"


class Operation:
    """One operation of the description, compiled: what it accepts, checked in one call."""

    def __init__(
        self,
        method: str,
        spec: Mapping[str, Any],
        description: Mapping[str, Any],
        max_body: int,
    ) -> None:
        self.method = method.upper()
        self.max_body = max_body
        self.parameters = []
        for p in spec.get("parameters", []):
            schema = _resolve(description, p["schema"])
            self.parameters.append(
                _Parameter(
                    name=p["name"],
                    where=p["in"],
                    required=bool(p.get("required")),
                    integer=schema.get("type") == "integer",
                    schema=schema,
                    validator=_validator(schema),
                )
            )
        body = spec.get("requestBody")
        self.body_schema: Mapping[str, Any] | None = None
        self.body: Any = None
        if body is not None:
            self.body_schema = _resolve(description, body["content"]["application/json"]["schema"])
            self.body = _validator(self.body_schema)

    def _value(self, request: Request, parameter: _Parameter) -> str | None:
        if parameter.where == "path":
            value: str | None = request.path_params.get(parameter.name)
        elif parameter.where == "query":
            value = request.query_params.get(parameter.name)
        else:
            value = request.headers.get(parameter.name)
        return value

    async def check(self, request: Request) -> dict[str, Any]:
        """The request's parameters (and ``body``) as the handler gets them, or ApiError."""
        _check_address(request)
        args: dict[str, Any] = {}
        for parameter in self.parameters:
            raw = self._value(request, parameter)
            if raw is None:
                if parameter.required:
                    raise ApiError(400, f"{parameter.subject} is missing.")
                continue
            value: Any = raw
            if parameter.integer and _INTEGER.fullmatch(raw):
                value = int(raw)
            error = _first(parameter.validator.iter_errors(value))
            if error is not None:
                raise ApiError(400, _sentence(error, parameter.schema, parameter.subject))
            args[parameter.name] = value
        if self.body is not None and self.body_schema is not None:
            _check_content_type(request, self.method)
            body = parse_json(await read_body(request, self.max_body))
            error = _first(self.body.iter_errors(body))
            if error is not None:
                raise ApiError(400, _sentence(error, self.body_schema, "body"))
            args["body"] = body
        return args


class Operations:
    """Every operation of a description, by ``(method, path template)``."""

    def __init__(self, description: Mapping[str, Any], max_body: int) -> None:
        self._operations = {
            (method.upper(), path): Operation(method, spec, description, max_body)
            for path, item in description["paths"].items()
            for method, spec in item.items()
        }

    def __getitem__(self, key: tuple[str, str]) -> Operation:
        return self._operations[key]

    def __iter__(self) -> Iterable[tuple[str, str]]:
        return iter(self._operations)


def _check_address(request: Request) -> None:
    """The path and query string are UTF-8 once percent-decoded (servers decode them with
    replacement characters, which would turn a bad name into a different one)."""
    raw_path = request.scope.get("raw_path") or request.scope["path"].encode("utf-8")
    for what, raw in (("path", raw_path), ("query string", request.scope["query_string"])):
        try:
            unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(
                400,
                f"The request's {what} is not UTF-8 once percent-decoded: percent-encode "
                "names and values as UTF-8.",
            ) from None


def _check_content_type(request: Request, method: str) -> None:
    """POST and DELETE carry JSON: a web page on another site cannot send that type without
    the browser asking this server first (a CORS preflight), so it cannot trigger runs."""
    given = request.headers.get("content-type")
    media = (given or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        had = f"Content-Type {_shown(given)}" if given else "no Content-Type"
        raise ApiError(
            415,
            f"A {method} here needs 'Content-Type: application/json' and this one had {had}: "
            "send the body as JSON ({} when there is nothing to say).",
        )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes before reading them all."""
    length = request.headers.get("content-length")
    if length is not None and length.isascii() and length.isdigit() and int(length) > limit:
        raise ApiError(
            413,
            f"The request body has {length} bytes, more than the {limit} this server "
            "accepts: send fewer or shorter variables.",
        )
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(
                    413,
                    f"The request body is longer than the {limit} bytes this server accepts: "
                    "send fewer or shorter variables.",
                )
    except ClientDisconnect:
        raise ApiError(400, "The client went away before its request body was complete.") from None
    return bytes(body)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(body: bytes) -> Any:
    """A JSON body (an empty one is ``{}``), strictly: UTF-8, standard numbers, shallow."""
    if not body.strip():
        return {}
    example = 'send a JSON object such as {"variables": {"name": "value"}}'
    try:
        source = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(
            400, f"The request body is not UTF-8 (at byte {exc.start}): {example}."
        ) from None
    too_deep = f"The request body nests JSON more than {MAX_DEPTH} levels deep: {example}."
    try:
        value = json.loads(source, parse_constant=_refuse_constant)
    except RecursionError:
        raise ApiError(400, too_deep) from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"The request body is not valid JSON ({exc}): {example}.") from None
    except ValueError as exc:  # NaN, Infinity, or an integer of thousands of digits
        what = str(exc) if "JSON number" in str(exc) else "a number too long to read"
        raise ApiError(400, f"The request body is not valid JSON ({what}): {example}.") from None
    problem = _walk_problem(value, MAX_DEPTH)
    if problem is not None:
        raise ApiError(400, f"The request body {problem}.")
    return value
