"""The one boundary every request passes: its parameters and body checked against the OpenAPI
description the server publishes, before any handler sees them.

Why ``jsonschema``: OpenAPI 3.1 schemas are JSON Schema 2020-12, and ``jsonschema`` is the
well-kept reference implementation of it, so the very schemas in ``/api/openapi.json`` are what
is enforced (one source of truth; a hand-written check per field is how out-of-range ids and
lone surrogates slipped through before). Why not a whole OpenAPI request validator such as
openapi-core: it would bring a stack of dependencies for what is here a dozen parameters and
one body, and its messages are not the one sentence a user of this server gets.

What JSON Schema cannot say is done here, once, for every request:

- the address is UTF-8 once percent-decoded, and the body is UTF-8 JSON nested at most
  :data:`MAX_DEPTH` deep (deeper JSON was a RecursionError), with no ``NaN``/``Infinity``;
- a JSON string is Unicode text, so a lone surrogate (``"\\ud800"``, which SQLite and UTF-8
  cannot store) is not a ``string``, and a JSON number is finite (``1e400`` parses as
  infinity), which the type checker below enforces wherever the schemas say ``string`` or
  ``number``;
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

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

__all__ = ["MAX_DEPTH", "ApiError", "Operation", "Operations", "error_response"]

#: The deepest JSON nesting a body may have (a run request needs 2).
MAX_DEPTH = 32
_SURROGATE = re.compile("[\ud800-\udfff]")
_INTEGER = re.compile(r"-?[0-9]{1,40}")
_BASE = "urn:lmstream-serve:openapi"


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


def _is_text(checker: Any, instance: object) -> bool:
    return isinstance(instance, str) and _SURROGATE.search(instance) is None


def _is_number(checker: Any, instance: object) -> bool:
    base = Draft202012Validator.TYPE_CHECKER
    if not base.is_type(instance, "number"):
        return False
    return isinstance(instance, int) or math.isfinite(instance)  # type: ignore[arg-type]


#: JSON Schema 2020-12 where ``string`` means Unicode text and ``number`` a finite one.
_Checker = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine_many(
        {"string": _is_text, "number": _is_number}
    ),
)


def _shown(value: object) -> str:
    """A value as a sentence quotes it: short, and ASCII-safe for lone surrogates."""
    shown = repr(value) if isinstance(value, str) else json.dumps(value, default=repr)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _sentence(error: ValidationError, subject: str) -> str:
    """One sentence for the most relevant failure of ``subject`` (a parameter or the body)."""
    path = list(error.path)
    instance: Any = error.instance
    schema: Mapping[str, Any] = error.schema if isinstance(error.schema, Mapping) else {}
    if subject == "body":
        if error.validator == "additionalProperties" and not path:
            allowed = sorted(schema.get("properties", {}))
            unknown = sorted(set(instance) - set(allowed))
            use = f"use {', '.join(allowed)}" if allowed else "send {}"
            names = ", ".join(_shown(name) for name in unknown)
            return f"The request body has unknown field(s) {names}: {use}."
        if not path:
            what = schema.get("description") or "a JSON object"
            return f"The request body must be {what}."
        if path[0] == "variables" and len(path) == 2:
            subject = f"The variable {path[1]!r}"
        elif "propertyNames" in error.schema_path:
            subject = f"The variable name {_shown(instance)}"
        else:
            subject = f'"{path[0]}"'
    if error.validator == "type" and isinstance(instance, str) and _SURROGATE.search(instance):
        return (
            f"{subject} is not Unicode text (it holds a lone surrogate such as \\ud800): "
            "send text encoded as UTF-8."
        )
    if error.validator == "type" and isinstance(instance, float) and not math.isfinite(instance):
        return f"{subject} is too large a number: send a finite number."
    rule = schema.get("description")
    if rule is None:  # a schema without words for its rule: say what the validator said
        return f"{subject} is not valid ({error.message[:120]})."
    if "propertyNames" in error.schema_path:
        return f"{subject} is not valid: a variable name must be {rule}."
    return f"{subject} is {_shown(instance)}: it must be {rule}."


@dataclass(frozen=True)
class _Parameter:
    name: str
    where: str  # path, query or header
    required: bool
    integer: bool
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
        registry: Registry[Any],
        max_body: int,
    ) -> None:
        self.method = method.upper()
        self.max_body = max_body
        self.parameters = [
            _Parameter(
                name=p["name"],
                where=p["in"],
                required=bool(p.get("required")),
                integer=p["schema"].get("type") == "integer",
                validator=_Checker(p["schema"], registry=registry),
            )
            for p in spec.get("parameters", [])
        ]
        body = spec.get("requestBody")
        self.body = None
        if body is not None:
            schema = body["content"]["application/json"]["schema"]
            if "$ref" in schema:
                schema = {"$ref": _BASE + schema["$ref"]}
            self.body = _Checker(schema, registry=registry)

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
            error = best_match(parameter.validator.iter_errors(value))
            if error is not None:
                raise ApiError(400, _sentence(error, parameter.subject))
            args[parameter.name] = value
        if self.body is not None:
            _check_content_type(request, self.method)
            body = parse_json(await read_body(request, self.max_body))
            error = best_match(self.body.iter_errors(body))
            if error is not None:
                raise ApiError(400, _sentence(error, "body"))
            args["body"] = body
        return args


class Operations:
    """Every operation of a description, by ``(method, path template)``."""

    def __init__(self, description: Mapping[str, Any], max_body: int) -> None:
        resource: Resource[Any] = Resource.from_contents(
            description, default_specification=DRAFT202012
        )
        registry: Registry[Any] = Registry().with_resource(_BASE, resource)
        self._operations = {
            (method.upper(), path): Operation(method, spec, registry, max_body)
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


def _nesting_at_most(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return True


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
    if not _nesting_at_most(value, MAX_DEPTH):
        raise ApiError(400, too_deep)
    return value
