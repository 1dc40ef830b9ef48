"""The run hub: every live run of this server, and the cursors of the clients that follow it.

A live run is one asyncio task calling :func:`arun` (``raise_errors=False``). Its text and
reasoning are kept once, in compact blocks (:class:`Text`); nothing is copied per client. A
client (a *listener*) is a cursor, the character offsets of text and reasoning it has been
sent, plus a wake-up event. When new text arrives the run only sets the wake-up events; each
listener then sends everything between its cursor and the end as one event. A slow client
therefore gets its pending deltas merged for free, and what the server holds per client stays
O(1), however far it falls behind.

Event ids say where a client is: ``"<phase>:<text offset>:<reasoning offset>"``, with phase
``s`` (the start event was sent), ``d`` (text flowing) or ``e`` (the final event was sent).
What a reconnecting client missed is then just ``text[t:]`` and ``reasoning[r:]``, which the
hub has while the run is live and the store has once it is over (also after a restart). An id
beyond the text is not an error: after a crash the store has up to a second less than the
client saw, and such a client simply gets what follows its offsets, then the final event.

The grace period (``grace``): a run nobody listens to is cancelled ``grace`` seconds after the
moment nobody was listening, which is the POST itself for a run nobody ever connected to (a
client that starts runs and never reads them cannot keep the model busy), and the moment the
last listener left otherwise. A listener that connects within it disarms it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import ctypes
import re
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._client import LMStudioClient
from .._config import Budgets
from .._conversation import runner
from .._errors import LMStreamError
from .._events import (
    Event,
    LoadProgress,
    PromptEstimate,
    PromptProgress,
    ReasoningDelta,
    StreamStarted,
    TextDelta,
)
from .._outcome import CANCELLED_MESSAGE
from .._progress import Shown
from .._run import RunResult
from .._store import PromptStore, RunRecord
from .._template import Prompt

#: Characters per block of a live run's text (see :class:`Text`).
BLOCK = 16384
#: A run at least this long gives the memory it freed back to the system when it is over.
_RELEASE_AFTER_CHARS = 1 << 20


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None)
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without it)
        return None
    return trim


_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Give memory that was freed back to the system, where the C library allows it.

    Why: glibc keeps freed blocks in its heaps (one per thread that allocated them) for reuse,
    so after a long answer (the text, the recording's buffers, the store's writes from worker
    threads) the service would go on holding hundreds of MB it no longer uses. ``malloc_trim``
    returns every free page of every heap; elsewhere this does nothing.
    """
    if _TRIM is not None:
        _TRIM(0)


class Text:
    """Append-only text, sliceable by character offset without joining it all.

    Stored as blocks of :data:`BLOCK` characters each, encoded as UTF-8, plus a short tail of
    the deltas since the last full block. Why: a delta is often a few characters, and a Python
    str costs about 50 bytes of overhead plus an offset entry, which made a long answer cost 15
    times its size when every delta was kept as its own piece; and a str holding one emoji
    stores every character in 4 bytes, so even joined text would cost up to 4 times its UTF-8
    size. Once the tail holds a block's worth it is joined, cut and encoded, so each character
    is copied a bounded number of times in all. An offset finds its block by division; a slice
    decodes only the blocks it overlaps (an event is at most a block, so at most two).
    """

    __slots__ = ("_blocks", "_tail", "_tail_ends")

    def __init__(self) -> None:
        self._blocks: list[bytes] = []  # each exactly BLOCK characters, as UTF-8
        self._tail: list[str] = []  # the deltas after the last block
        self._tail_ends: list[int] = []  # cumulative length within the tail, per delta

    def __len__(self) -> int:
        return len(self._blocks) * BLOCK + (self._tail_ends[-1] if self._tail_ends else 0)

    def append(self, piece: str) -> None:
        if not piece:
            return
        self._tail.append(piece)
        self._tail_ends.append((self._tail_ends[-1] if self._tail_ends else 0) + len(piece))
        if self._tail_ends[-1] >= BLOCK:
            joined = "".join(self._tail)
            cut = len(joined) - len(joined) % BLOCK
            self._blocks.extend(
                joined[i : i + BLOCK].encode("utf-8", "surrogatepass") for i in range(0, cut, BLOCK)
            )
            rest = joined[cut:]
            self._tail = [rest] if rest else []
            self._tail_ends = [len(rest)] if rest else []

    def _block(self, index: int) -> str:
        return self._blocks[index].decode("utf-8", "surrogatepass")

    def slice(self, start: int, stop: int) -> str:
        """``text[start:stop]``, touching only the blocks and deltas that overlap it."""
        stop = min(stop, len(self))
        if start >= stop:
            return ""
        parts: list[str] = []
        in_blocks = len(self._blocks) * BLOCK
        if start < in_blocks:
            first, last = start // BLOCK, (min(stop, in_blocks) - 1) // BLOCK
            for index in range(first, last + 1):
                offset = index * BLOCK
                parts.append(self._block(index)[max(0, start - offset) : stop - offset])
        if stop > in_blocks:
            start, stop = max(0, start - in_blocks), stop - in_blocks
            index = bisect.bisect_right(self._tail_ends, start)
            offset = self._tail_ends[index - 1] if index else 0
            while offset < stop:
                piece = self._tail[index]
                parts.append(piece[max(0, start - offset) : stop - offset])
                offset += len(piece)
                index += 1
        return "".join(parts)

    def __str__(self) -> str:
        return "".join([*(self._block(i) for i in range(len(self._blocks))), *self._tail])


@dataclass(frozen=True)
class Outcome:
    """How a run ended, as the final event tells it (``done`` if ``status == "ok"``)."""

    status: str
    message: str | None
    finish_reason: str | None
    stats: dict[str, Any]
    text_length: int
    structured: bool = False  # the run asked for a schema: ``parsed`` is its answer's value
    parsed: Any = None


_ID = re.compile(r"([sde]):([0-9]{1,12}):([0-9]{1,12})")


class BadCursor(ValueError):
    """A Last-Event-ID that this server did not send (or not for this run)."""


@dataclass
class Cursor:
    """Where a client is in a run: what it has been sent."""

    phase: str | None  # None: nothing yet; "s" start sent; "d" text; "e" the end
    text: int = 0
    reasoning: int = 0

    @property
    def id(self) -> str:
        return f"{self.phase or 's'}:{self.text}:{self.reasoning}"

    @classmethod
    def parse(cls, value: str | None) -> Cursor:
        if not value:
            return cls(None)
        match = _ID.fullmatch(value.strip())
        if match is None:
            raise BadCursor(
                f"The last event id {value[:40]!r} was not sent by this server: reconnect "
                "without Last-Event-ID to get the run from its start."
            )
        return cls(match[1], int(match[2]), int(match[3]))


class Listener:
    """One open events connection: its cursor into the run and a wake-up event. Nothing else:
    however far behind a client falls, this is all the server keeps for it."""

    __slots__ = ("cursor", "dropped", "progress_sent", "wake")

    def __init__(self, cursor: Cursor) -> None:
        self.cursor = cursor
        self.wake = asyncio.Event()
        self.dropped = False  # set by the server: end this response, the client may resume
        # The run's progress count when this client was last sent progress: a new connection
        # (0) is sent the latest report at once, then each newer one.
        self.progress_sent = 0


@dataclass(eq=False)
class LiveRun:
    """A run this server is streaming right now (and, for its listeners, how it ended)."""

    run_id: int
    prompt: str | None
    version: int | None
    model: str | None
    started_at: float = field(default_factory=time.monotonic)
    text: Text = field(default_factory=Text)
    reasoning: Text = field(default_factory=Text)
    first_token_at: float | None = None
    # The latest report while the prompt is processed (or the estimate where the server
    # reports nothing), and when it came (``time.monotonic()``): an estimate is moved on by
    # the time since, as nothing else comes to move it.
    progress: Shown | None = None
    progress_at: float = 0.0
    progress_count: int = 0
    outcome: Outcome | None = None
    listeners: set[Listener] = field(default_factory=set)
    task: asyncio.Task[None] | None = None
    grace_timer: asyncio.TimerHandle | None = None

    @property
    def waiting(self) -> bool:
        """True while the model is still processing the prompt (no token yet, not ended)."""
        return self.first_token_at is None and self.outcome is None

    def on_event(self, event: Event) -> None:
        if isinstance(event, TextDelta):
            self.text.append(event.content)
        elif isinstance(event, ReasoningDelta):
            self.reasoning.append(event.content)
        elif isinstance(event, StreamStarted):
            self.model = event.model or self.model
            return
        elif isinstance(event, (LoadProgress, PromptProgress, PromptEstimate)):
            # Already paced by the client (a few a second; an estimate comes once), so each
            # one wakes the listeners.
            self.progress = event
            self.progress_at = time.monotonic()
            self.progress_count += 1
            self.notify()
            return
        else:
            return
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.notify()

    def progress_now(self) -> Shown | None:
        """The latest progress as of now: an estimate with its time moved on to now."""
        event = self.progress
        if isinstance(event, PromptEstimate):
            moved = event.elapsed_s + time.monotonic() - self.progress_at
            return PromptEstimate(event.expected_s, event.runs, round(moved, 3))
        return event

    def notify(self) -> None:
        for listener in self.listeners:
            listener.wake.set()


class Hub:
    """The live runs of one server, keyed by run id; everything runs on the server's loop."""

    def __init__(
        self,
        store: PromptStore,
        client: LMStudioClient,
        *,
        grace: float = 60.0,
        budgets: Budgets | None = None,
    ) -> None:
        self.store = store
        self.client = client
        self.grace = grace
        self.budgets = budgets
        self._runs: dict[int, LiveRun] = {}
        self._listener_left: asyncio.Event | None = None  # watched while shutting down

    def get(self, run_id: int) -> LiveRun | None:
        return self._runs.get(run_id)

    async def start(
        self,
        prompt: Prompt,
        variables: dict[str, Any],
        *,
        model: str,
        temperature: float | None = None,
        max_tokens: int | None = None,
        schema: dict[str, Any] | None = None,
        chat: str | None = None,
        drop_oldest: bool = False,
        include_failed: bool = False,
    ) -> LiveRun:
        """Start a run in the background; return it once it is recorded (its id is known).

        The prompt has already been rendered once by the caller, so template errors never get
        here; a store failure before the run is recorded is raised to the caller, and so is a
        conversation's refusal (``chat``: the run is its next turn, see ``runner``).
        """
        loop = asyncio.get_running_loop()
        run_prompt = runner(
            self.store, chat, include_failed=include_failed, drop_oldest=drop_oldest
        )
        structured = schema is not None or prompt.schema is not None
        recorded: asyncio.Future[LiveRun] = loop.create_future()
        current: list[LiveRun] = []  # the run, once arun has recorded it
        tasks: list[asyncio.Task[None]] = []  # the task driving it (created before it runs)

        def on_run(run_id: int) -> None:
            live = LiveRun(run_id=run_id, prompt=prompt.name, version=prompt.version, model=model)
            live.task = tasks[0]
            current.append(live)
            self._runs[run_id] = live
            self._arm_grace(live)  # nobody listens yet: the grace period runs from the POST
            recorded.set_result(live)

        def on_event(event: Event) -> None:
            current[0].on_event(event)  # on_run always comes first

        async def drive() -> None:
            result: RunResult | None = None
            try:
                result = await run_prompt(
                    prompt,
                    variables,
                    model=model,
                    client=self.client,
                    schema=schema,
                    on_event=on_event,
                    on_run=on_run,
                    temperature=temperature,
                    max_tokens=max_tokens,
                    budgets=self.budgets,
                    raise_errors=False,
                    interface="relay",
                )
            except asyncio.CancelledError:
                pass  # recorded as cancelled by arun; we asked for it (DELETE, grace, shutdown)
            except Exception as exc:  # recorded by arun too, when it got that far
                if not recorded.done():
                    recorded.set_exception(exc)
            if not current:
                if not recorded.done():
                    recorded.cancel()
                return
            live = current[0]
            if result is not None:
                live.outcome = Outcome(
                    status=result.status,
                    message=result.error,
                    finish_reason=result.finish_reason,
                    stats=result.stats.as_dict(),
                    text_length=result.stats.text_chars,
                    structured=structured,
                    parsed=result.parsed,
                )
            else:
                # The record has the exact sentence arun wrote; the write is already done.
                try:
                    record = await asyncio.shield(
                        asyncio.to_thread(self.store.get_run, live.run_id)
                    )
                    live.outcome = outcome_of(record)
                except (LMStreamError, asyncio.CancelledError):
                    live.outcome = Outcome("cancelled", CANCELLED_MESSAGE, None, {}, len(live.text))
            self._finished(live)

        task = loop.create_task(drive(), name="lmstream-serve-run")
        tasks.append(task)
        try:
            return await asyncio.shield(recorded)
        except asyncio.CancelledError:
            task.cancel()
            raise

    def _finished(self, live: LiveRun) -> None:
        if live.grace_timer is not None:
            live.grace_timer.cancel()
            live.grace_timer = None
        # The final row is written (arun returns after it), so new clients read the store.
        self._runs.pop(live.run_id, None)
        live.notify()
        if len(live.text) + len(live.reasoning) >= _RELEASE_AFTER_CHARS:
            # Once its last listener is done with it (the text goes with it).
            weakref.finalize(live, release_freed_memory)

    # -- listeners ------------------------------------------------------------------------------

    def attach(self, live: LiveRun, cursor: Cursor) -> Listener:
        listener = Listener(cursor)
        live.listeners.add(listener)
        if live.grace_timer is not None:
            live.grace_timer.cancel()
            live.grace_timer = None
        return listener

    def detach(self, live: LiveRun, listener: Listener) -> None:
        live.listeners.discard(listener)
        if self._listener_left is not None:
            self._listener_left.set()
        if not live.listeners and live.outcome is None:
            self._arm_grace(live)

    def _arm_grace(self, live: LiveRun) -> None:
        """Nobody listens (since the POST, or since the last listener left): keep the run going
        for ``grace`` seconds, in case a client comes (back), then cancel it."""
        if live.grace_timer is not None:
            live.grace_timer.cancel()
        live.grace_timer = asyncio.get_running_loop().call_later(self.grace, self._grace_over, live)

    def _grace_over(self, live: LiveRun) -> None:
        live.grace_timer = None
        if not live.listeners and live.task is not None:
            live.task.cancel()

    def drop_listeners(self, run_id: int) -> int:
        """End every open events response of a run (the clients may resume); return how many."""
        live = self._runs.get(run_id)
        if live is None:
            return 0
        for listener in live.listeners:
            listener.dropped = True
            listener.wake.set()
        return len(live.listeners)

    # -- cancellation ---------------------------------------------------------------------------

    async def cancel(self, run_id: int, timeout: float = 10.0) -> bool:
        """Cancel a live run and wait until it is recorded; False if it is not live here."""
        live = self._runs.get(run_id)
        if live is None or live.task is None:
            return False
        live.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(live.task), timeout)
        return True

    async def aclose(self, timeout: float = 10.0) -> None:
        """Server shutdown: cancel every run, wait for their records, then end the listeners.

        Listeners get the final ``error`` event (status ``cancelled``) when they can take it
        within a second; any still open after that are ended without it.
        """
        runs = list(self._runs.values())
        tasks = [live.task for live in runs if live.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        while any(live.listeners for live in runs) and loop.time() < deadline:
            self._listener_left = left = asyncio.Event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(left.wait(), deadline - loop.time())
        for live in runs:
            for listener in live.listeners:
                listener.dropped = True
                listener.wake.set()

    def snapshot(self) -> dict[int, dict[str, Any]]:
        """For tests and monitoring: per live run, its size and its listeners' count."""
        return {
            run_id: {
                "text_chars": len(live.text),
                "reasoning_chars": len(live.reasoning),
                "listeners": len(live.listeners),
                # How many characters of text each listener has yet to be sent.
                "behind": sorted(len(live.text) - lis.cursor.text for lis in live.listeners),
                "waiting": live.waiting,
            }
            for run_id, live in self._runs.items()
        }


def outcome_of(record: RunRecord) -> Outcome:
    """The final event of a recorded run (finished, or found unfinished in the store)."""
    # An unfinished run has no duration yet: say so rather than 0.
    stats = {**record.stats().as_dict(), "duration_s": record.duration_s}
    message = record.error
    if record.status == "unfinished":
        message = (
            f"Run {record.id} is not running in this server (another process runs it, or it "
            "stopped without finishing); the text recorded so far has been sent."
        )
    return Outcome(
        record.status,
        message,
        record.finish_reason,
        stats,
        len(record.text),
        structured=record.schema is not None,
        parsed=record.parsed_value(),
    )
