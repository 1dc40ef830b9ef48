"""GridSink against a recording stand-in for the grid widget, with a clock the test moves; and
the snapshot that replaces the grid."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from waiting import await_until

from lmstream_nb import Stats, StreamStarted, TextDelta
from lmstream_nb._compare import CompareCell
from lmstream_nb._grid import GridSink, grid_bundle


class RecordingGrid:
    """Has what GridSink uses: its traits, ``send``, ``hold_sync`` and ``painted``."""

    def __init__(self) -> None:
        self.layout: list[dict[str, Any]] = []
        self.columns = 1
        self.ends: dict[str, Any] = {}
        self.texts: dict[str, Any] = {}
        self.finished = False
        self.sent: list[dict[str, Any]] = []
        self.painted: Any = None

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @contextlib.contextmanager
    def hold_sync(self) -> Iterator[None]:
        yield


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Result:
    """What GridSink reads of a RunResult."""

    def __init__(self, status: str, run_id: int, error: str | None = None) -> None:
        self.status, self.run_id, self.error = status, run_id, error
        self.stats = Stats(ttft_s=0.25, duration_s=1.5, chunks=4, text_chars=9)


CELLS = [CompareCell(i, f"p@{1 + i // 2}", "m", i % 2) for i in range(4)]


@pytest.mark.anyio
async def test_every_cells_text_rides_in_one_message_per_paint() -> None:
    grid, clock = RecordingGrid(), Clock()
    sink = GridSink(grid, CELLS, columns=2, clock=clock, interval=0.05)  # type: ignore[arg-type]
    assert [c["v"] for c in grid.layout] == ["p@1", "p@1", "p@2", "p@2"]
    for i in range(4):
        sink.started(i)
        sink.watch(i)(StreamStarted(model="m", request_id="r", url="u"))
    assert len(grid.sent) == 1, "the first start is painted at once, the rest wait"
    # 100 deltas over all four cells inside one interval: one message carries them all.
    for n in range(100):
        sink.watch(n % 4)(TextDelta(content=f"{n},"))
    assert len(grid.sent) == 1
    clock.now += 0.05
    await await_until(lambda: len(grid.sent) == 2, timeout=5, what="the timer's paint")
    paint = grid.sent[1]
    assert sorted(paint["c"]) == ["0", "1", "2", "3"]
    assert paint["c"]["1"] == "".join(f"{n}," for n in range(1, 100, 4))
    assert {s["state"] for s in paint["s"].values()} == {"generating"}
    # A cell's end rides in the next paint; close paints what is left and keeps it as state.
    clock.now += 0.01
    sink.watch(2)(TextDelta(content="tail"))
    sink.ended(2, Result("ok", 7))
    sink.ended(3, Result("stalled", 8, "The stream stalled."))
    sink.close()
    last = grid.sent[-1]
    assert last["c"] == {"2": "tail"}
    assert last["s"]["2"]["state"] == "done"
    assert last["s"]["3"]["message"] == "The stream stalled."
    assert len(grid.sent) == 3
    assert grid.finished is True
    assert grid.texts["2"].endswith("tail")
    assert grid.ends["2"]["line"].startswith("done")
    assert "run #8" in grid.ends["3"]["line"]
    # A grid opened mid-run gets what was painted, every cell at once.
    reply = grid.painted()
    assert reply["all"]["2"] == grid.texts["2"]


def test_the_snapshot_escapes_every_cell() -> None:
    texts = {0: "<b>bold</b> & more", 1: "fine"}
    ends = {0: {"state": "done", "line": "done · run #1"}, 1: {"state": "failed", "line": "x"}}
    ends[1]["message"] = "It <failed>."
    bundle = grid_bundle("summary", "<table></table>", CELLS[:2], texts, ends, 2)
    page = bundle["text/html"]
    assert page.startswith("<table></table>")
    assert "<b>" not in page
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; more" in page
    assert "It &lt;failed&gt;." in page
    assert "repeat(2, minmax" in page
    assert bundle["text/plain"].startswith("summary\n--- p@1 · m · row 0: done · run #1")
    assert "<b>bold</b> & more" in bundle["text/plain"]
