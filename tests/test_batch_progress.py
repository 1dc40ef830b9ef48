"""The progress of a batch or a benchmark: paced HTML in a notebook, tqdm's text elsewhere."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from notebook_kernel import Kernel, running_kernel
from waiting import await_until

from lmstream_nb import (
    Budgets,
    LoadProgress,
    Prompt,
    PromptEstimate,
    PromptProgress,
    PromptStore,
    StreamStarted,
    TextDelta,
    arun_many,
    simulator,
)
from lmstream_nb._batch_progress import (
    NotebookProgress,
    RowsInFlight,
    advance,
    in_notebook,
    paced_refresh,
    progress_bar,
)

WIDGET = "application/vnd.jupyter.widget-view+json"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def shown_bar(total: int = 10) -> tuple[NotebookProgress, Clock, list[dict[str, str]]]:
    clock, shown = Clock(), []
    bar = NotebookProgress(total, "lmstream batch", "row", clock=clock, show=shown.append)
    return bar, clock, shown


def test_outside_a_kernel_the_bar_is_tqdms_text() -> None:
    assert not in_notebook()
    bar = progress_bar(3, "lmstream batch", "row")
    try:
        assert type(bar).__module__.startswith("tqdm")
        assert not isinstance(bar, NotebookProgress)
    finally:
        bar.close()


def test_counts_between_redraws_wait_and_close_draws_the_end() -> None:
    bar, clock, shown = shown_bar()
    assert len(shown) == 1
    assert "0/10 rows (0%)" in shown[0]["text/plain"]
    for _ in range(5):  # no loop here to wake a timer: nothing is drawn within the interval
        bar.update()
        clock.now += 0.01
    assert len(shown) == 1
    clock.now += bar.interval
    bar.set_postfix(ok=6, failed=0, refresh=False)  # a postfix alone does not redraw
    bar.update()
    assert len(shown) == 2
    assert shown[-1]["text/plain"].startswith("lmstream batch: 6/10 rows (60%)")
    assert "ok=6, failed=0" in shown[-1]["text/plain"]
    advance(bar, 4)  # the step that completes the bar is drawn by close(), once
    assert len(shown) == 2
    bar.close()
    bar.close()
    assert len(shown) == 3
    assert "10/10 rows (100%)" in shown[-1]["text/plain"]
    assert 'data-state="done"' in shown[-1]["text/html"]
    assert "width: 100.0%" in shown[-1]["text/html"]


def test_a_bar_closed_short_says_it_stopped() -> None:
    bar, clock, shown = shown_bar()
    clock.now += 1
    bar.update(3)
    bar.close()
    assert 'data-state="stopped"' in shown[-1]["text/html"]
    assert "3/10 rows (30%)" in shown[-1]["text/plain"]
    assert "stopped" in shown[-1]["text/plain"]


def test_text_is_escaped() -> None:
    bar, _, shown = shown_bar()
    bar.set_postfix_str("<b>x</b>")
    bar.close()
    assert "<b>" not in shown[-1]["text/html"]
    assert "&lt;b&gt;x&lt;/b&gt;" in shown[-1]["text/html"]


@pytest.mark.anyio
async def test_on_a_loop_the_last_count_is_drawn_by_a_timer() -> None:
    """A count that arrives between two redraws is not held until the next one (there may be
    none for a long while): a timer on the running loop draws it."""
    shown: list[dict[str, str]] = []
    clock = Clock()  # stands still: the count is always within the interval of the first draw
    bar = NotebookProgress(4, "lmstream bench", "run", clock=clock, show=shown.append)
    bar.update()
    assert len(shown) == 1
    await await_until(lambda: len(shown) == 2, what="the timer's redraw", timeout=5)
    assert "1/4 runs" in shown[-1]["text/plain"]
    bar.close()
    assert len(shown) == 3


# -- what the rows in flight are doing ---------------------------------------------------


def test_rows_in_flight_say_what_each_is_doing() -> None:
    clock = Clock()
    rows = RowsInFlight(clock)
    assert rows.text() == ""
    for row in range(5):
        rows.start(row)
    assert rows.text() == "5 waiting"
    assert rows.event(0, StreamStarted("m", "r", "u"))  # sent: still waiting
    assert rows.text() == "5 waiting"
    assert rows.event(0, PromptProgress(0.41, 1.0))
    assert rows.event(1, PromptProgress(0.12, 1.0))
    assert rows.event(2, LoadProgress(0.65, 1.0))
    assert rows.event(3, TextDelta("Hi"))
    assert not rows.event(3, TextDelta(" there")), "a streaming row's deltas change nothing"
    assert rows.text() == (
        "1 loading model (65%) · 2 processing prompt (41%, 12%) · 1 streaming · 1 waiting"
    )
    # An estimate (the server reports nothing) fills on the clock and says it is one.
    rows.event(4, PromptEstimate(expected_s=10.0, runs=14, elapsed_s=1.0))
    clock.now += 2.0
    assert "3 processing prompt (41%, 12%, ~30%)" in rows.text()
    # A processed prompt is as good as streaming: never "100%" while the row still runs.
    rows.event(1, PromptProgress(1.0, 2.0))
    assert rows.text() == "1 loading model (65%) · 2 processing prompt (41%, ~30%) · 2 streaming"
    rows.end(3)
    rows.end(0)
    assert rows.text() == "1 loading model (65%) · 1 processing prompt (~30%) · 1 streaming"
    # Retried before its first token (the connection broke off): it waits again.
    assert rows.event(1, StreamStarted("m", "r2", "u"))
    assert rows.text() == "1 loading model (65%) · 1 processing prompt (~30%) · 1 waiting"


def test_many_rows_processing_are_summed_up_by_their_mean() -> None:
    rows = RowsInFlight(Clock())
    for row, fraction in enumerate((0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)):
        rows.start(row)
        rows.event(row, PromptProgress(fraction, 1.0))
    assert rows.text() == "8 processing prompt (mean 45%)"


def test_a_full_terminal_bar_is_left_to_close() -> None:
    """A paced redraw after the last row counted would print 100% a second time."""
    drawn: list[int] = []

    class Bar:
        total, n = 3, 0

        def refresh(self) -> None:
            drawn.append(self.n)

    bar = Bar()
    redraw = paced_refresh(bar)
    redraw.request()
    bar.n = 3
    redraw.interval = 0.0
    redraw.request()
    assert drawn == [0]
    redraw.close()


@pytest.mark.anyio
async def test_the_batch_bar_shows_the_rows_processing_their_prompt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """LM Studio's native chat reports prompt processing: both rows stop at 40% of their
    prompt, and the terminal bar says so (with the slots the server reported)."""
    hold = '[[sim {"prompt_stall_at": 1200, "stall_s": 60}]]'
    rows = [{"text": f"{i} " + "t" * 12000} for i in range(2)]
    err: list[str] = []

    def shown() -> tuple[int, int] | None:
        err.append(capsys.readouterr().err)
        found = re.findall(r"2 processing prompt \((\d+)%, (\d+)%\)", "".join(err))
        moved = [(int(a), int(b)) for a, b in found if int(a) and int(b)]
        return moved[-1] if moved else None

    with (
        simulator.serve(profile="test-fast", parallel=2) as sim,
        PromptStore(tmp_path / "batch.db") as store,
    ):
        task = asyncio.create_task(
            arun_many(
                Prompt(f"{{{{text}}}} {hold}", model="lmstream-sim-8b"),
                rows,
                store=store,
                base_url=sim.base_url,
                budgets=Budgets(first_token=120, idle=120),
            )
        )
        try:
            first, second = await await_until(
                shown, timeout=20, what="the bar shows two rows processing their prompt"
            )
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert 30 <= first <= 50
    assert 30 <= second <= 50
    assert "2 slots · ok=0, failed=0 · 2 processing prompt" in "".join(err)


# -- in a real kernel ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernel]:
    home: Path = tmp_path_factory.mktemp("progress-home")
    with running_kernel({**os.environ, "LMSTREAM_HOME": str(home)}) as k:
        yield k


@pytest.mark.timeout(120)
def test_a_batch_in_a_notebook_leaves_its_progress_as_html(kernel: Kernel) -> None:
    """No widget (a saved notebook would show "model not found" for it): an HTML display that
    is updated at a steady pace and ends at 100%."""
    defaults = simulator.Scenario(output_tokens=20, gen_tps=200, jitter=0)
    with simulator.serve(profile="test-fast", defaults=defaults) as sim:
        cell = kernel.execute(
            "import time\nfrom lmstream_nb import Prompt, run_many\nt0 = time.monotonic()\n"
            "rows = [{'name': str(i)} for i in range(8)]\n"
            f"batch = run_many(Prompt('Say hi to {{{{name}}}}.'), rows, base_url={sim.base_url!r},"
            " concurrency=4)\n"
            "print(len(batch.results), time.monotonic() - t0)",
            timeout=60,
        )
    assert cell.status == "ok", cell.error()
    rows, elapsed = cell.stream().split()
    assert rows == "8"
    assert not any(WIDGET in data for data in cell.displays()), "no widget in the notebook"
    [shown] = [d for d in cell.displays() if "lmstream-progress" in str(d.get("text/html"))]
    assert shown["text/plain"].startswith("lmstream batch: 0/8 rows (0%)")
    finals = cell.finals()
    assert finals, "the display follows the batch"
    assert all(f["replaces"] == shown for f in finals)
    assert finals[-1]["text/plain"].startswith("lmstream batch: 8/8 rows (100%)")
    assert "4 at once · ok=8, failed=0" in finals[-1]["text/plain"], "the concurrency given"
    assert 'data-state="done"' in finals[-1]["text/html"]
    # Paced: redraws at least an interval apart, and the end.
    assert len(finals) <= float(elapsed) / NotebookProgress.interval + 2
