"""``lmstream serve``: what relaying a run as Server-Sent Events costs, next to streaming directly.

Three processes on 127.0.0.1, each started by this script and stopped by it (stdin EOF, then
SIGTERM/SIGKILL of that PID only): the simulator (profile "instant": no per-token delay unless a
request asks for one), the service (``lmstream_nb.serve.serve`` over a temporary store) and this
process, the client. The direct path is ``LMStudioClient.stream_chat`` against the simulator;
the service path is ``POST /api/prompts/bench/runs`` and then reading the run's
``text/event-stream`` with httpx. Both send the same rendered messages (the service renders the
stored prompt; the client renders it with ``Prompt.render``), so the simulator, which is seeded,
streams the same text to both. The per-request speed rides in the prompt as a ``[[sim …]]``
marker (a variable).

(a) Throughput. One answer of ``--chunks`` chunks, streamed flat out. Measured from issuing the
    request (the POST, for the service) to the finish (``StreamFinished`` / the ``done`` event).
    The rate is simulator chunks delivered per second, comparable even if the service merges
    several chunks into one ``delta`` event; the service's own SSE events/s are shown too. The
    two paths alternate (the first path flips every round) and the figures are medians.
    Target: service >= 0.5x direct.

(b) Added latency per event. The simulator runs at ``--tps`` tokens/s with an even beat, and
    this script wraps its ``_EventStream._emit_data`` (in the simulator's process only) to stamp
    ``time.monotonic()`` just before each content chunk is written. CLOCK_MONOTONIC is one clock
    for every process on the machine, so each chunk's latency is (arrival in this process) -
    (stamp in the simulator), with no start-time alignment needed. A chunk has arrived when the
    text received so far reaches the chunk's end (character offsets, so merged deltas count
    correctly). Direct and service runs of the same seeded stream alternate; the added latency
    of chunk i is service latency(i) - direct latency(i), paired across a direct and a service
    run, pooled over the rounds. Target: p50 added <= 5 ms.

(c) Memory with 200 idle listeners. The service's VmRSS (``/proc/PID/status``) after warm-up,
    then with 200 open event streams that are waiting for a first token (the simulator is told
    to process the prompt for hours), in two shapes: one run watched by 200 listeners, and 200
    runs watched by one listener each (200 upstream requests too). Each listener counts once it
    received its first event. Reported: MiB added and KiB per listener, and VmRSS after the
    listeners closed and the runs were stopped.

(d) Memory for a long answer. In one fresh service process, ``--long-runs`` answers of
    ``--long-mib`` MiB each (default 48, in deltas of ``--long-chunk`` = 128 characters; the
    simulator's text has a few non-ASCII words, so a character is ~1.02 bytes), each read by one
    listener. The service's VmRSS is sampled every 0.25 s with what its store has received
    (``GET /api/runs``), and reported against the text's UTF-8 size: the growth per byte
    received while streaming (between a quarter and 95% of the text: before that fixed costs
    dominate, after it the run is being finished), the peak (VmHWM, reset when the run starts),
    at the done event and 2 s after the run. A second run shows whether what the first left is
    reused or leaked. The listener's text must equal the stored text (correctness). Before it,
    the hub's own copy of a 10 MB text is measured with tracemalloc in this process, against a
    baseline of one str per delta (the layout it had). Target: at most 3x the text.

    python benchmarks/serve.py [--rounds 5] [--chunks 100000] [--tps 200] [--tokens 400]
                               [--listeners 200] [--long-mib 48] [--long-chunk 128]
                               [--long-runs 1] [--long-only]

Exit status 0 whether or not the targets are met; 1 if a path failed or delivered the wrong text.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common as common

common.ensure_repo_on_path()

MODEL = common.MODEL
TARGET_RATIO = 0.5
TARGET_P50_MS = 5.0
TARGET_LONG_RATIO = 3.0
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
RUN_TIMEOUT_S = 60.0
TEMPLATE = "{{sim}} Write a long answer about {{topic}}."


def marker(**fields: Any) -> str:
    return "[[sim " + json.dumps(fields) + "]]"


# ---------------------------------------------------------------------------------------------
# Child processes: the simulator (with a stamping tap) and the service


def child_sim() -> None:
    """Serve the simulator; on stdin: ``tap on|off``, ``dump`` (prints the stamps as JSON)."""
    from lmstream_nb import simulator
    from lmstream_nb.simulator import _app

    stamps: list[tuple[float, str]] = []
    tap = {"on": False}
    cls: Any = _app._EventStream
    original = cls._emit_data

    async def _emit_data(self: Any, send: Any, obj: Any) -> None:
        if tap["on"] and isinstance(obj, dict) and obj.get("choices"):
            content = (obj["choices"][0].get("delta") or {}).get("content")
            if content:  # stamped just before the write: a chunk cannot have left earlier
                stamps.append((time.monotonic(), content))
        await original(self, send, obj)

    cls._emit_data = _emit_data
    with simulator.serve(profile="instant", seed=3) as sim:
        print("URL", sim.base_url, flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command in ("tap on", "tap off"):
                tap["on"] = command == "tap on"
                print("OK", flush=True)
            elif command == "dump":
                batch = stamps[:]
                del stamps[: len(batch)]
                print(json.dumps(batch), flush=True)


def child_serve(db: str, upstream: str) -> None:
    """Serve the service over the store at ``db``; exit when stdin closes."""
    from lmstream_nb import PromptStore
    from lmstream_nb import serve as serve_module

    store = PromptStore(db)
    with serve_module.serve(store=store, base_url=upstream) as handle:
        print("URL", handle.url, flush=True)
        sys.stdin.read()


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    url: str

    def command(self, line: str, timeout: float = 10.0) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return read_line(self.proc, timeout)

    def rss_kib(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"no {field} in /proc/PID/status")

    def reset_peak(self) -> None:
        """Start VmHWM (peak RSS) again from the current RSS ("5" to clear_refs, Linux 4.0+)."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().decode().strip() if ready else ""


def start_child(name: str, args: Sequence[str], env: dict[str, str]) -> Child:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    line = read_line(proc, START_TIMEOUT_S)
    if not line.startswith("URL "):
        stop_child(proc)
        raise RuntimeError(f"the {name} did not start within {START_TIMEOUT_S:.0f} s ({line!r})")
    return Child(name, proc, line.split()[1])


def stop_child(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()  # the child exits on EOF
    for signal_it in (None, proc.terminate, proc.kill):
        if signal_it is not None:
            signal_it()
        try:
            proc.wait(STOP_TIMEOUT_S)
            break
        except subprocess.TimeoutExpired:
            continue
    if proc.stdout is not None:
        proc.stdout.close()


# ---------------------------------------------------------------------------------------------
# The two paths


@dataclass
class Stream:
    seconds: float = 0.0
    events: int = 0  # TextDelta / SSE delta events
    text: str = ""
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, chars so far)


class Paths:
    def __init__(self, sim_url: str, service_url: str, prompt: Any) -> None:
        import httpx

        from lmstream_nb import LMStudioClient

        self.prompt = prompt
        self.direct = LMStudioClient(sim_url)
        self.http = httpx.AsyncClient(
            base_url=service_url,
            trust_env=False,
            timeout=httpx.Timeout(RUN_TIMEOUT_S),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=20),
        )

    async def aclose(self) -> None:
        await self.direct.aclose()
        await self.http.aclose()

    async def run_direct(self, sim: str, stamp: bool = False) -> Stream:
        from lmstream_nb import StreamFinished, TextDelta

        messages = self.prompt.render({"sim": sim, "topic": "rivers"})
        out = Stream()
        parts: list[str] = []
        chars = 0
        finished = None
        t0 = time.perf_counter()
        async with self.direct.stream_chat(messages, model=MODEL) as stream:
            async for event in stream:
                if isinstance(event, TextDelta):
                    out.events += 1
                    parts.append(event.content)
                    if stamp:
                        chars += len(event.content)
                        out.arrivals.append((time.monotonic(), chars))
                elif isinstance(event, StreamFinished):
                    finished = event
        out.seconds = time.perf_counter() - t0
        if finished is None:
            raise RuntimeError("the direct stream ended without StreamFinished")
        out.text = "".join(parts)
        return out

    async def start_run(self, sim: str) -> dict[str, Any]:
        response = await self.http.post(
            "/api/prompts/bench/runs", json={"variables": {"sim": sim, "topic": "rivers"}}
        )
        if response.status_code != 201:
            raise RuntimeError(f"POST run: {response.status_code} {response.text[:200]}")
        created: dict[str, Any] = response.json()
        return created

    async def events(self, url: str) -> AsyncGenerator[tuple[str, str], None]:
        """(event name, data) for each SSE event of ``url``, until the response ends."""
        async with self.http.stream("GET", url) as response:
            if response.status_code != 200:
                raise RuntimeError(f"GET {url}: {response.status_code}")
            name, data = "message", list[str]()
            async for line in response.aiter_lines():
                if not line:
                    if data:
                        yield name, "\n".join(data)
                    name, data = "message", []
                elif line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
                elif line.startswith("event:"):
                    name = line[6:].strip()

    async def run_service(self, sim: str, stamp: bool = False) -> Stream:
        out = Stream()
        parts: list[str] = []
        chars = 0
        done = False
        t0 = time.perf_counter()
        created = await self.start_run(sim)
        async with contextlib.aclosing(self.events(created["events_url"])) as events:
            async for name, data in events:
                if name == "delta":
                    text = json.loads(data)["text"]
                    out.events += 1
                    parts.append(text)
                    if stamp:
                        chars += len(text)
                        out.arrivals.append((time.monotonic(), chars))
                elif name == "done":
                    done = True
                    break
                elif name == "error":
                    raise RuntimeError(f"the service run failed: {data}")
        out.seconds = time.perf_counter() - t0
        if not done:
            raise RuntimeError("the service stream ended without a done event")
        out.text = "".join(parts)
        return out


# ---------------------------------------------------------------------------------------------
# (a) throughput, (b) latency, (c) memory


async def throughput(paths: Paths, rounds: int, chunks: int) -> dict[str, list[Stream]]:
    sim = marker(output_tokens=chunks)
    results: dict[str, list[Stream]] = {"direct": [], "service": []}
    for r in range(rounds):
        order = ("direct", "service") if r % 2 == 0 else ("service", "direct")
        line = []
        for path in order:
            run = paths.run_direct if path == "direct" else paths.run_service
            stream = await asyncio.wait_for(run(sim), RUN_TIMEOUT_S)
            results[path].append(stream)
            line.append(f"{path}={chunks / stream.seconds / 1000:.1f}k chunks/s")
        print(f"  round {r + 1}: " + "  ".join(line), flush=True)
    return results


def chunk_latencies(stamps: list[tuple[float, str]], stream: Stream) -> list[float]:
    """Seconds from each chunk's stamp in the simulator to the arrival of its last character."""
    latencies = []
    j = 0
    end = 0
    for t_sent, content in stamps:
        end += len(content)
        while stream.arrivals[j][1] < end:
            j += 1
        latencies.append(stream.arrivals[j][0] - t_sent)
    return latencies


async def latency(
    paths: Paths, sim_child: Child, rounds: int, tps: float, tokens: int
) -> tuple[list[float], list[float], list[float], list[str]]:
    sim = marker(output_tokens=tokens, gen_tps=tps, jitter=0)
    direct_all: list[float] = []
    service_all: list[float] = []
    added: list[float] = []
    texts: list[str] = []
    sim_child.command("tap on")
    try:
        for r in range(rounds):
            per_path: dict[str, list[float]] = {}
            order = ("direct", "service") if r % 2 == 0 else ("service", "direct")
            for path in order:
                run = paths.run_direct if path == "direct" else paths.run_service
                stream = await asyncio.wait_for(run(sim, stamp=True), RUN_TIMEOUT_S)
                stamps = [(t, c) for t, c in json.loads(sim_child.command("dump"))]
                if "".join(c for _, c in stamps) != stream.text:
                    raise RuntimeError(f"{path}: the text received is not the text sent")
                per_path[path] = chunk_latencies(stamps, stream)
                texts.append(stream.text)
            direct_all += per_path["direct"]
            service_all += per_path["service"]
            added += [s - d for s, d in zip(per_path["service"], per_path["direct"], strict=True)]
            print(
                f"  round {r + 1}: p50 direct {common.median(per_path['direct']) * 1e3:.2f} ms,"
                f" service {common.median(per_path['service']) * 1e3:.2f} ms",
                flush=True,
            )
    finally:
        sim_child.command("tap off")
    return direct_all, service_all, added, texts


@dataclass
class MemoryRow:
    shape: str
    listeners: int
    before_kib: int
    with_kib: int
    after_kib: int
    seconds_to_open: float


async def _listen(
    paths: Paths, url: str, opened: list[str], goal: int, ready: asyncio.Event
) -> None:
    async with contextlib.aclosing(paths.events(url)) as events:
        async for _event in events:
            opened.append(url)
            if len(opened) >= goal:
                ready.set()
            await asyncio.Event().wait()  # stay connected and idle until cancelled


async def _open_listeners(
    paths: Paths, shape: str, count: int
) -> tuple[list[dict[str, Any]], list[asyncio.Task[None]], float]:
    """Start the waiting run(s) of ``shape`` and ``count`` listeners; return once all are open."""
    waiting = marker(prefill_tps=0.001)  # hours of "prompt processing": no token arrives
    if shape.startswith("1 run"):
        created = [await paths.start_run(waiting)]
        urls = [created[0]["events_url"]] * count
    else:
        created = list(await asyncio.gather(*(paths.start_run(waiting) for _ in range(count))))
        urls = [c["events_url"] for c in created]
    ready = asyncio.Event()
    got: list[str] = []
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(_listen(paths, url, got, count, ready)) for url in urls]
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait([waiter, *tasks], timeout=30.0, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if not ready.is_set():
        await _close_listeners(paths, created, tasks)
        failed = [t.exception() for t in tasks if t.done() and not t.cancelled()]
        raise RuntimeError(
            f"only {len(got)} of {count} listeners opened within 30 s; first "
            f"failure: {failed[:1]!r}"
        )
    return created, tasks, time.perf_counter() - t0


async def _close_listeners(
    paths: Paths, created: list[dict[str, Any]], tasks: list[asyncio.Task[None]]
) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in created:
        with contextlib.suppress(Exception):
            await paths.http.request("DELETE", c["url"], json={})


async def memory(
    sim: Child, prompt: Any, start_service: Callable[[], Child], listeners: int
) -> list[MemoryRow]:
    """Each shape in a fresh service process, so memory freed by earlier work can't hide it."""
    rows = []
    for shape in ("1 run x N listeners", "N runs x 1 listener"):
        service = await asyncio.to_thread(start_service)
        paths = Paths(sim.url, service.url, prompt)
        try:
            # Warm-up: a finished run and the same shape at 5 listeners, then closed.
            await paths.run_service(marker(output_tokens=200))
            created, tasks, _ = await _open_listeners(paths, shape, 5)
            await _close_listeners(paths, created, tasks)
            await asyncio.sleep(1.0)
            before = service.rss_kib()
            created, tasks, opened = await _open_listeners(paths, shape, listeners)
            try:
                await asyncio.sleep(1.0)  # idle: a status event or two, nothing else
                with_listeners = service.rss_kib()
            finally:
                await _close_listeners(paths, created, tasks)
            await asyncio.sleep(1.0)
            rows.append(
                MemoryRow(
                    shape.replace("N", str(listeners)),
                    listeners,
                    before,
                    with_listeners,
                    service.rss_kib(),
                    opened,
                )
            )
        finally:
            await paths.aclose()
            await asyncio.to_thread(stop_child, service.proc)
        print(
            f"  {rows[-1].shape}: all open after {opened:.2f} s (fresh service, pid "
            f"{service.proc.pid})",
            flush=True,
        )
    return rows


@dataclass
class LongRow:
    text_bytes: int
    chars: int
    events: int
    seconds: float
    before_kib: int
    early_chars: int  # the text the service had received at the first streaming sample
    early_kib: int  # VmRSS then
    received_chars: int  # the same at the last streaming sample
    streaming_kib: int
    peak_kib: int  # VmHWM during the run (reset at its start)
    end_kib: int  # VmRSS when the done event arrived
    after_kib: int  # VmRSS 2 s after the run ended


async def sample_streaming(paths: Paths, service: Child, samples: list[tuple[int, int]]) -> None:
    """Every 0.25 s: (characters the service has received, its VmRSS) while the run streams.

    The received text is what its store holds (appended once a second), so the figure per byte
    is, if anything, too high."""
    while True:
        await asyncio.sleep(0.25)
        rss = service.rss_kib()
        runs = (await paths.http.get("/api/runs", params={"limit": 1})).json()["runs"]
        if runs and runs[0]["status"] == "unfinished":
            samples.append((runs[0]["text_chars"], rss))


async def long_answer(
    sim: Child,
    prompt: Any,
    start_service: Callable[[], Child],
    db: str,
    args: argparse.Namespace,
) -> tuple[list[LongRow], bool]:
    """Long answers through one fresh service, one after another: what holding one costs per
    byte of text, and whether what a run leaves behind is reused by the next (not a leak)."""
    from lmstream_nb import PromptStore

    chunk = args.long_chunk
    tokens = int(args.long_mib * 1024 * 1024 / chunk)
    service = await asyncio.to_thread(start_service)
    paths = Paths(sim.url, service.url, prompt)
    rows: list[LongRow] = []
    same = True
    try:
        await paths.run_service(marker(output_tokens=200))  # warm-up: imports, first writes
        await asyncio.sleep(1.0)
        for _ in range(args.long_runs):
            before = service.rss_kib()
            service.reset_peak()
            t0 = time.perf_counter()
            created = await paths.start_run(marker(output_tokens=tokens, chunk_chars=chunk))
            chars = events = end = 0
            digest = hashlib.sha256()
            samples: list[tuple[int, int]] = []
            sampler = asyncio.create_task(sample_streaming(paths, service, samples))
            async with contextlib.aclosing(paths.events(created["events_url"])) as stream:
                async for name, data in stream:
                    if name == "delta":
                        text = json.loads(data)["text"]
                        chars += len(text)
                        events += 1
                        digest.update(text.encode())
                    elif name in ("done", "error"):
                        end = service.rss_kib()
                        if name == "error":
                            raise RuntimeError(f"the long run failed: {data}")
                        break
            seconds = time.perf_counter() - t0
            sampler.cancel()
            peak = service.rss_kib("VmHWM")
            # While streaming: the samples between a quarter and 95% of the text received
            # (before that, fixed costs dominate; after it, the run is being finished).
            inside = [
                (r, k) for r, k in samples if tokens * chunk // 4 <= r <= tokens * chunk * 0.95
            ]
            (early, early_kib), (received, streaming) = (
                (inside[0], inside[-1]) if len(inside) >= 2 else ((0, 0), (0, 0))
            )
            await asyncio.sleep(2.0)  # the run is recorded and forgotten by the hub
            after = service.rss_kib()
            # Read in this process, so the service holds nothing more for it.
            stored = PromptStore(db).get_run(created["run_id"]).text.encode()
            same = same and hashlib.sha256(stored).digest() == digest.digest()
            rows.append(
                LongRow(
                    len(stored),
                    chars,
                    events,
                    seconds,
                    before,
                    early,
                    early_kib,
                    received,
                    streaming,
                    peak,
                    end,
                    after,
                )
            )
    finally:
        await paths.aclose()
        await asyncio.to_thread(stop_child, service.proc)
    return rows, same


class PieceList:
    """The baseline: a text kept as its deltas plus their cumulative ends (the hub's old
    layout), sliceable the same way."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.ends: list[int] = []

    def append(self, piece: str) -> None:
        self.pieces.append(piece)
        self.ends.append((self.ends[-1] if self.ends else 0) + len(piece))


def hub_copy(size: int = 10_000_000) -> list[tuple[str, float, float]]:
    """(delta shape, baseline bytes per text byte, hub bytes per text byte), by tracemalloc."""
    import tracemalloc

    from lmstream_nb.serve._hub import Text

    words = [" the", " river", " café", " runs", " →", " 🙂", " stone", "s", " and"]
    shapes = {"word pieces (~5 chars)": words, "128-character deltas": [("".join(words) * 4)[:128]]}
    rows = []
    for label, pieces in shapes.items():
        ratios = []
        for kind in (PieceList, Text):
            tracemalloc.start()
            text: Any = kind()
            total = i = 0
            while total < size:
                piece = (pieces[i % len(pieces)] + "x")[:-1]  # a new str, as every delta is
                i += 1
                text.append(piece)
                total += len(piece.encode())
            del piece
            ratios.append(tracemalloc.get_traced_memory()[0] / total)
            tracemalloc.stop()
            del text
        rows.append((label, ratios[0], ratios[1]))
    return rows


# ---------------------------------------------------------------------------------------------
# The conductor


async def measure(
    args: argparse.Namespace,
    sim: Child,
    service: Child,
    prompt: Any,
    start_service: Callable[[], Child],
    db: str,
) -> int:
    if args.long_only:
        return await report_long(args, sim, prompt, start_service, db)
    paths = Paths(sim.url, service.url, prompt)
    status = 0
    try:
        # Warm-up: imports, connections, the store's first writes, on both paths.
        for _ in range(2):
            await paths.run_direct(marker(output_tokens=200))
            await paths.run_service(marker(output_tokens=200))

        print(f"\n(a) throughput: {args.chunks:,} chunks flat out, {args.rounds} rounds")
        tp = await throughput(paths, args.rounds, args.chunks)
        print(
            f"\n(b) latency: {args.tokens} tokens at {args.tps:g} tokens/s, "
            f"{args.latency_rounds} rounds"
        )
        lat_direct, lat_service, added, texts = await latency(
            paths, sim, args.latency_rounds, args.tps, args.tokens
        )
        print(f"\n(c) memory: {args.listeners} idle listeners")
    finally:
        await paths.aclose()
    mem = await memory(sim, prompt, start_service, args.listeners)

    # -- correctness
    wrong = []
    want = tp["direct"][0].text
    for path, streams in tp.items():
        wrong += [
            f"{path} run {i + 1}: {len(s.text):,} chars, expected {len(want):,}"
            for i, s in enumerate(streams)
            if s.text != want
        ]
    if len(set(texts)) != 1:
        wrong.append("latency runs: direct and service received different texts")

    # -- table
    direct_rate = common.median([args.chunks / s.seconds for s in tp["direct"]])
    service_rate = common.median([args.chunks / s.seconds for s in tp["service"]])
    service_events = common.median([s.events / s.seconds for s in tp["service"]])
    ratio = service_rate / direct_rate
    paired = common.median(
        [d.seconds / v.seconds for d, v in zip(tp["direct"], tp["service"], strict=True)]
    )
    p50_added = common.percentile(added, 50) * 1e3
    direct_events = common.median([s.events / s.seconds for s in tp["direct"]])
    rows = [
        (
            "simulator chunks delivered/s",
            f"{direct_rate:,.0f}",
            f"{service_rate:,.0f}",
            f"{ratio:.2f}x",
        ),
        ("  same, median of per-round ratios", "", "", f"{paired:.2f}x"),
        ("events/s (TextDelta | SSE delta)", f"{direct_events:,.0f}", f"{service_events:,.0f}", ""),
        (
            "events per run",
            f"{tp['direct'][0].events:,}",
            f"{common.median([s.events for s in tp['service']]):,.0f}",
            "",
        ),
        (
            "seconds per run",
            f"{common.median([s.seconds for s in tp['direct']]):.3f}",
            f"{common.median([s.seconds for s in tp['service']]):.3f}",
            "",
        ),
    ]
    print(
        f"\n{'throughput (medians of ' + str(args.rounds) + ')':<36} {'direct':>10} "
        f"{'service':>10} {'service/direct':>15}"
    )
    for label, a, b, c in rows:
        print(f"  {label:<34} {a:>10} {b:>10} {c:>15}")
    print(
        f"\n{'latency per chunk, simulator write -> client':<44} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'max ms':>8}"
    )
    for label, values in (
        (f"direct ({len(lat_direct):,} chunks)", lat_direct),
        (f"service ({len(lat_service):,} chunks)", lat_service),
        ("added, service - direct (paired)", added),
    ):
        print(
            f"  {label:<42} {common.percentile(values, 50) * 1e3:>8.2f} "
            f"{common.percentile(values, 95) * 1e3:>8.2f} {max(values) * 1e3:>8.2f}"
        )
    print(
        f"\n{'service memory (VmRSS, MiB)':<28} {'before':>8} {'with':>8} {'closed':>8} "
        f"{'added':>8} {'KiB/listener':>13}"
    )
    for row in mem:
        added_kib = row.with_kib - row.before_kib
        print(
            f"  {row.shape:<26} {row.before_kib / 1024:>8.1f} {row.with_kib / 1024:>8.1f} "
            f"{row.after_kib / 1024:>8.1f} {added_kib / 1024:>8.2f} "
            f"{added_kib / row.listeners:>13.1f}"
        )
    print(
        '  ("with": the listeners open and idle, the second shape also holding its runs and\n'
        '   their upstream requests; "closed": after they closed and the runs were stopped)'
    )

    print()
    if wrong:
        status = 1
        print("CORRECTNESS: FAILED")
        for w in wrong:
            print("  " + w)
    else:
        print(
            f"correctness: every throughput run delivered the same {len(want):,} characters on "
            f"both paths; every latency run the text the simulator sent"
        )
    print(
        f"verdict: throughput service/direct = {ratio:.2f}x (target >= {TARGET_RATIO}x): "
        f"{'MET' if ratio >= TARGET_RATIO else 'NOT MET'}"
    )
    print(
        f"verdict: added latency p50 = {p50_added:.2f} ms (target <= {TARGET_P50_MS:g} ms): "
        f"{'MET' if p50_added <= TARGET_P50_MS else 'NOT MET'}"
    )
    return max(status, await report_long(args, sim, prompt, start_service, db))


def verdict(met: bool) -> str:
    return "MET" if met else "NOT MET"


async def report_long(
    args: argparse.Namespace,
    sim: Child,
    prompt: Any,
    start_service: Callable[[], Child],
    db: str,
) -> int:
    print(
        f"\n(d) long answers: {args.long_runs} x {args.long_mib:g} MiB in deltas of "
        f"{args.long_chunk} characters, one listener, one fresh service"
    )
    print("  the hub's own copy of a 10 MB text (tracemalloc, in this process):")
    for label, baseline, hub in hub_copy():
        print(f"    {label:<24} one str per delta {baseline:5.2f}x   blocks {hub:5.2f}x the text")
    rows, same = await long_answer(sim, prompt, start_service, db, args)
    first = rows[0]
    size = first.text_bytes
    for n, row in enumerate(rows, 1):
        print(
            f"  run {n}: {row.chars:,} characters ({row.text_bytes / 2**20:.1f} MiB of UTF-8) in "
            f"{row.events:,} events, {row.seconds:.1f} s "
            f"({row.text_bytes / 2**20 / row.seconds:.1f} MiB/s)"
        )
    print(
        f"\n{'service VmRSS, growth over run 1 start':<40} {'MiB':>8} {'x text':>8}"
        "   (text: one run's UTF-8 bytes)"
    )
    lines = [("before run 1", first.before_kib)]
    for n, row in enumerate(rows, 1):
        lines += [
            (f"run {n}: streaming (see below)", row.streaming_kib),
            (f"run {n}: peak (VmHWM, reset at its start)", row.peak_kib),
            (f"run {n}: when the done event arrived", row.end_kib),
            (f"run {n}: 2 s after it ended", row.after_kib),
        ]
    for label, kib in lines:
        growth = (kib - first.before_kib) * 1024 / size
        print(f"  {label:<38} {kib / 1024:>8.1f} {growth:>8.2f}")
    per_char = size / first.chars
    received = first.received_chars * per_char
    streaming = (first.streaming_kib - first.before_kib) * 1024 / max(received, 1)
    slope = (
        (first.streaming_kib - first.early_kib)
        * 1024
        / max((first.received_chars - first.early_chars) * per_char, 1)
    )
    peak = (first.peak_kib - first.before_kib) * 1024 / size
    print(
        "  (streaming: sampled every 0.25 s; the first and last samples between 1/4 and 95% of "
        "the text, as the service's store had it)"
    )
    print(
        f"  while streaming: {streaming:.2f}x the text received at {first.received_chars:,} "
        f"characters; growth per byte received from {first.early_chars:,} on: {slope:.2f}x"
    )
    print(
        f"\nverdict: while streaming, the service grows by {slope:.2f}x each byte it receives "
        f"(target <= {TARGET_LONG_RATIO:g}x): {verdict(slope <= TARGET_LONG_RATIO)}"
    )
    print(
        f"verdict: peak, as the run is finished and recorded, {peak:.2f}x the text "
        f"(target <= {TARGET_LONG_RATIO:g}x): {verdict(peak <= TARGET_LONG_RATIO)}"
    )
    if len(rows) > 1:
        kept = (rows[-1].after_kib - rows[0].after_kib) * 1024 / size
        print(
            f"after run {len(rows)} against after run 1: {kept:+.2f}x the text "
            "(about 0: what a run leaves is reused, not leaked)"
        )
    if not same:
        print("CORRECTNESS: FAILED: the stored text is not the text the listener received")
        return 1
    print("correctness: the listener received exactly the stored text, every run")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="throughput rounds")
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--latency-rounds", type=int, default=3)
    parser.add_argument("--tps", type=float, default=200.0)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--listeners", type=int, default=200)
    parser.add_argument("--long-mib", type=float, default=48.0, help="size of a long answer")
    parser.add_argument("--long-chunk", type=int, default=128, help="characters per delta")
    parser.add_argument("--long-runs", type=int, default=1, help="long answers in a row")
    parser.add_argument("--long-only", action="store_true", help="measure only (d)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child[0] == "sim":
            child_sim()
        else:
            child_serve(args.child[1], args.child[2])
        return 0

    from lmstream_nb import PromptStore

    started = time.perf_counter()
    print("lmstream serve: throughput, added latency and memory against streaming directly")
    print(common.versions())
    with tempfile.TemporaryDirectory(prefix="lmstream-serve-bench-") as tmp:
        env = {**common.child_env(), "LMSTREAM_HOME": tmp}
        db = str(Path(tmp) / "lmstream.db")
        prompt = PromptStore(db).save("bench", TEMPLATE, model=MODEL)
        sim = start_child("simulator", ["sim"], env)
        service = None
        try:

            def start_service() -> Child:
                return start_child("service", ["serve", db, sim.url], env)

            service = start_service()
            print(
                f"simulator {sim.url} (pid {sim.proc.pid}), service {service.url} "
                f"(pid {service.proc.pid}), client pid {os.getpid()}"
            )
            status = asyncio.run(measure(args, sim, service, prompt, start_service, db))
        finally:
            if service is not None:
                stop_child(service.proc)
            stop_child(sim.proc)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
