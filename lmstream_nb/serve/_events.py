"""``GET /api/runs/{id}/events``: a run as Server-Sent Events that a browser's EventSource reads.

Written as a plain ASGI endpoint rather than a ``StreamingResponse`` because it has to own each
``send``: a send that the client's socket does not accept within ``slow_client_limit`` seconds
(uvicorn's ``send`` waits while the connection's write buffer is full) means a stalled client,
whose connection is then dropped. It can come back with ``Last-Event-ID``.

Ids are ``<phase>:<text offset>:<reasoning offset>`` (see ``_hub``), so a reconnecting client
gets exactly the text after its offsets: from the hub while the run is live, from the store
after it ended. No text is lost or repeated, whichever happened in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from .._errors import RunNotFound
from .._events import PromptEstimate
from .._outcome import DONE, view_state
from .._progress import Shown, progress_facts, progress_title
from .._store import RunRecord
from ._hub import BadCursor, Cursor, Hub, Listener, LiveRun, Outcome, Text, outcome_of

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class SlowClient(Exception):
    """The client did not accept a write within the limit."""


class _Writer:
    """Formats events and sends them, each within the slow-client limit."""

    def __init__(self, send: Send, *, limit: float, retry_ms: int) -> None:
        self._send = send
        self._limit = limit
        self._retry = f"retry: {retry_ms}\n"
        self.sent_at = time.monotonic()

    async def event(self, name: str, data: dict[str, Any], event_id: str) -> None:
        payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        # Only the first event carries retry:; JSON never contains a raw line break.
        body = f"{self._retry}id: {event_id}\nevent: {name}\ndata: {payload}\n\n"
        self._retry = ""
        await self._write(body.encode("utf-8"))

    async def comment(self, text: str) -> None:
        await self._write(f": {text}\n\n".encode())

    async def _write(self, body: bytes) -> None:
        try:
            await asyncio.wait_for(
                self._send({"type": "http.response.body", "body": body, "more_body": True}),
                self._limit,
            )
        except asyncio.TimeoutError:
            raise SlowClient from None
        self.sent_at = time.monotonic()

    async def end(self) -> None:
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})


@dataclass(frozen=True)
class StreamSettings:
    keepalive: float
    status_interval: float
    slow_client_limit: float
    retry_ms: int
    max_event_chars: int


def start_data(
    run_id: int, prompt: str | None, version: int | None, model: str | None
) -> dict[str, Any]:
    return {"run_id": run_id, "prompt": prompt, "version": version, "model": model}


#: Seconds between ``progress`` events that resend an estimate while the prompt is processed:
#: the server sends nothing to move it, so its words (time so far, time left) are sent again.
ESTIMATE_INTERVAL = 1.0


def progress_data(event: Shown) -> dict[str, Any]:
    """A ``progress`` event's data: the figures, and the words every front end shows."""
    data = event.as_dict()
    del data["event"]
    data["title"] = progress_title(event)
    data["facts"] = " · ".join(progress_facts(event))
    return data


def final_event(outcome: Outcome) -> tuple[str, dict[str, Any]]:
    if view_state(outcome.status) == DONE:  # the same ending the notebook views show
        done = {
            "status": "ok",
            "finish_reason": outcome.finish_reason,
            "stats": outcome.stats,
            "text_length": outcome.text_length,
        }
        if outcome.structured:
            done["parsed"] = outcome.parsed
        return "done", done
    return "error", {"status": outcome.status, "message": outcome.message}


class EventStream:
    """One events response: replay what the cursor missed, then follow the live run."""

    def __init__(
        self,
        hub: Hub,
        settings: StreamSettings,
        abort: Callable[[Scope], bool] | None,
    ) -> None:
        self.hub = hub
        self.settings = settings
        self.abort = abort

    async def respond(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        cursor: Cursor,
        live: LiveRun | None,
        record: RunRecord | None,
    ) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache, no-store"),
            (b"x-accel-buffering", b"no"),  # nginx: do not buffer the stream
            (b"x-content-type-options", b"nosniff"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        writer = _Writer(
            send, limit=self.settings.slow_client_limit, retry_ms=self.settings.retry_ms
        )
        try:
            if live is not None:
                await self._follow(receive, writer, cursor, live)
            else:
                assert record is not None
                await self._replay(writer, cursor, record)
        except SlowClient:
            # Nothing more can be written in order: cut the connection so its buffers go, and
            # wait (bounded) until the server has seen it close. Without an abort hook the
            # ASGI server closes the response we leave incomplete.
            if self.abort is not None and self.abort(scope):
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(receive(), 1.0)
            return
        await writer.end()

    async def _pieces(
        self, writer: _Writer, cursor: Cursor, name: str, text: Text | str, stop: int
    ) -> None:
        """Send ``text[offset:stop]`` as events of at most ``max_event_chars`` characters."""
        step = self.settings.max_event_chars
        while True:
            offset = cursor.text if name == "delta" else cursor.reasoning
            if offset >= stop:
                return
            end = min(stop, offset + step)
            piece = text.slice(offset, end) if isinstance(text, Text) else text[offset:end]
            if name == "delta":
                cursor.text = end
            else:
                cursor.reasoning = end
            cursor.phase = "d"
            await writer.event(name, {"text": piece}, cursor.id)

    async def _replay(self, writer: _Writer, cursor: Cursor, record: RunRecord) -> None:
        if cursor.phase is None:
            cursor.phase = "s"
            data = start_data(record.id, record.prompt_name, record.prompt_version, record.model)
            await writer.event("start", data, cursor.id)
        await self._pieces(writer, cursor, "reasoning", record.reasoning, len(record.reasoning))
        await self._pieces(writer, cursor, "delta", record.text, len(record.text))
        await self._final(writer, cursor, outcome_of(record))

    async def _final(self, writer: _Writer, cursor: Cursor, outcome: Outcome) -> None:
        name, data = final_event(outcome)
        cursor.phase = "e"
        await writer.event(name, data, cursor.id)

    async def _follow(
        self, receive: Receive, writer: _Writer, cursor: Cursor, live: LiveRun
    ) -> None:
        listener = self.hub.attach(live, cursor)
        watcher = asyncio.create_task(_watch_disconnect(receive, listener))
        settings = self.settings
        try:
            if cursor.phase is None:
                cursor.phase = "s"
                data = start_data(live.run_id, live.prompt, live.version, live.model)
                await writer.event("start", data, cursor.id)
            now = time.monotonic()
            next_status = now
            next_keepalive = now + settings.keepalive
            next_estimate = now
            while True:
                listener.wake.clear()
                if listener.dropped:
                    return
                await self._pieces(writer, cursor, "reasoning", live.reasoning, len(live.reasoning))
                await self._pieces(writer, cursor, "delta", live.text, len(live.text))
                if live.outcome is not None:
                    if cursor.text >= len(live.text) and cursor.reasoning >= len(live.reasoning):
                        await self._final(writer, cursor, live.outcome)
                        return
                    continue
                progress = live.progress_now()
                if live.waiting and progress is not None:
                    count = live.progress_count
                    estimated = isinstance(progress, PromptEstimate)
                    if listener.progress_sent != count or (
                        estimated and time.monotonic() >= next_estimate
                    ):
                        listener.progress_sent = count
                        await writer.event("progress", progress_data(progress), cursor.id)
                        next_estimate = time.monotonic() + ESTIMATE_INTERVAL
                now = time.monotonic()
                if live.waiting and now >= next_status:
                    elapsed = round(now - live.started_at, 3)
                    await writer.event(
                        "status", {"state": "waiting", "elapsed": elapsed}, cursor.id
                    )
                    next_status = now + settings.status_interval
                if now >= next_keepalive:
                    await writer.comment("keep-alive")
                    next_keepalive = now + settings.keepalive
                deadline = next_keepalive
                if live.waiting:
                    deadline = min(deadline, next_status)
                    if isinstance(live.progress, PromptEstimate):
                        deadline = min(deadline, next_estimate)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(listener.wake.wait(), max(0.0, deadline - now))
        finally:
            watcher.cancel()
            self.hub.detach(live, listener)


async def _watch_disconnect(receive: Receive, listener: Listener) -> None:
    """The client went away: stop following (the run goes on for the grace period)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            listener.dropped = True
            listener.wake.set()
            return


async def find_run(hub: Hub, run_id: int) -> tuple[LiveRun | None, RunRecord | None]:
    """The live run, else its record; RunNotFound if neither exists.

    The hub forgets a run only after its final row is written, so a run is always in one of the
    two, complete.
    """
    live = hub.get(run_id)
    if live is not None:
        return live, None
    record = await asyncio.to_thread(hub.store.get_run, run_id)
    return None, record


__all__ = ["BadCursor", "Cursor", "EventStream", "RunNotFound", "StreamSettings", "find_run"]
