"""History and stats over recorded runs: order, filters, previews, counts and percentiles."""

from __future__ import annotations

import json
import random
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from store_helpers import (
    finish,
    populate,
    start,
    store_fixture,  # noqa: F401 (the `store` fixture)
)

from lmstream_nb._history import GroupStats, History, RunStats, percentile
from lmstream_nb._store import PromptStore


def test_history_is_newest_first_and_filters(store: PromptStore) -> None:
    ids = populate(store)
    runs = store.history()
    assert isinstance(runs, History)
    assert [r.started_at for r in runs] == [1500, 1400, 1400, 1300, 1200, 1100, 1000]
    assert runs[1].id > runs[2].id  # same start: the later run first
    assert runs[0].status == "unfinished"
    assert runs[0].preview == "streaming now"
    assert runs[0].text_chars == len("streaming   now")
    oldest = runs[-1]
    assert oldest.preview == ("First answer with spaces " + "y" * 100)[:80]
    assert oldest.text_chars == len("First   answer\n\nwith  spaces ") + 100
    assert (oldest.prompt_name, oldest.prompt_version, oldest.model) == ("a", 1, "m1")
    assert (oldest.chunks, oldest.completion_tokens, oldest.tokens_per_s) == (2, 2, 4.0)

    assert [r.started_at for r in store.history(prompt="a")] == [1400, 1300, 1100, 1000]
    assert [r.status for r in store.history(status="ok")] == ["ok"] * 4
    assert [r.id for r in store.history(status="error")] == [ids["a@1300"]]
    assert store.history(status="error")[0].error == "boom"
    assert [r.started_at for r in store.history(since=1300)] == [1500, 1400, 1400, 1300]
    since = datetime.fromtimestamp(1300, tz=timezone.utc)
    assert [r.started_at for r in store.history(since=since)] == [1500, 1400, 1400, 1300]
    assert [r.started_at for r in store.history(limit=2)] == [1500, 1400]
    assert len(store.history(limit=None)) == 7
    assert store.history(limit=0) == []
    assert [r.started_at for r in store.history(model="m2")] == [1500, 1300, 1200]
    assert [r.started_at for r in store.history(prompt="a", model="m1", status="ok")] == [
        1400,
        1000,
    ]
    assert store.history(prompt="nobody") == []
    with pytest.raises(ValueError, match="not known"):
        store.history(status="okay")
    with pytest.raises(ValueError, match="limit"):
        store.history(limit=-1)


def test_history_as_dicts_and_pandas(store: PromptStore) -> None:
    populate(store)
    runs = store.history()
    dicts = runs.as_dicts()
    assert dicts[0]["status"] == "unfinished"
    assert dicts[0]["started_at"] == 1500.0
    json.dumps(dicts)
    frame = runs.to_pandas()
    assert len(frame) == 7
    assert list(frame.columns) == list(dicts[0])
    assert str(frame["started_at"].dtype).startswith("datetime64")
    assert frame["started_at"].iloc[0] == datetime.fromtimestamp(1500, tz=timezone.utc)
    empty = History().to_pandas()
    assert len(empty) == 0
    assert "preview" in empty.columns


def test_percentile_interpolates_linearly() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 95) == pytest.approx(3.85)
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0


def test_stats_on_a_hand_made_set_of_runs(store: PromptStore) -> None:
    populate(store)
    report = store.stats()
    assert isinstance(report, RunStats)
    overall = report.overall
    assert (overall.prompt, overall.model, overall.runs, overall.ok) == (None, None, 7, 4)
    assert overall.success_rate == pytest.approx(4 / 7)
    assert overall.by_status == {"error": 1, "ok": 4, "stalled": 1, "unfinished": 1}
    # The six finished runs measured ttft 0.1..0.6 and durations 1..6; the unfinished none.
    assert overall.ttft_p50 == pytest.approx(0.35)
    assert overall.ttft_p95 == pytest.approx(0.575)
    assert overall.duration_p50 == pytest.approx(3.5)
    assert overall.duration_p95 == pytest.approx(5.75)

    groups = {(g.prompt, g.model): g for g in report.groups}
    assert [(g.prompt, g.model) for g in report.groups] == [
        (None, "m1"),
        ("a", "m1"),
        ("a", "m2"),
        ("b", "m2"),
    ]
    a_m1 = groups[("a", "m1")]
    assert (a_m1.runs, a_m1.ok, a_m1.by_status) == (3, 2, {"ok": 2, "stalled": 1})
    assert a_m1.success_rate == pytest.approx(2 / 3)
    assert a_m1.duration_p50 == 2.0  # durations 1, 2, 6
    assert a_m1.duration_p95 == pytest.approx(5.6)
    b_m2 = groups[("b", "m2")]
    assert (b_m2.runs, b_m2.ok, b_m2.success_rate) == (2, 1, 0.5)
    assert b_m2.ttft_p50 == pytest.approx(0.3)
    assert b_m2.ttft_p95 == pytest.approx(0.3)
    assert groups[("a", "m2")].success_rate == 0.0

    only_a = store.stats(prompt="a")
    assert only_a.overall.runs == 4
    assert {g.prompt for g in only_a.groups} == {"a"}
    assert store.stats(model="m2").overall.runs == 3
    assert store.stats(since=1400).overall.runs == 3
    assert store.stats(since=datetime.fromtimestamp(1400, tz=timezone.utc)).overall.runs == 3


def test_stats_give_the_median_time_to_first_progress_and_prompt_speed(
    store: PromptStore,
) -> None:
    """Over the runs that measured each figure (old runs and silent servers did not)."""
    plan = [
        ("a", "m1", 0.5, 100.0),
        ("a", "m1", 1.5, None),
        ("a", "m1", None, None),
        ("a", "m1", 2.5, 300.0),
        ("b", "m1", 4.0, 1000.0),
        ("b", "m2", None, None),
    ]
    for name, model, first_progress, speed in plan:
        finish(
            store,
            start(store, prompt_name=name, model=model, started_at=1000.0),
            first_progress_s=first_progress,
            prompt_tokens_per_s=speed,
        )
    report = store.stats()
    assert report.overall.first_progress_p50 == pytest.approx(2.0)  # 0.5, 1.5, 2.5, 4.0
    assert report.overall.prompt_tokens_per_s_p50 == pytest.approx(300.0)
    groups = {(g.prompt, g.model): g for g in report.groups}
    assert groups[("a", "m1")].first_progress_p50 == pytest.approx(1.5)
    assert groups[("a", "m1")].prompt_tokens_per_s_p50 == pytest.approx(200.0)
    assert groups[("b", "m1")].first_progress_p50 == 4.0
    assert (groups[("b", "m2")].first_progress_p50, groups[("b", "m2")].runs) == (None, 1)
    assert groups[("b", "m2")].prompt_tokens_per_s_p50 is None
    assert store.stats(prompt="b").overall.prompt_tokens_per_s_p50 == 1000.0
    assert report.as_dicts()[0]["first_progress_p50"] == pytest.approx(1.5)


def test_stats_read_the_progress_figures_from_indexes_only(store: PromptStore) -> None:
    """Every query stats sends reads covering indexes: never a run's row, which holds its text."""
    populate(store)
    finish(store, start(store), first_progress_s=0.1, prompt_tokens_per_s=50.0)
    sent: list[str] = []
    conn = sqlite3.connect(store.path)
    try:
        for kwargs in ({}, {"prompt": "a"}, {"model": "m1"}, {"since": 1200.0}):
            sent.clear()
            store._connection().set_trace_callback(sent.append)
            try:
                store.stats(**kwargs)
            finally:
                store._connection().set_trace_callback(None)
            progress = [sql for sql in sent if "first_progress_s" in sql or "prompt_tokens" in sql]
            assert progress, sent
            for sql in progress:
                plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}")]
                assert all("COVERING INDEX" in step or "TEMP B-TREE" in step for step in plan), (
                    sql,
                    plan,
                )
    finally:
        conn.close()


def test_stats_with_no_runs(store: PromptStore) -> None:
    report = store.stats()
    assert report.groups == []
    assert report.overall.runs == 0
    assert report.overall.success_rate == 0.0
    assert report.overall.ttft_p50 is None
    assert report.to_pandas().empty


def test_stats_as_dicts_and_pandas(store: PromptStore) -> None:
    populate(store)
    report = store.stats()
    dicts = report.as_dicts()
    assert len(dicts) == 4
    assert dicts[1]["prompt"] == "a"
    assert dicts[1]["by_status"]["ok"] == 2
    json.dumps(dicts)
    frame = report.to_pandas()
    assert list(frame["runs"]) == [1, 3, 1, 2]
    assert frame.loc[1, "success_rate"] == pytest.approx(2 / 3)


def test_history_and_stats_stay_fast_over_100k_runs(tmp_path: Path) -> None:
    path = tmp_path / "big.db"
    PromptStore(path).close()
    rng = random.Random(3)
    statuses = ["ok"] * 8 + ["stalled", "error"]
    rows = [
        (
            f"prompt{i % 20}",
            1,
            "Summarize {{x}}",
            None,
            "[]",
            "{}",
            f"model{i % 3}",
            "u",
            1_000_000.0 + i,
            rng.random(),
            rng.random() * 10,
            10,
            statuses[i % 10],
            "answer " * 40,
            280,
            "answer " * 11,
        )
        for i in range(100_000)
    ]
    conn = sqlite3.connect(path)
    conn.executemany(
        "INSERT INTO runs (prompt_name, prompt_version, template, system, messages, variables,"
        " model, base_url, started_at, ttft_s, duration_s, chunks, status, text, text_chars,"
        " preview) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    conn.commit()
    conn.close()

    with PromptStore(path) as store:
        timings: dict[str, float] = {}
        for label, call in [
            ("history", lambda: store.history()),
            ("history prompt", lambda: store.history(prompt="prompt7")),
            ("history status", lambda: store.history(status="error")),
            ("history since", lambda: store.history(since=1_050_000.0)),
            ("history model", lambda: store.history(model="model1")),
            ("stats", lambda: store.stats()),
            ("stats prompt", lambda: store.stats(prompt="prompt7")),
            ("stats since", lambda: store.stats(since=1_050_000.0)),
        ]:
            began = time.perf_counter()
            result = call()
            timings[label] = time.perf_counter() - began
            assert result
        assert max(timings.values()) < 1.0, timings
        report = store.stats()
        assert report.overall.runs == 100_000
        assert len(report.groups) == 60
        assert report.overall.success_rate == pytest.approx(0.8)


Row = tuple[
    str | None, str | None, str, float | None, float | None, float, float | None, float | None
]


def reference_stats(
    rows: list[Row],
    prompt: str | None = None,
    model: str | None = None,
    since: float | None = None,
) -> RunStats:
    """What stats computed before it moved into SQL: every run into Python lists, sorted."""
    chosen = [
        r
        for r in rows
        if (prompt is None or r[0] == prompt)
        and (model is None or r[1] == model)
        and (since is None or r[5] >= since)
    ]

    def group(name: str | None, group_model: str | None, part: list[Any]) -> GroupStats:
        by_status: dict[str, int] = {}
        for r in part:
            by_status[r[2]] = by_status.get(r[2], 0) + 1
        ttfts = sorted(r[3] for r in part if r[3] is not None)
        durations = sorted(r[4] for r in part if r[4] is not None)
        first_progress = sorted(r[6] for r in part if r[6] is not None)
        prompt_speeds = sorted(r[7] for r in part if r[7] is not None)
        ok = by_status.get("ok", 0)
        return GroupStats(
            prompt=name,
            model=group_model,
            runs=len(part),
            ok=ok,
            success_rate=ok / len(part) if part else 0.0,
            by_status=dict(sorted(by_status.items())),
            ttft_p50=percentile(ttfts, 50),
            ttft_p95=percentile(ttfts, 95),
            duration_p50=percentile(durations, 50),
            duration_p95=percentile(durations, 95),
            first_progress_p50=percentile(first_progress, 50),
            prompt_tokens_per_s_p50=percentile(prompt_speeds, 50),
        )

    keys = sorted(
        {(r[0], r[1]) for r in chosen},
        key=lambda k: (k[0] is not None, k[0] or "", k[1] is not None, k[1] or ""),
    )
    groups = [group(k[0], k[1], [r for r in chosen if (r[0], r[1]) == k]) for k in keys]
    return RunStats(overall=group(None, None, chosen), groups=groups)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_stats_in_sql_match_a_python_reference_on_random_runs(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    prompts = ["a", "b", "c", None]
    models = ["m1", "m2", None]
    statuses = ["ok", "ok", "ok", "stalled", "error", "unfinished", "first_token_timeout"]
    rows: list[Row] = []
    for i in range(rng.randint(1, 3000)):
        ttft = rng.choice([None, round(rng.random() * 10, rng.choice([0, 1, 6]))])
        duration = rng.choice([None, rng.random() * 100, float(rng.randint(0, 3))])
        # Most runs of an OpenAI-style server measure no progress: None is the common case.
        first_progress = rng.choice([None, None, round(rng.random() * 5, 2)])
        prompt_speed = rng.choice([None, None, None, rng.random() * 2000, 100.0])
        row = (rng.choice(prompts), rng.choice(models), rng.choice(statuses), ttft, duration)
        rows.append((*row, float(i % 97), first_progress, prompt_speed))
    path = tmp_path / "random.db"
    PromptStore(path).close()
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            "INSERT INTO runs (prompt_name, model, status, ttft_s, duration_s, started_at, "
            "first_progress_s, prompt_tokens_per_s, template, messages, variables, base_url) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 't', '[]', '{}', 'u')",
            rows,
        )
    conn.close()
    with PromptStore(path) as store:
        assert store.stats() == reference_stats(rows)
        assert store.stats(prompt="a") == reference_stats(rows, prompt="a")
        assert store.stats(model="m2") == reference_stats(rows, model="m2")
        assert store.stats(since=50) == reference_stats(rows, since=50)
        assert store.stats(prompt="b", model="m1", since=20) == reference_stats(
            rows, prompt="b", model="m1", since=20
        )
        assert store.stats(prompt="nobody") == reference_stats(rows, prompt="nobody")
