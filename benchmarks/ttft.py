"""Time to first token: what ``stream_chat`` adds over plain httpx before the first text arrives.

Why: in a notebook the first token is what the user waits for; the client's own share of that
wait (building the request, the watchdog, decoding) should be negligible next to a model's
prompt processing. Target: median overhead of lmstream over the plain-httpx baseline <= 1 ms, on
both streams the client reads: the OpenAI-compatible one (lmstream at ``api="openai"``, the
official ``openai`` SDK for reference) and LM Studio 0.4's native one (lmstream at
``api="native"``, against a hand-written httpx reader of its named events).

Each stack keeps ONE warm client whose keep-alive connection is reused for every request (the
replay server counts its connections to prove it), and runs many short streams (10 content
chunks) from the same replay server as throughput.py; the stacks alternate request by request
so that machine noise hits them equally. The time measured is from just before the request is
issued to the moment the first non-empty content string is in the caller's hands; each stream
is still read to its end, so the connection goes back to the pool. The native stream has six
events before its first ``message.delta`` (chat and prompt-processing start and progress),
which every native stack reads too.

    python benchmarks/ttft.py [--reps 300] [--warmup 30] [--chunks 10] [--api both|openai|native]
                              [--no-openai]

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

LABELS, API_OF, PAIRS = common.LABELS, common.API_OF, common.PAIRS
# User-Agent (as the replay server counts it) → the stacks that send it
AGENTS = {
    "python-httpx": ("baseline", "native-baseline"),
    "lmstream_nb": ("lmstream", "native-lmstream"),
    "AsyncOpenAI": ("openai",),
}


async def measure(
    url: str, chunks: int, reps: int, warmup: int, apis: list[str], with_openai: bool
) -> int:
    common.ensure_repo_on_path()
    import httpx
    from openai import AsyncOpenAI

    from lmstream_nb import LMStudioClient, TextDelta

    body = common.openai_request(chunks)
    native_body = common.native_request(chunks)
    native_url = common.native_chat_url(url)
    sim = {"output_tokens": chunks}
    http = httpx.AsyncClient(base_url=url, timeout=60.0, trust_env=False)
    native_http = httpx.AsyncClient(timeout=60.0, trust_env=False)
    lm = LMStudioClient(url, api="openai")
    lm_native = LMStudioClient(url, api="native")
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

    async def native_baseline() -> tuple[float, float, int, int]:
        n = chars = 0
        first = 0.0
        t0 = time.perf_counter()
        async with native_http.stream("POST", native_url, json=native_body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                obj = json.loads(line[5:])
                if obj.get("type") == "message.delta":
                    content = obj.get("content")
                    if content:
                        if not n:
                            first = time.perf_counter()
                        n += 1
                        chars += len(content)
        return first - t0, time.perf_counter() - t0, n, chars

    def lmstream_of(client: LMStudioClient) -> Once:
        async def once() -> tuple[float, float, int, int]:
            n = chars = 0
            first = 0.0
            t0 = time.perf_counter()
            async with client.stream_chat(common.MESSAGES, model=common.MODEL, sim=sim) as stream:
                async for event in stream:
                    if isinstance(event, TextDelta):
                        if not n:
                            first = time.perf_counter()
                        n += 1
                        chars += len(event.content)
            if stream.api != client.api:
                raise AssertionError(f"api={client.api!r} sent the stream to {stream.api!r}")
            return first - t0, time.perf_counter() - t0, n, chars

        return once

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

    every: dict[str, Once] = {
        "baseline": baseline,
        "lmstream": lmstream_of(lm),
        "openai": openai_sdk,
        "native-baseline": native_baseline,
        "native-lmstream": lmstream_of(lm_native),
    }
    stacks = {
        name: once
        for name, once in every.items()
        if API_OF[name] in apis and (with_openai or name != "openai")
    }
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
        await native_http.aclose()
        await lm.aclose()
        await lm_native.aclose()
        await oa.close()

    stats = common.server_stats(url)  # before the check below adds a client
    auto = await auto_route(url) if "native" in apis else None
    return report(names, apis, ttft, total, seen, stats, done, warmup, chunks, auto)


async def auto_route(url: str) -> str:
    """Where a client left at ``api="auto"`` sends a plain request to this server (with the
    native stream served, the replay server lists its model as LM Studio 0.4 does)."""
    from lmstream_nb import LMStudioClient

    async with LMStudioClient(url) as client:
        stream = client.stream_chat(common.MESSAGES, model=common.MODEL)
        await stream.collect()
        return stream.api


def report(
    names: list[str],
    apis: list[str],
    ttft: dict[str, list[float]],
    total: dict[str, list[float]],
    seen: dict[str, set[tuple[int, int]]],
    server: dict[str, dict[str, int]],
    reps: int,
    warmup: int,
    chunks: int,
    auto: str | None,
) -> int:
    print()
    header = (
        f"{'stack (ms)':<44} {'n':>5} {'TTFT med':>9} {'TTFT p95':>9} {'TTFT min':>9} "
        f"{'whole med':>10} {'overhead':>9}"
    )
    print(header)
    print("-" * len(header))
    for name in names:
        med = common.median(ttft[name])
        base_name = PAIRS[API_OF[name]][0]
        base = common.median(ttft[base_name])
        over = "-" if name == base_name else f"{med - base:+.3f}"
        print(
            f"{LABELS[name]:<44} {len(ttft[name]):>5} {med:>9.3f} "
            f"{common.percentile(ttft[name], 95):>9.3f} {min(ttft[name]):>9.3f} "
            f"{common.median(total[name]):>10.3f} {over:>9}"
        )
    print("(overhead: against the baseline that reads the same stream)\n")
    for api in apis:
        base_name, lm_name = PAIRS[api]
        paired = [a - b for a, b in zip(ttft[lm_name], ttft[base_name], strict=True)]
        print(
            f"median of paired differences ({api} stream, lmstream - baseline, same "
            f"repetition): {common.median(paired):+.3f} ms; p95 "
            f"{common.percentile(paired, 95):+.3f} ms"
        )

    print(f"connections (server side, per User-Agent; {reps + warmup} requests per stack):")
    for agent, entry in sorted(server.items()):
        clients = sum(1 for name in AGENTS.get(agent, ()) if name in names) or 1
        reused = (
            "reused"
            if entry["connections"] <= clients
            else "NEW CONNECTION PER REQUEST"
            if (entry["connections"] >= entry["requests"])
            else "partly reused"
        )
        print(
            f"  {agent:<20} {entry['connections']:>5} connection(s) for "
            f"{entry['requests']:>5} requests from {clients} client(s): {reused}"
        )
    lm_entry = server.get("lmstream_nb")
    lm_clients = sum(1 for name in AGENTS["lmstream_nb"] if name in names)
    if lm_entry and lm_entry["connections"] > lm_clients:
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
    for api in apis:
        got = {next(iter(seen[n])) for n in names if API_OF[n] == api and seen[n]}
        if len(got) != 1:
            print(f"CORRECTNESS: {api} stacks disagree: { {n: sorted(seen[n]) for n in names} }")
            bad = True
    if not bad:
        for api in apis:
            n, chars = next(iter(seen[PAIRS[api][0]]))
            ok = "" if n == chunks else f" (expected {chunks})"
            print(
                f"correctness ({api}): every stream gave {n} content chunks{ok} and {chars} chars"
            )
            bad = bad or n != chunks
    if auto is not None:
        ok = "" if auto == "native" else "  <- EXPECTED native"
        print(f"a client at api='auto' sent a plain request to: {auto}{ok}")
        bad = bad or auto != "native"

    print()
    for api in apis:
        base_name, lm_name = PAIRS[api]
        overhead = common.median(ttft[lm_name]) - common.median(ttft[base_name])
        verdict = "MET" if overhead <= TARGET_OVERHEAD_MS else "NOT MET"
        print(
            f"verdict ({api} stream): median TTFT overhead lmstream - baseline = "
            f"{overhead:+.3f} ms (target <= {TARGET_OVERHEAD_MS:.1f} ms): {verdict}"
        )
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=300, help="measured requests per stack")
    parser.add_argument("--warmup", type=int, default=30, help="unmeasured requests per stack")
    parser.add_argument("--chunks", type=int, default=10, help="content chunks per stream")
    parser.add_argument(
        "--api",
        choices=("both", *common.APIS),
        default="both",
        help="which stream to measure (default: both, alternating in the same run)",
    )
    parser.add_argument("--no-openai", action="store_true", help="skip the openai SDK")
    args = parser.parse_args()

    print("Time to first token on a warm, reused connection (ms, lower is better)")
    print(common.versions())
    apis = list(common.APIS) if args.api == "both" else [args.api]
    specs: dict[str, common.ReplaySpec] = {}
    for api in apis:
        events, source = common.stream_events(args.chunks, api)
        specs[api] = spec = common.ReplaySpec.from_events(events)
        print(
            f"{api} stream: {len(events)} SSE events, {len(spec.head):,} bytes, one HTTP chunk "
            f"per event, sent in one write; source: {source}"
        )
    print(f"{args.warmup} warm-up + {args.reps} measured requests per stack, alternating")
    started = time.perf_counter()
    openai_spec = specs.get("openai", common.ReplaySpec.from_events([]))
    with common.replay_server(openai_spec, specs.get("native")) as url:
        status = asyncio.run(
            measure(url, args.chunks, args.reps, args.warmup, apis, not args.no_openai)
        )
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
