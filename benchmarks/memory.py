"""Memory: how much a 10 MB answer costs while it streams through ``stream_chat``.

Why: a notebook may stream very long answers, and a client that keeps one Python object per
chunk (millions of tiny strings, events or parsed dicts) can need 10-50x the text size. The
user here consumes the events, discards them, and keeps only ``stream.text`` at the end.
Target: (peak - idle) / text size <= 3x.

Each measurement runs in a fresh process. "Idle" is after the imports, after creating the client
and after one request (``list_models``) has opened the pooled connection. Two figures:

* RSS: /proc/self/status VmHWM (peak resident set; reset to the idle level through
  /proc/self/clear_refs where the kernel allows it) plus VmRSS sampled during the stream, and
  ``getrusage(RUSAGE_SELF).ru_maxrss`` for reference;
* tracemalloc: peak of Python allocations, tracing started at idle (a separate process, because
  tracing slows the stream several times over and itself uses memory).

The answer is 10 MiB of ``"tok "`` (4-byte content per chunk: 2,621,440 chunks) for the RSS
run. The tracemalloc run uses 40-byte chunks (262,144 chunks, same 10 MiB of text) by default:
with 4-byte chunks tracing took about 150 s on 2 cores, and its peak is set by the text buffers,
not by the chunk count (the RSS run, with 4-byte chunks, shows the per-chunk garbage is freed).

    python benchmarks/memory.py [--token-bytes 4] [--tracemalloc-token-bytes 40]

Exit status 0 whether or not the target is met; 1 if a run failed or the text was wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import _common as common

TEXT_BYTES = 10 * 2**20
TARGET_RATIO = 3.0
WORKER_TIMEOUT_S = 170.0
SAMPLE_EVERY = 1 << 15  # events between VmRSS samples


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0, own process)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def worker(mode: str, url: str, chunks: int) -> None:
    """Stream once and print one JSON line of figures (all memory in KiB)."""
    t_import = time.perf_counter()
    from lmstream_nb import LMStudioClient, StreamFinished, TextDelta

    import_s = time.perf_counter() - t_import
    figures: dict[str, Any] = {"mode": mode, "import_s": import_s}

    async def run() -> str:
        async with LMStudioClient(url) as client:
            await client.list_models()  # connect once: the pooled connection is part of idle
            gc.collect()
            idle = common.proc_status("VmRSS", "VmHWM")
            figures["idle_rss"] = idle.get("VmRSS", 0)
            figures["idle_hwm"] = idle.get("VmHWM", 0)
            figures["hwm_reset"] = _reset_hwm()
            if mode == "tracemalloc":
                import tracemalloc

                tracemalloc.start()
                figures["tm_start"] = tracemalloc.get_traced_memory()[0] // 1024
            sampled = figures["idle_rss"]
            n = 0
            finish = None
            t0 = time.perf_counter()
            async with client.stream_chat("Write 10 MB.", model=common.MODEL) as stream:
                async for event in stream:  # consume and discard, as a notebook sink would
                    n += 1
                    if not n % SAMPLE_EVERY:
                        sampled = max(sampled, common.proc_status("VmRSS").get("VmRSS", 0))
                    if isinstance(event, TextDelta):
                        continue
                    if isinstance(event, StreamFinished):
                        finish = event
            figures["loop_hwm"] = common.proc_status("VmHWM").get("VmHWM", 0)
            if mode == "tracemalloc":
                import tracemalloc

                figures["tm_loop_peak"] = tracemalloc.get_traced_memory()[1] // 1024
            text = stream.text  # what the user keeps (``stream`` is still alive, as in a cell)
            figures["stream_s"] = time.perf_counter() - t0
            if mode == "tracemalloc":
                import tracemalloc

                current, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                figures["tm_peak"] = peak // 1024
                figures["tm_after"] = current // 1024
            after = common.proc_status("VmRSS", "VmHWM")
            figures["peak_hwm"] = after.get("VmHWM", 0)
            figures["after_rss"] = after.get("VmRSS", 0)
            figures["sampled_rss"] = max(sampled, figures["after_rss"])
            figures["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            figures["events"] = n
            figures["chunks"] = finish.stats.chunks if finish else None
            figures["finish_reason"] = finish.finish_reason if finish else None
            return text

    text = asyncio.run(run())
    figures["text_bytes"] = len(text) if text.isascii() else len(text.encode())
    print(json.dumps(figures))


@functools.cache
def _template() -> tuple[dict[str, Any], str]:
    """The simulator's content chunk, rendered in a child so this process stays small.

    A small parent matters: Linux carries a parent's peak RSS over into a child's ru_maxrss.
    """
    try:
        res = common.run_worker(str(Path(common.__file__)), ["template"], 60.0)
    except (common.WorkerFailed, ValueError) as exc:
        print(f"(no simulator template: {exc}; using the built-in chunk layout)")
        return json.loads(json.dumps(common.FALLBACK_CHUNK)), "the built-in chunk layout"
    res.pop("wall_s")
    res.pop("stdout")
    return res, "the simulator's chunk layout"


def _spec(token_bytes: int) -> tuple[common.ReplaySpec, int, str]:
    """A 10 MiB answer as head + repeated chunk + tail, so the server holds only a few KB."""
    template, source = _template()
    token = ("tok " * (token_bytes // 4 + 1))[:token_bytes]
    chunks = TEXT_BYTES // len(token)
    if chunks * len(token) != TEXT_BYTES:
        raise SystemExit(f"--token-bytes must divide {TEXT_BYTES}")
    middle = common.http_chunk(common.content_event(template, token) + b"\n\n")
    tail = (
        b"".join(common.http_chunk(e + b"\n\n") for e in common.closing_events(template, chunks))
        + common.LAST_CHUNK
    )
    return common.ReplaySpec(head=b"", middle=middle, repeat=chunks, tail=tail), chunks, source


def _run(mode: str, token_bytes: int) -> dict[str, Any]:
    spec, chunks, source = _spec(token_bytes)
    print(
        f"[{mode}] serving {chunks:,} chunks of {token_bytes} bytes ({len(spec.middle)} bytes "
        f"on the wire each, {chunks * len(spec.middle) / 2**20:.0f} MiB in all; "
        f"{source})",
        flush=True,
    )
    with common.replay_server(spec) as url:
        res = common.run_worker(
            __file__,
            ["--worker", mode, "--url", url, "--token-bytes", str(token_bytes)],
            WORKER_TIMEOUT_S,
        )
    res["chunks_planned"] = chunks
    res["token_bytes"] = token_bytes
    print(
        f"[{mode}] streamed in {res['stream_s']:.1f} s "
        f"({chunks / res['stream_s'] / 1000:.0f}k chunks/s)",
        flush=True,
    )
    return res


def _mib(kib: float) -> str:
    return f"{kib / 1024:8.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--token-bytes",
        type=int,
        default=4,
        help="content bytes per chunk for the RSS run (4 -> 2.6M chunks)",
    )
    parser.add_argument(
        "--tracemalloc-token-bytes",
        type=int,
        default=40,
        help="content bytes per chunk for the tracemalloc run (40 -> 262k "
        "chunks; 4 takes about 150 s)",
    )
    parser.add_argument("--worker", choices=("rss", "tracemalloc"), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.url, TEXT_BYTES // args.token_bytes)
        return 0

    print("Peak memory while streaming a 10 MiB answer through stream_chat (lower is better)")
    print(common.versions())
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    try:
        runs.append(_run("rss", args.token_bytes))
        runs.append(_run("tracemalloc", args.tracemalloc_token_bytes))
    except common.WorkerFailed as exc:
        print(f"FAILED: {exc}")
        return 1

    rss, tm = runs
    text = TEXT_BYTES / 1024
    print()
    print(
        f"text kept: {rss['text_bytes']:,} bytes ({rss['text_bytes'] / 2**20:.2f} MiB), "
        f"{rss['events']:,} events, finish_reason={rss['finish_reason']!r}"
    )
    print(f"{'RSS run (fresh process)':<52} {'':>12} {'x text':>7}")
    print(f"  {'idle VmRSS (imports + client + 1 connection)':<50} {_mib(rss['idle_rss'])}")
    print(f"  {'idle VmHWM (peak before the stream, incl. imports)':<50} {_mib(rss['idle_hwm'])}")
    reset = "reset to idle first" if rss["hwm_reset"] else "NOT resettable: includes imports"
    grow = rss["peak_hwm"] - rss["idle_rss"]
    print(f"  {'peak VmHWM after the stream (' + reset + ')':<50} {_mib(rss['peak_hwm'])}")
    print(f"  {'peak VmHWM at the end of the loop, before .text':<50} {_mib(rss['loop_hwm'])}")
    print(f"  {'max VmRSS sampled during/after the stream':<50} {_mib(rss['sampled_rss'])}")
    print(f"  {'ru_maxrss (getrusage)':<50} {_mib(rss['ru_maxrss'])}")
    print(f"  {'VmRSS after the stream (text kept)':<50} {_mib(rss['after_rss'])}")
    print(f"  {'peak VmHWM - idle VmRSS':<50} {_mib(grow)} {grow / text:>6.2f}x")
    sampled_grow = rss["sampled_rss"] - rss["idle_rss"]
    print(
        f"  {'max sampled VmRSS - idle VmRSS':<50} {_mib(sampled_grow)} "
        f"{sampled_grow / text:>6.2f}x"
    )
    print(f"{'tracemalloc run (fresh process, tracing from idle)':<52}")
    if tm["token_bytes"] != rss["token_bytes"]:
        print(
            f"  (this run used {tm['token_bytes']}-byte chunks: {tm['chunks_planned']:,} "
            "chunks, same 10 MiB of text, because tracing 2.6M chunks takes ~150 s)"
        )
    tm_peak = tm["tm_peak"] - tm["tm_start"]
    loop_peak = tm["tm_loop_peak"] - tm["tm_start"]
    print(
        f"  {'peak traced during the loop, before .text':<50} {_mib(loop_peak)} "
        f"{loop_peak / text:>6.2f}x"
    )
    print(f"  {'peak traced Python allocations':<50} {_mib(tm_peak)} {tm_peak / text:>6.2f}x")
    kept = tm["tm_after"] - tm["tm_start"]
    print(
        f"  {'traced after the stream (text + stream buffers)':<50} {_mib(kept)} "
        f"{kept / text:>6.2f}x"
    )
    print(f"  {'stream time under tracemalloc':<50} {tm['stream_s']:8.1f} s")

    bad = [r["mode"] for r in runs if r["text_bytes"] != TEXT_BYTES or r["finish_reason"] != "stop"]
    if bad:
        print(f"CORRECTNESS: FAILED in {bad}: text or finish reason wrong")
    ratio = grow / text
    verdict = "MET" if ratio <= TARGET_RATIO and tm_peak / text <= TARGET_RATIO else "NOT MET"
    print(
        f"\nverdict: (peak - idle) / text = {ratio:.2f}x by RSS, {tm_peak / text:.2f}x by "
        f"tracemalloc (target <= {TARGET_RATIO:.0f}x): {verdict}"
    )
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
