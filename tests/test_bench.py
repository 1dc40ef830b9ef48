"""lmstream_nb.bench: the measured table is the predicted one at any scale, every verdict is far
from its boundary, both queue models, the time to first visible progress, the headline, history
and outputs.

Each benchmark here starts its own simulators (one per cell, in one child process), so no
shared fixture is needed. The workloads are small (two sizes, one or two concurrencies); the
file takes about a minute, most of it in the two runs that compare margins.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lmstream_nb import PromptStore, Retries, bench, history, simulator
from lmstream_nb.bench._simhost import SimHost
from lmstream_nb.bench._timeline import Rules, TimedRow, expect_cell, forecast_cell
from lmstream_nb.cli import main

QUICK = bench.quick_workload()
# The configurations notebook 03 runs: both queue models with and without progress, the
# OpenAI endpoint's stream alone on LM Studio 0.4, and faults on a quarter of the rows of the
# four shorter sizes with the 300 s blocking timeout only, on LM Studio 0.4.
NOTEBOOK = (
    {"modes": ("blocking", "stream")},
    {"modes": ("stream-openai",), "queues": (4,), "concurrency": (1,)},
    {
        "workload": bench.Workload(buckets=bench.default_workload().buckets[:4]),
        "modes": ("stream", "blocking"),
        "timeouts": (300,),
        "faults": 0.25,
        "seed": 8,
        "queues": (4,),
    },
)
P4, ONE = "parallel 4", "one at a time"
NO_PROGRESS = "stream (no progress)"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PromptStore]:
    with PromptStore(tmp_path / "bench.db") as s:
        yield s


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> bench.BenchReport:
    """One quick benchmark at c=1 and c=3 with the default margin (both queue models, every
    mode), shared by several tests."""
    path = tmp_path_factory.mktemp("bench") / "shared.db"
    with PromptStore(path) as s:
        return bench.run_benchmark(
            QUICK, concurrency=(1, 3), timeouts=(30, 300), store=s, progress=False
        )


# --- verdicts -------------------------------------------------------------------------------


def test_the_measured_table_is_the_predicted_one(report: bench.BenchReport) -> None:
    # (parallel 4, one at a time) x (blocking 30s, 300s, both streams) x sizes x c
    assert len(report.success_table()) == 2 * 4 * 2 * 2
    assert report.success_table() == report.predicted_table()
    assert report.unexpected() == {}
    assert report.margin_ms == pytest.approx(bench.DEFAULT_MARGIN * 1000)


def test_twice_the_margin_gives_the_same_success_table(
    report: bench.BenchReport, store: PromptStore
) -> None:
    """Every cell runs at twice its scale, so every verdict is twice as far from its boundary
    in real time; the outcome must not change (the verdicts do not depend on the scale). The
    300 s timeout and LM Studio 0.4's queue only, to keep it short: a 30 s one with three users
    already takes 15 s."""
    slower = bench.run_benchmark(
        QUICK,
        scale=2 * bench.DEFAULT_SCALE,
        margin=2 * bench.DEFAULT_MARGIN,
        concurrency=(1, 3),
        timeouts=(300,),
        modes=("blocking", "stream"),
        queues=(4,),
        store=store,
        progress=False,
    )
    scales = {
        (r["queue"], r["mode"], r["bucket"], r["concurrency"]): r["scale"] for r in report.rows
    }
    for row in slower.rows:
        key = (row["queue"], row["mode"], row["bucket"], row["concurrency"])
        assert row["scale"] == pytest.approx(2 * scales[key])
    table = slower.success_table()
    assert len(table) == 8
    assert table == {key: counts for key, counts in report.success_table().items() if key in table}
    assert slower.margin_ms == pytest.approx(2 * bench.DEFAULT_MARGIN * 1000)


def test_streaming_succeeds_where_a_short_blocking_timeout_fails(
    report: bench.BenchReport,
) -> None:
    table = report.success_table()
    for queue in (P4, ONE):
        assert table[(queue, "stream", "20k", 1)] == {"ok": 1}
        assert table[(queue, "blocking 30s", "20k", 1)] == {"timeout": 1}
        assert table[(queue, "blocking 300s", "20k", 1)] == {"ok": 1}
        # Three users at once: the blocking requests run out of time, the streams do not.
        assert table[(queue, "stream", "20k", 3)] == {"ok": 3}
        assert table[(queue, NO_PROGRESS, "20k", 3)] == {"ok": 3}
    # One at a time, the queued ones time out; four slots share the model's speed, so three
    # 20k-token prompts processed side by side all take longer than 300 s.
    assert table[(ONE, "blocking 300s", "20k", 3)] == {"ok": 1, "timeout": 2}
    assert table[(P4, "blocking 300s", "20k", 3)] == {"timeout": 3}
    assert table[(ONE, "blocking 30s", "0.5k", 3)] == {"ok": 2, "timeout": 1}
    assert table[(P4, "blocking 30s", "0.5k", 3)] == {"ok": 3}
    row = next(
        r
        for r in report.rows
        if (r["queue"], r["mode"], r["bucket"], r["concurrency"]) == (ONE, "stream", "20k", 1)
    )
    # Reported in simulated seconds: 20k tokens at 150 tok/s is 133 s to the first token, and
    # 1600 more at 30 tok/s end at 186 s; a loaded machine only adds its lateness, which in
    # real time stays inside the margin.
    late = bench.DEFAULT_MARGIN / row["scale"]
    assert 133.3 <= row["ttfv_p50_s"] <= 133.3 + late
    assert 186.3 <= row["total_p50_s"] <= 186.3 + late


def test_time_to_first_visible_progress(report: bench.BenchReport) -> None:
    """A blocking request shows nothing before its whole answer; a stream to LM Studio 0.4's
    native chat shows progress as soon as its prompt is taken up, minutes before its first
    token on a long prompt; a stream to the OpenAI endpoint shows nothing before that token."""
    blocking = [r for r in report.runs if r["mode"].startswith("blocking")]
    assert blocking
    assert all(r["ttfp_s"] == r["total_s"] for r in blocking)
    rows = {(r["queue"], r["mode"], r["bucket"], r["concurrency"]): r for r in report.rows}
    for queue in (P4, ONE):
        alone = rows[queue, "stream", "20k", 1]
        assert alone["ttfv_p50_s"] > 133  # 20k tokens at 150 tok/s before the first token
        # Progress is due at once: what it took is the client's real time, far below 2 s.
        assert alone["ttfp_p95_s"] < 2
        silent = rows[queue, NO_PROGRESS, "20k", 1]
        assert silent["ttfp_p50_s"] > 133
        assert rows[queue, "blocking 300s", "20k", 1]["ttfp_p50_s"] > 186
    # With four slots, three users at once all get one: each sees progress at once.
    assert rows[P4, "stream", "20k", 3]["ttfp_p95_s"] < 2
    # One at a time, the second and third wait in the queue, where the server says nothing.
    assert rows[ONE, "stream", "20k", 3]["ttfp_p95_s"] > 180


@pytest.mark.parametrize("settings", NOTEBOOK, ids=["queues", "openai", "faults"])
def test_every_predicted_verdict_is_far_from_its_boundary(settings: dict[str, object]) -> None:
    """The design figures: 2 s of real time for a verdict on a whole request, 1 s for one on a
    gap between two events, and the longest cell (eight queued 64k-token streams) in 70 s."""
    plans = bench.plan_benchmark(**settings)  # type: ignore[arg-type]
    predicted = [p for p in plans if p.predicted is not None]
    assert min(p.margin_ms for p in predicted) >= bench.DEFAULT_MARGIN * 1000 - 1e-6
    assert min(p.gap_margin_ms for p in plans) >= bench.DEFAULT_MARGIN * 500 - 1e-6
    # Only blocking cells can be left unpredicted: with a fault, the order their rows arrive
    # in decides; without, a verdict too close to its boundary even in real time.
    for p in plans:
        if p.predicted is None:
            assert p.kind == "blocking"
            assert p.forecast is not None
            assert any(p.faults) or p.forecast.margin_s < bench.DEFAULT_MARGIN
    assert len(predicted) >= len(plans) - 4
    assert max(p.real_s for p in plans) <= 70
    assert all(bench.DEFAULT_SCALE <= p.scale <= 1 for p in plans)


def test_the_plan_of_the_default_benchmark() -> None:
    cells = {p.key: p for p in bench.plan_benchmark()}
    assert len(cells) == 2 * 5 * 5 * 3  # queues x (3 blocking, 2 streams) x sizes x c
    assert cells[ONE, "blocking 30s", "0.5k", 8].predicted == {"ok": 2, "timeout": 6}
    assert cells[ONE, "blocking 30s", "2k", 1].predicted == {"ok": 1}
    assert cells[ONE, "blocking 120s", "2k", 8].predicted == {"ok": 4, "timeout": 4}
    assert cells[ONE, "blocking 300s", "20k", 8].predicted == {"ok": 1, "timeout": 7}
    assert cells[P4, "blocking 120s", "2k", 8].predicted == {"ok": 5, "timeout": 3}
    assert cells[P4, "blocking 300s", "20k", 8].predicted == {"timeout": 8}
    for queue in (P4, ONE):
        assert cells[queue, "stream", "64k", 8].predicted == {"ok": 8}
    # Without progress, three 64k-token prompts processed side by side stay silent for longer
    # than the 600 s budget; one after another each is silent for 427 s only.
    assert cells[P4, NO_PROGRESS, "64k", 3].predicted == {"first_token_timeout": 3}
    assert cells[ONE, NO_PROGRESS, "64k", 8].predicted == {"ok": 8}
    # Eight 500-token answers sharing four slots end 0.2 s from the 30 s timeout: too close to
    # call even in real time, so not predicted (and run at the fastest scale).
    close = cells[P4, "blocking 30s", "0.5k", 8]
    assert close.predicted is None
    assert close.scale == bench.DEFAULT_SCALE
    # The closest verdict: 26.3 of 30 s, run near half real time so it is 2 s away.
    tight = cells[ONE, "blocking 30s", "2k", 1]
    assert tight.margin_ms == pytest.approx(2000)
    assert 0.4 < tight.scale < 0.7
    far = cells[ONE, "blocking 30s", "64k", 1]  # 427 s of prompt processing against 30 s
    assert far.scale == bench.DEFAULT_SCALE
    assert far.margin_ms > 5000
    with pytest.raises(ValueError, match="margin"):
        bench.plan_benchmark(margin=-1)


# --- the timing model -----------------------------------------------------------------------


def _rules(kind: str, concurrency: int, timeout: float | None = None, **budgets: float) -> Rules:
    return Rules(
        kind=kind,
        concurrency=concurrency,
        timeout_s=timeout,
        first_token_s=budgets.get("first_token", 600.0),
        idle_s=budgets.get("idle", 120.0),
        retries=Retries(),
        max_parallel=budgets.get("slots", 1),  # type: ignore[arg-type]
        progress=bool(budgets.get("progress", False)),
    )


def test_model_a_queue_of_blocking_requests() -> None:
    # 4 s of prompt processing, then 7 events a second apart: 10 s each, one after another.
    rows = [TimedRow(prefill_s=4.0, events=7, event_s=1.0)] * 3
    out = expect_cell(rows, _rules("blocking", 3, timeout=25.0))
    assert [e.status for e in out] == ["ok", "ok", "timeout"]
    assert [e.total_s for e in out[:2]] == [pytest.approx(10.0), pytest.approx(20.0)]
    # The third would have come at 30 s, 5 s after its timeout.
    assert [e.margin_s for e in out] == [
        pytest.approx(15.0),
        pytest.approx(5.0),
        pytest.approx(5.0),
    ]


def test_model_prompt_processing_cannot_be_interrupted() -> None:
    rows = [TimedRow(prefill_s=20.0, events=1, event_s=1.0)] * 2
    out = expect_cell(rows, _rules("blocking", 2, timeout=10.0))
    assert [e.status for e in out] == ["timeout", "timeout"]
    # The first would end at 20 s; the second waits for the first one's prompt processing,
    # which goes on after its client left, so it would end at 40 s.
    assert [e.margin_s for e in out] == [pytest.approx(10.0), pytest.approx(30.0)]


def test_model_queued_streams_keep_their_first_token_budget() -> None:
    rows = [TimedRow(prefill_s=400.0, events=10, event_s=1.0)] * 3
    out = expect_cell(rows, _rules("stream", 3))
    assert [e.status for e in out] == ["ok"] * 3
    # Each waits 400 s of silence at most (its own prompt processing), not its queue time.
    assert [e.margin_s for e in out] == [pytest.approx(200.0)] * 3
    assert out[2].ttfv_s == pytest.approx(2 * 409 + 400)
    assert [e.gap_margin_s for e in out] == [pytest.approx(119.0)] * 3
    short = expect_cell(rows, _rules("stream", 3, first_token=300.0))
    assert [e.status for e in short] == ["first_token_timeout"] * 3
    assert short[0].margin_s == pytest.approx(100.0)


def test_model_a_stall_and_the_order_rows_arrive_in() -> None:
    plain = TimedRow(prefill_s=3.0, events=25, event_s=1 / 3)
    stall = TimedRow(prefill_s=3.0, events=25, event_s=1 / 3, fault="stall", stall_s=360.0)
    out = expect_cell([stall], _rules("stream", 1))
    assert out[0].status == "stalled"
    # The idle budget is 119.7 s from the gaps before the stall, and 240.3 s from the stall.
    assert out[0].gap_margin_s == pytest.approx(120 - 1 / 3)
    assert out[0].decided_s == pytest.approx(3 + 11 / 3 + 120)
    streams = forecast_cell([plain, stall, plain], _rules("stream", 3))
    assert streams.statuses == {"ok": 2, "stalled": 1}
    # Blocking, a stalled answer ahead of the others makes them time out, behind them it
    # does not: who reaches the server first decides, so the cell is not predicted.
    blocking = forecast_cell([plain, stall, plain], _rules("blocking", 3, timeout=300.0))
    assert blocking.statuses is None
    assert forecast_cell([plain] * 3, _rules("blocking", 3, timeout=300.0)).statuses == {"ok": 3}


def test_model_slots_share_the_speed_and_progress_keeps_the_queue_alive() -> None:
    # Twenty prompt steps of 20 s each, alone; four slots.
    row = TimedRow(prefill_s=400.0, events=10, event_s=1.0, steps=(20.0,) * 20)
    silent = expect_cell([row] * 5, _rules("stream", 5, slots=4))
    # Four prompts side by side: each step takes up to four times longer, so nothing comes
    # for longer than the 600 s budget, and every stream gives up.
    assert [e.status for e in silent] == ["first_token_timeout"] * 5
    alive = expect_cell([row] * 5, _rules("stream", 5, slots=4, progress=1))
    assert [e.status for e in alive] == ["ok"] * 5
    # The four in the slots show progress at once; the fifth, queued behind them, only when one
    # of them is done; its wait counts as waiting its turn while their progress goes on.
    assert [e.ttfp_s for e in alive[:4]] == [0.0] * 4
    assert alive[4].ttfp_s is not None
    assert alive[4].ttfp_s > 1000
    assert all(e.ttfv_s is not None and e.ttfv_s > 1000 for e in alive)
    # The widest gap between two progress reports is one step at a quarter of its pace.
    assert min(e.gap_margin_s for e in alive) == pytest.approx(120 - 80)
    # Steps of 40 s side by side leave 160 s between two reports: the progress has stopped
    # for longer than the idle budget, and once the first-token budget is over they give up.
    slow = TimedRow(prefill_s=400.0, events=10, event_s=1.0, steps=(40.0,) * 10)
    stopped = expect_cell([slow] * 4, _rules("stream", 4, slots=4, progress=1))
    assert [e.status for e in stopped] == ["first_token_timeout"] * 4
    one_slot = expect_cell([row] * 2, _rules("blocking", 2, timeout=1000.0))
    assert [e.total_s for e in one_slot] == [pytest.approx(409.0), pytest.approx(818.0)]


# --- the simulators' process ----------------------------------------------------------------


def test_the_simulators_run_in_a_process_of_their_own() -> None:
    async def scenario() -> tuple[int, str]:
        async with SimHost() as host:
            url = await host.start(simulator.SimConfig(profile="test-fast"))
            async with httpx.AsyncClient() as http:
                status = (await http.get(url + "/models")).status_code
            await host.stop(url)
        return status, url

    status, url = asyncio.run(scenario())
    assert status == 200
    with pytest.raises(httpx.ConnectError):  # the process ended with the block
        httpx.get(url + "/models", timeout=2)


def test_a_dead_simulator_process_is_one_sentence() -> None:
    async def scenario() -> None:
        async with SimHost() as host:
            assert host._proc is not None
            host._proc.kill()
            await host._proc.wait()
            await host.start(simulator.SimConfig(profile="test-fast"))

    with pytest.raises(RuntimeError, match="simulator process ended unexpectedly"):
        asyncio.run(scenario())


# --- history, faults, outputs ---------------------------------------------------------------


def test_runs_are_recorded_in_the_history(tmp_path: Path) -> None:
    with PromptStore(tmp_path / "history.db") as s:
        result = bench.run_benchmark(
            QUICK,
            scale=0.004,
            modes=("stream",),
            queues=(4,),
            concurrency=(1,),
            store=s,
            progress=False,
        )
        runs = history(bench.BENCH_PROMPT, store=s, limit=None)
        assert len(runs) == len(result.runs) == 2
        recorded = {r.id for r in runs}
        assert {r["run_id"] for r in result.runs} == recorded
        assert all(r.status == "ok" for r in runs)


def test_faults_are_injected_deterministically(store: PromptStore) -> None:
    work = bench.Workload(buckets=(bench.SizeBucket("0.5k", 500, 250),), rows_per_user=4)
    result = bench.run_benchmark(
        work,
        scale=0.004,
        modes=("stream",),
        queues=(4,),
        concurrency=(1,),
        faults=1.0,
        seed=3,
        store=store,
        progress=False,
    )
    # Faults before the first token are transient and retried; after it they are reported.
    expected = {
        "stall": "stalled",
        "disconnect_after": "interrupted",
        "disconnect_before": "ok",
        "error_before": "ok",
    }
    faults = [r["fault"] for r in result.runs]
    assert all(f in bench.FAULT_KINDS for f in faults)
    assert faults == [work.fault(work.buckets[0], i, 1.0, 3) for i in range(4)]
    for run in result.runs:
        assert run["status"] == expected[run["fault"]], run
    assert result.success_table() == result.predicted_table()


def test_retry_recovers_every_fault_before_the_first_token(store: PromptStore) -> None:
    work = bench.Workload(buckets=(bench.SizeBucket("0.5k", 500, 250),), rows_per_user=3)
    result = bench.run_benchmark(
        work,
        scale=0.004,
        modes=("stream",),
        queues=(4,),
        concurrency=(1, 3),
        faults=1.0,
        fault_kinds=bench.PRE_FIRST_TOKEN_FAULTS,
        store=store,
        progress=False,
    )
    assert {r["fault"] for r in result.runs} == set(bench.PRE_FIRST_TOKEN_FAULTS)
    assert [r["status"] for r in result.runs] == ["ok"] * 12
    with pytest.raises(ValueError, match="fault_kinds"):
        bench.run_benchmark(work, fault_kinds=("earthquake",), progress=False)


def test_queued_streams_outlast_the_first_token_budget(store: PromptStore) -> None:
    """Eight 20k-token prompts queue for 25 simulated minutes, one at a time or four by four;
    none exceeds the 600 s budget of silence (the four side by side report progress), so all
    succeed, while a 300 s blocking timeout loses the queued ones."""
    work = bench.Workload(buckets=(bench.SizeBucket("20k", 20_000, 1_600),))
    result = bench.run_benchmark(
        work,
        scale=0.004,
        concurrency=(8,),
        timeouts=(300,),
        modes=("blocking", "stream"),
        store=store,
        progress=False,
    )
    table = result.success_table()
    for queue in (P4, ONE):
        assert table[(queue, "stream", "20k", 8)] == {"ok": 8}
        waits = sorted(
            r["ttfv_s"] for r in result.runs if r["mode"] == "stream" and r["queue"] == queue
        )
        assert waits[-1] > 600  # the last one waited well past the budget, in the queue
    assert table[(ONE, "blocking 300s", "20k", 8)] == {"ok": 1, "timeout": 7}
    assert table[(P4, "blocking 300s", "20k", 8)] == {"timeout": 8}


def test_csv_json_and_table(report: bench.BenchReport, tmp_path: Path) -> None:
    with report.to_csv(tmp_path / "b.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(report.rows) == 32
    assert {
        "queue",
        "mode",
        "bucket",
        "concurrency",
        "runs",
        "success_rate",
        "timeout_rate",
        "other_failures",
        "ttfv_p50_s",
        "ttfv_p95_s",
        "ttfp_p50_s",
        "ttfp_p95_s",
        "total_p50_s",
        "total_p95_s",
        "scale",
        "margin_ms",
        "gap_margin_ms",
        "late_ms",
    } <= set(rows[0])
    document = json.loads(report.to_json(tmp_path / "b.json").read_text(encoding="utf-8"))
    assert document["rows"] == report.rows
    assert len(document["runs"]) == len(report.runs)
    assert document["profile"]["prefill_tps"] == bench.LAPTOP_GPU.prefill_tps
    assert len(document["predicted"]) == 32
    assert {p["queue"] for p in document["predicted"]} == {P4, ONE}
    assert [q["parallel"] for q in document["meta"]["queues"]] == [4, 1]
    text = report.table()
    assert "blocking 30s" in text
    assert "stream" in text
    assert NO_PROGRESS in text
    assert "ttfp p95" in text
    assert {line.split("  ")[0] for line in text.splitlines()[2:-1]} == {P4, ONE}
    assert f"time scale {bench.DEFAULT_SCALE:g} to " in text
    assert "every verdict on a request at least 2000 ms and on a gap at least 1" in text
    late = report.late_ms
    assert late is not None
    assert math.isfinite(late)


def test_plots_are_written_as_png(report: bench.BenchReport, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plots = (
        ("success.png", report.plot_success),
        ("ttfv.png", report.plot_ttfv),
        ("first.png", report.plot_first_visible),
    )
    for name, plot in plots:
        path = tmp_path / name
        plot(path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report.plot_first_visible(tmp_path / "one.png", queue=ONE, concurrency=1)
    with pytest.raises(ValueError, match="queue must be one of parallel 4, one at a time"):
        report.plot_ttfv(queue="parallel 9")


def test_a_real_server_is_not_scaled_and_gets_no_faults() -> None:
    with pytest.raises(ValueError, match="real time"):
        bench.run_benchmark(base_url="http://127.0.0.1:9/v1", scale=0.01, progress=False)
    with pytest.raises(ValueError, match="faults"):
        bench.run_benchmark(base_url="http://127.0.0.1:9/v1", faults=0.2, progress=False)
    plans = bench.plan_benchmark(QUICK, base_url="http://127.0.0.1:9/v1")
    assert {p.scale for p in plans} == {1.0}
    assert all(p.predicted is None and "[[sim" not in p.texts[0] for p in plans)


def test_the_default_workload_spans_the_issue_sizes() -> None:
    buckets = bench.default_workload().buckets
    assert buckets[0].prompt_tokens == 500
    assert buckets[-1].prompt_tokens == 64_000
    assert buckets[0].answer_tokens <= 250
    assert buckets[-1].answer_tokens == 8_000
    text = bench.default_workload().prompt_text(buckets[1], 0, overrides={"output_tokens": 1})
    assert len(text) == buckets[1].prompt_tokens * 4
    assert text.startswith('[[sim {"output_tokens": 1}]]')


def test_cli_bench_prints_the_table_and_writes_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "bench",
            "--quick",
            "--scale",
            "0.004",
            "--concurrency",
            "1",
            "--timeouts",
            "30",
            "--no-progress",
            "--csv",
            str(tmp_path / "t.csv"),
            "--json",
            str(tmp_path / "t.json"),
            "--plot-dir",
            str(tmp_path / "plots"),
        ]
    )
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0
    assert "recording the benchmark's runs in a temporary database" in captured.err
    with PromptStore() as mine:
        assert mine.history() == [], "the user's history is left alone"
        assert mine.list() == [], "and so is the prompt list"
    assert "blocking 30s" in out
    assert "20k" in out
    # Both queue models, each with the three ways to ask, by default.
    lines = [line for line in out.splitlines() if line.startswith(("parallel 4", "one at a"))]
    assert len(lines) == 2 * 3 * 2  # queues x (blocking 30s, stream, no progress) x sizes
    assert {line.split("  ")[0] for line in lines} == {P4, ONE}
    assert sum(NO_PROGRESS in line for line in lines) == 4
    assert (tmp_path / "t.csv").is_file()
    assert (tmp_path / "t.json").is_file()
    for name in ("success.png", "ttfv.png", "first-visible.png"):
        assert (tmp_path / "plots" / name).is_file()
    with pytest.raises(SystemExit) as refused:
        main(["bench", "--queues", "0"])
    assert refused.value.code == 2
    assert "not a number of prediction slots" in capsys.readouterr().err
