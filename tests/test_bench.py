"""lmstream_nb.bench: verdicts independent of the time scale, the headline, history and outputs.

Each benchmark here starts its own simulators (one per cell), so no shared fixture is needed.
The workloads are small (two sizes, one or two concurrencies) to keep the file under ~40 s.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmstream_nb import PromptStore, bench, history
from lmstream_nb.cli import main

QUICK = bench.quick_workload()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PromptStore]:
    with PromptStore(tmp_path / "bench.db") as s:
        yield s


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> bench.BenchReport:
    """One quick benchmark at c=1 and c=3, shared by the output tests."""
    path = tmp_path_factory.mktemp("bench") / "shared.db"
    with PromptStore(path) as s:
        return bench.run_benchmark(
            QUICK, scale=0.015, concurrency=(1, 3), timeouts=(30, 300), store=s, progress=False
        )


def test_two_scales_give_the_same_success_table(store: PromptStore) -> None:
    tables = []
    for scale in (0.01, 0.02):
        result = bench.run_benchmark(
            QUICK, scale=scale, concurrency=(1, 3), timeouts=(30, 300), store=store, progress=False
        )
        assert result.scale == scale
        tables.append(result.success_table())
    assert tables[0] == tables[1]
    assert len(tables[0]) == 3 * 2 * 2  # (blocking 30s, blocking 300s, stream) x sizes x conc


def test_streaming_succeeds_where_a_short_blocking_timeout_fails(
    report: bench.BenchReport,
) -> None:
    table = report.success_table()
    assert table[("stream", "20k", 1)] == {"ok": 1}
    assert table[("blocking 30s", "20k", 1)] == {"timeout": 1}
    assert table[("blocking 300s", "20k", 1)] == {"ok": 1}
    # Three users at once: the queued blocking requests run out of time, the streams do not.
    assert table[("stream", "20k", 3)] == {"ok": 3}
    assert table[("blocking 300s", "20k", 3)] == {"ok": 1, "timeout": 2}
    assert table[("blocking 30s", "0.5k", 3)] == {"ok": 2, "timeout": 1}
    row = next(
        r for r in report.rows if (r["mode"], r["bucket"], r["concurrency"]) == ("stream", "20k", 1)
    )
    # Reported in simulated seconds: 20k tokens at 150 tok/s is 133 s to the first token.
    assert row["ttfv_p50_s"] == pytest.approx(133.3, rel=0.1)
    assert row["total_p50_s"] == pytest.approx(186.7, rel=0.1)


def test_runs_are_recorded_in_the_history(tmp_path: Path) -> None:
    with PromptStore(tmp_path / "history.db") as s:
        result = bench.run_benchmark(
            QUICK, scale=0.004, modes=("stream",), concurrency=(1,), store=s, progress=False
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


def test_retry_recovers_every_fault_before_the_first_token(store: PromptStore) -> None:
    work = bench.Workload(buckets=(bench.SizeBucket("0.5k", 500, 250),), rows_per_user=3)
    result = bench.run_benchmark(
        work,
        scale=0.004,
        modes=("stream",),
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
    """Eight 20k-token prompts queue for 25 simulated minutes; none exceeds the 600 s budget
    of silence, so all succeed, while a 300 s blocking timeout loses the queued ones."""
    work = bench.Workload(buckets=(bench.SizeBucket("20k", 20_000, 1_600),))
    result = bench.run_benchmark(
        work, scale=0.004, concurrency=(8,), timeouts=(300,), store=store, progress=False
    )
    table = result.success_table()
    assert table[("stream", "20k", 8)] == {"ok": 8}
    assert table[("blocking 300s", "20k", 8)] == {"ok": 1, "timeout": 7}
    waits = sorted(r["ttfv_s"] for r in result.runs if r["mode"] == "stream")
    assert waits[-1] > 600  # the last one waited well past the budget, in the queue


def test_csv_json_and_table(report: bench.BenchReport, tmp_path: Path) -> None:
    with report.to_csv(tmp_path / "b.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(report.rows) == 12
    assert {
        "mode",
        "bucket",
        "concurrency",
        "runs",
        "success_rate",
        "timeout_rate",
        "other_failures",
        "ttfv_p50_s",
        "ttfv_p95_s",
        "total_p50_s",
        "total_p95_s",
    } <= set(rows[0])
    document = json.loads(report.to_json(tmp_path / "b.json").read_text(encoding="utf-8"))
    assert document["rows"] == report.rows
    assert len(document["runs"]) == len(report.runs)
    assert document["profile"]["prefill_tps"] == bench.LAPTOP_GPU.prefill_tps
    text = report.table()
    assert "blocking 30s" in text
    assert "stream" in text
    assert "time scale 0.015" in text


def test_plots_are_written_as_png(report: bench.BenchReport, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    for name, plot in (("success.png", report.plot_success), ("ttfv.png", report.plot_ttfv)):
        path = tmp_path / name
        plot(path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_real_server_is_not_scaled_and_gets_no_faults() -> None:
    with pytest.raises(ValueError, match="real time"):
        bench.run_benchmark(base_url="http://127.0.0.1:9/v1", scale=0.01, progress=False)
    with pytest.raises(ValueError, match="faults"):
        bench.run_benchmark(base_url="http://127.0.0.1:9/v1", faults=0.2, progress=False)


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
    out = capsys.readouterr().out
    assert code == 0
    assert "blocking 30s" in out
    assert "20k" in out
    assert (tmp_path / "t.csv").is_file()
    assert (tmp_path / "t.json").is_file()
    assert (tmp_path / "plots" / "success.png").is_file()
    assert (tmp_path / "plots" / "ttfv.png").is_file()
