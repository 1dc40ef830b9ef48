"""Running the benchmark: every cell is one ``arun_many`` batch, so every run is in the history.

Why one fresh simulator per cell: a real server keeps processing a prompt after a blocking
client gave up (prefill cannot be interrupted), so a timed-out 64k-token prompt would still
occupy the model when the next cell starts, and each cell's verdict would depend on the one
before. A fresh simulator per cell keeps cells independent, which also lets several of them run
side by side. Against a real server (``base_url``) the cells run one after another, unscaled.

Why two queue models. LM Studio 0.4 answers up to 4 predictions per loaded GGUF model at once
("Max Concurrent Predictions", continuous batching; the predictions in the slots share the
model's speed) and queues the rest, while MLX models, and every model in LM Studio 0.3, answer
one request at a time ("Model is currently generating. Queuing request"). Eight users at once
therefore wait for each other, four by four or one by one, and a blocking client's total timeout
counts that wait. Both are honest results for some user, so every cell runs against both
(``queues=(4, 1)``, labelled "parallel 4" and "one at a time"); ``None`` models a server that
serves everyone at once at full speed.

Why three ways to ask. A blocking request shows nothing before the whole answer. A stream to
LM Studio 0.4's native chat (the client's default ``api="auto"``) shows prompt-processing
progress from the moment its prompt is taken up; a stream to the OpenAI-compatible endpoint
shows nothing before its first token. The ``"stream-openai"`` mode runs its cells on a server
without the native API (as LM Studio 0.3 is, and as a client with ``api="openai"`` sees any
server), so the benchmark's batches take that endpoint by themselves. The report gives each the
time to first visible progress beside the time to first token.

Why the streams survive queueing: a stream's first-token budget counts from the moment the
server last started or finished answering another stream of the same client, or reported
progress on one (see ``Budgets.first_token``), and each cell's rows share one client. So the
eighth of eight queued 64k-token prompts waits over an hour for its first token without
failing, while the server is visibly working through the queue (with four slots, the fifth
waits for four long prompts processed side by side, which report their progress); a server
that goes silent still fails after the budget.

Why every cell has its own time scale. The simulator multiplies every duration by a scale and
the benchmark multiplies every budget, timeout and back-off it gives the client by the same
scale, so the verdicts do not depend on it. But each verdict is a race between the client's
clock and the server's answer, run in real time: at one scale of 0.015 for every cell, a
blocking answer due 3.3 simulated seconds before its 30 s timeout was due 50 ms of real time
before it, and on a loaded machine it came later than that (a cell read 0 % instead of 100 %).
Since the simulator is deterministic, ``_timeline`` works out each row's outcome and margin
(the simulated time between the event that decides its verdict and the boundary that would
flip it) before the cell runs, and the cell runs at the scale that puts its closest verdict
``margin`` (2 s) of real time from its boundary, never faster than ``scale``. Only the cells
with close verdicts slow down: the tightest thirty-second timeout runs at about half real
time, the 92 simulated minutes of eight queued 64k-token streams at 1/80. What the model
predicts is only used to choose the scales and to compare with (``BenchReport.predicted``);
the table is what the client did.

Two kinds of verdict are told apart because they are exposed to different delays. One on a
whole request (a total timeout, a first-token budget) is exposed to everything between
sending and the answer: connecting, the server's queue, the event loop being busy with other
cells. Measured on a 2-core machine with two busy loops and other test suites beside it
(load average 5 to 8), the latest blocking answer came 0.2 to 0.44 s after its predicted time,
so ``margin`` is 2 s. One on a single gap between two events of a flowing stream (the idle
budget) is exposed to one wake-up of the event loop: the longest gap measured under the same
load was 0.18 s for an expected 4 ms, so it gets half of ``margin`` (1.5 s at the default
scale, where the 120 s idle budget is 1.5 s long).

Weighed and not taken: measuring the machine's lateness at start and scaling to it (the
lateness that mattered came later, from the benchmark's own work and from whatever else
started meanwhile, and a table that takes a different time on every run is harder to trust);
starting all cells at once so none starts in the middle of another's requests (the burst made
the first answers 0.7 to 1.6 s late). What was taken besides the margins: the simulators run
in a process of their own (``_simhost``), and the simulated answers come ten tokens to an
event. Time-scaled, 30 tokens/s are 2400 events/s per stream, a rate no server sends, which
makes the benchmark measure the interpreter instead of the budgets; an event every third of a
simulated second is still far inside the 120 s idle budget, and it halved the benchmark's CPU
time. The simulator counts an event as a token, so the history shows a tenth of the answer
tokens for a simulated benchmark run (the text itself is the whole answer).

Cells that depend on arrival order: the rows of a cell are sent at the same moment, and when
they differ (one has a fault) the order in which they reach the server can decide how many
succeed. That race is not the benchmark's to win, so such a cell is not predicted and runs
at ``scale``; notebook 03 shows those counts without comparing them. So is a cell whose closest
verdict is nearer its boundary than ``margin`` even in real time: with four slots sharing the
model, eight 500-token requests end a few seconds apart, and one of them 0.2 s after the 30 s
timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import simulator
from .._batch import BatchResult, arun_many, new_batch_id
from .._batch_progress import advance, progress_bar
from .._config import Budgets, Retries
from .._errors import PromptNotFound
from .._loop import shared_loop
from .._run import default_store
from .._store import PromptStore
from .._template import Prompt
from ..simulator._pace import LMSTUDIO_BATCH, prompt_steps
from ._report import BenchReport, summarize
from ._simhost import SimHost
from ._timeline import Forecast, Rules, TimedRow, forecast_cell
from ._workload import (
    DEFAULT_QUEUES,
    FAULT_KINDS,
    LAPTOP_GPU,
    MODES,
    SizeBucket,
    SpeedProfile,
    Workload,
    default_workload,
    fault_overrides,
    queue_label,
)

__all__ = [
    "BENCH_PROMPT",
    "DEFAULT_MARGIN",
    "DEFAULT_SCALE",
    "CellPlan",
    "arun_benchmark",
    "plan_benchmark",
    "run_benchmark",
]

#: The fastest a cell runs: one simulated second in 12.5 ms of real time, which makes the
#: 120 s idle budget 1.5 s long. Cells with a verdict near its boundary run slower.
DEFAULT_SCALE = 0.0125

#: The least real time, in seconds, between a verdict on a whole request (a total timeout, a
#: first-token budget) and the boundary that would flip it; see the module docstring.
DEFAULT_MARGIN = 2.0

#: A cell never runs slower than real time.
_MAX_SCALE = 1.0

#: The share of ``margin`` a verdict on one gap between two events (the idle budget) needs.
_GAP_SHARE = 0.5

#: Answer tokens per server-sent event on the simulator (see the module docstring).
_TOKENS_PER_EVENT = 10

#: The stored prompt every benchmark run is recorded under, in the benchmark's store.
BENCH_PROMPT = "lmstream-bench"

#: The label of a ``"stream-openai"`` cell in the tables.
_NO_PROGRESS = "stream (no progress)"


_SIM_MODEL = simulator.SimConfig().models[0]


@dataclass(frozen=True)
class CellPlan:
    """One cell of the benchmark (queue x mode x size x concurrency) as planned before it runs.

    ``queue`` names the server's queue model (``parallel`` slots per model; "real server"
    against one), ``native`` whether its server has LM Studio 0.4's native chat (a stream there
    reports progress). ``texts`` are the prompts of its rows and ``faults`` their injected
    faults. ``scale`` is the cell's time scale (1.0 against a real server). ``forecast`` is
    what the timing model predicts on the simulator (``None`` against a real server).
    """

    queue: str
    parallel: int | None
    native: bool
    mode: str  # label: "stream", "stream (no progress)" or "blocking 30s"
    kind: str  # "stream" or "blocking"
    timeout_s: float | None
    bucket: SizeBucket
    concurrency: int
    texts: tuple[str, ...]
    faults: tuple[str | None, ...]
    scale: float
    forecast: Forecast | None

    @property
    def rows(self) -> int:
        return len(self.texts)

    @property
    def key(self) -> tuple[str, str, str, int]:
        """(queue, mode, bucket, concurrency): the cell's key in the report's tables."""
        return (self.queue, self.mode, self.bucket.name, self.concurrency)

    @property
    def predicted(self) -> dict[str, int] | None:
        """How many rows the timing model expects to end with each status; ``None`` against a
        real server, or when the order in which rows sent together arrive decides it."""
        return None if self.forecast is None else self.forecast.statuses

    @property
    def margin_ms(self) -> float:
        """The closest a verdict on a whole request (a total timeout, a first-token budget) is
        to its boundary, in milliseconds of real time at the cell's scale (``inf`` if none)."""
        if self.forecast is None or self.forecast.statuses is None:
            return math.inf
        return self.forecast.margin_s * self.scale * 1000

    @property
    def gap_margin_ms(self) -> float:
        """The closest a verdict on one gap between two events (the idle budget) is to its
        boundary, in milliseconds of real time."""
        if self.forecast is None:
            return math.inf
        return self.forecast.gap_margin_s * self.scale * 1000

    @property
    def real_s(self) -> float:
        """About how long the cell takes in real time (its timeout, unscaled, on a real
        server)."""
        if self.forecast is None:
            return self.timeout_s or math.inf
        return self.forecast.decided_s * self.scale


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


def _events(bucket: SizeBucket) -> int:
    return max(1, math.ceil(bucket.answer_tokens / _TOKENS_PER_EVENT))


def _overrides(
    bucket: SizeBucket, kind: str | None, profile: SpeedProfile, idle_sim: float
) -> dict[str, object]:
    """The simulator scenario of one row (simulated seconds), written into its prompt."""
    events = _events(bucket)
    fields: dict[str, object] = {"output_tokens": events}
    if _TOKENS_PER_EVENT > 1:
        fields["gen_tps"] = profile.gen_tps / _TOKENS_PER_EVENT
        fields["chunk_chars"] = 4 * _TOKENS_PER_EVENT
    return {**fields, **fault_overrides(kind, events, idle_sim)}


def _cell_scale(base: float, margin: float, forecast: Forecast) -> float:
    """The slowest of ``base``, the scale that puts the closest verdict on a whole request
    ``margin`` real seconds from its boundary, and the one that puts the closest gap verdict
    ``_GAP_SHARE * margin`` from its own (never slower than real time). The outcome of a cell
    that depends on the order its rows arrive in is not made reproducible by any margin, so
    its request verdicts do not slow it down."""
    needed = base
    request = math.inf if forecast.statuses is None else forecast.margin_s
    for margin_s, wanted in ((request, margin), (forecast.gap_margin_s, _GAP_SHARE * margin)):
        if wanted > 0 and not math.isinf(margin_s):
            needed = max(needed, _MAX_SCALE if margin_s <= 0 else wanted / margin_s)
    return max(base, min(_MAX_SCALE, needed))


def plan_benchmark(
    workload: Workload | None = None,
    *,
    base_url: str | None = None,
    scale: float | None = None,
    margin: float = DEFAULT_MARGIN,
    modes: Sequence[str] = MODES,
    concurrency: Sequence[int] = (1, 3, 8),
    timeouts: Sequence[float] = (30, 120, 300),
    budgets: Budgets | None = None,
    faults: float = 0.0,
    fault_kinds: Sequence[str] = FAULT_KINDS,
    retries: Retries | None = None,
    seed: int = 0,
    profile: SpeedProfile = LAPTOP_GPU,
    queues: Sequence[int | None] = DEFAULT_QUEUES,
) -> list[CellPlan]:
    """The cells :func:`run_benchmark` would run with these arguments, without running them:
    their prompts, faults, predicted outcomes, margins and time scales."""
    workload = workload or default_workload()
    budgets = budgets or Budgets()
    retries = retries or Retries()
    if not 0.0 <= faults <= 1.0:
        raise ValueError("faults is a rate between 0 and 1")
    kinds = tuple(fault_kinds)
    unknown = sorted(set(kinds) - set(FAULT_KINDS)) or ([] if kinds else ["(none)"])
    if unknown:
        raise ValueError(
            f"fault_kinds must be among {', '.join(FAULT_KINDS)}, not {', '.join(unknown)}"
        )
    if base_url is not None:
        if scale not in (None, 1, 1.0):
            raise ValueError("a real server runs in real time: leave scale unset with base_url")
        if faults:
            raise ValueError(
                "faults are injected by the simulator: leave faults at 0 with base_url"
            )
    base = DEFAULT_SCALE if scale is None else float(scale)
    if not base > 0:
        raise ValueError("scale must be a positive number")
    if not margin >= 0:
        raise ValueError("margin must be a number of seconds >= 0")
    if not queues or any(q is not None and (int(q) != q or q < 1) for q in queues):
        raise ValueError("queues are prediction slots per model: whole numbers >= 1, or None")
    # Against a real server the queue is whatever it is: one pass.
    passes: list[tuple[str, int | None]] = (
        [("real server", None)]
        if base_url is not None
        else [(queue_label(q), q) for q in dict.fromkeys(queues)]
    )
    plans: list[CellPlan] = []
    for queue, parallel in passes:
        for kind in modes:
            if kind not in MODES:
                raise ValueError(f"modes must be among {', '.join(MODES)}, not {kind!r}")
            variants: list[tuple[str, float | None]] = (
                [(f"blocking {t:g}s", float(t)) for t in timeouts]
                if kind == "blocking"
                else [(_NO_PROGRESS if kind == "stream-openai" else "stream", None)]
            )
            for label, timeout in variants:
                for bucket in workload.buckets:
                    for c in concurrency:
                        if c < 1:
                            raise ValueError("every concurrency must be at least 1")
                        cell = CellPlan(
                            queue,
                            parallel,
                            kind != "stream-openai",
                            label,
                            "blocking" if kind == "blocking" else "stream",
                            timeout,
                            bucket,
                            c,
                            (),
                            (),
                            1.0,
                            None,
                        )
                        faulty = tuple(
                            workload.fault(bucket, row, faults, seed, kinds)
                            for row in range(workload.rows(c))
                        )
                        if base_url is None:
                            rules = Rules(
                                kind=cell.kind,
                                concurrency=c,
                                timeout_s=timeout,
                                first_token_s=budgets.first_token,
                                idle_s=budgets.idle,
                                retries=retries,
                                max_parallel=parallel,
                                progress=cell.native,
                            )
                            cell = _on_simulator(
                                cell, workload, faulty, rules, profile, base, margin
                            )
                        else:
                            texts = tuple(
                                workload.prompt_text(bucket, row, overrides=None)
                                for row in range(len(faulty))
                            )
                            cell = dataclasses.replace(cell, texts=texts, faults=faulty)
                        plans.append(cell)
    return plans


def _steps(tokens: int, prefill_tps: float, *, bounded: bool) -> tuple[float, ...]:
    """The simulator's prompt steps for a prompt of ``tokens`` (seconds each, alone): its
    native chat spreads a long prompt over a bounded number of progress reports."""
    marks = prompt_steps(tokens, LMSTUDIO_BATCH, bounded=bounded)
    return tuple((b - a) / prefill_tps for a, b in zip([0, *marks], marks, strict=False))


def _on_simulator(
    cell: CellPlan,
    workload: Workload,
    faults: tuple[str | None, ...],
    rules: Rules,
    profile: SpeedProfile,
    base: float,
    margin: float,
) -> CellPlan:
    """``cell`` with its simulator prompts, its forecast and the time scale it needs."""
    idle = rules.idle_s if rules.idle_s is not None else 120.0
    texts = tuple(
        workload.prompt_text(
            cell.bucket, row, overrides=_overrides(cell.bucket, fault, profile, idle)
        )
        for row, fault in enumerate(faults)
    )
    # The simulator counts a prompt's characters / 4 as its tokens; a blocking request goes to
    # /chat/completions, a stream to the native chat where the server has it.
    bounded = cell.kind == "stream" and cell.native
    timed = []
    for text, fault in zip(texts, faults, strict=True):
        tokens = max(1, len(text) // 4)
        timed.append(
            TimedRow(
                prefill_s=tokens / profile.prefill_tps,
                events=_events(cell.bucket),
                event_s=_TOKENS_PER_EVENT / profile.gen_tps,
                fault=fault,
                stall_s=3 * idle if fault == "stall" else 0.0,
                steps=_steps(tokens, profile.prefill_tps, bounded=bounded),
            )
        )
    forecast = forecast_cell(timed, rules)
    if forecast.statuses is not None and forecast.margin_s * _MAX_SCALE < margin:
        # Its closest verdict is nearer its boundary than ``margin`` even in real time, so a
        # loaded machine may flip it: like an order-dependent cell, it is not predicted.
        forecast = dataclasses.replace(forecast, statuses=None)
    return dataclasses.replace(
        cell,
        texts=texts,
        faults=faults,
        scale=_cell_scale(base, margin, forecast),
        forecast=forecast,
    )


async def arun_benchmark(
    workload: Workload | None = None,
    *,
    base_url: str | None = None,
    scale: float | None = None,
    margin: float = DEFAULT_MARGIN,
    modes: Sequence[str] = MODES,
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
    queues: Sequence[int | None] = DEFAULT_QUEUES,
    parallel_cells: int | None = None,
    model: str | None = None,
) -> BenchReport:
    """The async form of :func:`run_benchmark`."""
    budgets = budgets or Budgets()
    retries = retries or Retries()
    if parallel_cells is not None and parallel_cells < 1:
        raise ValueError("parallel_cells must be at least 1")
    plans = await asyncio.to_thread(
        plan_benchmark,
        workload,
        base_url=base_url,
        scale=scale,
        margin=margin,
        modes=modes,
        concurrency=concurrency,
        timeouts=timeouts,
        budgets=budgets,
        faults=faults,
        fault_kinds=fault_kinds,
        retries=retries,
        seed=seed,
        profile=profile,
        queues=queues,
    )
    simulated = base_url is None
    parallel = parallel_cells or (_PARALLEL_CELLS if simulated else 1)
    store = store or default_store()
    prompt = await asyncio.to_thread(_bench_prompt, store)
    bar = _Bar(sum(p.rows for p in plans), progress)
    slots = asyncio.Semaphore(parallel)
    t0 = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        host = await stack.enter_async_context(SimHost()) if simulated else None
        cell = _CellRunner(prompt, store, base_url, host, budgets, retries, profile, seed, model)

        async def one(plan: CellPlan) -> list[dict[str, Any]]:
            async with slots:
                return await cell.run(plan, bar)

        # The longest cells first, so that the short ones fill in around them.
        order = sorted(plans, key=lambda p: -p.real_s)
        tasks = [asyncio.ensure_future(one(plan)) for plan in order]
        try:
            done = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            bar.close()
    results = {id(plan): rows for plan, rows in zip(order, done, strict=True)}
    runs = [run for plan in plans for run in results[id(plan)]]
    return BenchReport(
        rows=summarize(runs),
        runs=runs,
        scale=1.0 if not simulated else (DEFAULT_SCALE if scale is None else float(scale)),
        base_url=base_url,
        profile=profile if simulated else None,
        wall_s=time.monotonic() - t0,
        predicted={p.key: p.predicted for p in plans if p.predicted is not None},
        meta={
            "seed": seed,
            "faults": faults,
            "fault_kinds": list(fault_kinds),
            "retries": retries.attempts,
            "queues": [{"queue": queue_label(q), "parallel": q} for q in dict.fromkeys(queues)]
            if simulated
            else [{"queue": "real server", "parallel": None}],
            "first_token_budget_s": budgets.first_token,
            "idle_budget_s": budgets.idle,
            "prompt": prompt.label,
            "margin_real_s": margin if simulated else None,
            "tokens_per_event": _TOKENS_PER_EVENT if simulated else None,
        },
    )


#: Cells side by side on the simulator, each on its own server. Most cells spend their time
#: waiting on a scaled clock, so ten fit on two cores: the default workload took 121 s with six
#: and 73 s with ten (its longest cell alone takes 69 s), its latest blocking answer 125 ms after
#: its predicted time against a 2 s margin while a compiler used both cores.
_PARALLEL_CELLS = 10


@dataclass(frozen=True)
class _CellRunner:
    """What every cell of one benchmark shares: the prompt, the store, the servers' settings."""

    prompt: Prompt
    store: PromptStore
    base_url: str | None
    host: SimHost | None  # the simulators' process, unless against a real server
    budgets: Budgets
    retries: Retries
    profile: SpeedProfile
    seed: int
    model: str | None

    async def run(self, plan: CellPlan, bar: _Bar) -> list[dict[str, Any]]:
        """One cell, on a fresh simulator unless against a real server; its run records."""
        url = self.base_url
        if self.host is not None:
            # The speeds come from ``profile`` through the default scenario; jitter 0 keeps
            # every cell the same at any scale.
            url = await self.host.start(
                simulator.SimConfig(
                    time_scale=plan.scale,
                    parallel=plan.parallel,
                    native_api=plan.native,
                    seed=self.seed,
                    defaults=simulator.Scenario(
                        prefill_tps=self.profile.prefill_tps,
                        gen_tps=self.profile.gen_tps,
                        load_s=self.profile.load_s,
                        jitter=0.0,
                    ),
                )
            )
        bar.note(plan)
        try:
            batch = await self._batch(plan, url)
        finally:
            if self.host is not None and url is not None:
                await self.host.stop(url)
        bar.done(plan)
        return _records(plan, batch)

    async def _batch(self, plan: CellPlan, url: str | None) -> BatchResult:
        """One cell as one ``arun_many`` batch, with every budget and timeout scaled."""
        scale, budgets, retries = plan.scale, self.budgets, self.retries
        batch: BatchResult = await arun_many(
            self.prompt,
            [{"text": text} for text in plan.texts],
            concurrency=plan.concurrency,
            store=self.store,
            base_url=url,
            budgets=Budgets(
                connect=budgets.connect,  # opening a TCP connection is real time at any scale
                first_token=None if budgets.first_token is None else budgets.first_token * scale,
                idle=None if budgets.idle is None else budgets.idle * scale,
            ),
            retries=Retries(
                attempts=retries.attempts,
                backoff=retries.backoff * scale,
                max_backoff=retries.max_backoff * scale,
            ),
            batch_id=new_batch_id(),
            progress=False,
            mode=plan.kind,
            timeout=None if plan.timeout_s is None else plan.timeout_s * scale,
            max_tokens=plan.bucket.answer_tokens,
            model=self.model or (_SIM_MODEL if self.host is not None else None),
        )
        return batch


def _records(plan: CellPlan, batch: BatchResult) -> list[dict[str, Any]]:
    """One record per run of a cell, times in simulated seconds."""
    scale, bucket = plan.scale, plan.bucket
    late = _lateness(plan, batch)
    signs = _first_signs(plan, batch)
    out: list[dict[str, Any]] = []
    for row, (result, kind) in enumerate(zip(batch.results, plan.faults, strict=True)):
        stats = result.stats
        first = stats.ttft_s if plan.kind == "stream" else stats.duration_s
        sign = signs.get(row)
        out.append(
            {
                "queue": plan.queue,
                "parallel": plan.parallel,
                "mode": plan.mode,
                "timeout_s": plan.timeout_s,
                "bucket": bucket.name,
                "prompt_tokens": bucket.prompt_tokens,
                "answer_tokens": bucket.answer_tokens,
                "concurrency": plan.concurrency,
                "row": row,
                "fault": kind,
                "status": result.status,
                "run_id": result.run_id,
                "batch_id": batch.batch_id,
                "ttfv_s": None if first is None else first / scale,
                "ttfp_s": sign,
                "total_s": stats.duration_s / scale,
                "scale": scale,
                "margin_ms": _finite(plan.margin_ms),
                "gap_margin_ms": _finite(plan.gap_margin_ms),
                "late_ms": late.get(row),
            }
        )
    return out


def _first_signs(plan: CellPlan, batch: BatchResult) -> dict[int, float]:
    """Each row's time to first visible progress, in simulated seconds.

    Nothing of a blocking request is visible before its whole answer, so that is its duration.
    A stream shows its first progress report, or its first token when none came before. A
    stream that gets a slot hears of its prompt at once, so nearly all of that time is the
    client's, the transport's and the machine's, which pass in real time: divided by a scale
    of 1/80, the 25 ms a loaded machine takes to send a request and record it would read as
    2 s. So where the timing model predicted the cell, a stream's figure is the wait the
    simulated server imposed (the model's, matched in order like ``_lateness``) plus the real
    time the run took beyond it, unscaled; elsewhere it is the measured time divided by the
    scale.
    """
    scale = plan.scale
    if plan.kind == "blocking":
        return {row: r.stats.duration_s / scale for row, r in enumerate(batch.results)}
    measured = {
        row: r.stats.first_progress_s
        for row, r in enumerate(batch.results)
        if r.stats.first_progress_s is not None
    }
    out = {row: seconds / scale for row, seconds in measured.items()}
    if plan.predicted is None or plan.forecast is None:
        return out
    got = sorted((s, row) for row, s in measured.items() if batch.results[row].status == "ok")
    due = sorted(e.ttfp_s for e in plan.forecast.rows if e.status == "ok" and e.ttfp_s is not None)
    for (seconds, row), want in zip(got, due, strict=False):
        out[row] = want + (seconds - want * scale)
    return out


def _finite(value: float) -> float | None:
    return None if math.isinf(value) else value


def _lateness(plan: CellPlan, batch: BatchResult) -> dict[int, float]:
    """Real milliseconds by which each successful blocking answer came after its predicted time.

    The rows of a cell are sent together and the server takes them in whatever order they
    arrive, so the n-th fastest answer is compared with the n-th earliest prediction. This is
    the part of the margin the machine used up; a stream's verdicts depend on single gaps, not
    on its total time, so streams are not counted.
    """
    if plan.predicted is None or plan.forecast is None or plan.kind != "blocking":
        return {}
    got = sorted(
        (r.stats.duration_s / plan.scale, row)
        for row, r in enumerate(batch.results)
        if r.status == "ok"
    )
    due = sorted(
        e.total_s for e in plan.forecast.rows if e.status == "ok" and e.total_s is not None
    )
    return {
        row: (total - want) * plan.scale * 1000
        for (total, row), want in zip(got, due, strict=False)
    }


class _Bar:
    """One bar over every run of the benchmark (HTML in a notebook, tqdm's text otherwise)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar: Any = None
        self.running: list[str] = []
        if enabled and total:
            self.bar = progress_bar(total, "lmstream bench", "run")

    @staticmethod
    def _label(cell: CellPlan) -> str:
        return f"{cell.queue}: {cell.mode} {cell.bucket.name} x{cell.concurrency}"

    def _show(self) -> None:
        more = len(self.running) - 1
        text = self.running[0] if self.running else ""
        if more > 0:
            text += f" and {more} more"
        self.bar.set_postfix_str(text, refresh=False)

    def note(self, cell: CellPlan) -> None:
        self.running.append(self._label(cell))
        if self.bar is not None:
            self._show()

    def done(self, cell: CellPlan) -> None:
        self.running.remove(self._label(cell))
        if self.bar is not None:
            self._show()
            advance(self.bar, cell.rows)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_benchmark(workload: Workload | None = None, **kwargs: Any) -> BenchReport:
    """Run the benchmark and return its :class:`BenchReport`.

    By default on a fresh embedded simulator per cell, at the ``profile``'s speed with every
    duration multiplied by the cell's time scale (budgets and timeouts too; reported times are
    divided back, so they read as real seconds on the imagined machine). A cell's scale is
    ``scale`` (default ``DEFAULT_SCALE``), or slower where a verdict would otherwise be less
    than ``margin`` seconds of real time from its boundary (default ``DEFAULT_MARGIN``;
    ``margin=0`` runs every cell at ``scale``); :func:`plan_benchmark` shows the scales and
    margins without running anything. With ``base_url`` the same workload runs against a real
    server, in real time, one cell after another.

    Each cell is ``queue x mode x size bucket x concurrency``, ``concurrency`` prompts sent at
    once through :func:`run_many`. ``modes`` (see ``MODES``): ``"blocking"`` (one cell per
    total ``timeouts`` value), ``"stream"`` (LM Studio 0.4's native chat, which reports
    progress while the prompt is processed) and ``"stream-openai"`` (the OpenAI-compatible
    endpoint, silent until the first token); streams have the first-token and idle
    ``budgets``. ``queues`` are the prediction slots of the simulated server, one pass of every
    cell per value: 4 (LM Studio 0.4's default for GGUF models; the predictions in the slots
    share the model's speed) and 1 (MLX models and LM Studio 0.3: one answer at a time, the rest
    queued) by default, ``None`` for a server that serves everyone at once at full speed.
    ``faults`` is the rate of rows given an injected fault, of the ``fault_kinds`` (see
    ``FAULT_KINDS``), picked from ``seed``; every fault is transient, and ``retries`` (scaled
    like the budgets) retry what failed before the first token. Every run is recorded in
    ``store`` under the prompt ``lmstream-bench``.

    ``parallel_cells`` is how many cells run side by side (10 on the simulator, each on its own
    server in a separate process; 1 against a real server unless given); ``progress`` shows
    one bar over all runs.
    """
    return shared_loop().run(arun_benchmark(workload, **kwargs))
