"""What recording costs: per run and per chunk, and how fast history/stats are over 100k runs.

Why: every run is recorded (the row is written before the request, text is appended at least
once a second, the row is completed at the end). That must not slow streaming down, and looking
back over a long history must stay interactive.

Targets:
- recording adds < 5% to the wall time of a 10k-chunk stream, against the same stream read
  with ``stream_chat`` and no store (same client, same replay server, alternating runs);
- ``history()`` and ``stats()`` over 100k recorded runs answer in < 200 ms.

    python benchmarks/store.py [--reps 21] [--runs 100000]

Exit status 0 whether or not a target is met; 1 if a run failed or saw the wrong text.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import _common as common

TARGET_OVERHEAD = 0.05
TARGET_QUERY_S = 0.200


async def recording(url_long: str, url_short: str, reps: int, db: Path) -> dict[str, float]:
    common.ensure_repo_on_path()
    from lmstream_nb import LMStudioClient, Prompt, PromptStore, arun

    prompt = Prompt(common.PROMPT, model=common.MODEL)
    timings: dict[str, list[float]] = {}
    with PromptStore(db) as store:
        async with LMStudioClient(url_long) as long_client, LMStudioClient(url_short) as short:

            async def plain(client: LMStudioClient) -> str:
                done = await client.stream_chat(common.MESSAGES, model=common.MODEL).collect()
                return done.text

            async def recorded(client: LMStudioClient) -> str:
                result = await arun(prompt, store=store, client=client)
                return result.text

            cases: dict[str, Callable[[], Awaitable[str]]] = {
                "long plain": lambda: plain(long_client),
                "long recorded": lambda: recorded(long_client),
                "short plain": lambda: plain(short),
                "short recorded": lambda: recorded(short),
            }
            texts: dict[str, set[str]] = {name: set() for name in cases}
            for rep in range(reps + 2):
                order = list(cases)
                if rep % 2:
                    order.reverse()
                for name in order:
                    gc.collect()
                    t0 = time.perf_counter()
                    texts[name].add(await cases[name]())
                    elapsed = time.perf_counter() - t0
                    if rep >= 2:  # two warm-up rounds
                        timings.setdefault(name, []).append(elapsed)
            if len(texts["long plain"] | texts["long recorded"]) != 1:
                raise SystemExit("recorded and plain runs saw different texts")
            recorded_runs = store.history(limit=None)
            if any(r.status != "ok" for r in recorded_runs):
                raise SystemExit("a recorded run did not finish ok")
    return {name: common.median(values) for name, values in timings.items()}


def fill(db: Path, runs: int) -> None:
    """Insert ``runs`` finished runs directly (the store's API would take minutes for 100k)."""
    common.ensure_repo_on_path()
    from lmstream_nb import PromptStore

    PromptStore(db).close()  # create and migrate
    rng = random.Random(7)
    statuses = ["ok"] * 85 + ["stalled"] * 5 + ["interrupted"] * 4 + ["first_token_timeout"] * 3
    statuses += ["error"] * 2 + ["cancelled"]
    prompts = [f"prompt-{i}" for i in range(40)] + [None] * 10
    models = ["qwen2.5-7b-instruct", "llama-3.1-8b-instruct", "gemma-2-9b"]
    text = "word " * 400  # ~2 KB of text per run
    now = time.time()
    rows = []
    for i in range(runs):
        name = rng.choice(prompts)
        ttft = rng.uniform(0.2, 600.0)
        rows.append(
            (
                name,
                1 if name else None,
                "Template {{x}}",
                None,
                json.dumps([{"role": "user", "content": "Template x"}]),
                json.dumps({"x": "x"}),
                rng.choice(models),
                "http://localhost:1234/v1",
                now - (runs - i) * 30.0,
                ttft,
                ttft + rng.uniform(1.0, 1800.0),
                400,
                500,
                400,
                20.0,
                "stop",
                rng.choice(statuses),
                None,
                text,
                "",
                len(text),
                text[:80].strip(),
                None,
            )
        )
    conn = sqlite3.connect(db)
    with conn:
        conn.executemany(
            "INSERT INTO runs (prompt_name, prompt_version, template, system, messages, "
            "variables, model, base_url, started_at, ttft_s, duration_s, chunks, "
            "prompt_tokens, completion_tokens, tokens_per_s, finish_reason, status, error, "
            "text, reasoning, text_chars, preview, batch_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    conn.close()


def queries(db: Path, reps: int) -> dict[str, float]:
    common.ensure_repo_on_path()
    from lmstream_nb import PromptStore

    week_ago = time.time() - 7 * 86400
    calls: dict[str, Callable[[PromptStore], object]] = {
        "history()": lambda s: s.history(),
        "history(prompt=...)": lambda s: s.history(prompt="prompt-3"),
        "history(status='stalled')": lambda s: s.history(status="stalled"),
        "history(since=7 days)": lambda s: s.history(since=week_ago),
        "stats()": lambda s: s.stats(),
        "stats(prompt=...)": lambda s: s.stats(prompt="prompt-3"),
        "stats(model=...)": lambda s: s.stats(model="gemma-2-9b"),
        "stats(since=7 days)": lambda s: s.stats(since=week_ago),
    }
    results: dict[str, float] = {}
    with PromptStore(db) as store:
        for name, call in calls.items():
            call(store)  # warm the page cache once
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter()
                call(store)
                samples.append(time.perf_counter() - t0)
            results[name] = common.median(samples)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--runs", type=int, default=100_000)
    args = parser.parse_args()
    print(common.versions())
    started = time.perf_counter()
    long_events, source = common.stream_events(10_000)
    short_events, _ = common.stream_events(10)
    print(f"streams: 10,000 and 10 content chunks; source: {source}")
    with tempfile.TemporaryDirectory(prefix="lmstream-store-bench-") as tmp:
        db = Path(tmp) / "bench.db"
        with (
            common.replay_server(common.ReplaySpec.from_events(long_events)) as url_long,
            common.replay_server(common.ReplaySpec.from_events(short_events)) as url_short,
        ):
            rec = asyncio.run(recording(url_long, url_short, args.reps, db))
        long_extra = rec["long recorded"] - rec["long plain"]
        short_extra = rec["short recorded"] - rec["short plain"]
        per_chunk_us = (long_extra - short_extra) / (10_000 - 10) * 1e6
        overhead = long_extra / rec["long plain"]
        print(f"\nrecording overhead (median of {args.reps} alternating runs each)")
        print(f"  10k-chunk stream, plain stream_chat     {rec['long plain'] * 1e3:9.1f} ms")
        print(
            f"  10k-chunk stream, arun() with a store   {rec['long recorded'] * 1e3:9.1f} ms"
            f"   {overhead:+.1%}"
        )
        print(f"  per run (10-chunk stream difference)    {short_extra * 1e3:9.2f} ms")
        print(f"  per chunk (difference of differences)   {per_chunk_us:9.3f} µs")

        fill_db = Path(tmp) / "history.db"
        t0 = time.perf_counter()
        fill(fill_db, args.runs)
        print(
            f"\nqueries over {args.runs:,} runs (filled in {time.perf_counter() - t0:.1f} s; "
            f"median of 9 calls each)"
        )
        q = queries(fill_db, 9)
        for name, seconds in q.items():
            print(f"  {name:30s} {seconds * 1e3:8.1f} ms")
    worst = max(q.values())
    print(
        f"\nverdict: recording adds {overhead:+.1%} to a 10k-chunk stream "
        f"(target < {TARGET_OVERHEAD:.0%}): {'MET' if overhead < TARGET_OVERHEAD else 'NOT MET'}"
    )
    print(
        f"         slowest history/stats query {worst * 1e3:.1f} ms (target < "
        f"{TARGET_QUERY_S * 1e3:.0f} ms): {'MET' if worst < TARGET_QUERY_S else 'NOT MET'}"
    )
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
