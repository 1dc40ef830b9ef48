"""Terminal rendering: the sink fed with real events, the stats line and the tables."""

from __future__ import annotations

import asyncio
import io
import json
import os
import select
import time
from pathlib import Path

from lmstream_nb import ReasoningDelta, Stats, StreamFinished, StreamStarted, TextDelta
from lmstream_nb._terminal import TerminalSink, format_stats, secs, table, when

STATS = Stats(
    ttft_s=0.25,
    duration_s=1.5,
    chunks=3,
    text_chars=11,
    prompt_tokens=7,
    completion_tokens=3,
    tokens_per_s=2.4,
)
FINISHED = StreamFinished(finish_reason="stop", stats=STATS, model="m", response_id="r1")


def test_text_to_out_and_reasoning_to_err_in_order() -> None:
    out, err = io.StringIO(), io.StringIO()
    sink = TerminalSink(out, err, as_json=False)
    for event in (
        StreamStarted(model="m", request_id="q", url="http://127.0.0.1:1/v1"),
        ReasoningDelta("thinking"),
        TextDelta("Hello"),
        TextDelta(" world"),
        FINISHED,
    ):
        sink.handle(event)
    sink.end_text()
    assert out.getvalue() == "Hello world\n"
    assert err.getvalue() == "thinking\n", "not a terminal: no escape codes"
    assert sink.finished is FINISHED


def test_json_mode_writes_one_object_per_event() -> None:
    out, err = io.StringIO(), io.StringIO()
    sink = TerminalSink(out, err, as_json=True)
    sink.handle(StreamStarted(model="m", request_id="q", url="u"))
    sink.handle(TextDelta("Hi"))
    sink.handle(FINISHED)
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["start", "text", "done"]
    assert events[1]["content"] == "Hi"
    assert events[2]["stats"]["completion_tokens"] == 3
    assert err.getvalue() == ""


def test_waiting_indicator_shows_on_a_terminal_until_text_arrives() -> None:
    leader, follower = os.openpty()
    err = os.fdopen(follower, "w", encoding="utf-8")
    try:

        async def scenario() -> None:
            sink = TerminalSink(io.StringIO(), err, as_json=False)
            sink.handle(StreamStarted(model="m", request_id="q", url="u"))
            await asyncio.sleep(0)  # let the indicator paint once
            sink.handle(TextDelta("x"))

        asyncio.run(scenario())
        seen = b""
        deadline = time.monotonic() + 5
        while b"\r\x1b[K" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                seen += os.read(leader, 4096)
    finally:
        err.close()
        os.close(leader)
    assert b"waiting for the first token" in seen
    assert seen.endswith(b"\r\x1b[K"), "the line is cleared when text arrives"


def test_stats_line() -> None:
    assert format_stats(STATS, FINISHED) == (
        "3 tokens, 11 chars in 1.5 s, first token after 0.25 s, 2.4 tokens/s, "
        "7 prompt tokens, 3 chunks, model m, finish: stop"
    )
    assert format_stats(STATS) == (
        "3 tokens, 11 chars in 1.5 s, first token after 0.25 s, 2.4 tokens/s, "
        "7 prompt tokens, 3 chunks"
    )


def test_table_pads_columns_and_shows_none_as_a_dash() -> None:
    text = table([(1, "ok", secs(0.123)), (12, "stalled", secs(None))], ["id", "status", "s"])
    assert text == ("id  status   s\n--  -------  ----\n1   ok       0.12\n12  stalled  -\n")
    assert when(None) == "-"
    assert len(when(0.0)) == len("2000-01-01 00:00:00")


def test_stats_rows_label_inline_templates_and_the_overall_row(tmp_path: Path) -> None:
    """One layout for `lmstream stats` and `%lmstream stats`: a template that was never stored
    is "(inline)", every run together is "(all)"."""
    from lmstream_nb import PromptStore
    from lmstream_nb._terminal import STATS_HEADERS, stats_rows

    with PromptStore(tmp_path / "s.db") as store:
        for name in (None, "greet"):
            run_id = store.start_run(
                prompt_name=name,
                prompt_version=1 if name else None,
                template="Hi",
                system=None,
                messages=[],
                variables={},
                model="m",
                base_url="http://x/v1",
                started_at=time.time(),
            )
            store.finish_run(
                run_id,
                status="ok",
                text="hello",
                reasoning="",
                error=None,
                finish_reason="stop",
                model="m",
                ttft_s=0.1,
                duration_s=0.2,
                chunks=1,
                prompt_tokens=1,
                completion_tokens=1,
                tokens_per_s=5.0,
            )
        rows = stats_rows(store.stats())
    assert [row[:3] for row in rows] == [
        ("(inline)", "m", 1),
        ("greet", "m", 1),
        ("(all)", "(all)", 2),
    ]
    assert all(len(row) == len(STATS_HEADERS) for row in rows)
