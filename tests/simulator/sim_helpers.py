"""Helpers shared by the simulator tests: request bodies and a plain SSE reader."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

MODEL = "lmstream-sim-8b"
EMBED_MODEL = "lmstream-sim-embed"
TIMEOUT = httpx.Timeout(10.0)


def chat_body(
    content: str = "Say something.", *, sim: dict[str, Any] | None = None, **fields: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    if sim is not None:
        body["sim"] = sim
    body.update(fields)
    return body


def native_body(
    input: str | list[dict[str, Any]] = "Say something.",
    *,
    sim: dict[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A request body for LM Studio's native ``POST /api/v1/chat``."""
    body: dict[str, Any] = {"model": MODEL, "input": input}
    if sim is not None:
        body["sim"] = sim
    body.update(fields)
    return body


@dataclass
class Event:
    """One SSE event as the tests read it: an optional event name and its joined data."""

    data: str
    event: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class StreamResult:
    status: int
    headers: httpx.Headers
    raw: bytes
    events: list[Event] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # monotonic time of each data event
    started: float = 0.0

    @property
    def chunks(self) -> list[dict[str, Any]]:
        """The JSON data events (not [DONE], not error frames)."""
        return [e.json() for e in self.events if e.event is None and e.data != "[DONE]"]

    @property
    def text(self) -> str:
        return "".join(
            c["choices"][0]["delta"].get("content") or "" for c in self.chunks if c["choices"]
        )

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.started


def parse_sse(raw: bytes) -> tuple[list[Event], list[str]]:
    """A deliberately plain SSE reader for LF-framed test streams."""
    events: list[Event] = []
    comments: list[str] = []
    for block in raw.decode("utf-8").split("\n\n"):
        data: list[str] = []
        name = None
        for line in block.split("\n"):
            if line.startswith(":"):
                comments.append(line)
            elif line.startswith("data: "):
                data.append(line[6:])
            elif line.startswith("event: "):
                name = line[7:]
        if data:
            events.append(Event("\n".join(data), name))
    return events, comments


def stream(
    client: httpx.Client, url: str, body: dict[str, Any], *, time_events: bool = False
) -> StreamResult:
    """POST a streaming request and read it to the end, noting when each data event arrived."""
    started = time.monotonic()
    with client.stream("POST", url, json={**body, "stream": True}) as response:
        raw = bytearray()
        arrivals: list[float] = []
        for piece in response.iter_raw():
            if time_events:
                now = time.monotonic()
                arrivals.extend(now for _ in range(piece.count(b"data: ")))
            raw += piece
        result = StreamResult(response.status_code, response.headers, bytes(raw), started=started)
    result.events, result.comments = parse_sse(result.raw)
    result.arrivals = arrivals
    return result
