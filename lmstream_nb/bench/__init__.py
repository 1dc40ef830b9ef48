"""``lmstream_nb.bench``: how often blocking requests and streams succeed, by prompt size and load.

The question it answers is the project's reason to exist: with a long prompt on a local model,
does a classic blocking request with a total timeout come back, and does a stream with a
first-token and an idle budget, and when does the user first see something? It sends a
workload of prompts from about 500 to 64k tokens, at 1, 3 and 8 concurrent users, as blocking
requests and as streams with and without progress (LM Studio 0.4's native chat, the OpenAI
endpoint), against both queue models (LM Studio 0.4's 4 parallel slots, and one at a time as MLX
models and LM Studio 0.3), optionally with injected stalls and disconnects, and tabulates success
rate, timeouts, the time to first visible output and to first visible progress.

By default it runs on the embedded simulator at a documented speed profile, time-scaled so the
whole benchmark takes about two and a half minutes: each cell at the scale that keeps its
closest verdict at least 2 s of real time from its boundary (:func:`plan_benchmark` shows the
plan), so that a loaded machine cannot flip one. With ``base_url`` it runs the same workload
against a real LM Studio in real time. It is built on :func:`lmstream_nb.run_many`, so every
run is recorded like any other, in ``store`` (``lmstream bench`` gives it a temporary database
unless ``--db``, so a user's own history is left alone).

    from lmstream_nb import bench

    report = bench.run_benchmark(bench.quick_workload(), concurrency=(1, 3))
    print(report.table())
    assert report.success_table() == report.predicted_table()
    report.plot_success("success.png")
"""

import importlib as _importlib
import typing as _typing

from ._workload import (
    DEFAULT_QUEUES,
    FAULT_KINDS,
    LAPTOP_GPU,
    MODES,
    PRE_FIRST_TOKEN_FAULTS,
    SizeBucket,
    SpeedProfile,
    Workload,
    default_workload,
    queue_label,
    quick_workload,
)

if _typing.TYPE_CHECKING:
    from ._report import TIMEOUT_STATUSES, BenchReport
    from ._runner import (
        BENCH_PROMPT,
        DEFAULT_MARGIN,
        DEFAULT_SCALE,
        CellPlan,
        arun_benchmark,
        plan_benchmark,
        run_benchmark,
    )

_LAZY = {
    "TIMEOUT_STATUSES": "_report",
    "BenchReport": "_report",
    "BENCH_PROMPT": "_runner",
    "DEFAULT_MARGIN": "_runner",
    "DEFAULT_SCALE": "_runner",
    "CellPlan": "_runner",
    "arun_benchmark": "_runner",
    "plan_benchmark": "_runner",
    "run_benchmark": "_runner",
}


def __getattr__(name: str) -> _typing.Any:
    """The runner and the report (the client, the store, the simulator) load on first use, so
    ``lmstream --help`` can read the fault kinds without them."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "BENCH_PROMPT",
    "DEFAULT_MARGIN",
    "DEFAULT_QUEUES",
    "DEFAULT_SCALE",
    "FAULT_KINDS",
    "LAPTOP_GPU",
    "MODES",
    "PRE_FIRST_TOKEN_FAULTS",
    "TIMEOUT_STATUSES",
    "BenchReport",
    "CellPlan",
    "SizeBucket",
    "SpeedProfile",
    "Workload",
    "arun_benchmark",
    "default_workload",
    "plan_benchmark",
    "queue_label",
    "quick_workload",
    "run_benchmark",
]
