"""run() / arun(): render a prompt, stream it, record it. The one place that knows the whole story.

A run is written to the store *before* the request is sent (status ``unfinished``), its text is
appended at least once a second while it streams, and the row is completed when it ends, also
when it fails or is cancelled. So a crash, a kill or a Ctrl-C never loses text the user saw.

The store is synchronous sqlite3; every write goes through ``asyncio.to_thread`` so the event
loop (and with it the stream and the notebook) never waits on the disk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._client import ChatStream, LMStudioClient, within
from ._config import Budgets
from ._errors import (
    INTERFACES,
    FirstTokenTimeout,
    InvalidOutput,
    LMStreamError,
    RequestTimedOut,
    StoreError,
    StreamInterrupted,
    StreamStalled,
    render,
)
from ._events import Completion, Event, PromptEstimate, Stats, StreamStarted
from ._loop import shared_loop
from ._outcome import CANCELLED_MESSAGE, failed_inside
from ._prompt_fields import check_max_tokens, check_temperature
from ._store import History, PromptStore, RunStats, default_path
from ._structured import canonical_schema, parse_answer, response_format, schema_of
from ._sync import SyncLMStudioClient
from ._template import Prompt, variable_text

FLUSH_INTERVAL_S = 1.0
#: The longest a stream waits for the store's estimate of its wait (one indexed query, well
#: under a millisecond; more means a store busy elsewhere, and the stream goes on without).
ESTIMATE_WAIT_S = 0.5
#: The endpoint a blocking run is recorded as using: ``complete()`` posts to /chat/completions.
BLOCKING_API = "openai"

_EMPTY_STATS = Stats(ttft_s=None, duration_s=0.0, chunks=0, text_chars=0)


def status_of(error: BaseException) -> str:
    """The recorded status for an error that ended a run."""
    if isinstance(error, InvalidOutput):
        return "invalid_output"
    if isinstance(error, FirstTokenTimeout):
        return "first_token_timeout"
    if isinstance(error, RequestTimedOut):
        return "timeout"
    if isinstance(error, StreamStalled):
        return "stalled"
    if isinstance(error, StreamInterrupted):
        return "interrupted"
    if isinstance(error, (asyncio.CancelledError, KeyboardInterrupt)):
        return "cancelled"
    return "error"


class RunResult:
    """What one run produced. ``str(result)`` is the text; the repr is a one-line summary.

    ``text`` and ``reasoning`` may be given as a function that returns them: a streamed run
    hands over its stream's buffer that way, so an answer is decoded into one string only if
    someone reads it (``lmstream serve`` never does; it has the text already).

    ``parsed`` is the validated JSON value of a run that asked for a schema and got an answer
    matching it; None otherwise (``status`` is ``invalid_output`` when the answer did not).
    """

    __slots__ = (
        "_reasoning",
        "_text",
        "error",
        "exception",
        "finish_reason",
        "model",
        "parsed",
        "prompt",
        "run_id",
        "stats",
        "status",
    )

    def __init__(
        self,
        *,
        run_id: int,
        status: str,
        text: str | Callable[[], str],
        reasoning: str | Callable[[], str],
        error: str | None,
        stats: Stats,
        finish_reason: str | None,
        model: str | None,
        prompt: str,
        exception: BaseException | None = None,
        parsed: Any = None,
    ) -> None:
        self.run_id = run_id
        self.parsed = parsed
        self.status = status
        self._text = text
        self._reasoning = reasoning
        self.error = error
        self.stats = stats
        self.finish_reason = finish_reason
        self.model = model
        self.prompt = prompt  # "name@version" or "(inline)"
        #: The error that ended the run (None when it succeeded): what ``error`` says, as an
        #: object, so a caller can decide by its class (a batch: would a rerun help?).
        self.exception = exception

    @property
    def text(self) -> str:
        if not isinstance(self._text, str):
            self._text = self._text()
        return self._text

    @property
    def reasoning(self) -> str:
        if not isinstance(self._reasoning, str):
            self._reasoning = self._reasoning()
        return self._reasoning

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        parts = [f"run #{self.run_id}", self.status, self.prompt]
        if self.model:
            parts.append(self.model)
        parts.extend(self.stats.summary())
        # No text preview: in a notebook the answer is already on screen above this repr.
        line = f"<RunResult {', '.join(parts)}"
        if self.error:
            line += f": {self.error}"
        return line + ">"


def _read(stream: ChatStream | None, what: str) -> str | Callable[[], str]:
    """The stream's text or reasoning, read when first asked for (see RunResult)."""
    if stream is None:
        return ""
    return lambda: str(getattr(stream, what))


_stores: dict[Path, PromptStore] = {}


def default_store() -> PromptStore:
    """The store at the default location (``LMSTREAM_HOME`` or the user data dir), opened once."""
    path = default_path()
    store = _stores.get(path)
    if store is None:
        store = _stores[path] = PromptStore(path)
    return store


class _Recorder:
    """Appends the run's new text to its row once a second, never blocking the event loop.

    A timer does the work, so streaming pays nothing per chunk: at each tick the text that
    arrived since the last tick is read from the stream's own buffer and written from a
    worker thread. A tick is skipped while the previous write is still going. The offsets move
    on only when a write succeeded, so what the store holds is always the start of the text:
    after a failed write (a full disk) the next one carries that text again, and the final
    write carries whatever is still missing. A failed append is never raised from the timer:
    the final write reports what is still wrong (it raises the store's error itself).
    """

    def __init__(self, store: PromptStore, run_id: int, loop: asyncio.AbstractEventLoop) -> None:
        self._store = store
        self._run_id = run_id
        self._loop = loop
        self._stream: ChatStream | None = None
        self._text_pos = 0
        self._reasoning_pos = 0
        self._writing: asyncio.Task[None] | None = None
        self._timer = loop.call_later(FLUSH_INTERVAL_S, self._tick)

    def watch(self, stream: ChatStream) -> None:
        self._stream = stream

    def _tick(self) -> None:
        self._timer = self._loop.call_later(FLUSH_INTERVAL_S, self._tick)
        if self._stream is None or (self._writing is not None and not self._writing.done()):
            return
        text, reasoning, text_pos, reasoning_pos = self._stream.tail(
            self._text_pos, self._reasoning_pos
        )
        if text or reasoning:
            self._writing = self._loop.create_task(
                self._append(text, reasoning, text_pos, reasoning_pos)
            )

    async def _append(self, text: str, reasoning: str, text_pos: int, reasoning_pos: int) -> None:
        try:
            await asyncio.to_thread(self._store.append_run_text, self._run_id, text, reasoning)
        except Exception:  # nobody awaits this task but the last: it must not fail; retried
            return
        self._text_pos, self._reasoning_pos = text_pos, reasoning_pos

    async def settle(self) -> None:
        """Stop ticking and wait for a write in flight."""
        self._timer.cancel()
        if self._writing is not None:
            await asyncio.shield(self._writing)

    async def append_rest(self) -> bool:
        """Append what the ticks have not, so the store holds the whole text; False when no
        stream was watched. A failure here is raised (the store's one sentence)."""
        if self._stream is None:
            return False
        text, reasoning, _, _ = self._stream.tail(self._text_pos, self._reasoning_pos)
        await asyncio.to_thread(self._store.append_run_text, self._run_id, text, reasoning)
        return True


async def arun(
    prompt: Prompt | str,
    variables: Mapping[str, Any] | None = None,
    *,
    model: str | None = None,
    store: PromptStore | None = None,
    client: LMStudioClient | None = None,
    on_event: Callable[[Event], object] | None = None,
    on_run: Callable[[int], object] | None = None,
    on_stream: Callable[[ChatStream], object] | None = None,
    version: int | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    budgets: Budgets | None = None,
    base_url: str | None = None,
    allow_extra: bool = False,
    raise_errors: bool = True,
    batch_id: str | None = None,
    batch_row: int | None = None,
    mode: str = "stream",
    timeout: float | None = None,
    interface: str = "python",
    schema: object = None,
    context: Sequence[Mapping[str, str]] = (),
    conversation_id: int | None = None,
    parent_run_id: int | None = None,
    api: str = "auto",
    **extra: Any,
) -> RunResult:
    """Render ``prompt`` with ``variables``, stream the answer, and record the run.

    ``prompt`` is a stored prompt's name (latest version, or ``version``) or a ``Prompt``.
    The model is ``model``, else the prompt's, else the server's first chat model.
    ``on_event`` sees every event as it arrives; ``on_run`` gets the run id as soon as the run
    is recorded, before the request is sent (so a server can answer with it at once).
    ``on_stream`` gets the stream before it starts, so a live view can show the times the run
    records (``ChatStream.stats``) rather than measure its own.
    ``mode="blocking"`` sends one non-streaming request with a total ``timeout`` instead (the
    classic way, kept for comparisons).
    A failed run raises its ``LMStreamError`` (with ``.run_id`` and the partial text) unless
    ``raise_errors=False``, which returns a RunResult whose status says what happened.
    Cancellation is recorded, then re-raised.
    ``interface`` (python, cli, magic, runner or relay) is whose words the error sentences
    say what to do in, both raised (see ``render``) and recorded.
    ``schema`` (a dict, a pydantic model class, or the prompt's own when not given) asks for
    JSON matching it: it is sent as ``response_format``, the answer still streams, and at the
    end it is parsed and validated into ``result.parsed``; an answer that is not JSON or does
    not match ends with status ``invalid_output`` (InvalidOutput), its text kept.
    ``context`` is the messages sent before the rendered prompt (a conversation's system
    prompt and earlier turns, see ``Conversation``), which records the run as turn
    ``conversation_id`` after ``parent_run_id``.
    ``api`` (``auto``, ``native`` or ``openai``) is the endpoint of the client made for the run
    (see ``LMStudioClient``); a ``client`` given brings its own.
    """
    if mode not in ("stream", "blocking"):
        raise ValueError(f"mode must be 'stream' or 'blocking', not {mode!r}")
    if interface not in INTERFACES:
        raise ValueError(f"interface must be one of {', '.join(INTERFACES)}, not {interface!r}")
    store = store or default_store()
    try:
        if isinstance(prompt, str):
            prompt = await asyncio.to_thread(store.get, prompt, version)
        # Refused before anything is recorded or sent, by the rules every front end shares.
        temperature = check_temperature(
            temperature if temperature is not None else prompt.temperature
        )
        max_tokens = check_max_tokens(max_tokens if max_tokens is not None else prompt.max_tokens)
        wanted = schema if schema is not None else prompt.schema
        checked_schema = schema_of(wanted) if wanted is not None else None
        own_messages = prompt.render(variables, allow_extra=allow_extra)
        messages = [*(dict(m) for m in context), *own_messages]
    except LMStreamError as exc:
        exc.interface = interface
        raise
    if checked_schema is not None:
        if "response_format" in extra:
            raise ValueError("pass either schema= or response_format=, not both")
        extra["response_format"] = response_format(checked_schema)
    recorded_vars = {k: variable_text(k, v) for k, v in (variables or {}).items()}
    own_client = client is None
    if client is not None and api not in ("auto", client.api):
        raise ValueError(f"api={api!r} differs from the client's ({client.api!r}): pass one")
    http = client if client is not None else LMStudioClient(base_url, budgets=budgets, api=api)
    chosen_model = model or prompt.model
    loop = asyncio.get_running_loop()
    starting = asyncio.ensure_future(
        asyncio.to_thread(
            store.start_run,
            prompt_name=prompt.name,
            prompt_version=prompt.version,
            template=prompt.template,
            system=prompt.system,
            messages=own_messages,
            context=context,
            schema=canonical_schema(checked_schema) if checked_schema is not None else None,
            variables=recorded_vars,
            model=chosen_model,
            base_url=http.url,
            started_at=time.time(),
            batch_id=batch_id,
            batch_row=batch_row,
            conversation_id=conversation_id,
            parent_run_id=parent_run_id,
        )
    )
    try:
        run_id = await asyncio.shield(starting)
    except BaseException as exc:
        if isinstance(exc, LMStreamError):  # the store refused it (a conversation's turn)
            exc.interface = interface
        if isinstance(exc, asyncio.CancelledError):
            # Cancelled while the row was being written: the thread writes it anyway, so it
            # is ended as cancelled before the cancellation goes on (never left unfinished).
            await _despite_cancellation(_end_cancelled(store, starting))
        if own_client:
            await asyncio.shield(http.aclose())
        raise
    if on_run is not None:
        on_run(run_id)
    recorder = _Recorder(store, run_id, loop)
    status, error_text = "ok", None
    failure: BaseException | None = None
    stream = None
    blocking: Completion | None = None
    blocking_api: str | None = None
    blocking_since: float | None = None  # a blocking request that fails took this long too
    try:
        if chosen_model is None:
            chosen_model = await http.default_model()
        if mode == "blocking":
            blocking_api = BLOCKING_API
            blocking_since = loop.time()
            blocking = await http.complete(
                messages,
                model=chosen_model,
                temperature=temperature,
                max_tokens=max_tokens,
                timeout=timeout,
                **extra,
            )
        else:
            stream = http.stream_chat(
                messages,
                model=chosen_model,
                temperature=temperature,
                max_tokens=max_tokens,
                budgets=budgets,
                **extra,
            )
            recorder.watch(stream)
            if on_stream is not None:
                on_stream(stream)
            async with stream:
                if on_event is None:
                    async for _ in stream:
                        pass
                else:
                    async for event in stream:
                        on_event(event)
                        if isinstance(event, StreamStarted) and stream.reports_progress is False:
                            guess = await _estimate_wait(store, stream, messages, http.url)
                            if guess is not None:
                                on_event(guess)
    except BaseException as exc:  # recorded below, then re-raised: nothing is swallowed
        failure = exc
        status = status_of(exc)
        if isinstance(exc, LMStreamError):
            exc.run_id = run_id
            exc.interface = interface
            error_text = render(exc)
        elif status == "cancelled":
            error_text = CANCELLED_MESSAGE
        else:
            error_text = failed_inside(exc)
    if blocking is not None:
        result = RunResult(
            run_id=run_id,
            status=status,
            text=blocking.text,
            reasoning=blocking.reasoning,
            error=error_text,
            stats=blocking.stats,
            finish_reason=blocking.finish_reason,
            model=blocking.model or chosen_model,
            prompt=prompt.label,
        )
        stats = blocking.stats
    else:
        finished = stream.finished if stream is not None else None
        stats = (
            finished.stats
            if finished is not None
            else (stream.stats() if stream is not None else _EMPTY_STATS)
        )
        if blocking_since is not None:  # it failed (a timeout): it still took its time
            stats = dataclasses.replace(stats, duration_s=loop.time() - blocking_since)
        result = RunResult(
            run_id=run_id,
            status=status,
            text=_read(stream, "text"),
            reasoning=_read(stream, "reasoning"),
            error=error_text,
            stats=stats,
            finish_reason=finished.finish_reason if finished is not None else None,
            model=(finished.model if finished is not None and finished.model else chosen_model),
            prompt=prompt.label,
        )
    if checked_schema is not None and failure is None:
        try:
            result.parsed = parse_answer(
                result.text, checked_schema, cut_short=result.finish_reason == "length"
            )
        except InvalidOutput as exc:
            exc.run_id = run_id
            exc.interface = interface
            failure = exc
            result.status = status_of(exc)
            result.error = render(exc)
    result.exception = failure

    async def record() -> None:
        # The stream's text goes to the store as pieces, then the outcome: a long answer is
        # never decoded or bound whole just to finish its row.
        whole = blocking is not None or not await recorder.append_rest()
        await asyncio.to_thread(
            store.finish_run,
            run_id,
            status=result.status,
            text=result.text if whole else None,
            reasoning=result.reasoning if whole else None,
            error=result.error,
            finish_reason=result.finish_reason,
            model=result.model,
            ttft_s=stats.ttft_s,
            duration_s=stats.duration_s,
            chunks=stats.chunks,
            prompt_tokens=stats.prompt_tokens,
            completion_tokens=stats.completion_tokens,
            tokens_per_s=stats.tokens_per_s,
            # A stream says where it went (it may decide when it sends); None: nothing was sent.
            api=stream.api if stream is not None else blocking_api,
            first_progress_s=stats.first_progress_s,
            load_s=stats.load_s,
            prompt_s=stats.prompt_s,
            prompt_tokens_per_s=stats.prompt_tokens_per_s,
        )

    async def conclude() -> None:
        # Closing the client, the pending appends and the final write run as one step that a
        # cancellation (a second Ctrl-C, a batch being stopped) waits for: a cancellation
        # arriving while the client closes must not skip the write and leave the run unfinished.
        if own_client:
            await http.aclose()
        await recorder.settle()
        await record()

    # The final write carries whatever the appends did not (all of it, if they failed).
    try:
        await _despite_cancellation(conclude())
    except StoreError as exc:
        # The run could not be recorded (a full disk, a read-only folder): that is what the
        # caller must hear about, unless the run was cancelled, which must stay a cancellation.
        exc.run_id = run_id
        exc.interface = interface
        if isinstance(failure, (asyncio.CancelledError, KeyboardInterrupt)):
            raise failure from exc
        raise
    if failure is not None and (raise_errors or not isinstance(failure, LMStreamError)):
        raise failure
    return result


async def _estimate_wait(
    store: PromptStore, stream: ChatStream, messages: list[dict[str, str]], base_url: str
) -> PromptEstimate | None:
    """The wait for a stream whose server will report nothing before its first token, from
    the history of that model and server; None when it has too few runs to tell.

    An estimate is a courtesy: a store that cannot answer (locked, damaged, an old schema
    opened read-only) or not within ``ESTIMATE_WAIT_S`` gives none, and the run goes on; the
    stream is not read meanwhile, so a slow answer must not hold up its first token.
    """
    query = asyncio.to_thread(
        store.first_token_estimate, model=stream.model, base_url=base_url, messages=messages
    )
    try:
        guess = await within(query, ESTIMATE_WAIT_S)
    except Exception:  # asyncio.TimeoutError included; a cancellation goes on
        return None
    if guess is None:
        return None
    return PromptEstimate(guess.expected_s, guess.runs, stream.stats().duration_s)


async def _end_cancelled(store: PromptStore, starting: asyncio.Future[int]) -> None:
    """Record as cancelled a run whose row was still being written when it was cancelled."""
    try:
        run_id = await starting
    except Exception:  # the row was never written: nothing to end
        return
    await asyncio.to_thread(
        store.finish_run,
        run_id,
        status="cancelled",
        text="",
        reasoning="",
        error=CANCELLED_MESSAGE,
        finish_reason=None,
        model=None,
        ttft_s=None,
        duration_s=0.0,
        chunks=0,
        prompt_tokens=None,
        completion_tokens=None,
        tokens_per_s=None,
    )


async def _despite_cancellation(write: Coroutine[Any, Any, None]) -> None:
    """Run ``write`` to its end even if this task is cancelled meanwhile (once or again), then
    let the cancellation go on: a run is recorded before its caller hears that it ended.

    ``asyncio.shield`` alone is not enough: a second cancellation would return at once and
    leave the write running behind a caller that believes the run is recorded.
    """
    task = asyncio.ensure_future(write)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError as exc:
            if task.cancelled():
                raise
            cancelled = exc
    if cancelled is not None:  # a cancellation stays one, even if the write failed too
        raise cancelled from task.exception()
    task.result()  # the write's own error, if it failed


def run(
    prompt: Prompt | str,
    variables: Mapping[str, Any] | None = None,
    *,
    client: SyncLMStudioClient | None = None,
    **kwargs: Any,
) -> RunResult:
    """The blocking form of :func:`arun`, for scripts and notebook cells.

    It runs on a private event-loop thread, so it works where a loop already runs in the
    calling thread (a Jupyter kernel). ``on_event`` is called on that thread. Ctrl-C (or a
    kernel interrupt) cancels the stream, records the run as cancelled and re-raises.
    """
    async_client = client._client if client is not None else None
    return shared_loop().run(arun(prompt, variables, client=async_client, **kwargs))


def history(
    prompt: str | None = None,
    status: str | None = None,
    since: Any = None,
    limit: int | None = 50,
    *,
    model: str | None = None,
    store: PromptStore | None = None,
    batch: str | None = None,
) -> History:
    """Recorded runs, newest first (a list; ``.to_pandas()`` gives a DataFrame); ``batch`` keeps
    the runs of one batch or comparison."""
    return (store or default_store()).history(
        prompt=prompt, status=status, since=since, limit=limit, model=model, batch=batch
    )


def stats(
    prompt: str | None = None,
    *,
    model: str | None = None,
    since: Any = None,
    store: PromptStore | None = None,
    by: str = "prompt",
    batch: str | None = None,
) -> RunStats:
    """Success rate, failures by status and TTFT/duration percentiles, overall and per group:
    (prompt, model), or (prompt, version, model) with ``by="version"``; ``batch`` keeps the
    runs of one batch or comparison."""
    return (store or default_store()).stats(
        prompt=prompt, model=model, since=since, by=by, batch=batch
    )
