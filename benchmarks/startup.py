"""Start-up: how long `lmstream --help` takes, and `lmstream run` until its first request.

Why: a command that answers `--help` slowly, or makes the user wait before it even asks the
server, feels broken; every command should import only what it uses (no simulator, relay,
IPython or widgets for a run). The baseline is what any httpx program pays anyway:
`python -c 'import httpx'`, measured in the same run, in fresh processes, interleaved.

Targets (medians): `lmstream --help` <= 1.5x the baseline, and `lmstream run` until the first
request reaches the server <= 2x the baseline.

    python benchmarks/startup.py [--rounds 15]

`lmstream` here is what the console script runs (`lmstream_nb.cli.main`), in a fresh
interpreter with the working tree first on the path. The "server" is a plain socket in this
process: the time is taken when the request's first bytes arrive, then the child is stopped
(it is the benchmark's own process, stopped by its pid). Exit status 0 whether or not a target
is met; 1 if a command failed.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time

import _common as common

HELP_TARGET = 1.5
RUN_TARGET = 2.0
CHILD_TIMEOUT_S = 60.0

CONSOLE_SCRIPT = "import sys; from lmstream_nb.cli import main; sys.argv[0] = 'lmstream'; "


def _timed(argv: list[str], env: dict[str, str]) -> float:
    """Seconds from spawning ``argv`` to its exit (it must succeed)."""
    t0 = time.perf_counter()
    done = subprocess.run(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=CHILD_TIMEOUT_S
    )
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{argv} failed: {done.stderr.decode(errors='replace')[-500:]}")
    return elapsed


def _until_first_request(env: dict[str, str]) -> float:
    """Seconds from spawning `lmstream run` to the first bytes of its request."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        listener.settimeout(CHILD_TIMEOUT_S)
        args = ["run", "Hi", "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "m"]
        code = CONSOLE_SCRIPT + f"sys.exit(main({args!r}))"
        t0 = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(CHILD_TIMEOUT_S)
                first = conn.recv(64)
                elapsed = time.perf_counter() - t0
            # The client's probe for LM Studio's native API, or the chat itself: either way
            # the command has started and reached the network.
            if not first.startswith((b"GET /api/v1/models", b"POST /v1/chat/completions")):
                raise RuntimeError(f"the first request was {first!r}")
            return elapsed
        finally:
            child.kill()
            child.wait(CHILD_TIMEOUT_S)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="fresh processes per command")
    args = parser.parse_args()
    print(common.versions())
    with tempfile.TemporaryDirectory() as home:
        env = {**common.child_env(), "LMSTREAM_HOME": home}
        python = [sys.executable]
        stacks = {
            "python -c pass": lambda: _timed([*python, "-c", "pass"], env),
            "import httpx (baseline)": lambda: _timed([*python, "-c", "import httpx"], env),
            "lmstream --help": lambda: _timed(
                [*python, "-c", CONSOLE_SCRIPT + "sys.exit(main(['--help']))"], env
            ),
            "lmstream run → first request": lambda: _until_first_request(env),
        }
        names = list(stacks)
        times: dict[str, list[float]] = {name: [] for name in names}
        stacks[names[-1]]()  # the first run creates the database: not part of start-up
        try:
            for round_ in range(args.rounds):
                shift = round_ % len(names)
                for name in names[shift:] + names[:shift]:  # rotate so noise hits all alike
                    times[name].append(stacks[name]())
        except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
            print(f"FAILED: {exc}")
            return 1
    base = common.median(times["import httpx (baseline)"])
    print(f"\n{args.rounds} fresh processes each, interleaved; medians (min-max)\n")
    print(f"{'command':32} {'median s':>9} {'min-max s':>13} {'x baseline':>11}")
    for name in names:
        values = times[name]
        med = common.median(values)
        spread = f"{min(values):.3f}-{max(values):.3f}"
        print(f"{name:32} {med:9.3f} {spread:>13} {med / base:10.2f}x")
    help_ratio = common.median(times["lmstream --help"]) / base
    run_ratio = common.median(times["lmstream run → first request"]) / base
    print()
    for label, ratio, target in (
        ("lmstream --help", help_ratio, HELP_TARGET),
        ("lmstream run to its first request", run_ratio, RUN_TARGET),
    ):
        verdict = "met" if ratio <= target else "NOT met"
        print(f"{label}: {ratio:.2f}x import httpx (target <= {target}x): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
