"""run_many(): one prompt over many rows of variables, a few at a time, every row recorded.

A failed row never stops the batch: it is recorded with its status and the batch goes on.
Every run carries the batch id and its row number, so ``resume=batch_id`` runs only the rows
whose latest run did not succeed. An interrupt cancels what is in flight (each of those runs
is recorded as cancelled, its connection closed) and keeps what finished.

Rows are spread over one or more base URLs (several LM Studio machines): each URL gets its own
client, and workers take the next row from a shared queue, so a slow machine simply takes
fewer rows. The progress bar is tqdm's text bar in a terminal and an HTML line in a notebook
(``_batch_progress``), which a saved notebook shows without its kernel.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._batch_progress import advance, progress_bar
from ._client import LMStudioClient
from ._config import Budgets, Retries
from ._errors import LMStreamError, TemplateError, render, rerun_could_help
from ._events import Stats
from ._loop import shared_loop
from ._prompt_fields import check_max_tokens, check_temperature
from ._run import RunResult, arun, default_store, status_of
from ._store import PromptStore
from ._template import Prompt

_NO_STATS = Stats(ttft_s=None, duration_s=0.0, chunks=0, text_chars=0)


@dataclass
class BatchResult:
    """The results of a batch in row order, and the id to resume it with."""

    batch_id: str
    results: list[RunResult]

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
        return (
            f"<BatchResult {self.batch_id}: {self.succeeded} ok, {self.failed} failed "
            f"of {len(self.results)}>"
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


def new_batch_id() -> str:
    """A short id for a batch (pass it as ``batch_id=`` to know it before the batch starts)."""
    return uuid.uuid4().hex[:12]


def _rows(rows: Any) -> tuple[list[dict[str, Any]], Any]:
    """Rows as dicts, and the DataFrame they came from (if they did)."""
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):
        return [dict(r) for r in rows.to_dict("records")], rows
    return [dict(r) for r in rows], None


def _result_from_record(store: PromptStore, run_id: int, label: str) -> RunResult:
    rec = store.get_run(run_id)
    return RunResult(
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


class _Progress:
    """done / failed / in flight and tokens per second, on one progress bar (or nothing)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar: Any = None
        self.done = self.failed = self.running = self.tokens = 0
        self.t0 = time.monotonic()
        if enabled and total:
            self.bar = progress_bar(total, "lmstream batch", "row")

    def _post(self) -> None:
        if self.bar is not None:
            elapsed = max(1e-9, time.monotonic() - self.t0)
            self.bar.set_postfix(
                ok=self.done,
                failed=self.failed,
                in_flight=self.running,
                tok_s=f"{self.tokens / elapsed:.1f}",
                refresh=False,
            )

    def started(self) -> None:
        self.running += 1
        self._post()
        if self.bar is not None:
            self.bar.refresh()

    def finished(self, result: RunResult) -> None:
        self.running -= 1
        if result.ok:
            self.done += 1
        else:
            self.failed += 1
        self.tokens += result.stats.completion_tokens or 0
        self._post()
        if self.bar is not None:
            advance(self.bar)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def arun_many(
    prompt: Prompt | str,
    rows: Any,
    *,
    concurrency: int = 3,
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
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    store = store or default_store()
    if isinstance(prompt, str):
        prompt = await asyncio.to_thread(store.get, prompt)
    # A setting out of range would fail every row alike: refused once, before any row runs.
    temperature, max_tokens = extra.get("temperature"), extra.get("max_tokens")
    try:
        check_temperature(temperature if temperature is not None else prompt.temperature)
        check_max_tokens(max_tokens if max_tokens is not None else prompt.max_tokens)
    except LMStreamError as exc:
        exc.interface = extra.get("interface", "python")
        raise
    records, frame = _rows(rows)
    batch_id = resume or batch_id or new_batch_id()
    results: list[RunResult | None] = [None] * len(records)
    todo = list(range(len(records)))
    if resume is not None:
        latest = await asyncio.to_thread(store.batch_outcomes, resume)
        for index, run_id in latest.items():
            if 0 <= index < len(records):
                previous = await asyncio.to_thread(_result_from_record, store, run_id, prompt.label)
                if previous.ok:
                    results[index] = previous
        todo = [i for i in todo if results[i] is None]
    urls = [base_url] if base_url is None or isinstance(base_url, str) else list(base_url)
    clients = [LMStudioClient(url, budgets=budgets, retries=retries) for url in urls]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in todo:
        queue.put_nowait(index)
    bar = _Progress(len(todo), progress)

    async def one(index: int, client: LMStudioClient) -> RunResult:
        variables = records[index]
        try:
            prompt.render(variables, allow_extra=True)
        except TemplateError as exc:
            exc.interface = extra.get("interface", "python")
            return await asyncio.to_thread(
                _record_refused, store, prompt, variables, exc, client.url, batch_id, index
            )
        return await arun(
            prompt,
            variables,
            model=model,
            store=store,
            client=client,
            budgets=budgets,
            allow_extra=True,
            raise_errors=False,
            batch_id=batch_id,
            batch_row=index,
            **extra,
        )

    async def worker(client: LMStudioClient) -> None:
        while True:
            try:
                index = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            bar.started()
            result = await one(index, client)
            results[index] = result
            bar.finished(result)

    try:
        workers = [
            asyncio.ensure_future(worker(clients[i % len(clients)])) for i in range(concurrency)
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
    final = [r for r in results if r is not None]
    batch = BatchResult(batch_id, final)
    if frame is not None:
        out = frame.copy()
        for key in ("status", "text", "error", "run_id", "ttft_s", "duration_s"):
            out[key] = [row[key] for row in batch.as_dicts()]
        out.attrs["batch_id"] = batch_id
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

    At most ``concurrency`` rows stream at once, spread over ``base_url`` (one or several),
    one client per URL: a server that queues requests (LM Studio answers one at a time) does
    not make the queued rows run out of first-token budget while earlier rows are answered.
    Returns the results in row order: a ``BatchResult`` for a list, or the DataFrame with
    ``status``, ``text``, ``error``, ``run_id``, ``ttft_s`` and ``duration_s`` columns added
    (and ``.attrs["batch_id"]``). A failed row is recorded and the batch goes on; Ctrl-C
    cancels the rows in flight (recorded as cancelled) and keeps the finished ones;
    ``resume=batch_id`` runs only the rows that did not succeed.
    """
    return shared_loop().run(arun_many(prompt, rows, **kwargs))
