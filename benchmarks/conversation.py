"""What a long conversation costs the store: bytes and time per turn as it grows.

Why: every turn sends the turns before it, so the request grows with the conversation; that is
the server's work and cannot be avoided. What the store keeps must not grow that way: a turn
stores its own message (and its answer), and the context it sent is rebuilt from the turns
before it (``m009``). Storing the whole messages array with every turn, as the first version
did, made a conversation of n turns cost O(n²) bytes.

For conversations of 10, 40 and 160 turns (each message and answer about 120 characters),
against the simulator (profile "instant", so the time is the client's and the store's), this
prints per turn: the bytes the ``runs.messages`` column holds for that conversation, against the
baseline of the text the turns' own messages hold (measured in the same run), the bytes the
whole arrays would have taken, and the time to send a turn (reading the chain, building the
context, the request, recording it).

Targets: stored message bytes per turn at 160 turns <= 1.2x those at 10 turns (linear growth
of the whole); send time per turn at 160 turns <= 16x that at 10 (the context sent, and read
back from the store, grows with the conversation: linear per turn, 16x longer).

    python benchmarks/conversation.py [--turns 10,40,160]

Exit status 0 whether or not a target is met; 1 if a turn failed or the context sent was wrong.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import _common as common

TARGET_BYTES_RATIO = 1.2
TARGET_TIME_RATIO = 16.0
MODEL = "lmstream-sim-8b"


def sentence(i: int, kind: str) -> str:
    """About 120 characters, different for every turn."""
    return (f"{kind} {i}: " + "the tide turns on the quiet harbor wall and the lanterns " * 3)[:120]


def measure(turns: int, folder: Path) -> dict[str, float]:
    common.ensure_repo_on_path()
    from lmstream_nb import Conversation, PromptStore, SyncLMStudioClient, simulator

    db = folder / f"conversation-{turns}.db"
    times: list[float] = []
    own_chars = 0
    whole_bytes = 0
    with (
        simulator.serve(profile="instant", seed=1) as sim,
        PromptStore(db) as store,
        SyncLMStudioClient(sim.base_url) as client,
    ):
        chat = Conversation("long", model=MODEL, store=store, client=client)
        sent: list[dict[str, str]] = []
        for i in range(turns):
            question, answer = sentence(i, "question"), sentence(i, "answer")
            started = time.perf_counter()
            result = chat.send(question, options={"sim": {"reply": answer}})
            times.append(time.perf_counter() - started)
            if result.status != "ok" or result.text != answer:
                raise SystemExit(f"turn {i} ended {result.status}: {result.error}")
            sent += [{"role": "user", "content": question}]
            whole_bytes += len(json.dumps(sent, ensure_ascii=False).encode())
            sent += [{"role": "assistant", "content": answer}]
            own_chars += len(question)
        last = [r for r in sim.records() if r.method == "POST"][-1]
        if len(last.messages) != 2 * turns - 1:
            raise SystemExit(f"the last turn sent {len(last.messages)} messages")
    conn = sqlite3.connect(db)
    try:
        (stored,) = conn.execute("SELECT sum(length(CAST(messages AS BLOB))) FROM runs").fetchone()
    finally:
        conn.close()
    ordered = sorted(times)
    return {
        "turns": turns,
        "stored_per_turn": stored / turns,
        "own_per_turn": own_chars / turns,
        "whole_per_turn": whole_bytes / turns,
        "send_ms": 1000 * ordered[len(ordered) // 2],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", default="10,40,160", help="conversation lengths, with commas")
    args = parser.parse_args()
    lengths = [int(n) for n in args.turns.split(",")]
    print(common.versions())
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(n, Path(tmp)) for n in lengths]
    print()
    print(
        f"{'turns':>6} {'stored B/turn':>14} {'own text B/turn':>16} {'whole arrays B/turn':>20} "
        f"{'send ms (median)':>17}"
    )
    for row in rows:
        print(
            f"{row['turns']:>6} {row['stored_per_turn']:>14.0f} {row['own_per_turn']:>16.0f} "
            f"{row['whole_per_turn']:>20.0f} {row['send_ms']:>17.1f}"
        )
    small, large = rows[0], rows[-1]
    bytes_ratio = large["stored_per_turn"] / small["stored_per_turn"]
    time_ratio = large["send_ms"] / small["send_ms"]
    growth = large["turns"] / small["turns"]
    print()
    print(
        f"stored bytes per turn, {large['turns']} against {small['turns']} turns: "
        f"{bytes_ratio:.2f}x (target <= {TARGET_BYTES_RATIO}x): "
        f"{'met' if bytes_ratio <= TARGET_BYTES_RATIO else 'NOT MET'}"
    )
    print(
        f"send time per turn, {large['turns']} against {small['turns']} turns ({growth:.0f}x the "
        f"context): {time_ratio:.2f}x (target <= {TARGET_TIME_RATIO}x): "
        f"{'met' if time_ratio <= TARGET_TIME_RATIO else 'NOT MET'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
