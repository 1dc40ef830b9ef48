"""compare(): every (version, model, row) cell run and recorded under one id; the frames; stats."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from waiting import await_until

from lmstream_nb import (
    Budgets,
    Comparison,
    PromptNotFound,
    PromptStore,
    acompare,
    compare,
    history,
    simulator,
)
from lmstream_nb._history import percentile
from lmstream_nb._template import parse_version_ref

MODELS = ("sim-a", "sim-b")
STALL = '[[sim {"stall_at": 3, "stall_s": 60}]]'


@pytest.fixture(scope="module")
def two_models() -> Iterator[simulator.SimServer]:
    with simulator.serve(profile="test-fast", seed=3, models=MODELS) as server:
        yield server


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PromptStore]:
    with PromptStore(tmp_path / "compare.db") as s:
        s.add("greet", "Say hello to {{who}}.", model="sim-a")
        s.add("greet", "Greet {{who}} warmly, {{extra}}", model="sim-a")
        yield s


def test_parse_version_ref() -> None:
    assert parse_version_ref("greet@2") == ("greet", 2)
    assert parse_version_ref("greet") == ("greet", None)
    assert parse_version_ref("team@work") == ("team@work", None)
    assert parse_version_ref("team@work@3") == ("team@work", 3)
    assert parse_version_ref("@3") == ("@3", None)


def test_every_cell_runs_and_is_recorded_under_one_id(
    two_models: simulator.SimServer, store: PromptStore
) -> None:
    rows = [{"who": "Ada", "extra": "please."}, {"who": "Bob", "extra": "now."}]
    before = len(two_models.records())
    result = compare(
        ["greet@1", "greet@2"],
        list(MODELS),
        rows,
        store=store,
        base_url=two_models.base_url,
        progress=False,
        max_tokens=6,
    )
    assert isinstance(result, Comparison)
    assert len(result) == 8
    assert [r.status for r in result] == ["ok"] * 8
    # version first, then model, then row
    assert [(c.version, c.model, c.row) for c in result.cells] == [
        (v, m, r) for v in ("greet@1", "greet@2") for m in MODELS for r in (0, 1)
    ]
    recorded = history(batch=result.comparison_id, limit=None, store=store)
    assert len(recorded) == 8
    assert {r.id for r in recorded} == {r.run_id for r in result}
    for cell, res in zip(result.cells, result.results, strict=True):
        rec = store.get_run(res.run_id)
        assert rec.batch_id == result.comparison_id
        assert rec.batch_row == cell.index
        assert f"{rec.prompt_name}@{rec.prompt_version}" == cell.version
        assert rec.model == cell.model
        assert rec.variables["who"] == rows[cell.row]["who"]
        assert rec.text == res.text
    served = [r.model for r in two_models.records()[before:] if r.method == "POST" and r.model]
    assert sorted(served) == ["sim-a"] * 4 + ["sim-b"] * 4, served
    # the one-row frame and the summary
    frame = result.to_pandas()
    assert list(frame.columns[:8]) == [
        "version",
        "model",
        "row",
        "status",
        "text",
        "ttft_s",
        "tokens_per_s",
        "length",
    ]
    assert len(frame) == 8
    assert list(frame["length"]) == [len(r.text) for r in result]
    assert all(t.strip() for t in frame["text"])
    summary = result.summary()
    assert len(summary) == 4
    assert list(zip(summary["version"], summary["model"], strict=True)) == [
        (v, m) for v in ("greet@1", "greet@2") for m in MODELS
    ]
    assert list(summary["success_rate"]) == [1.0] * 4
    for _, group in summary.iterrows():
        cells = frame[(frame.version == group.version) & (frame.model == group.model)]
        ttfts = sorted(cells["ttft_s"])
        assert group.ttft_p50 == pytest.approx(percentile(ttfts, 50))
        assert group.ttft_p95 == pytest.approx(percentile(ttfts, 95))
        assert group.mean_length == pytest.approx(cells["length"].mean())
    assert result.comparison_id in repr(result)
    assert "greet@2" in repr(result)
    assert "<table>" in result._repr_html_()


def test_stats_by_version_agree_with_the_summary(
    two_models: simulator.SimServer, store: PromptStore
) -> None:
    result = compare(
        ["greet@1", store.get("greet", 2)],
        ["sim-b"],
        [{"who": "Cy", "extra": ""}, {"who": "Di", "extra": STALL}],
        store=store,
        base_url=two_models.base_url,
        budgets=Budgets(idle=0.3),
        progress=False,
        max_tokens=6,
    )
    # version 1 does not use {{extra}}: both rows succeed; version 2's second row stalls
    assert [r.status for r in result] == ["ok", "ok", "ok", "stalled"]
    assert result[3].text.strip(), "the stalled cell keeps its partial text"
    report = result.stats(store)
    groups = {(g.prompt, g.version, g.model): g for g in report.groups}
    assert set(groups) == {("greet", 1, "sim-b"), ("greet", 2, "sim-b")}
    assert groups[("greet", 1, "sim-b")].success_rate == 1.0
    assert groups[("greet", 2, "sim-b")].by_status == {"ok": 1, "stalled": 1}
    summary = {s["version"]: s for s in result.summary_dicts()}
    for version in (1, 2):
        group, line = groups[("greet", version, "sim-b")], summary[f"greet@{version}"]
        assert group.success_rate == line["success_rate"]
        assert group.ttft_p50 == pytest.approx(line["ttft_p50"])
        assert group.ttft_p95 == pytest.approx(line["ttft_p95"])
    # by prompt (the default) the versions are one group, and version stays unset
    (merged,) = store.stats(prompt="greet").groups
    assert (merged.version, merged.runs) == (None, 4)


def test_models_default_to_each_versions_own(
    two_models: simulator.SimServer, store: PromptStore
) -> None:
    store.add("other", "Name {{who}}.", model="sim-b")
    result = compare(
        ["greet", "other@1"],
        rows=[{"who": "Ed", "extra": ""}],
        store=store,
        base_url=two_models.base_url,
        progress=False,
        max_tokens=4,
        concurrency=1,
    )
    assert [(c.version, c.model) for c in result.cells] == [
        ("greet@2", "sim-a"),
        ("other@1", "sim-b"),
    ]
    assert [store.get_run(r.run_id).model for r in result] == ["sim-a", "sim-b"]
    assert result.concurrency == {two_models.base_url: 1}


@pytest.mark.anyio
async def test_acompare_and_a_missing_version(
    two_models: simulator.SimServer, store: PromptStore
) -> None:
    with pytest.raises(PromptNotFound):
        await acompare(["greet@9"], store=store, base_url=two_models.base_url, progress=False)
    assert not store.history(limit=None), "nothing ran"
    seen: list[int] = []
    ended: list[int] = []
    result = await acompare(
        ["greet@1"],
        list(MODELS),
        [{"who": "Flo"}],
        store=store,
        base_url=two_models.base_url,
        progress=False,
        max_tokens=4,
        on_start=seen.append,
        on_end=lambda i, _r: ended.append(i),
    )
    assert sorted(seen) == sorted(ended) == [0, 1]
    assert result.succeeded == 2


@pytest.mark.anyio
async def test_a_cancelled_comparison_records_every_cell_it_started(tmp_path: Path) -> None:
    """Cancellation is the batch's: the cells in flight are recorded as cancelled and their
    connections closed, the finished ones kept, none left unfinished."""
    defaults = simulator.Scenario(gen_tps=100, jitter=0)
    with (
        PromptStore(tmp_path / "cancel.db") as store,
        simulator.serve(profile="test-fast", defaults=defaults, models=MODELS) as paced,
    ):
        store.add("short", 'Quick [[sim {"output_tokens": 3}]]', model="sim-a")
        store.add("long", 'Slow [[sim {"output_tokens": 3000}]]', model="sim-a")
        ended: list[int] = []
        task = asyncio.create_task(
            acompare(
                ["short@1", "long@1"],
                list(MODELS),
                store=store,
                base_url=paced.base_url,
                progress=False,
                on_end=lambda i, _r: ended.append(i),
            )
        )
        await await_until(lambda: sorted(ended) == [0, 1], timeout=10, what="the short cells")
        await await_until(
            lambda: sum(r.outcome == "running" and r.sent_tokens > 0 for r in paced.records()) == 2,
            timeout=10,
            what="both long cells are streaming",
        )
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        runs = store.history(limit=None)
    assert sorted((r.batch_row, r.status) for r in runs) == [
        (0, "ok"),
        (1, "ok"),
        (2, "cancelled"),
        (3, "cancelled"),
    ]
    assert len({r.batch_id for r in runs}) == 1
    assert all(r.text_chars > 0 for r in runs), "the cancelled cells keep their partial text"


def test_rows_from_a_dataframe_and_models_as_one_text(
    two_models: simulator.SimServer, store: PromptStore
) -> None:
    import pandas as pd

    frame = pd.DataFrame({"who": ["Gus", "Hal", "Ivy"], "extra": ["", "", ""]})
    result = compare(
        "greet@2",
        "sim-a, sim-b",
        frame,
        store=store,
        base_url=two_models.base_url,
        progress=False,
        max_tokens=3,
    )
    cells = result.to_pandas()
    assert list(zip(cells["model"], cells["row"], strict=True)) == [
        (m, r) for m in MODELS for r in range(3)
    ]
    assert [store.get_run(i).variables["who"] for i in cells["run_id"]] == ["Gus", "Hal", "Ivy"] * 2
    with pytest.raises(ValueError, match="models is empty"):
        compare("greet@2", [], store=store, base_url=two_models.base_url, progress=False)


def test_versions_with_a_schema_give_their_parsed_fields_as_columns(
    two_models: simulator.SimServer, store: PromptStore
) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    }
    store.add("plan", "Plan a trip for {{who}}.", model="sim-a", schema=schema)
    result = compare(
        ["plan@1", "greet@1"],
        models=list(MODELS),
        rows=[{"who": "Ed"}],
        store=store,
        base_url=two_models.base_url,
        progress=False,
        max_tokens=60,
    )
    frame = result.to_pandas()
    assert list(frame["status"]) == ["ok"] * 4
    assert list(frame.columns[-2:]) == ["parsed.city", "parsed.days"]
    planned = frame[frame["version"] == "plan@1"]
    assert all(isinstance(days, int) for days in planned["parsed.days"])
    assert list(frame[frame["version"] == "greet@1"]["parsed.city"]) == [None, None]
