"""Running the benchmark: every cell is one ``arun_many`` batch, so every run is in the history.

Why one fresh simulator per cell: a real server keeps processing a prompt after a blocking
client gave up (prefill cannot be interrupted), so a timed-out 64k-token prompt would still
occupy the model when the next cell starts, and each cell's verdict would depend on the one
before. A fresh simulator per cell keeps cells independent, which also lets a few of them run
side by side. Against a real server (``base_url``) the cells run one after another, unscaled.

Why queueing (``max_parallel=1``) by default: LM Studio answers one request per loaded model
at a time and queues the rest ("Model is currently generating. Queuing request"). Eight users
at once therefore wait for each other, and a blocking client's total timeout counts that
wait. That is the honest result, so it is what the benchmark shows; ``max_parallel=None``
models a server that serves everyone at once at full speed.

Why time scaling is safe: the simulator multiplies every duration by ``scale`` and the
benchmark multiplies every budget and timeout it gives the client by the same ``scale``, then
divides the measured times back. The verdicts are the same at any scale as long as the scaled
times stay well above the event loop's own overhead (milliseconds), which the default scale
does with a wide margin. The client's retry back-off is scaled the same way.

Why the streams survive queueing: a stream's first-token budget counts from the moment the
server last started or finished answering another stream of the same client (see
``Budgets.first_token``), and each cell's rows share one client. So the eighth of eight queued
64k-token prompts waits over an hour for its first token without failing, while the server is
visibly working through the queue; a server that goes silent still fails after the budget.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import simulator
from .._batch import BatchResult, arun_many, new_batch_id
from .._config import Budgets, Retries
from .._errors import PromptNotFound
from .._loop import shared_loop
from .._run import default_store
from .._store import PromptStore
from .._template import Prompt
from ._report import BenchReport, summarize
from ._workload import (
    FAULT_KINDS,
    LAPTOP_GPU,
    SizeBucket,
    SpeedProfile,
    Workload,
    default_workload,
    fault_overrides,
)

__all__ = ["BENCH_PROMPT", "DEFAULT_SCALE", "arun_benchmark", "run_benchmark"]

#: At this scale the default workload (its longest cell, eight queued 64k-token prompts, is 88
#: minutes of simulated work) takes about 90 s with four cells side by side, and a 30-minute
#: generation takes 27 s. The scaled times stay far above the event loop's overhead: the
#: closest verdict boundary is 50 ms of real time away.
DEFAULT_SCALE = 0.015

#: The stored prompt every benchmark run is recorded under (``lmstream history bench``).
BENCH_PROMPT = "lmstream-bench"

_SIM_MODEL = simulator.SimConfig().models[0]


@dataclass(frozen=True)
class _Cell:
    mode: str  # label: "stream" or "blocking 30s"
    kind: str  # "stream" or "blocking"
    timeout_s: float | None
    bucket: SizeBucket
    concurrency: int
    rows: int

    def estimate_s(self, profile: SpeedProfile) -> float:
        """Rough simulated length, to start the longest cells first."""
        busy = self.rows * profile.service_s(self.bucket.prompt_tokens, self.bucket.answer_tokens)
        return busy if self.timeout_s is None else min(busy, self.timeout_s)


def _bench_prompt(store: PromptStore) -> Prompt:
    template = "{{text}}"
    try:
        prompt = store.get(BENCH_PROMPT)
    except PromptNotFound:
        prompt = None
    if prompt is None or prompt.template != template:
        prompt = store.save(
            BENCH_PROMPT,
            template,
            description="lmstream bench workload: the prompt text is the whole variable",
        )
    return prompt


def _cells(
    workload: Workload,
    modes: Sequence[str],
    concurrency: Sequence[int],
    timeouts: Sequence[float],
) -> list[_Cell]:
    cells: list[_Cell] = []
    for kind in modes:
        if kind not in ("stream", "blocking"):
            raise ValueError(f"modes must be 'stream' and/or 'blocking', not {kind!r}")
        variants: list[tuple[str, float | None]] = (
            [("stream", None)]
            if kind == "stream"
            else [(f"blocking {t:g}s", float(t)) for t in timeouts]
        )
        for label, timeout in variants:
            for bucket in workload.buckets:
                for c in concurrency:
                    if c < 1:
                        raise ValueError("every concurrency must be at least 1")
                    cells.append(_Cell(label, kind, timeout, bucket, c, workload.rows(c)))
    return cells


async def arun_benchmark(
    workload: Workload | None = None,
    *,
    base_url: str | None = None,
    scale: float | None = None,
    modes: Sequence[str] = ("blocking", "stream"),
    concurrency: Sequence[int] = (1, 3, 8),
    timeouts: Sequence[float] = (30, 120, 300),
    budgets: Budgets | None = None,
    faults: float = 0.0,
    fault_kinds: Sequence[str] = FAULT_KINDS,
    retries: Retries | None = None,
    seed: int = 0,
    store: PromptStore | None = None,
    progress: bool = True,
    profile: SpeedProfile = LAPTOP_GPU,
    max_parallel: int | None = 1,
    parallel_cells: int | None = None,
    model: str | None = None,
) -> BenchReport:
    """The async form of :func:`run_benchmark`."""
    workload = workload or default_workload()
    budgets = budgets or Budgets()
    if not 0.0 <= faults <= 1.0:
        raise ValueError("faults is a rate between 0 and 1")
    kinds = tuple(fault_kinds)
    unknown = sorted(set(kinds) - set(FAULT_KINDS)) or ([] if kinds else ["(none)"])
    if unknown:
        raise ValueError(
            f"fault_kinds must be among {', '.join(FAULT_KINDS)}, not {', '.join(unknown)}"
        )
    retries = retries or Retries()
    if base_url is not None:
        if scale not in (None, 1, 1.0):
            raise ValueError("a real server runs in real time: leave scale unset with base_url")
        if faults:
            raise ValueError(
                "faults are injected by the simulator: leave faults at 0 with base_url"
            )
        scale = 1.0
    scale = DEFAULT_SCALE if scale is None else float(scale)
    if not scale > 0:
        raise ValueError("scale must be a positive number")
    parallel = parallel_cells or (1 if base_url is not None else 4)
    store = store or default_store()
    prompt = await asyncio.to_thread(_bench_prompt, store)
    cells = _cells(workload, modes, concurrency, timeouts)
    order = sorted(range(len(cells)), key=lambda i: -cells[i].estimate_s(profile))
    scaled = Budgets(
        connect=budgets.connect,  # opening a TCP connection is real time at any scale
        first_token=None if budgets.first_token is None else budgets.first_token * scale,
        idle=None if budgets.idle is None else budgets.idle * scale,
    )
    idle_sim = budgets.idle if budgets.idle is not None else 120.0
    scaled_retries = Retries(
        attempts=retries.attempts,
        backoff=retries.backoff * scale,
        max_backoff=retries.max_backoff * scale,
    )
    bar = _Bar(sum(c.rows for c in cells), progress)
    slots = asyncio.Semaphore(parallel)
    results: dict[int, list[dict[str, Any]]] = {}

    async def one_cell(index: int) -> None:
        cell = cells[index]
        async with slots:
            bar.note(cell)
            results[index] = await _run_cell(
                cell,
                workload,
                prompt,
                store,
                base_url,
                scale,
                scaled,
                scaled_retries,
                profile,
                max_parallel,
                faults,
                kinds,
                seed,
                idle_sim,
                model,
            )
            bar.done(cell)

    t0 = time.monotonic()
    try:
        await asyncio.gather(*(one_cell(i) for i in order))
    finally:
        bar.close()
    runs = [run for i in range(len(cells)) for run in results[i]]
    return BenchReport(
        rows=summarize(runs),
        runs=runs,
        scale=scale,
        base_url=base_url,
        profile=None if base_url is not None else profile,
        wall_s=time.monotonic() - t0,
        meta={
            "seed": seed,
            "faults": faults,
            "fault_kinds": list(kinds),
            "retries": retries.attempts,
            "max_parallel": max_parallel,
            "first_token_budget_s": budgets.first_token,
            "idle_budget_s": budgets.idle,
            "prompt": prompt.label,
        },
    )


async def _run_cell(
    cell: _Cell,
    workload: Workload,
    prompt: Prompt,
    store: PromptStore,
    base_url: str | None,
    scale: float,
    budgets: Budgets,
    retries: Retries,
    profile: SpeedProfile,
    max_parallel: int | None,
    faults: float,
    fault_kinds: tuple[str, ...],
    seed: int,
    idle_sim: float,
    model: str | None,
) -> list[dict[str, Any]]:
    bucket = cell.bucket
    kinds = [workload.fault(bucket, row, faults, seed, fault_kinds) for row in range(cell.rows)]
    rows: list[dict[str, Any]] = []
    for row, kind in enumerate(kinds):
        overrides: dict[str, object] | None = None
        if base_url is None:
            overrides = {
                "output_tokens": bucket.answer_tokens,
                **fault_overrides(kind, bucket, idle_sim),
            }
        rows.append({"text": workload.prompt_text(bucket, row, overrides=overrides)})
    sim: simulator.SimServer | None = None
    url = base_url
    if base_url is None:
        # The speeds come from ``profile`` through the default scenario; jitter 0 keeps every
        # cell the same at any scale.
        sim = await asyncio.to_thread(
            simulator.serve,
            time_scale=scale,
            max_parallel=max_parallel,
            seed=seed,
            defaults=simulator.Scenario(
                prefill_tps=profile.prefill_tps,
                gen_tps=profile.gen_tps,
                load_s=profile.load_s,
                jitter=0.0,
            ),
        )
        url = sim.base_url
    batch_id = new_batch_id()
    try:
        batch: BatchResult = await arun_many(
            prompt,
            rows,
            concurrency=cell.concurrency,
            store=store,
            base_url=url,
            budgets=budgets,
            retries=retries,
            batch_id=batch_id,
            progress=False,
            mode=cell.kind,
            timeout=None if cell.timeout_s is None else cell.timeout_s * scale,
            max_tokens=bucket.answer_tokens,
            model=model or (_SIM_MODEL if sim else None),
        )
    finally:
        if sim is not None:
            await asyncio.to_thread(sim.stop)
    out: list[dict[str, Any]] = []
    for row, (result, kind) in enumerate(zip(batch.results, kinds, strict=True)):
        stats = result.stats
        first = stats.ttft_s if cell.kind == "stream" else stats.duration_s
        out.append(
            {
                "mode": cell.mode,
                "timeout_s": cell.timeout_s,
                "bucket": bucket.name,
                "prompt_tokens": bucket.prompt_tokens,
                "answer_tokens": bucket.answer_tokens,
                "concurrency": cell.concurrency,
                "row": row,
                "fault": kind,
                "status": result.status,
                "run_id": result.run_id,
                "batch_id": batch_id,
                "ttfv_s": None if first is None else first / scale,
                "total_s": stats.duration_s / scale,
            }
        )
    return out


class _Bar:
    """One tqdm bar over every run of the benchmark (a widget in a notebook, text otherwise)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar: Any = None
        self.running: list[str] = []
        if enabled and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="lmstream bench", unit="run", leave=True)

    @staticmethod
    def _label(cell: _Cell) -> str:
        return f"{cell.mode} {cell.bucket.name} x{cell.concurrency}"

    def note(self, cell: _Cell) -> None:
        self.running.append(self._label(cell))
        if self.bar is not None:
            self.bar.set_postfix_str(", ".join(self.running))

    def done(self, cell: _Cell) -> None:
        self.running.remove(self._label(cell))
        if self.bar is not None:
            self.bar.set_postfix_str(", ".join(self.running), refresh=False)
            self.bar.update(cell.rows)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_benchmark(workload: Workload | None = None, **kwargs: Any) -> BenchReport:
    """Run the benchmark and return its :class:`BenchReport`.

    By default on a fresh embedded simulator per cell, at the ``profile``'s speed with every
    duration multiplied by ``scale`` (budgets and timeouts too; reported times are divided
    back, so they read as real seconds on the imagined machine). With ``base_url`` the same
    workload runs against a real server, in real time, one cell after another.

    Each cell is ``mode x size bucket x concurrency``: ``modes`` ``"blocking"`` (one cell per
    total ``timeouts`` value) and ``"stream"`` (the first-token and idle ``budgets``),
    ``concurrency`` prompts sent at once through :func:`run_many`. ``faults`` is the rate of
    rows given an injected fault, of the ``fault_kinds`` (see ``FAULT_KINDS``), picked from
    ``seed``; every fault is transient, and ``retries`` (scaled like the budgets) retry what
    failed before the first token. Every run is recorded in ``store`` under the prompt
    ``lmstream-bench``.

    ``max_parallel`` is how many requests the simulated server serves at once (1, LM Studio's
    queue, by default); ``parallel_cells`` how many cells run side by side (4 on the
    simulator, each on its own server; always 1 against a real server unless given);
    ``progress`` shows one bar over all runs.
    """
    return shared_loop().run(arun_benchmark(workload, **kwargs))
