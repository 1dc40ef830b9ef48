"""Time to first token: what ``stream_chat`` adds over plain httpx before the first text arrives.

Why: in a notebook the first token is what the user waits for; the client's own share of that
wait (building the request, the watchdog, decoding) should be negligible next to a model's
prompt processing. Target: median overhead of lmstream over the plain-httpx baseline <= 1 ms.

Each stack keeps ONE warm client whose keep-alive connection is reused for every request (the
replay server counts its connections to prove it), and runs many short streams (10 content
chunks) from the same replay server as throughput.py; the stacks alternate request by request
so that machine noise hits them equally. The time measured is from just before the request is
issued to the moment the first non-empty content string is in the caller's hands; each stream
is still read to its end, so the connection goes back to the pool.

    python benchmarks/ttft.py [--reps 300] [--warmup 30] [--chunks 10] [--no-openai]

Exit status 0 whether or not the target is met; 1 if a stack failed or saw the wrong data.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from collections.abc import Awaitable, Callable

import _common as common

TARGET_OVERHEAD_MS = 1.0
TIME_BUDGET_S = 120.0

Once = Callable[[], Awaitable[tuple[float, float, int, int]]]  # ttft s, total s, chunks, chars


async def measure(url: str, chunks: int, reps: int, warmup: int, with_openai: bool) -> int:
    common.ensure_repo_on_path()
    import httpx
    from openai import AsyncOpenAI

    from lmstream_nb import LMStudioClient, TextDelta

    body = {
        "model": common.MODEL,
        "messages": common.MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
        "sim": {"output_tokens": chunks},
    }
    sim = {"output_tokens": chunks}
    http = httpx.AsyncClient(base_url=url, timeout=60.0, trust_env=False)
    lm = LMStudioClient(url)
    oa = AsyncOpenAI(base_url=url, api_key="not-needed", max_retries=0, timeout=60.0)

    async def baseline() -> tuple[float, float, int, int]:
        n = chars = 0
        first = 0.0
        t0 = time.perf_counter()
        async with http.stream("POST", "/chat/completions", json=body) as response:
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
                        if not n:
                            first = time.perf_counter()
                        n += 1
                        chars += len(content)
        return first - t0, time.perf_counter() - t0, n, chars

    async def lmstream() -> tuple[float, float, int, int]:
        n = chars = 0
        first = 0.0
        t0 = time.perf_counter()
        async with lm.stream_chat(common.MESSAGES, model=common.MODEL, sim=sim) as stream:
            async for event in stream:
                if isinstance(event, TextDelta):
                    if not n:
                        first = time.perf_counter()
                    n += 1
                    chars += len(event.content)
        return first - t0, time.perf_counter() - t0, n, chars

    async def openai_sdk() -> tuple[float, float, int, int]:
        n = chars = 0
        first = 0.0
        t0 = time.perf_counter()
        stream = await oa.chat.completions.create(
            model=common.MODEL,
            messages=[{"role": "user", "content": common.PROMPT}],
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"sim": sim},
        )
        async for chunk in stream:
            if chunk.choices:
                content = chunk.choices[0].delta.content
                if content:
                    if not n:
                        first = time.perf_counter()
                    n += 1
                    chars += len(content)
        return first - t0, time.perf_counter() - t0, n, chars

    stacks: dict[str, Once] = {"baseline": baseline, "lmstream": lmstream}
    if with_openai:
        stacks["openai"] = openai_sdk
    names = list(stacks)
    ttft: dict[str, list[float]] = {s: [] for s in names}
    total: dict[str, list[float]] = {s: [] for s in names}
    seen: dict[str, set[tuple[int, int]]] = {s: set() for s in names}
    started = time.perf_counter()
    done = 0
    try:
        for name in names:  # connect and warm up every stack before measuring anything
            for _ in range(warmup):
                await stacks[name]()
        gc.collect()
        for i in range(reps):
            if time.perf_counter() - started > TIME_BUDGET_S:
                print(f"(time budget of {TIME_BUDGET_S:.0f} s reached after {i} repetitions)")
                break
            order = names[i % len(names) :] + names[: i % len(names)]
            for name in order:
                first, whole, n, chars = await stacks[name]()
                ttft[name].append(first * 1e3)
                total[name].append(whole * 1e3)
                seen[name].add((n, chars))
            done = i + 1
    finally:
        await http.aclose()
        await lm.aclose()
        await oa.close()

    stats = common.server_stats(url)
    return report(names, ttft, total, seen, stats, done, warmup, chunks)


LABELS = {
    "baseline": "httpx aiter_lines + json.loads (baseline)",
    "lmstream": "lmstream_nb stream_chat",
    "openai": "openai AsyncOpenAI stream=True",
}


def report(
    names: list[str],
    ttft: dict[str, list[float]],
    total: dict[str, list[float]],
    seen: dict[str, set[tuple[int, int]]],
    server: dict[str, dict[str, int]],
    reps: int,
    warmup: int,
    chunks: int,
) -> int:
    print()
    header = (
        f"{'stack (ms)':<44} {'n':>5} {'TTFT med':>9} {'TTFT p95':>9} {'TTFT min':>9} "
        f"{'whole med':>10} {'overhead':>9}"
    )
    print(header)
    print("-" * len(header))
    base = common.median(ttft["baseline"])
    for name in names:
        med = common.median(ttft[name])
        over = "-" if name == "baseline" else f"{med - base:+.3f}"
        print(
            f"{LABELS[name]:<44} {len(ttft[name]):>5} {med:>9.3f} "
            f"{common.percentile(ttft[name], 95):>9.3f} {min(ttft[name]):>9.3f} "
            f"{common.median(total[name]):>10.3f} {over:>9}"
        )
    paired = [a - b for a, b in zip(ttft["lmstream"], ttft["baseline"], strict=True)]
    print(
        f"\nmedian of paired differences (lmstream - baseline, same repetition): "
        f"{common.median(paired):+.3f} ms; p95 {common.percentile(paired, 95):+.3f} ms"
    )

    print(f"connections (server side, per User-Agent; {reps + warmup} requests per stack):")
    for agent, entry in sorted(server.items()):
        reused = (
            "reused"
            if entry["connections"] == 1
            else "NEW CONNECTION PER REQUEST"
            if (entry["connections"] >= entry["requests"])
            else "partly reused"
        )
        print(
            f"  {agent:<20} {entry['connections']:>5} connection(s) for "
            f"{entry['requests']:>5} requests: {reused}"
        )
    lm_entry = server.get("lmstream_nb")
    if lm_entry and lm_entry["connections"] > 1:
        print(
            "  NOTE: lmstream_nb did not keep its connection, so each of its TTFTs includes a "
            "TCP connect.\n  (A client that closes the response before it has read the end "
            "of the chunked body,\n  e.g. by stopping at [DONE], makes httpcore drop the "
            "connection instead of pooling it.)"
        )
    bad = False
    for name in names:
        if len(seen[name]) != 1:
            print(f"CORRECTNESS: {name} saw different streams: {sorted(seen[name])}")
            bad = True
    if len({next(iter(s)) for s in seen.values() if s}) != 1:
        print(f"CORRECTNESS: stacks disagree: { {n: sorted(s) for n, s in seen.items()} }")
        bad = True
    if not bad:
        n, chars = next(iter(seen["baseline"]))
        ok = "" if n == chunks else f" (expected {chunks})"
        print(f"correctness: every stream gave {n} content chunks{ok} and {chars} chars")
        bad = n != chunks

    overhead = common.median(ttft["lmstream"]) - base
    verdict = "MET" if overhead <= TARGET_OVERHEAD_MS else "NOT MET"
    print(
        f"\nverdict: median TTFT overhead lmstream - baseline = {overhead:+.3f} ms "
        f"(target <= {TARGET_OVERHEAD_MS:.1f} ms): {verdict}"
    )
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=300, help="measured requests per stack")
    parser.add_argument("--warmup", type=int, default=30, help="unmeasured requests per stack")
    parser.add_argument("--chunks", type=int, default=10, help="content chunks per stream")
    parser.add_argument("--no-openai", action="store_true", help="skip the openai SDK")
    args = parser.parse_args()

    print("Time to first token on a warm, reused connection (ms, lower is better)")
    print(common.versions())
    events, source = common.stream_events(args.chunks)
    spec = common.ReplaySpec.from_events(events)
    print(
        f"stream: {len(events)} SSE events, {len(spec.head):,} bytes, one HTTP chunk per "
        f"event, sent in one write; source: {source}"
    )
    print(f"{args.warmup} warm-up + {args.reps} measured requests per stack, alternating")
    started = time.perf_counter()
    with common.replay_server(spec) as url:
        status = asyncio.run(measure(url, args.chunks, args.reps, args.warmup, not args.no_openai))
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
