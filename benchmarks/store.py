"""What recording costs: per run and per chunk, for a 100 MB answer, and stats over 100k runs.

Why: every run is recorded (the row is written before the request, text is appended at least
once a second, the row is completed at the end). That must not slow streaming down, recording
a long answer must cost in proportion to its length, and looking back over a long history must
stay interactive.

Targets, each against a baseline measured in the same run:
- recording adds < 5% to the wall time of a 10k-chunk stream, against the same stream read
  with ``stream_chat`` and no store (same client, same replay server, alternating runs);
- a 100 MB answer appended once a second leaves database + WAL <= 1.2x the text, and takes
  <= 3x the time of writing the same text once into a fresh WAL database with one INSERT;
- ``stats()`` over 100k runs takes <= 3x a raw ``GROUP BY prompt_name, model, status`` over the
  same table (history and the filtered forms of stats are shown beside it);
- ``first_token_estimate()`` (the estimated wait, asked before each request to a server that
  reports no progress) takes <= 0.05x that GROUP BY: one bounded walk along an index.

    python benchmarks/store.py [--reps 21] [--runs 100000] [--answer-mb 100]

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
TARGET_SIZE_RATIO = 1.2
TARGET_TIME_RATIO = 3.0
TARGET_STATS_RATIO = 3.0
# The estimate of the wait reads at most 40 index entries, however long the history: a small
# fraction of one pass over it.
TARGET_ESTIMATE_RATIO = 0.05
# Bytes one second of a stream brings, for the appends of the long answer: a fast local server
# (about 1 MB/s, the rate that produced a 93 MB answer in testing) and a GPU-class model
# (about 16k tokens/s, 64 KiB/s, so 1,600 appends).
APPEND_RATES = (1024 * 1024, 64 * 1024)
RAW_GROUP_BY = (
    "SELECT prompt_name, model, status, count(*) FROM runs GROUP BY prompt_name, model, status"
)
# The same percentiles by window functions (not used by the store: shown for comparison).
WINDOW_STATS = [
    f"""SELECT {part}n, i, v FROM (
      SELECT {part}{column} AS v, row_number() OVER w - 1 AS i,
        count(*) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING) AS n
      FROM runs WHERE {column} IS NOT NULL WINDOW w AS ({by}ORDER BY {column}))
    WHERE i IN (CAST((n - 1) * 0.5 AS INTEGER), CAST((n - 1) * 0.5 AS INTEGER) + 1,
                CAST((n - 1) * 0.95 AS INTEGER), CAST((n - 1) * 0.95 AS INTEGER) + 1)"""
    for column in ("ttft_s", "duration_s")
    for part, by in (("prompt_name, model, ", "PARTITION BY prompt_name, model "), ("", ""))
]


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
    """Insert ``runs`` finished runs directly (the store's API would take minutes for 100k).

    Half of them carry the progress figures stats takes medians of, as runs over an API that
    reports progress do (LM Studio's native one); the other half, as over an OpenAI-style one,
    have none. Each has a prompt size, so the estimate of the wait has a long history to read.
    """
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
        told = i % 2 == 0
        chars = rng.randrange(100, 40_000)
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
                rng.uniform(0.05, 2.0) if told else None,
                rng.uniform(100.0, 3000.0) if told else None,
                chars,
            )
        )
    conn = sqlite3.connect(db)
    with conn:
        conn.executemany(
            "INSERT INTO runs (prompt_name, prompt_version, template, system, messages, "
            "variables, model, base_url, started_at, ttft_s, duration_s, chunks, "
            "prompt_tokens, completion_tokens, tokens_per_s, finish_reason, status, error, "
            "text, reasoning, text_chars, preview, batch_id, first_progress_s, "
            "prompt_tokens_per_s, prompt_chars) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    conn.close()


#: The prompt an estimate of the wait is asked for (12,000 characters).
ESTIMATED = [{"role": "user", "content": "x" * 12_000}]


def queries(db: Path, reps: int) -> dict[str, float]:
    """Median seconds of each call, measured round-robin so load on the machine hits all alike."""
    common.ensure_repo_on_path()
    from lmstream_nb import PromptStore

    week_ago = time.time() - 7 * 86400
    with PromptStore(db) as store:
        conn = store._connection()  # the store's own connection: the same cache for all
        calls: dict[str, Callable[[], object]] = {
            "raw GROUP BY (baseline)": lambda: conn.execute(RAW_GROUP_BY).fetchall(),
            "stats()": lambda: store.stats(),
            "stats(prompt=...)": lambda: store.stats(prompt="prompt-3"),
            "stats(model=...)": lambda: store.stats(model="gemma-2-9b"),
            "stats(since=7 days)": lambda: store.stats(since=week_ago),
            "window functions (not used)": lambda: [
                conn.execute(sql).fetchall() for sql in WINDOW_STATS
            ],
            "history()": lambda: store.history(),
            "history(prompt=...)": lambda: store.history(prompt="prompt-3"),
            "history(status='stalled')": lambda: store.history(status="stalled"),
            "history(since=7 days)": lambda: store.history(since=week_ago),
            "first_token_estimate()": lambda: store.first_token_estimate(
                model="gemma-2-9b", base_url="http://localhost:1234/v1", messages=ESTIMATED
            ),
        }
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for call in calls.values():
            call()  # warm the page cache once
        for rep in range(reps):
            order = list(calls) if rep % 2 == 0 else list(reversed(calls))
            for name in order:
                t0 = time.perf_counter()
                calls[name]()
                samples[name].append(time.perf_counter() - t0)
    return {name: common.median(values) for name, values in samples.items()}


def _files_size(db: Path) -> tuple[int, int]:
    """Bytes of the database file and of its write-ahead log (0 when there is none)."""
    wal = Path(f"{db}-wal")
    return db.stat().st_size, wal.stat().st_size if wal.exists() else 0


def _answer(size: int) -> str:
    """``size`` characters of varied ASCII text (one byte each in UTF-8)."""
    rng = random.Random(11)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n)) for n in range(1, 12)
    ]
    block = " ".join(rng.choice(words) for _ in range(20_000)) + "\n"
    return (block * (size // len(block) + 1))[:size]


def _write_once(db: Path, text: str) -> dict[str, float]:
    """The baseline: the text in one INSERT into a fresh WAL database (synchronous = NORMAL)."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("CREATE TABLE answers (text TEXT NOT NULL)")
    t0 = time.perf_counter()
    conn.execute("BEGIN")
    conn.execute("INSERT INTO answers VALUES (?)", (text,))
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    db_bytes, wal_bytes = _files_size(db)
    conn.close()
    closed = _files_size(db)[0]
    return {"seconds": elapsed, "db": db_bytes, "wal": wal_bytes, "closed": closed, "appends": 0}


def _record(db: Path, text: str, rate: int, *, former: bool) -> dict[str, float]:
    """One answer recorded as ``arun`` records it, ``rate`` characters a second."""
    common.ensure_repo_on_path()
    from lmstream_nb import PromptStore

    size = len(text)
    with PromptStore(db) as store:
        run_id = store.start_run(
            prompt_name="long",
            prompt_version=1,
            template="Write {{n}} bytes",
            system=None,
            messages=[{"role": "user", "content": "Write 100 MB"}],
            variables={"n": str(size)},
            model="m",
            base_url="http://127.0.0.1:1234/v1",
            started_at=time.time(),
        )
        appended = (size - rate // 2) // rate * rate  # the last half second is not yet in
        t0 = time.perf_counter()
        for start in range(0, appended, rate):
            store.append_run_text(run_id, text[start : start + rate])
        if former:
            conn = store._connection()
            conn.execute("PRAGMA journal_size_limit = -1")
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "UPDATE runs SET status = 'ok', text = ?, text_in_chunks = 0, text_chars = ? "
                "WHERE id = ?",
                (text, size, run_id),
            )
            conn.execute("DELETE FROM run_chunks WHERE run_id = ?", (run_id,))
            conn.execute("COMMIT")
        else:
            store.finish_run(
                run_id,
                status="ok",
                text=text,
                reasoning="",
                error=None,
                finish_reason="stop",
                model=None,
                ttft_s=0.5,
                duration_s=size / rate,
                chunks=size // 100,
                prompt_tokens=10,
                completion_tokens=size // 4,
                tokens_per_s=None,
            )
        elapsed = time.perf_counter() - t0
        db_bytes, wal_bytes = _files_size(db)
        if store.get_run(run_id).text != text:
            raise SystemExit("the recorded text differs from the answer")
    return {
        "seconds": elapsed,
        "db": db_bytes,
        "wal": wal_bytes,
        "closed": _files_size(db)[0],
        "appends": appended // rate,
    }


def long_answer(tmp: Path, size: int, reps: int) -> dict[str, dict[str, float]]:
    """Database + WAL size and write time (median of ``reps``) for one answer of ``size``.

    The baseline writes the text once (``_write_once``). Each recording case goes through the
    store as ``arun`` does: ``start_run``, one ``append_run_text`` per second's worth of text,
    then ``finish_run`` with the whole text (the last half second has not been appended yet,
    as at the end of a real stream). "former finish" repeats the 1 MB/s case with the finish
    this store used before: the whole text written into the run row and the pieces deleted,
    in one transaction, with no limit on the WAL. Sizes are taken with the database still
    open (what a running process leaves on disk), and the file alone after closing.
    """
    text = _answer(size)
    cases: dict[str, Callable[[Path], dict[str, float]]] = {
        "written once (baseline)": lambda db: _write_once(db, text)
    }
    for rate in APPEND_RATES:
        cases[f"{rate // 1024} KiB appended each second"] = lambda db, r=rate: _record(
            db, text, r, former=False
        )
    cases["former finish, 1024 KiB each second"] = lambda db: _record(
        db, text, APPEND_RATES[0], former=True
    )
    results: dict[str, dict[str, float]] = {}
    times: dict[str, list[float]] = {label: [] for label in cases}
    for rep in range(reps):
        for label, case in cases.items():
            db = tmp / f"answer-{rep}.db"
            gc.collect()
            results[label] = case(db)
            times[label].append(results[label]["seconds"])
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
    for label, values in times.items():
        results[label]["seconds"] = common.median(values)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--answer-mb", type=float, default=100.0)
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

        size = int(args.answer_mb * 1e6)
        answer = long_answer(Path(tmp), size, reps=3)
        base = answer["written once (baseline)"]
        mb = 1e6
        print(
            f"\na {size / mb:.0f} MB answer (database + WAL while open, and the file after "
            "close; ratios to the text and to the baseline; seconds: median of 3)"
        )
        print(
            f"  {'':38s} {'appends':>7s} {'db MB':>7s} {'wal MB':>7s} {'/text':>6s} "
            f"{'/base':>6s} {'closed':>7s} {'seconds':>8s} {'/base':>6s}"
        )
        for label, row in answer.items():
            total = row["db"] + row["wal"]
            print(
                f"  {label:38s} {row['appends']:7.0f} {row['db'] / mb:7.1f} "
                f"{row['wal'] / mb:7.1f} {total / size:6.2f} "
                f"{total / (base['db'] + base['wal']):6.2f} {row['closed'] / mb:7.1f} "
                f"{row['seconds']:8.2f} {row['seconds'] / base['seconds']:6.2f}"
            )
        recorded = [
            row
            for label, row in answer.items()
            if label.endswith("each second") and not label.startswith("former")
        ]
        worst_size = max((row["db"] + row["wal"]) / size for row in recorded)
        worst_time = max(row["seconds"] / base["seconds"] for row in recorded)

        fill_db = Path(tmp) / "history.db"
        t0 = time.perf_counter()
        fill(fill_db, args.runs)
        reps = 15
        print(
            f"\nqueries over {args.runs:,} runs (filled in {time.perf_counter() - t0:.1f} s; "
            f"median of {reps} round-robin calls each; ratio to the raw GROUP BY)"
        )
        q = queries(fill_db, reps)
        raw = q["raw GROUP BY (baseline)"]
        for name, seconds in q.items():
            print(f"  {name:30s} {seconds * 1e3:8.1f} ms {seconds / raw:7.2f}x")
    stats_ratio = q["stats()"] / raw
    estimate_ratio = q["first_token_estimate()"] / raw

    def verdict(ok: bool) -> str:
        return "MET" if ok else "NOT MET"

    print(
        f"\nverdict: recording adds {overhead:+.1%} to a 10k-chunk stream "
        f"(target < {TARGET_OVERHEAD:.0%}): {verdict(overhead < TARGET_OVERHEAD)}"
    )
    print(
        f"         a {size / mb:.0f} MB answer leaves database + WAL at {worst_size:.2f}x the "
        f"text (target <= {TARGET_SIZE_RATIO}x): {verdict(worst_size <= TARGET_SIZE_RATIO)}"
    )
    print(
        f"         and takes {worst_time:.2f}x the time of writing it once (target <= "
        f"{TARGET_TIME_RATIO:.0f}x): {verdict(worst_time <= TARGET_TIME_RATIO)}"
    )
    print(
        f"         stats() over {args.runs:,} runs takes {stats_ratio:.2f}x a raw GROUP BY "
        f"(target <= {TARGET_STATS_RATIO:.0f}x): {verdict(stats_ratio <= TARGET_STATS_RATIO)}"
    )
    print(
        f"         first_token_estimate() over {args.runs:,} runs takes {estimate_ratio:.3f}x a "
        f"raw GROUP BY (target <= {TARGET_ESTIMATE_RATIO}x): "
        f"{verdict(estimate_ratio <= TARGET_ESTIMATE_RATIO)}"
    )
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
