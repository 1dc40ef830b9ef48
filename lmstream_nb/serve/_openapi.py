"""The OpenAPI 3.1 description of the API, written by hand (it is small, and stays readable).

It is also the one statement of what a request may hold: ``_validate`` checks every request
against these very schemas (bounds, lengths, enums, the event-id pattern, the body limit), so
the description cannot promise what the server does not enforce, and a fuzzer reading it
(tests/serve/test_serve_fuzz.py) tries exactly the rules the server keeps. Each constraint is
built by a helper that also writes its ``description``: the phrase an error sentence uses
("a whole number from 1 to 1000"), so the rule and the words for it cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from .._history import STATUSES
from .._prompt_fields import MAX_NAME_LENGTH, MAX_TOKENS, RULES

#: SQLite's largest integer: run ids and versions are looked up as SQL parameters, which
#: cannot be larger (an id beyond it was an OverflowError deep in the store).
MAX_ID = 2**63 - 1
#: The most runs one history request returns.
MAX_HISTORY = 1000
#: Longest model id accepted (ids are paths such as "org/model-GGUF/model-Q4_K_M.gguf").
MAX_MODEL_LENGTH = 400
#: Variables in one run request, and the longest variable name.
MAX_VARIABLES = 256
MAX_VARIABLE_NAME = 200
#: Event ids are ``<phase>:<text offset>:<reasoning offset>`` (see ``_hub``).
EVENT_ID_PATTERN = r"^([sde]:[0-9]{1,12}:[0-9]{1,12})?$"
DEFAULT_MAX_BODY = 65536


def integer(minimum: int, maximum: int, **extra: Any) -> dict[str, Any]:
    return {
        "type": "integer",
        "minimum": minimum,
        "maximum": maximum,
        "description": f"a whole number from {minimum} to {maximum}",
        **extra,
    }


def text(max_length: int, min_length: int = 1) -> dict[str, Any]:
    return {
        "type": "string",
        "minLength": min_length,
        "maxLength": max_length,
        "description": f"text of {min_length} to {max_length} characters",
    }


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": "A malformed request: a parameter, header or body that breaks the rules here",
    "401": "The server has a token and the request did not carry it",
    "403": "Sent by a web page from an origin the server does not allow",
    "404": "No such prompt, run or route",
    "405": "The method is not allowed on this path",
    "409": "The run has already ended, or is not running in this server; or the "
    "conversation is still waiting for its previous answer",
    "413": "The request body is longer than the server accepts",
    "415": "A POST or DELETE without Content-Type: application/json",
    "421": "The Host header does not name this server (DNS rebinding is refused)",
    "422": "The variables do not fit the prompt's template, the schema is not a JSON Schema, "
    "or the conversation no longer fits the model's context",
    "502": "The model server refused the request or could not be reached",
    "503": "The database cannot be used right now",
}
#: Answers any operation can give, whatever it does.
_ALWAYS = ("400", "401", "403", "405", "421", "503")
#: Answers of the operations that change something (they carry a JSON body).
_CHANGES = ("413", "415")


def _responses(ok: dict[str, dict[str, Any]], *errors: str, body: bool = False) -> dict[str, Any]:
    codes = sorted({*_ALWAYS, *errors, *(_CHANGES if body else ())})
    return {**ok, **{code: _json(_ERRORS[code], _ref("Error")) for code in codes}}


def _body(schema: str, max_body: int, description: str) -> dict[str, Any]:
    return {
        "required": True,
        "description": f"{description} At most {max_body} bytes; the Content-Type must be "
        "application/json (a web page from another origin cannot send that without asking).",
        "content": {"application/json": {"schema": _ref(schema)}},
        "x-max-bytes": max_body,
    }


_RUN_ID = {
    "name": "run_id",
    "in": "path",
    "required": True,
    "schema": integer(1, MAX_ID),
}
_NAME = {"name": "name", "in": "path", "required": True, "schema": text(MAX_NAME_LENGTH)}
_EVENT_ID = {
    "type": "string",
    "pattern": EVENT_ID_PATTERN,
    "maxLength": 27,
    "description": "an event id this server sent, such as d:120:0 (or nothing)",
}

_EVENTS_DOC = """Server-Sent Events: `start` {run_id, prompt, version, model}, `delta` {text},
`reasoning` {text}, `status` {state: "waiting", elapsed} while no token has arrived, `progress`
{phase: "loading" | "prompt", fraction, elapsed_s, eta_s, processed, total, cached, title, facts}
while the server loads the model or processes the prompt (a few a second at most; `title` and
`facts` are the words to show, such as "processing prompt" and "43% · 3,512 / 8,140 tokens · 41 s ·
about 55 s left"; a client that reconnects then is sent the latest one at once); where the model
server reports nothing while it processes the prompt, `progress` {phase: "estimate", fraction,
elapsed_s, eta_s, expected_s, runs, title, facts} instead, once a second: an estimate of the wait
(`expected_s` seconds from the request to the first token) from `runs` earlier runs of the model
there, which a client may fill a bar against on its own clock (the bar never fills: the first token
ends it), sent only when enough runs back it; then `done` {status: "ok", finish_reason, stats,
text_length, parsed} (`parsed`, the answer's JSON value, only for a run that asked for a schema) or
`error` {status, message} (status `invalid_output`: the answer is not JSON matching the schema; the
message names the first failing place); the response ends after either. Every event has an id
`<phase>:<text offset>:<reasoning offset>`; the first carries `retry:`. Comment lines
`: keep-alive` go out every few seconds. Send `Last-Event-ID` (or `?last_event_id=`) to get exactly
what was missed, live or after the run ended, also after a restart, and also with an id ahead of
what the database holds (it lags up to a second behind what was sent: such a client gets the final
event); after the final event the answer is 204, which stops an EventSource."""

_RUN_DOC = """`variables` fill the template; `model`, `version`, `temperature` and `max_tokens`
override the prompt's. `schema` (else the prompt version's own, if it has one) asks for JSON
matching it: it is sent as `response_format` and the answer still streams; the final event
carries the parsed value, or the status `invalid_output`. `chat` makes the run the next turn of
that conversation (started by this request if it has no turns yet): the prompt, rendered, is the
next message, sent after the conversation's earlier turns; its system prompt counts on the first
turn only. A turn that failed is left out of the next context unless `include_failed` is true.
A conversation that no longer fits the model's context is refused with 422 before anything is
sent, unless `drop_oldest` is true, which leaves out as many of its oldest turns as needed (for
good); a turn sent while the previous one is still answering is refused with 409. Both
`drop_oldest` and `include_failed` apply only with `chat`."""

_INFO = """Run stored prompts against LM Studio and stream the answers.

When the server has a token, send `Authorization: Bearer TOKEN` or `?token=TOKEN`. The Host
header must name the server (127.0.0.1, localhost or [::1] with its port, or the address it was
started on), a request with an `Origin` header must come from the server's own page or an origin
it was started with (`--cors-origin`), and POST and DELETE need `Content-Type: application/json`,
so that no other web page can use a server on this machine. Every error is JSON
`{"error": "<one sentence>"}`."""


def openapi(max_body: int = DEFAULT_MAX_BODY) -> dict[str, Any]:
    """The description served at ``/api/openapi.json`` (``max_body``: the body limit in bytes)."""
    obj: dict[str, Any] = {"type": "object"}
    variable_value = {
        "type": ["string", "number", "boolean"],
        "description": "a string, a finite number or a boolean (not an object, array or null)",
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "lmstream serve", "version": "1", "description": _INFO},
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {"error": {"type": "string"}},
                    "required": ["error"],
                },
                "RunRequest": {
                    "type": "object",
                    "additionalProperties": False,
                    "description": 'a JSON object such as {"variables": {"name": "value"}}',
                    "properties": {
                        "variables": {
                            "type": "object",
                            "maxProperties": MAX_VARIABLES,
                            "propertyNames": text(MAX_VARIABLE_NAME),
                            "additionalProperties": variable_value,
                            "description": "a JSON object of names to values "
                            f"(at most {MAX_VARIABLES})",
                        },
                        "model": text(MAX_MODEL_LENGTH),
                        "version": integer(1, MAX_ID),
                        # The ranges every front end keeps (_prompt_fields), in its words.
                        "temperature": {
                            "type": "number",
                            "minimum": 0,
                            "maximum": 2,
                            "description": RULES["temperature"],
                        },
                        "max_tokens": {
                            "anyOf": [integer(1, MAX_TOKENS), {"const": -1}],
                            "description": RULES["max_tokens"],
                        },
                        "schema": {
                            "type": "object",
                            "description": "a JSON object: a JSON Schema the answer must match "
                            "(instead of the prompt's own)",
                        },
                        "chat": {
                            **text(MAX_NAME_LENGTH),
                            "description": "a conversation's name, "
                            f"{text(MAX_NAME_LENGTH)['description']}",
                        },
                        # Both mean nothing without "chat"; such a request is not refused, as
                        # the description allows it (the fuzz test holds the server to that).
                        "drop_oldest": {"type": "boolean", "description": "true or false"},
                        "include_failed": {"type": "boolean", "description": "true or false"},
                    },
                },
                "CancelRequest": {
                    "type": "object",
                    "additionalProperties": False,
                    "description": "an empty JSON object, {}",
                },
                "RunCreated": {
                    "type": "object",
                    "required": ["run_id", "events_url", "url"],
                    "properties": {
                        "run_id": {"type": "integer"},
                        "events_url": {"type": "string"},
                        "url": {"type": "string"},
                    },
                },
                "Cancelled": {
                    "type": "object",
                    "required": ["run_id", "status"],
                    "properties": {
                        "run_id": {"type": "integer"},
                        "status": {"const": "cancelled"},
                    },
                },
            },
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "query": {"type": "apiKey", "in": "query", "name": "token"},
            },
        },
        "paths": {
            "/": {
                "get": {
                    "summary": "The browser page",
                    "responses": _responses(
                        {"200": {"description": "HTML", "content": {"text/html": {}}}}
                    ),
                }
            },
            "/api/openapi.json": {
                "get": {
                    "summary": "This description",
                    "responses": _responses({"200": _json("OpenAPI 3.1", obj)}),
                }
            },
            "/api/prompts": {
                "get": {
                    "summary": "Stored prompts (latest versions)",
                    "responses": _responses({"200": _json("{prompts: [...]}", obj)}),
                }
            },
            "/api/prompts/{name}": {
                "get": {
                    "summary": "One prompt: latest version, its variables and every version number",
                    "parameters": [_NAME],
                    "responses": _responses({"200": _json("The prompt", obj)}, "404"),
                }
            },
            "/api/prompts/{name}/diff": {
                "get": {
                    "summary": "What changed from version a to version b (default: the latest)",
                    "description": "{old, new, changes: [{field, old, new}], unified}: every "
                    "field that differs (template, system prompt, schema, settings), with both "
                    "values, and the unified diff `lmstream prompts diff` prints.",
                    "parameters": [
                        _NAME,
                        {
                            "name": "a",
                            "in": "query",
                            "required": True,
                            "schema": integer(1, MAX_ID),
                        },
                        {"name": "b", "in": "query", "schema": integer(1, MAX_ID)},
                    ],
                    "responses": _responses({"200": _json("The differences", obj)}, "404"),
                }
            },
            "/api/prompts/{name}/runs": {
                "post": {
                    "summary": "Start a run; answers at once with its id and events URL",
                    "description": _RUN_DOC,
                    "parameters": [_NAME],
                    "requestBody": _body(
                        "RunRequest", max_body, "The variables and options of the run."
                    ),
                    "responses": _responses(
                        {"201": _json("{run_id, events_url, url}", _ref("RunCreated"))},
                        "404",
                        "409",
                        "422",
                        "502",
                        body=True,
                    ),
                }
            },
            "/api/models": {
                "get": {
                    "summary": "Model ids of the model server",
                    "responses": _responses({"200": _json("{models: [...]}", obj)}, "502"),
                }
            },
            "/api/runs": {
                "get": {
                    "summary": "Recorded runs, newest first (as `lmstream history --json`)",
                    "parameters": [
                        {"name": "prompt", "in": "query", "schema": text(MAX_NAME_LENGTH)},
                        {
                            "name": "status",
                            "in": "query",
                            "schema": {
                                "type": "string",
                                "enum": list(STATUSES),
                                "description": "one of " + ", ".join(STATUSES),
                            },
                        },
                        {"name": "model", "in": "query", "schema": text(MAX_MODEL_LENGTH)},
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": integer(1, MAX_HISTORY, default=50),
                        },
                    ],
                    "responses": _responses({"200": _json("{runs: [...]}", obj)}),
                }
            },
            "/api/runs/{run_id}": {
                "get": {
                    "summary": "One run in full",
                    "parameters": [_RUN_ID],
                    "responses": _responses({"200": _json("The run", obj)}, "404"),
                },
                "delete": {
                    "summary": "Cancel a running run",
                    "parameters": [_RUN_ID],
                    "requestBody": _body("CancelRequest", max_body, "Nothing: {}."),
                    "responses": _responses(
                        {"200": _json("{run_id, status: cancelled}", _ref("Cancelled"))},
                        "404",
                        "409",
                        body=True,
                    ),
                },
            },
            "/api/runs/{run_id}/events": {
                "get": {
                    "summary": "The run as Server-Sent Events",
                    "description": _EVENTS_DOC,
                    "parameters": [
                        _RUN_ID,
                        {"name": "Last-Event-ID", "in": "header", "schema": _EVENT_ID},
                        {"name": "last_event_id", "in": "query", "schema": _EVENT_ID},
                    ],
                    "responses": _responses(
                        {
                            "200": {
                                "description": "The event stream",
                                "content": {"text/event-stream": {}},
                            },
                            "204": {"description": "The client has seen the end already"},
                        },
                        "404",
                    ),
                }
            },
        },
        "security": [{}, {"bearer": []}, {"query": []}],
    }
