"""Helpers for the ``lmstream serve`` tests: a tiny SSE reader and the service over loopback.

The reader follows the event-stream rules the browser's EventSource uses (fields ``id``,
``event``, ``data``, ``retry``; lines starting with ``:`` are comments; a blank line ends an
event), so what the tests see is what a page would see.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from lmstream_nb import PromptStore
from lmstream_nb.serve import ServeHandle, serve

TIMEOUT = httpx.Timeout(10.0)


@dataclass
class SSE:
    event: str
    id: str | None
    data: str
    retry: int | None = None

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class SSEReader:
    """Feed it lines; it returns an event when a blank line ends one."""

    comments: list[str] = field(default_factory=list)
    last_id: str | None = None
    _event: str = ""
    _data: list[str] = field(default_factory=list)
    _id: str | None = None
    _retry: int | None = None
    _has: bool = False

    def feed(self, line: str) -> SSE | None:
        if line == "":
            if not self._has:
                return None
            event = SSE(self._event or "message", self._id, "\n".join(self._data), self._retry)
            self._event, self._data, self._id, self._retry, self._has = "", [], None, None, False
            return event
        if line.startswith(":"):
            self.comments.append(line[1:].strip())
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        self._has = True
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = self.last_id = value
        elif name == "retry":
            self._retry = int(value)
        return None


def parse(body: str) -> tuple[list[SSE], SSEReader]:
    reader = SSEReader()
    events = [e for line in body.split("\n") if (e := reader.feed(line)) is not None]
    return events, reader


def text_of(events: list[SSE], kind: str = "delta") -> str:
    return "".join(e.json()["text"] for e in events if e.event == kind)


def read_events(
    client: httpx.Client,
    url: str,
    *,
    last_id: str | None = None,
    stop: Callable[[list[SSE]], bool] | None = None,
    reader: SSEReader | None = None,
) -> tuple[list[SSE], SSEReader]:
    """Read an events stream to its end, or until ``stop(events)`` says so (then hang up)."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    reader = reader or SSEReader()
    events: list[SSE] = []
    with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            event = reader.feed(line)
            if event is not None:
                events.append(event)
                if stop is not None and stop(events):
                    break
    return events, reader


async def aread_events(
    client: httpx.AsyncClient, url: str, *, last_id: str | None = None
) -> list[SSE]:
    headers = {"Last-Event-ID": last_id} if last_id else {}
    reader = SSEReader()
    events: list[SSE] = []
    async with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            event = reader.feed(line)
            if event is not None:
                events.append(event)
    return events


@contextmanager
def service(store_path: Path, base_url: str, **kwargs: Any) -> Iterator[ServeHandle]:
    """The service over loopback on a free port, stopped at the end."""
    with serve(store=PromptStore(store_path), base_url=base_url, **kwargs) as handle:
        yield handle
