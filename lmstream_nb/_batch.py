"""run_many(): one prompt over many rows of variables, a few at a time, every row recorded.

A failed row never stops the batch: it is recorded with its status and the batch goes on.
Every run carries the batch id and its row number, so ``resume=batch_id`` runs only the rows
whose latest run did not succeed. An interrupt cancels what is in flight (each of those runs
is recorded as cancelled, its connection closed) and keeps what finished.

Rows are spread over one or more base URLs (several LM Studio machines): each URL gets its own
client and as many workers as rows may run there at once (by default the prediction slots the
server reports), and the workers take the next row from a shared queue, so a row goes to
whichever server has a free slot and a slow machine simply takes fewer rows. The progress bar
is tqdm's text bar in a terminal and an HTML line in a notebook (``_batch_progress``), which a
saved notebook shows without its kernel; it says what the rows in flight are doing.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._batch_progress import RowsInFlight, advance, paced_refresh, progress_bar
from ._client import LMStudioClient
from ._config import Budgets, Retries
from ._errors import LMStreamError, TemplateError, render, rerun_could_help
from ._events import Event, Stats
from ._loop import shared_loop
from ._prompt_fields import check_max_tokens, check_temperature
from ._run import RunResult, arun, default_store, status_of
from ._store import PromptStore
from ._structured import schema_of
from ._template import Prompt

_NO_STATS = Stats(ttft_s=None, duration_s=0.0, chunks=0, text_chars=0)

#: Rows at once on a server that reports no prediction slots (the OpenAI-compatible endpoint of
#: LM Studio 0.3, Ollama, a proxy, a model LM Studio has not loaded yet). Three is what a batch
#: ran at before servers were asked, so such a batch behaves as it did: enough to keep a server
#: with a few slots busy, and harmless for one that answers one at a time, where the rows
#: beyond the first wait in its queue without using up their first-token budget (the client
#: counts that wait as queued while another of its streams is answered).
UNREPORTED_SLOTS = 3


@dataclass
class BatchResult:
    """The results of a batch in row order, and the id to resume it with.

    ``concurrency`` is how many rows ran at once on each server (by base URL), and
    ``concurrency_note`` says it in words, e.g. ``"2 servers: 4 + 1 slots"``.
    """

    batch_id: str
    results: list[RunResult]
    concurrency: dict[str, int] = field(default_factory=dict)
    concurrency_note: str = ""

    @property
    def succeeded(self) -> int:
        return sum(r.ok for r in self.results)

    @property
    def failed(self) -> int:
        return len(self.results) - self.succeeded

    def failures(self) -> list[tuple[str, int, bool]]:
        """Why rows failed: each kind of error sentence, how many rows it ended and whether
        they all said exactly that, most frequent first (500 rows that all miss one variable
        say so once). Sentences that differ only in their numbers (characters received, a
        row's token count) are one kind; the first row's sentence stands for them."""
        first: dict[str, str] = {}
        counts: Counter[str] = Counter()
        alike: dict[str, bool] = {}
        for r in self.results:
            if r.ok:
                continue
            sentence = r.error or r.status
            key = re.sub(r"\d+", "#", sentence)
            first.setdefault(key, sentence)
            alike[key] = alike.get(key, True) and first[key] == sentence
            counts[key] += 1
        return [(first[key], count, alike[key]) for key, count in counts.most_common()]

    @property
    def rerun_could_help(self) -> bool:
        """Whether resuming could turn a failed row into a success: some row was cancelled or
        ended on a failure of the moment (see ``rerun_could_help`` in the error module)."""
        return any(
            r.status == "cancelled" or rerun_could_help(r.exception)
            for r in self.results
            if not r.ok
        )

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, index: int) -> RunResult:
        return self.results[index]

    def __repr__(self) -> str:
        note = f"; {self.concurrency_note}" if self.concurrency_note else ""
        return (
            f"<BatchResult {self.batch_id}: {self.succeeded} ok, {self.failed} failed "
            f"of {len(self.results)}{note}>"
        )

    def as_dicts(self) -> list[dict[str, Any]]:
        return [
            {
                "run_id": r.run_id,
                "status": r.status,
                "text": r.text,
                "error": r.error,
                "ttft_s": r.stats.ttft_s,
                "duration_s": r.stats.duration_s,
                "completion_tokens": r.stats.completion_tokens,
            }
            for r in self.results
        ]

    def parsed_columns(self) -> dict[str, list[Any]]:
        """The structured answers as columns: see :func:`parsed_columns`."""
        return parsed_columns(self.results)


def parsed_columns(results: Sequence[RunResult]) -> dict[str, list[Any]]:
    """The structured answers (runs with a schema) as columns, for batches and comparisons:
    each top-level key of a parsed object becomes ``parsed.KEY`` (the prefix keeps them apart
    from the row's own columns and from ``status``, ``text``...), in the order keys first
    appear; a run without that key, or whose answer failed, holds None. A parsed value that is
    not an object is the one column ``parsed``. No schema, no columns."""
    values = [r.parsed for r in results]
    if all(v is None for v in values):
        return {}
    if not all(v is None or isinstance(v, dict) for v in values):
        return {"parsed": values}
    keys: dict[str, None] = {}
    for value in values:
        keys.update(dict.fromkeys(value or {}))
    return {f"parsed.{key}": [None if v is None else v.get(key) for v in values] for key in keys}


def new_batch_id() -> str:
    """A short id for a batch (pass it as ``batch_id=`` to know it before the batch starts)."""
    return uuid.uuid4().hex[:12]


def _rows(rows: Any) -> tuple[list[dict[str, Any]], Any]:
    """Rows as dicts, and the DataFrame they came from (if they did)."""
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):
        return [dict(r) for r in rows.to_dict("records")], rows
    return [dict(r) for r in rows], None


def _result_from_record(
    store: PromptStore, run_id: int, label: str, schema: dict[str, Any] | None = None
) -> RunResult:
    rec = store.get_run(run_id)
    return RunResult(
        parsed=rec.parsed_value(schema),
        run_id=rec.id,
        status=rec.status,
        text=rec.text,
        reasoning=rec.reasoning,
        error=rec.error,
        stats=rec.stats(),
        finish_reason=rec.finish_reason,
        model=rec.model,
        prompt=label,
    )


@dataclass(frozen=True)
class _Share:
    """How many rows run at once on one server, and whether the server said so itself."""

    client: LMStudioClient
    rows: int
    reported: bool


def concurrency_note(shares: Sequence[tuple[int, bool]]) -> str:
    """Rows at once per server in words: ``4 slots``, ``2 servers: 4 + 1 slots``, ``3 at once``
    (a number the server did not report), ``2 servers: 4 slots + 3 at once``."""
    if not shares:
        return ""
    if all(reported for _, reported in shares):
        words = " + ".join(str(rows) for rows, _ in shares) + " slots"
    elif not any(reported for _, reported in shares):
        words = " + ".join(str(rows) for rows, _ in shares) + " at once"
    else:
        words = " + ".join(f"{rows} {'slots' if rep else 'at once'}" for rows, rep in shares)
    return words if len(shares) == 1 else f"{len(shares)} servers: {words}"


async def _shares(
    clients: Sequence[LMStudioClient], concurrency: int | None, models: Sequence[str | None]
) -> list[_Share]:
    """Rows at once per client. An int is the total, dealt out over the clients in turn (as
    before servers were asked); None asks each server for its slots for each of ``models``
    (None: its default model) and takes the fewest, so no model is sent more at once than it
    has slots (a server that reports none for one of them gets ``UNREPORTED_SLOTS``)."""
    if concurrency is not None:
        return [
            _Share(client, len(range(i, concurrency, len(clients))), False)
            for i, client in enumerate(clients)
        ]

    async def ask(client: LMStudioClient) -> _Share:
        names: list[str | None] = []
        for model in models or [None]:
            name = model
            if name is None:
                try:
                    name = await client.default_model()
                except LMStreamError:
                    name = None  # every row will say what is wrong; the probe may still answer
            names.append(name)
        info = await client.server_info()
        figures = [info.slots_of(name) for name in names]
        if any(slots is None for slots in figures):
            return _Share(client, UNREPORTED_SLOTS, False)
        return _Share(client, min(s for s in figures if s is not None), True)

    return list(await asyncio.gather(*(ask(client) for client in clients)))


class _Progress:
    """done / failed, what the rows in flight are doing and tokens per second, on one
    progress bar (or nothing)."""

    def __init__(
        self, total: int, enabled: bool, note: str, title: str = "lmstream batch", unit: str = "row"
    ) -> None:
        self.bar: Any = None
        self.done = self.failed = self.tokens = 0
        self.note = note
        self.rows = RowsInFlight()
        self.t0 = time.monotonic()
        if enabled and total:
            self.bar = progress_bar(total, title, unit)
            self.redraw = paced_refresh(self.bar)
            self._post()

    def _post(self) -> None:
        if self.bar is not None:
            elapsed = max(1e-9, time.monotonic() - self.t0)
            parts = [self.note, f"ok={self.done}, failed={self.failed}", self.rows.text()]
            parts.append(f"{self.tokens / elapsed:.1f} tok/s")
            self.bar.set_postfix_str(" · ".join(p for p in parts if p), refresh=False)

    def started(self, index: int) -> None:
        self.rows.start(index)
        if self.bar is not None:
            self._post()
            self.redraw.request()

    def on_event(self, index: int) -> Callable[[Event], None] | None:
        """What a row's stream tells, for the line (None: no bar to tell)."""
        if self.bar is None:
            return None
        rows, redraw = self.rows, self.redraw

        def seen(event: Event) -> None:
            if rows.event(index, event):
                self._post()
                redraw.request()

        return seen

    def finished(self, index: int, result: RunResult) -> None:
        self.rows.end(index)
        if result.ok:
            self.done += 1
        else:
            self.failed += 1
        self.tokens += result.stats.completion_tokens or 0
        if self.bar is not None:
            self._post()
            advance(self.bar)

    def close(self) -> None:
        if self.bar is not None:
            self.redraw.close()
            self._post()
            self.bar.close()


@dataclass(frozen=True)
class Cell:
    """One run of a batch or a comparison: a prompt version, its variables, and the model
    (None: the version's own, else the server's)."""

    prompt: Prompt
    variables: dict[str, Any]
    model: str | None = None


async def arun_cells(
    cells: Sequence[Cell],
    todo: Sequence[int],
    *,
    concurrency: int | None,
    store: PromptStore,
    base_url: str | Sequence[str] | None,
    budgets: Budgets | None,
    retries: Retries | None,
    batch_id: str,
    progress: bool,
    title: str = "lmstream batch",
    unit: str = "row",
    watch: Callable[[int], Callable[[Event], object] | None] | None = None,
    on_start: Callable[[int], object] | None = None,
    on_end: Callable[[int, RunResult], object] | None = None,
    **extra: Any,
) -> tuple[dict[int, RunResult], dict[str, int], str]:
    """Run the cells numbered ``todo`` on the one pipeline a batch and a comparison share.

    Each base URL gets a client and as many workers as it has slots (``_shares``); workers take
    the next cell from one queue; every cell is recorded through ``arun`` with ``batch_id`` and
    its number as ``batch_row``; an interrupt ends only once every cell in flight is recorded.
    ``watch(i)`` gives cell ``i``'s event callback, ``on_start`` / ``on_end`` say when a cell
    starts and what it ended with. Returns the results by cell number, the rows at once per
    server and that in words.
    """
    urls = [base_url] if base_url is None or isinstance(base_url, str) else list(base_url)
    api = extra.pop("api", "auto")  # the endpoint every cell's client uses (see LMStudioClient)
    clients = [LMStudioClient(url, budgets=budgets, retries=retries, api=api) for url in urls]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in todo:
        queue.put_nowait(index)
    caller_on_event = extra.pop("on_event", None)
    models = sorted({c.model or c.prompt.model for i in todo for c in [cells[i]]}, key=str)
    try:
        shares = await _shares(clients, concurrency, models) if todo else []
    except BaseException:
        for client in clients:
            await asyncio.shield(client.aclose())
        raise
    note = concurrency_note([(share.rows, share.reported) for share in shares])
    bar = _Progress(len(todo), progress, note, title, unit)
    results: dict[int, RunResult] = {}

    def on_event(index: int) -> Callable[[Event], object] | None:
        seen = [
            f
            for f in (bar.on_event(index), caller_on_event, watch(index) if watch else None)
            if f is not None
        ]
        if len(seen) <= 1:
            return seen[0] if seen else None

        def every(event: Event) -> None:
            for f in seen:
                f(event)

        return every

    async def one(index: int, client: LMStudioClient) -> RunResult:
        cell = cells[index]
        try:
            cell.prompt.render(cell.variables, allow_extra=True)
        except TemplateError as exc:
            exc.interface = extra.get("interface", "python")
            return await asyncio.to_thread(
                _record_refused,
                store,
                cell.prompt,
                cell.variables,
                exc,
                client.url,
                batch_id,
                index,
            )
        return await arun(
            cell.prompt,
            cell.variables,
            model=cell.model,
            store=store,
            client=client,
            budgets=budgets,
            allow_extra=True,
            raise_errors=False,
            batch_id=batch_id,
            batch_row=index,
            on_event=on_event(index),
            **extra,
        )

    async def worker(client: LMStudioClient) -> None:
        while True:
            try:
                index = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            bar.started(index)
            if on_start is not None:
                on_start(index)
            result = await one(index, client)
            results[index] = result
            bar.finished(index, result)
            if on_end is not None:
                on_end(index, result)

    try:
        workers = [
            asyncio.ensure_future(worker(share.client))
            for share in shares
            for _ in range(share.rows)
        ]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            # gather gives up at the first worker that ends so (the first row that records its
            # cancellation): the batch ends only once every row in flight is recorded too.
            await _every_one_ended(workers)
            raise
    finally:
        bar.close()
        for client in clients:
            await asyncio.shield(client.aclose())
    spread: dict[str, int] = {}
    for share in shares:
        spread[share.client.url] = spread.get(share.client.url, 0) + share.rows
    return results, spread, note


def check_settings(prompt: Prompt, extra: Mapping[str, Any]) -> dict[str, Any] | None:
    """A setting out of range, or a schema that is not one, would fail every row alike:
    refused once, before any row runs. Returns the schema the rows ask for, checked."""
    temperature, max_tokens = extra.get("temperature"), extra.get("max_tokens")
    try:
        check_temperature(temperature if temperature is not None else prompt.temperature)
        check_max_tokens(max_tokens if max_tokens is not None else prompt.max_tokens)
        wanted = extra.get("schema")
        wanted = wanted if wanted is not None else prompt.schema
        return schema_of(wanted) if wanted is not None else None
    except LMStreamError as exc:
        exc.interface = extra.get("interface", "python")
        raise


async def arun_many(
    prompt: Prompt | str,
    rows: Any,
    *,
    concurrency: int | None = None,
    model: str | None = None,
    store: PromptStore | None = None,
    base_url: str | Sequence[str] | None = None,
    budgets: Budgets | None = None,
    retries: Retries | None = None,
    resume: str | None = None,
    batch_id: str | None = None,
    progress: bool = True,
    **extra: Any,
) -> Any:
    """The async form of :func:`run_many`."""
    if concurrency is not None and concurrency < 1:
        raise ValueError("concurrency must be at least 1 (or None: the slots each server has)")
    store = store or default_store()
    if isinstance(prompt, str):
        prompt = await asyncio.to_thread(store.get, prompt)
    schema = check_settings(prompt, extra)
    if schema is not None:
        extra["schema"] = schema  # checked once, here, for every row
    records, frame = _rows(rows)
    batch_id = resume or batch_id or new_batch_id()
    results: list[RunResult | None] = [None] * len(records)
    todo = list(range(len(records)))
    if resume is not None:
        latest = await asyncio.to_thread(store.batch_outcomes, resume)
        for index, run_id in latest.items():
            if 0 <= index < len(records):
                previous = await asyncio.to_thread(
                    _result_from_record, store, run_id, prompt.label, schema
                )
                if previous.ok:
                    results[index] = previous
        todo = [i for i in todo if results[i] is None]
    cells = [Cell(prompt, variables, model) for variables in records]
    ran, spread, note = await arun_cells(
        cells,
        todo,
        concurrency=concurrency,
        store=store,
        base_url=base_url,
        budgets=budgets,
        retries=retries,
        batch_id=batch_id,
        progress=progress,
        **extra,
    )
    for index, result in ran.items():
        results[index] = result
    final = [r for r in results if r is not None]
    batch = BatchResult(batch_id, final, spread, note)
    if frame is not None:
        out = frame.copy()
        for key in ("status", "text", "error", "run_id", "ttft_s", "duration_s"):
            out[key] = [row[key] for row in batch.as_dicts()]
        parsed = batch.parsed_columns()
        if parsed:
            import pandas as pd  # there is a DataFrame, so there is pandas

            for key, column in parsed.items():
                # Objects as parsed: a whole number stays an int beside a failed row's None.
                out[key] = pd.Series(column, index=out.index, dtype=object)
        out.attrs["batch_id"] = batch_id
        out.attrs["concurrency"] = spread
        return out
    return batch


async def _every_one_ended(tasks: Sequence[asyncio.Future[None]]) -> None:
    """Cancel what still runs and wait until all of it has ended, also through another
    cancellation (a second Ctrl-C), which goes on once they have."""
    for task in tasks:
        task.cancel()
    cancelled: asyncio.CancelledError | None = None
    pending = [task for task in tasks if not task.done()]
    while pending:
        try:
            await asyncio.wait(pending)
        except asyncio.CancelledError as exc:
            cancelled = exc
        pending = [task for task in pending if not task.done()]
    for task in tasks:  # retrieved, so none is reported as never retrieved
        if not task.cancelled():
            task.exception()
    if cancelled is not None:
        raise cancelled


def _record_refused(
    store: PromptStore,
    prompt: Prompt,
    variables: Mapping[str, Any],
    error: LMStreamError,
    base_url: str,
    batch_id: str,
    index: int,
) -> RunResult:
    """A row that could not even be rendered is recorded as a failed run, like any other."""
    started = time.time()
    run_id = store.start_run(
        prompt_name=prompt.name,
        prompt_version=prompt.version,
        template=prompt.template,
        system=prompt.system,
        messages=[],
        variables={k: str(v) for k, v in variables.items()},
        model=None,
        base_url=base_url,
        started_at=started,
        batch_id=batch_id,
        batch_row=index,
    )
    store.finish_run(
        run_id,
        status=status_of(error),
        text="",
        reasoning="",
        error=render(error),
        finish_reason=None,
        model=None,
        ttft_s=None,
        duration_s=0.0,
        chunks=0,
        prompt_tokens=None,
        completion_tokens=None,
        tokens_per_s=None,
    )
    return RunResult(
        run_id=run_id,
        status=status_of(error),
        text="",
        reasoning="",
        error=render(error),
        stats=_NO_STATS,
        finish_reason=None,
        model=None,
        prompt=prompt.label,
        exception=error,
    )


def run_many(prompt: Prompt | str, rows: Any, **kwargs: Any) -> Any:
    """Run ``prompt`` once per row of variables (a list of dicts or a DataFrame).

    Rows are spread over ``base_url`` (one or several), one client per URL, each row going to
    whichever server has a free place. ``concurrency=None`` (the default) runs as many rows at
    once on each server as it has prediction slots for the model (LM Studio 0.4's ``parallel``
    of the loaded instance, llama.cpp's ``total_slots``), and ``UNREPORTED_SLOTS`` (3) on a
    server that reports none; an int is the total instead, dealt out over the URLs in turn.
    Rows queued by a server do not run out of first-token budget while earlier rows are
    answered (the client shares it). ``BatchResult.concurrency`` says what was chosen.
    Returns the results in row order: a ``BatchResult`` for a list, or the DataFrame with
    ``status``, ``text``, ``error``, ``run_id``, ``ttft_s`` and ``duration_s`` columns added
    and, with ``schema=``, a ``parsed.KEY`` column per top-level key of the answers (see
    ``BatchResult.parsed_columns``), and ``.attrs["batch_id"]``, ``.attrs["concurrency"]``.
    A failed row is recorded and the batch goes on; Ctrl-C cancels the rows in flight
    (recorded as cancelled) and keeps the finished ones; ``resume=batch_id`` runs only the
    rows that did not succeed.
    """
    return shared_loop().run(arun_many(prompt, rows, **kwargs))
