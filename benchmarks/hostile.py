"""Hostile servers: peak memory of ``lmstream run`` against streams that never end properly.

Why: a client that holds whatever a server sends can be made to use any amount of memory by one
broken or hostile server (a line without a line ending, ``data:`` lines without the blank line
that ends an event, a few KB of gzip that inflate to gigabytes, an endless error body). The
client bounds each of those (``max_event_bytes``, 16 MiB by default; error bodies 1 MiB;
compressed answers refused), so its peak should stay within a small multiple of that limit
above what a normal short run costs. Target: peak - baseline <= 3 x 16 MiB for every stream.

Each row is ``lmstream run`` in a fresh process (the real command line: ``lmstream_nb.cli.main``
with the run's arguments) against the simulator (``lmstream_nb.simulator``, in this process),
its scenario given by a ``[[sim …]]`` marker in the prompt. Every flood is bounded on the
server's side too (1 GiB), so a client without limits would still end. The figure is the
child's own VmHWM (peak resident set, /proc/self/status), written by an exit hook just before
it ends: ``getrusage``/``wait4`` would report at least the parent's size at fork time, since
Linux carries it over into the child's ``ru_maxrss``. The baseline is a normal 50-token run,
measured in the same rounds, and every row is the median of its rounds.

    python benchmarks/hostile.py [--rounds 3] [--flood-mib 1024]

Exit status 0 whether or not the target is met; 1 if a run did not end the way it must (the
normal run must succeed, each hostile one must fail with its sentence).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as common

common.ensure_repo_on_path()

from lmstream_nb import simulator  # noqa: E402

LIMIT_MIB = 16
TARGET_MIB = 3 * LIMIT_MIB
RUN_TIMEOUT_S = 120.0
MODEL = "lmstream-sim-8b"

# The child: `lmstream run` as the console script runs it, plus an exit hook reporting VmHWM.
CHILD = """
import atexit, os, sys

def report():
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(os.environ["HOSTILE_REPORT"], "w") as out:
        out.write(peak)

atexit.register(report)
from lmstream_nb.cli import main
sys.exit(main(sys.argv[1:]))
"""


def rows(flood_bytes: int) -> list[tuple[str, dict[str, Any], str]]:
    """(name, scenario, what stderr must say)."""
    return [
        ("normal 50-token run (baseline)", {"output_tokens": 50}, ""),
        ("endless line", {"flood": "line", "flood_bytes": flood_bytes}, "SSE line longer"),
        (
            "endless data: lines, no blank line",
            {"flood": "data", "flood_bytes": flood_bytes},
            "SSE event longer",
        ),
        (
            "gzip bomb (~1 KB per MB inflated)",
            {"flood": "gzip", "flood_bytes": flood_bytes},
            "compressed answer",
        ),
        (
            "endless error body (HTTP 500)",
            {"http_status": 500, "flood": "line", "flood_bytes": flood_bytes},
            "answered HTTP 500",
        ),
    ]


def run_once(base_url: str, home: Path, scenario: dict[str, Any]) -> dict[str, Any]:
    report = home / "peak.txt"
    report.unlink(missing_ok=True)
    prompt = "Write something. [[sim " + json.dumps(scenario) + "]]"
    env = {**common.child_env(), "LMSTREAM_HOME": str(home), "HOSTILE_REPORT": str(report)}
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "run", prompt, "--model", MODEL, "--base-url", base_url],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env=env,
        check=False,
    )
    seconds = time.perf_counter() - t0
    peak = int(report.read_text()) if report.exists() else 0
    return {
        "status": done.returncode,
        "peak_kib": peak,
        "seconds": seconds,
        "stderr": done.stderr.strip().splitlines(),
        "stdout_bytes": len(done.stdout),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--flood-mib", type=int, default=1024, help="how much each flood sends at most (MiB)"
    )
    args = parser.parse_args()
    print("Peak memory of `lmstream run` against hostile streams (VmHWM of the child process)")
    print(common.versions())
    print(
        f"client limit: max_event_bytes = {LIMIT_MIB} MiB (default); each flood stops after "
        f"{args.flood_mib} MiB or when the client leaves; {args.rounds} rounds, a fresh process "
        "per run, rows alternate within a round\n"
    )
    table = rows(args.flood_mib * 2**20)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in table}
    failures: list[str] = []
    started = time.perf_counter()
    with (
        simulator.serve(profile="instant") as sim,
        tempfile.TemporaryDirectory(prefix="lmstream-hostile-") as tmp,
    ):
        home = Path(tmp)
        # Unmeasured: the simulator compresses its gzip bomb once (a few seconds per GiB).
        run_once(sim.base_url, home, table[3][1])
        for round_number in range(1, args.rounds + 1):
            order = table[round_number % len(table) :] + table[: round_number % len(table)]
            for name, scenario, must_say in order:
                result = run_once(sim.base_url, home, scenario)
                results[name].append(result)
                said = " ".join(result["stderr"])
                if must_say:
                    if result["status"] != 1 or must_say not in said:
                        failures.append(f"{name}: exit {result['status']}, said {said[:300]!r}")
                elif result["status"] != 0:
                    failures.append(f"{name}: exit {result['status']}, said {said[:300]!r}")
            print(
                f"round {round_number}: "
                + "  ".join(
                    f"{name.split(' (')[0]}={results[name][-1]['peak_kib'] / 1024:.1f}"
                    for name, _, _ in table
                )
                + " MiB"
            )

    baseline = common.median([r["peak_kib"] for r in results[table[0][0]]]) / 1024
    print()
    header = f"{'stream':38} {'peak MiB':>9} {'- base':>8} {'x base':>7} {'seconds':>8}  said"
    print(header)
    print("-" * len(header))
    worst = 0.0
    for name, _, _ in table:
        peak = common.median([r["peak_kib"] for r in results[name]]) / 1024
        seconds = common.median([r["seconds"] for r in results[name]])
        added = peak - baseline
        if name != table[0][0]:
            worst = max(worst, added)
        lines = results[name][-1]["stderr"]
        said = (lines[-1] if lines else "")[:70]
        print(f"{name:38} {peak:9.1f} {added:+8.1f} {peak / baseline:6.2f}x {seconds:8.2f}  {said}")
    print()
    if failures:
        print("correctness: FAILED")
        for failure in failures:
            print("  " + failure)
    else:
        print(
            "correctness: the normal run succeeded every time; every hostile run ended with "
            "exit status 1 and its sentence"
        )
    verdict = "MET" if worst <= TARGET_MIB else "NOT MET"
    print(
        f"verdict: worst peak above the baseline = {worst:.1f} MiB (target <= {TARGET_MIB} MiB, "
        f"3 x the {LIMIT_MIB} MiB limit): {verdict}"
    )
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
