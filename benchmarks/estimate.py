"""How far the estimated wait for the first token is from the truth, on the simulator and llama.cpp.

Why: where the server reports nothing while it processes a prompt, every front end shows a bar
that fills against an estimate made from the history of that model and server
(``PromptStore.first_token_estimate``, fitted by ``lmstream_nb._estimate``). A bar that runs out
long before the first token, or is still at 20% when the text starts, is worse than none. This
script records runs of varied prompt sizes (log-uniform, in random order, each prompt different
from its first word so no server can reuse a cached prefix), and before each one asks the
store for its estimate, then compares it with the time to first token that run measured.

- The simulator (LM Studio 0.3: no native API, so the run layer emits the estimate itself; the
  figure checked is the event's) processes prompts at a fixed speed: its error is the fit's and
  the client's own overhead.
- llama.cpp's server (the project's launcher, ``tools/llama_server.py``, SmolLM2-135M on the
  CPU) is a real server on a shared machine: its error is what a user would see. It reports
  progress, so the run layer sends no estimate there; the store is asked directly, as the run
  layer would. Skipped with a printed line when the server cannot be built here.

For each, the median and p90 of ``|expected - actual| / actual`` over the runs that had an
estimate, for the store's Theil-Sen line and, on the same histories, a least-squares line.

Targets: median relative error <= 15% and p90 <= 35% on the simulator; the real server's figures
are reported (a loaded 2-core machine makes them what they are).

    python benchmarks/estimate.py [--sim-runs 40] [--real-runs 24] [--no-real]

Exit status 0 whether or not a target is met; 1 if a run failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common as common

TARGET_MEDIAN = 0.15
TARGET_P90 = 0.35
WORDS = [
    *("river", "stone", "lantern", "quiet", "orbit", "meadow", "copper", "signal", "harbor"),
    *("velvet", "ember", "canyon", "thistle", "beacon", "marble", "willow", "falcon", "prism"),
    *("tundra", "cobalt", "saffron", "glacier", "anchor"),
]


@dataclass
class Errors:
    """Relative errors of the estimates of one server, and how many runs had none."""

    theil_sen: list[float] = field(default_factory=list)
    least_squares: list[float] = field(default_factory=list)
    without: int = 0
    runs: int = 0
    seconds: float = 0.0


def prompt_text(rng: random.Random, index: int, chars: int) -> str:
    """Words in random order, opening with the run's number: no two prompts share a prefix."""
    parts = [f"Run {index}."]
    size = len(parts[0])
    while size < chars:
        word = rng.choice(WORDS)
        parts.append(word)
        size += len(word) + 1
    return " ".join(parts)[:chars]


def sizes(rng: random.Random, count: int, low: int, high: int) -> list[int]:
    return [round(math.exp(rng.uniform(math.log(low), math.log(high)))) for _ in range(count)]


def least_squares(points: list[tuple[int, float]], chars: int) -> float:
    """The ordinary least-squares line through ``points`` at ``chars`` (for comparison)."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    slope = 0.0 if sxx == 0 else sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
    return mean_y + max(0.0, slope) * (chars - mean_x)


def measure(
    base_url: str,
    model: str,
    prompt_sizes: list[int],
    *,
    seed: int,
    store_path: Path,
    budgets: Any = None,
    from_event: bool,
    progress: Callable[[str], None],
) -> Errors:
    common.ensure_repo_on_path()
    from lmstream_nb import Prompt, PromptEstimate, PromptStore, run
    from lmstream_nb._estimate import WINDOW

    rng = random.Random(seed)
    errors = Errors()
    history: list[tuple[int, float]] = []
    started = time.perf_counter()
    with PromptStore(store_path) as store:
        for index, chars in enumerate(prompt_sizes):
            text = prompt_text(rng, index, chars)
            messages = [{"role": "user", "content": text}]
            asked = store.first_token_estimate(model=model, base_url=base_url, messages=messages)
            seen: list[PromptEstimate] = []

            def keep(event: object, seen: list[PromptEstimate] = seen) -> None:
                if isinstance(event, PromptEstimate):
                    seen.append(event)

            result = run(
                Prompt(text, model=model),
                store=store,
                base_url=base_url,
                budgets=budgets,
                max_tokens=4,
                raise_errors=False,
                on_event=keep,
            )
            errors.runs += 1
            if not result.ok or result.stats.ttft_s is None:
                raise SystemExit(f"run {index} ({chars} chars) failed: {result.error}")
            actual = result.stats.ttft_s
            if from_event:
                if (asked is None) != (not seen):
                    raise SystemExit(f"run {index}: the event and the store disagree")
                expected = seen[0].expected_s if seen else None
            else:
                expected = None if asked is None else asked.expected_s
            if expected is None:
                errors.without += 1
            else:
                errors.theil_sen.append(abs(expected - actual) / actual)
                lsq = least_squares(history[-WINDOW:], len(text))
                errors.least_squares.append(abs(lsq - actual) / actual)
            history.append((len(text), actual))
            guess = "-" if expected is None else f"{expected:6.2f} s"
            progress(f"  run {index + 1:3d}: {len(text):6,} chars, {actual:6.2f} s, est {guess}")
    errors.seconds = time.perf_counter() - started
    return errors


def report(name: str, errors: Errors) -> tuple[float, float] | None:
    print(
        f"\n{name}: {errors.runs} runs in {errors.seconds:.0f} s, {len(errors.theil_sen)} "
        f"with an estimate ({errors.without} without: the first runs, or sizes outside the "
        "history)"
    )
    if not errors.theil_sen:
        print("  no estimates to compare")
        return None
    print(f"  {'relative error of expected_s':32s} {'median':>8s} {'p90':>8s} {'max':>8s}")
    for label, values in (
        ("Theil-Sen (the store's)", errors.theil_sen),
        ("least squares (for comparison)", errors.least_squares),
    ):
        print(
            f"  {label:32s} {common.median(values):8.1%} {common.percentile(values, 90):8.1%} "
            f"{max(values):8.1%}"
        )
    return common.median(errors.theil_sen), common.percentile(errors.theil_sen, 90)


def real_launcher() -> Any:
    path = common.REPO / "tools" / "llama_server.py"
    spec = importlib.util.spec_from_file_location("lmstream_llama_server", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sim-runs", type=int, default=40)
    parser.add_argument("--real-runs", type=int, default=24)
    parser.add_argument("--no-real", action="store_true", help="skip llama.cpp's server")
    parser.add_argument("--quiet", action="store_true", help="no line per run")
    args = parser.parse_args()
    print(common.versions())
    common.ensure_repo_on_path()
    from lmstream_nb import Budgets, simulator

    def progress(line: str) -> None:
        if not args.quiet:
            print(line, flush=True)

    rng = random.Random(11)
    with tempfile.TemporaryDirectory(prefix="lmstream-estimate-bench-") as tmp:
        # 2,000 prompt tokens/s, about 4 characters a token: 200 to 24,000 characters take
        # 0.03 to 3 s to process.
        defaults = simulator.Scenario(prefill_tps=2000, output_tokens=4)
        print("\nsimulator (LM Studio 0.3: no progress while the prompt is processed)")
        with simulator.serve(profile="test-fast", defaults=defaults, native_api=False) as sim:
            sim_errors = measure(
                sim.base_url,
                common.MODEL,
                sizes(rng, args.sim_runs, 200, 24_000),
                seed=1,
                store_path=Path(tmp) / "sim.db",
                from_event=True,
                progress=progress,
            )
        real_errors: Errors | None = None
        if args.no_real:
            print("\nllama.cpp's server: skipped (--no-real)")
        else:
            launcher = real_launcher()
            reason = launcher.unavailable_reason()
            if reason is not None:
                print(f"\nllama.cpp's server: skipped ({reason})")
            else:
                print("\nllama.cpp's server (SmolLM2-135M on the CPU, one slot)")
                try:
                    server = launcher.start()
                except launcher.Unavailable as exc:
                    print(f"  skipped: it did not start ({exc})")
                else:
                    with server:
                        real_errors = measure(
                            server.base_url,
                            launcher.MODEL_NAME,
                            sizes(rng, args.real_runs, 200, 12_000),
                            seed=2,
                            store_path=Path(tmp) / "real.db",
                            budgets=Budgets(connect=10, first_token=120, idle=30),
                            from_event=False,
                            progress=progress,
                        )
    sim_figures = report("simulator", sim_errors)
    if real_errors is not None:
        report("llama.cpp's server", real_errors)
    if sim_figures is not None:
        median, p90 = sim_figures
        verdict = "met" if median <= TARGET_MEDIAN and p90 <= TARGET_P90 else "NOT met"
        print(
            f"\nverdict: on the simulator the median relative error is {median:.1%} (target <= "
            f"{TARGET_MEDIAN:.0%}) and p90 {p90:.1%} (target <= {TARGET_P90:.0%}): {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
