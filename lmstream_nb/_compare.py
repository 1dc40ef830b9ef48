"""compare(): prompt versions side by side on models and rows of variables, every cell recorded.

A comparison is a batch whose cells differ in their prompt version and model as well as their
variables: it runs on the batch's pipeline (``arun_cells``), so recording, cancellation,
budgets and the per-server slots all apply as they do to ``run_many``. Its id is the batch id
the runs record (``runs.batch_id``), and a cell's number is its ``batch_row``: no column of its
own is needed, and ``history(batch=id)`` and ``stats(batch=id, by="version")`` read one
comparison back. Cells are numbered version first, then model, then row.
"""

from __future__ import annotations

import asyncio
import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._batch import Cell, _rows, arun_cells, check_settings, new_batch_id, parsed_columns
from ._config import Budgets, Retries
from ._events import Event
from ._history import RunStats, _load_pandas, percentile
from ._loop import shared_loop
from ._run import RunResult, default_store
from ._store import PromptStore
from ._template import Prompt, parse_version_ref

#: The columns of ``Comparison.to_pandas()``, in order.
CELL_COLUMNS = (
    "version",
    "model",
    "row",
    "status",
    "text",
    "ttft_s",
    "tokens_per_s",
    "length",
    "tokens",
    "duration_s",
    "error",
    "run_id",
)
#: The columns of ``Comparison.summary()``, in order.
SUMMARY_COLUMNS = (
    "version",
    "model",
    "cells",
    "ok",
    "success_rate",
    "ttft_p50",
    "ttft_p95",
    "mean_length",
)


@dataclass(frozen=True)
class CompareCell:
    """Where a cell stands in the grid: which version, model and row it runs."""

    index: int
    version: str  # the version's label, name@N
    model: str | None  # as asked, else the version's own (None: the server's first model)
    row: int


def resolve_prompts(prompts: Sequence[Prompt | str], store: PromptStore) -> list[Prompt]:
    """Stored versions from ``Prompt`` values and ``NAME@N`` texts (``NAME`` alone: the latest)."""
    if isinstance(prompts, (str, Prompt)):
        prompts = [prompts]
    found: list[Prompt] = []
    for item in prompts:
        if isinstance(item, Prompt):
            found.append(item)
        else:
            name, version = parse_version_ref(str(item))
            found.append(store.get(name, version))
    if not found:
        raise ValueError("compare needs at least one prompt version, e.g. ['greet@1', 'greet@2']")
    return found


def plan(
    versions: Sequence[Prompt], models: Sequence[str | None], rows: Sequence[dict[str, Any]]
) -> tuple[list[Cell], list[CompareCell]]:
    """Every (version, model, row) cell, version first, then model, then row."""
    cells: list[Cell] = []
    where: list[CompareCell] = []
    for prompt in versions:
        for model in models:
            for r, variables in enumerate(rows):
                where.append(CompareCell(len(cells), prompt.label, model or prompt.model, r))
                cells.append(Cell(prompt, dict(variables), model))
    return cells, where


def merge_rows(
    shared: dict[str, Any], rows: Sequence[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """The rows a front end's options give: each row's values over the ones given for every
    row (``--var``); no row at all is one row of the shared values."""
    if not rows:
        return [dict(shared)]
    return [{**shared, **row} for row in rows]


def _models(models: Sequence[str] | str | None) -> list[str | None]:
    if models is None:
        return [None]
    if isinstance(models, str):
        models = [m for m in models.split(",") if m.strip()]
    chosen: list[str | None] = [m.strip() for m in models if m and m.strip()]
    if not chosen:
        raise ValueError("models is empty: name at least one model, or None for each version's own")
    return chosen


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


@dataclass
class Comparison:
    """Every cell of a comparison in grid order, and the id its runs are recorded under."""

    comparison_id: str
    cells: list[CompareCell]
    results: list[RunResult]
    versions: list[Prompt]
    models: list[str | None]
    rows: list[dict[str, Any]]
    concurrency: dict[str, int] = field(default_factory=dict)
    concurrency_note: str = ""

    def as_dicts(self) -> list[dict[str, Any]]:
        """One plain dict per cell (the columns of ``to_pandas``)."""
        return [
            {
                "version": cell.version,
                "model": cell.model or r.model,
                "row": cell.row,
                "status": r.status,
                "text": r.text,
                "ttft_s": r.stats.ttft_s,
                "tokens_per_s": r.stats.tokens_per_s,
                "length": len(r.text),
                "tokens": r.stats.completion_tokens,
                "duration_s": r.stats.duration_s,
                "error": r.error,
                "run_id": r.run_id,
            }
            for cell, r in zip(self.cells, self.results, strict=True)
        ]

    def to_pandas(self) -> Any:
        """A DataFrame, one row per cell: version, model, row, status, text, time to first
        token, tokens/s, length (characters) and the run's id; with a schema, the parsed fields
        too (``parsed.KEY`` columns, as ``run_many`` gives them)."""
        pd = _load_pandas()
        frame = pd.DataFrame(self.as_dicts(), columns=list(CELL_COLUMNS))
        for key, column in parsed_columns(self.results).items():
            frame[key] = pd.Series(column, dtype=object)  # an int stays an int beside a None
        return frame

    def summary_dicts(self) -> list[dict[str, Any]]:
        """Per (version, model), in grid order: cells, successes, success rate, time to first
        token p50/p95 (over the cells that measured it, as ``stats`` counts) and mean length."""
        groups: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
        for row in self.as_dicts():
            groups.setdefault((row["version"], row["model"]), []).append(row)
        out = []
        for (version, model), rows in groups.items():
            ok = sum(r["status"] == "ok" for r in rows)
            ttfts = sorted(r["ttft_s"] for r in rows if r["ttft_s"] is not None)
            out.append(
                {
                    "version": version,
                    "model": model,
                    "cells": len(rows),
                    "ok": ok,
                    "success_rate": ok / len(rows),
                    "ttft_p50": percentile(ttfts, 50),
                    "ttft_p95": percentile(ttfts, 95),
                    "mean_length": sum(r["length"] for r in rows) / len(rows),
                }
            )
        return out

    def summary(self) -> Any:
        """A DataFrame, one row per (version, model): see ``summary_dicts``."""
        pd = _load_pandas()
        return pd.DataFrame(self.summary_dicts(), columns=list(SUMMARY_COLUMNS))

    def summary_rows(self) -> list[tuple[object, ...]]:
        """The summary as table cells, the one layout the CLI, the repr and the grid show."""
        return [
            (
                s["version"],
                s["model"] or "-",
                f"{s['ok']}/{s['cells']}",
                f"{s['success_rate']:.0%}",
                _seconds(s["ttft_p50"]),
                _seconds(s["ttft_p95"]),
                f"{s['mean_length']:.0f}",
            )
            for s in self.summary_dicts()
        ]

    def stats(self, store: PromptStore | None = None) -> RunStats:
        """What the store recorded for this comparison, per (prompt, version, model)."""
        return (store or default_store()).stats(by="version", batch=self.comparison_id)

    @property
    def succeeded(self) -> int:
        return sum(r.ok for r in self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, index: int) -> RunResult:
        return self.results[index]

    def __repr__(self) -> str:
        from ._terminal import table

        head = (
            f"<Comparison {self.comparison_id}: {len(self.versions)} versions x "
            f"{len(self.models)} models x {len(self.rows)} rows, {self.succeeded} of "
            f"{len(self.results)} ok>"
        )
        return head + "\n" + table(self.summary_rows(), SUMMARY_HEADERS).rstrip("\n")

    def _repr_html_(self) -> str:
        return summary_html(self.comparison_id, self.summary_rows())


#: The headers of the summary table (``Comparison.summary_rows``).
SUMMARY_HEADERS = ["version", "model", "ok", "success", "ttft p50", "ttft p95", "mean length"]


def summary_html(comparison_id: str, rows: Sequence[Sequence[object]]) -> str:
    """The summary as an HTML table, every value escaped (names and models are user text)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in SUMMARY_HEADERS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return (
        f'<div class="lmstream-compare-summary"><div>comparison '
        f"{html.escape(comparison_id)}</div><table><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table></div>"
    )


async def acompare(
    prompts: Sequence[Prompt | str],
    models: Sequence[str] | str | None = None,
    rows: Any = None,
    *,
    store: PromptStore | None = None,
    base_url: str | Sequence[str] | None = None,
    concurrency: int | None = None,
    budgets: Budgets | None = None,
    retries: Retries | None = None,
    comparison_id: str | None = None,
    progress: bool = True,
    watch: Callable[[int], Callable[[Event], object] | None] | None = None,
    on_start: Callable[[int], object] | None = None,
    on_end: Callable[[int, RunResult], object] | None = None,
    on_plan: Callable[[list[CompareCell]], object] | None = None,
    **extra: Any,
) -> Comparison:
    """The async form of :func:`compare`. ``on_plan`` gets the cells before any runs, and
    ``watch`` / ``on_start`` / ``on_end`` follow each one (by its number): a live view's hooks."""
    if concurrency is not None and concurrency < 1:
        raise ValueError("concurrency must be at least 1 (or None: the slots each server has)")
    store = store or default_store()
    versions = await asyncio.to_thread(resolve_prompts, prompts, store)
    for prompt in versions:
        check_settings(prompt, extra)
    chosen = _models(models)
    records, _ = _rows([{}] if rows is None else rows)
    if not records:
        records = [{}]
    cells, where = plan(versions, chosen, records)
    if on_plan is not None:
        on_plan(where)
    comparison_id = comparison_id or new_batch_id()
    ran, spread, note = await arun_cells(
        cells,
        range(len(cells)),
        concurrency=concurrency,
        store=store,
        base_url=base_url,
        budgets=budgets,
        retries=retries,
        batch_id=comparison_id,
        progress=progress,
        title="lmstream compare",
        unit="cell",
        watch=watch,
        on_start=on_start,
        on_end=on_end,
        **extra,
    )
    results = [ran[i] for i in range(len(cells))]
    return Comparison(comparison_id, where, results, versions, chosen, records, spread, note)


def compare(
    prompts: Sequence[Prompt | str],
    models: Sequence[str] | str | None = None,
    rows: Any = None,
    **kwargs: Any,
) -> Comparison:
    """Run every prompt version on every model and row of variables, side by side.

    ``prompts`` are ``Prompt`` values or stored versions as ``"NAME@N"`` (``"NAME"``: the
    latest); ``models`` a list of model ids (None: each version's own, else the server's);
    ``rows`` a list of variable dicts or a DataFrame (default: one empty row; a row may hold
    variables only some versions use). Cells run like a batch's rows (``run_many``: as many at
    once on each server as it has slots, ``concurrency=`` caps the total), each recorded under
    the comparison's id (``Comparison.comparison_id``, the runs' batch id); a failed cell is
    recorded and the rest go on; Ctrl-C cancels the cells in flight (recorded as cancelled).
    ``.to_pandas()`` has one row per cell, ``.summary()`` one per (version, model).
    """
    return shared_loop().run(acompare(prompts, models, rows, **kwargs))
