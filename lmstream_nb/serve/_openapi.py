"""The OpenAPI 3.1 description of the API, written by hand (it is small, and stays readable)."""

from __future__ import annotations

from typing import Any

_ERROR = {
    "description": "An error, as one sentence",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_RUN_ID = {"name": "run_id", "in": "path", "required": True, "schema": {"type": "integer"}}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}

_EVENTS_DOC = """Server-Sent Events: `start` {run_id, prompt, version, model}, `delta` {text},
`reasoning` {text}, `status` {state: "waiting", elapsed} while no token has arrived, then `done`
{status: "ok", finish_reason, stats, text_length} or `error` {status, message}; the response ends
after either. Every event has an id `<phase>:<text offset>:<reasoning offset>`; the first carries
`retry:`. Comment lines `: keep-alive` go out every few seconds. Send `Last-Event-ID` (or
`?last_event_id=`) to get exactly what was missed, live or after the run ended; after the final
event the answer is 204, which stops an EventSource."""


def openapi() -> dict[str, Any]:
    """The description served at ``/api/openapi.json``."""
    obj: dict[str, Any] = {"type": "object"}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "lmstream serve",
            "version": "1",
            "description": "Run stored prompts against LM Studio and stream the answers. When "
            "the server has a token, send `Authorization: Bearer TOKEN` or `?token=TOKEN`.",
        },
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
                    "properties": {
                        "variables": {
                            "type": "object",
                            "additionalProperties": {"type": ["string", "number", "boolean"]},
                        },
                        "model": {"type": "string"},
                        "version": {"type": "integer", "minimum": 1},
                        "temperature": {"type": "number", "minimum": 0},
                        "max_tokens": {"type": "integer", "minimum": 1},
                    },
                },
            },
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/": {
                "get": {
                    "summary": "The browser page",
                    "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}},
                }
            },
            "/api/openapi.json": {
                "get": {
                    "summary": "This description",
                    "responses": {"200": _json("OpenAPI 3.1", obj)},
                }
            },
            "/api/prompts": {
                "get": {
                    "summary": "Stored prompts (latest versions)",
                    "responses": {"200": _json("{prompts: [...]}", obj)},
                }
            },
            "/api/prompts/{name}": {
                "get": {
                    "summary": "One prompt: latest version, its variables and every version number",
                    "parameters": [_NAME],
                    "responses": {"200": _json("The prompt", obj), "404": _ERROR},
                }
            },
            "/api/prompts/{name}/runs": {
                "post": {
                    "summary": "Start a run; answers at once with its id and events URL",
                    "parameters": [_NAME],
                    "requestBody": {
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/RunRequest"}
                            }
                        }
                    },
                    "responses": {
                        "201": _json("{run_id, events_url, url}", obj),
                        "400": _ERROR,
                        "404": _ERROR,
                        "413": _ERROR,
                        "422": _ERROR,
                        "502": _ERROR,
                    },
                }
            },
            "/api/models": {
                "get": {
                    "summary": "Model ids of the model server",
                    "responses": {"200": _json("{models: [...]}", obj), "502": _ERROR},
                }
            },
            "/api/runs": {
                "get": {
                    "summary": "Recorded runs, newest first (as `lmstream history --json`)",
                    "parameters": [
                        {"name": n, "in": "query", "schema": {"type": t}}
                        for n, t in (
                            ("prompt", "string"),
                            ("status", "string"),
                            ("model", "string"),
                            ("limit", "integer"),
                        )
                    ],
                    "responses": {"200": _json("{runs: [...]}", obj), "400": _ERROR},
                }
            },
            "/api/runs/{run_id}": {
                "get": {
                    "summary": "One run in full",
                    "parameters": [_RUN_ID],
                    "responses": {"200": _json("The run", obj), "404": _ERROR},
                },
                "delete": {
                    "summary": "Cancel a running run",
                    "parameters": [_RUN_ID],
                    "responses": {
                        "200": _json("{run_id, status: cancelled}", obj),
                        "404": _ERROR,
                        "409": _ERROR,
                    },
                },
            },
            "/api/runs/{run_id}/events": {
                "get": {
                    "summary": "The run as Server-Sent Events",
                    "description": _EVENTS_DOC,
                    "parameters": [
                        _RUN_ID,
                        {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
                        {"name": "last_event_id", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": {
                            "description": "The event stream",
                            "content": {"text/event-stream": {}},
                        },
                        "204": {"description": "The client has seen the end already"},
                        "400": _ERROR,
                        "404": _ERROR,
                    },
                }
            },
        },
        "security": [{}, {"token": []}],
    }
