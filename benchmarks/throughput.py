"""Throughput: chunks/s that ``LMStudioClient.stream_chat`` decodes from one long SSE stream.

Why: a notebook streaming a fast model should not spend its CPU in the client, and long benchmark
runs should not be paced by it. The yardstick is what anyone would write by hand with plain httpx
(``AsyncClient.stream`` + ``aiter_lines`` + ``json.loads`` of each ``data:`` line); target:
lmstream >= 1.0x that baseline. The official ``openai`` SDK is measured too, for reference.

All stacks read the SAME pre-rendered stream (100,000 content chunks from the simulator) from a
minimal replay server in a separate process (see ``_common.py`` for why not an ASGI server: the
benchmark measures the client, and an ASGI server's per-chunk cost would cap every client at the
same rate and hide the differences). Each run is a fresh process, stacks alternate round by
round, and the figures are medians.

    python benchmarks/throughput.py [--rounds 5] [--chunks 100000] [--no-openai] [--profile]

Exit status 0 whether or not the target is met; 1 if a stack failed or saw the wrong data.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import _common as common

STACKS = ("baseline", "lmstream", "openai")
LABELS = {
    "baseline": "httpx aiter_lines + json.loads (baseline)",
    "lmstream": "lmstream_nb stream_chat",
    "openai": "openai AsyncOpenAI stream=True",
}
TARGET_RATIO = 1.0
TIME_BUDGET_S = 150.0  # stop starting new rounds after this, so the script stays bounded
WORKER_TIMEOUT_S = {"baseline": 60.0, "lmstream": 60.0, "openai": 120.0}


def _body(chunks: int) -> dict[str, Any]:
    return {
        "model": common.MODEL,
        "messages": common.MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
        "sim": {"output_tokens": chunks},
    }


# ---------------------------------------------------------------------------------------------
# The three client stacks (each runs in its own worker process)


async def _run_baseline(url: str, chunks: int) -> tuple[float, int, int]:
    import httpx

    n = chars = 0
    async with httpx.AsyncClient(base_url=url, timeout=60.0, trust_env=False) as client:
        t0 = time.perf_counter()
        async with client.stream("POST", "/chat/completions", json=_body(chunks)) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    continue
                obj = json.loads(data)
                choices = obj.get("choices")
                if choices:
                    content = choices[0]["delta"].get("content")
                    if content:
                        n += 1
                        chars += len(content)
        seconds = time.perf_counter() - t0
    return seconds, n, chars


async def _run_lmstream(url: str, chunks: int) -> tuple[float, int, int]:
    from lmstream_nb import LMStudioClient, StreamFinished, TextDelta

    n = chars = 0
    finished = None
    async with LMStudioClient(url) as client:
        t0 = time.perf_counter()
        sim = {"output_tokens": chunks}
        async with client.stream_chat(common.MESSAGES, model=common.MODEL, sim=sim) as stream:
            async for event in stream:
                if isinstance(event, TextDelta):
                    n += 1
                    chars += len(event.content)
                elif isinstance(event, StreamFinished):
                    finished = event
            seconds = time.perf_counter() - t0
            if len(stream.text) != chars:
                raise AssertionError(f"stream.text has {len(stream.text)} chars, deltas {chars}")
    if finished is None or finished.finish_reason != "stop":
        raise AssertionError(f"no clean StreamFinished: {finished!r}")
    return seconds, n, chars


async def _run_openai(url: str, chunks: int) -> tuple[float, int, int]:
    from openai import AsyncOpenAI

    n = chars = 0
    client = AsyncOpenAI(base_url=url, api_key="not-needed", max_retries=0, timeout=60.0)
    try:
        t0 = time.perf_counter()
        stream = await client.chat.completions.create(
            model=common.MODEL,
            messages=[{"role": "user", "content": common.PROMPT}],
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"sim": {"output_tokens": chunks}},
        )
        async for chunk in stream:
            if chunk.choices:
                content = chunk.choices[0].delta.content
                if content:
                    n += 1
                    chars += len(content)
        seconds = time.perf_counter() - t0
    finally:
        await client.close()
    return seconds, n, chars


def worker(stack: str, url: str, chunks: int, profile: bool) -> None:
    """Import the stack, stream once, print one JSON line (and a profile first, if asked)."""
    t_import = time.perf_counter()
    if stack == "baseline":
        import httpx  # noqa: F401

        run = _run_baseline
    elif stack == "lmstream":
        import lmstream_nb  # noqa: F401

        run = _run_lmstream
    else:
        import openai  # noqa: F401

        run = _run_openai
    import_s = time.perf_counter() - t_import
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    seconds, n, chars = asyncio.run(run(url, chunks))
    if profiler is not None:
        import pstats

        profiler.disable()
        print(f"--- cProfile of the {stack} run (top 25 by own time; profiling slows it) ---")
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    # VmHWM, not ru_maxrss: on Linux ru_maxrss carries over the parent's peak across exec.
    hwm_kib = common.proc_status("VmHWM").get("VmHWM", 0)
    print(
        json.dumps(
            {
                "stack": stack,
                "seconds": seconds,
                "chunks": n,
                "chars": chars,
                "import_s": import_s,
                "peak_rss_mib": hwm_kib / 1024,
            }
        )
    )


# ---------------------------------------------------------------------------------------------
# The conductor


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--no-openai", action="store_true", help="skip the (slow) openai SDK")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print cProfile of one lmstream and one baseline run",
    )
    parser.add_argument("--worker", choices=STACKS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.url, args.chunks, args.profile)
        return 0

    stacks = [s for s in STACKS if not (args.no_openai and s == "openai")]
    print("Throughput of one long chat-completion stream (chunks/s, higher is better)")
    print(common.versions())
    events, source = common.stream_events(args.chunks)
    want_chunks, want_chars = common.expected_content(events)
    spec = common.ReplaySpec.from_events(events)
    print(
        f"stream: {len(events):,} SSE events ({want_chunks:,} with content, {want_chars:,} "
        f"chars), {len(spec.head) / 2**20:.1f} MiB in HTTP chunked framing, one HTTP chunk "
        f"per event; source: {source}"
    )
    print(f"each run: a fresh process; {args.rounds} rounds, stack order rotated every round\n")

    results: dict[str, list[dict[str, Any]]] = {s: [] for s in stacks}
    failures: list[str] = []
    started = time.perf_counter()
    script = __file__
    with common.replay_server(spec) as url:
        for r in range(args.rounds):
            if r and time.perf_counter() - started > TIME_BUDGET_S:
                print(f"(time budget of {TIME_BUDGET_S:.0f} s reached: stopped after {r} rounds)")
                break
            order = stacks[r % len(stacks) :] + stacks[: r % len(stacks)]
            line = []
            for stack in order:
                try:
                    res = common.run_worker(
                        script,
                        ["--worker", stack, "--url", url, "--chunks", str(args.chunks)],
                        WORKER_TIMEOUT_S[stack],
                    )
                except common.WorkerFailed as exc:
                    failures.append(f"{stack}: {exc}")
                    line.append(f"{stack}=FAILED")
                    continue
                results[stack].append(res)
                line.append(f"{stack}={args.chunks / res['seconds'] / 1000:.1f}k/s")
            print(f"round {r + 1}: " + "  ".join(line), flush=True)
        profiles = []
        if args.profile:
            for stack in ("lmstream", "baseline"):
                try:
                    res = common.run_worker(
                        script,
                        [
                            "--worker",
                            stack,
                            "--url",
                            url,
                            "--chunks",
                            str(args.chunks),
                            "--profile",
                        ],
                        WORKER_TIMEOUT_S[stack] * 3,
                    )
                except common.WorkerFailed as exc:
                    failures.append(f"{stack} (profiled): {exc}")
                    continue
                profiles.append(res["stdout"])

    # -- figures
    print()
    header = (
        f"{'stack':<44} {'runs':>4} {'chunks/s':>10} {'µs/chunk':>9} {'min-max k/s':>13} "
        f"{'vs base':>8} {'import s':>8} {'RSS MiB':>8}"
    )
    print(header)
    print("-" * len(header))
    medians: dict[str, float] = {}
    for stack in stacks:
        runs = results[stack]
        if not runs:
            print(f"{LABELS[stack]:<44} {0:>4}   (no successful run)")
            continue
        rates = [want_chunks / r["seconds"] for r in runs]
        rate = common.median(rates)
        medians[stack] = rate
        base = medians.get("baseline")
        vs_base = f"{rate / base:.2f}x" if base else "-"
        print(
            f"{LABELS[stack]:<44} {len(runs):>4} {rate:>10,.0f} {1e6 / rate:>9.2f} "
            f"{min(rates) / 1000:>6.1f}-{max(rates) / 1000:<6.1f} {vs_base:>8} "
            f"{common.median([r['import_s'] for r in runs]):>8.3f} "
            f"{common.median([r['peak_rss_mib'] for r in runs]):>8.1f}"
        )

    # -- correctness
    print()
    wrong = [
        f"{stack} run {i + 1}: {r['chunks']:,} chunks / {r['chars']:,} chars"
        for stack in stacks
        for i, r in enumerate(results[stack])
        if (r["chunks"], r["chars"]) != (want_chunks, want_chars)
    ]
    total = sum(len(v) for v in results.values())
    if wrong:
        print(f"CORRECTNESS: FAILED, expected {want_chunks:,} chunks / {want_chars:,} chars:")
        for w in wrong:
            print("  " + w)
    else:
        print(
            f"correctness: all {total} runs saw {want_chunks:,} content chunks and "
            f"{want_chars:,} text chars"
        )
    for failure in failures:
        print("FAILED RUN: " + failure)

    # -- verdict
    if "baseline" in medians and "lmstream" in medians:
        ratio = medians["lmstream"] / medians["baseline"]
        verdict = "MET" if ratio >= TARGET_RATIO else "NOT MET"
        print(
            f"\nverdict: lmstream / baseline = {ratio:.2f}x (target >= {TARGET_RATIO:.1f}x): "
            f"{verdict}"
        )
        if ratio < TARGET_RATIO and not args.profile:
            print("         (run with --profile to see where lmstream's time goes)")
        if "openai" in medians:
            print(
                f"         openai SDK / baseline = {medians['openai'] / medians['baseline']:.2f}x"
                f" (reference only; the notes measured about 0.13x)"
            )
    else:
        print("\nverdict: not available (a stack had no successful run)")
    for text in profiles:
        print("\n" + text)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 1 if wrong or failures else 0


if __name__ == "__main__":
    sys.exit(main())
