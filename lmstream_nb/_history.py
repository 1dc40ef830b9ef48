"""Looking back over recorded runs: history (one line per run) and stats (counts, percentiles).

These are read-only queries over the ``runs`` table of a ``PromptStore``, kept apart from the
store so the store stays about writing prompts and runs. Both read only summary columns (the
text length and a preview are stored beside the text) through indexes that cover them, and
neither brings a row per run into Python: history is one query, and stats is one GROUP BY
plus, for each percentile, a walk along an index that keeps the timing in order. So both stay
fast over a hundred thousand runs. The functions take an open connection inside a read
transaction; ``PromptStore.history`` and ``PromptStore.stats`` are the public way in.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ._template import prompt_label

__all__ = [
    "PREVIEW_CHARS",
    "STATUSES",
    "GroupStats",
    "History",
    "RunStats",
    "RunSummary",
    "chunks_preview",
    "percentile",
    "preview",
    "query_history",
    "query_stats",
]

#: Every status a run can have. ``unfinished`` is written when a run starts; a run whose
#: recording process was killed stays so until a store is opened again on that machine, which
#: marks it ``interrupted``. The others are final.
STATUSES: tuple[str, ...] = (
    "ok",
    "first_token_timeout",
    "stalled",
    "interrupted",
    "error",
    "cancelled",
    "timeout",  # a blocking (non-streaming) request ran past its total timeout
    "invalid_output",  # the answer is not JSON matching the schema the run asked for
    "unfinished",
)

PREVIEW_CHARS = 80
# How much of the start of a text a preview looks at before collapsing whitespace.
PREVIEW_HEAD = 4096


@dataclass(frozen=True)
class RunSummary:
    """One line of history: a run without its text (``preview`` is its first 80 characters).

    ``api`` and the progress figures are as on ``RunRecord`` (``None`` where unknown);
    ``conversation`` is the name of the conversation the run is a turn of.
    """

    id: int
    prompt_name: str | None
    prompt_version: int | None
    model: str | None
    started_at: float
    status: str
    ttft_s: float | None
    duration_s: float | None
    chunks: int
    completion_tokens: int | None
    tokens_per_s: float | None
    finish_reason: str | None
    error: str | None
    text_chars: int
    preview: str
    batch_id: str | None
    batch_row: int | None = None
    api: str | None = None
    first_progress_s: float | None = None
    load_s: float | None = None
    prompt_s: float | None = None
    prompt_tokens_per_s: float | None = None
    conversation: str | None = None

    @property
    def label(self) -> str:
        """The prompt the run used, as every front end names it (see ``prompt_label``)."""
        return prompt_label(self.prompt_name, self.prompt_version, self.conversation)


def _load_pandas() -> Any:
    try:
        return importlib.import_module("pandas")
    except ImportError as exc:
        raise ImportError(
            f"to_pandas() needs pandas, which is not installed ({exc}): run "
            "`pip install pandas` and try again."
        ) from exc


class History(list[RunSummary]):
    """Runs, newest first, as returned by ``PromptStore.history``."""

    def as_dicts(self) -> list[dict[str, Any]]:
        """One plain dict per run (JSON-ready: ``started_at`` stays unix time)."""
        return [dataclasses.asdict(run) for run in self]

    def to_pandas(self) -> Any:
        """A pandas DataFrame, one row per run; ``started_at`` becomes a UTC datetime."""
        pd = _load_pandas()
        columns = [field.name for field in dataclasses.fields(RunSummary)]
        frame = pd.DataFrame(self.as_dicts(), columns=columns)
        frame["started_at"] = pd.to_datetime(frame["started_at"], unit="s", utc=True)
        return frame


@dataclass(frozen=True)
class GroupStats:
    """Outcome counts and timing percentiles for a set of runs.

    ``prompt`` and ``model`` name the group (both ``None`` for the overall figures). Percentiles
    use linear interpolation between the nearest ranks (numpy's default) over every run in the
    group that measured the value, whatever its status; ``None`` when no run did.
    ``first_progress_p50`` is the median time to the first sign of life and
    ``prompt_tokens_per_s_p50`` the median prompt-processing speed (see ``Stats``).
    """

    prompt: str | None
    model: str | None
    runs: int
    ok: int
    success_rate: float
    by_status: dict[str, int]
    ttft_p50: float | None
    ttft_p95: float | None
    duration_p50: float | None
    duration_p95: float | None
    first_progress_p50: float | None = None
    prompt_tokens_per_s_p50: float | None = None
    #: The prompt version the group ran, when stats were asked ``by="version"`` (else None).
    version: int | None = None


@dataclass(frozen=True)
class RunStats:
    """``overall`` figures, and one group per (prompt name, model) pair, sorted (``None`` first)."""

    overall: GroupStats
    groups: list[GroupStats]

    def as_dicts(self) -> list[dict[str, Any]]:
        """One plain dict per group."""
        return [dataclasses.asdict(group) for group in self.groups]

    def to_pandas(self) -> Any:
        """A pandas DataFrame, one row per group (``by_status`` stays a dict column)."""
        pd = _load_pandas()
        columns = [field.name for field in dataclasses.fields(GroupStats)]
        return pd.DataFrame(self.as_dicts(), columns=columns)


def _ranks(count: int, p: float) -> tuple[float, int, int]:
    """Where the ``p``-th percentile of ``count`` sorted values falls: (k, low, high)."""
    k = (count - 1) * p / 100.0
    low = math.floor(k)
    return k, low, min(low + 1, count - 1)


def _interpolate(k: float, low: int, low_value: float, high_value: float) -> float:
    return float(low_value + (high_value - low_value) * (k - low))


def percentile(values: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile (0..100) of sorted ``values`` by linear interpolation between
    the nearest ranks (numpy's default); None for no values."""
    if not values:
        return None
    k, low, high = _ranks(len(values), p)
    return _interpolate(k, low, values[low], values[high])


def preview(text: str) -> str:
    """The first 80 characters of ``text`` with runs of whitespace collapsed to one space."""
    head = text[:PREVIEW_HEAD]
    collapsed = " ".join(head.split())
    if len(collapsed) <= PREVIEW_CHARS and len(head) < len(text):
        collapsed = " ".join(text.split())  # mostly whitespace so far: look at all of it
    return collapsed[:PREVIEW_CHARS]


def _timestamp(since: float | datetime) -> float:
    if isinstance(since, datetime):
        return since.timestamp()
    return float(since)


def _filters(
    *,
    prompt: str | None,
    model: str | None,
    since: float | datetime | None,
    status: str | None,
    batch: str | None = None,
) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if batch is not None:
        clauses.append("batch_id = ?")
        params.append(batch)
    if prompt is not None:
        clauses.append("prompt_name = ?")
        params.append(prompt)
    if model is not None:
        clauses.append("model = ?")
        params.append(model)
    if status is not None:
        clauses.append("status = ?")
        params.append(status)
    if since is not None:
        clauses.append("started_at >= ?")
        params.append(_timestamp(since))
    where = " WHERE " + " AND ".join(clauses) if clauses else ""
    return where, params


# ---------------------------------------------------------------------------------------------
# History


#: The name of the conversation a run is a turn of (NULL for other runs), as a column.
CONVERSATION_NAME = "(SELECT name FROM conversations WHERE conversations.id = runs.conversation_id)"
_SUMMARY_COLUMNS = (
    "id, prompt_name, prompt_version, model, started_at, status, ttft_s, duration_s, chunks, "
    "completion_tokens, tokens_per_s, finish_reason, error, text_chars, preview, batch_id, "
    "batch_row, api, first_progress_s, load_s, prompt_s, prompt_tokens_per_s, "
    f"{CONVERSATION_NAME}"
)


def query_history(
    conn: sqlite3.Connection,
    *,
    prompt: str | None,
    status: str | None,
    since: float | datetime | None,
    limit: int | None,
    model: str | None,
    batch: str | None = None,
) -> History:
    """Recorded runs, newest first, without their text (see ``PromptStore.history``)."""
    if status is not None and status not in STATUSES:
        known = ", ".join(STATUSES)
        raise ValueError(f"The status {status!r} is not known: use one of {known}.")
    if limit is not None and (isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit is {limit!r}: use a number of runs (0 or more) or None.")
    where, params = _filters(prompt=prompt, model=model, since=since, status=status, batch=batch)
    sql = f"SELECT {_SUMMARY_COLUMNS} FROM runs{where} ORDER BY started_at DESC, id DESC"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(int(limit))
    rows = conn.execute(sql, params).fetchall()
    summaries = History()
    for row in rows:
        summary = RunSummary(*row)
        if summary.status == "unfinished":
            chars, head = _partial_summary(conn, summary.id)
            summary = dataclasses.replace(summary, text_chars=chars, preview=head)
        summaries.append(summary)
    return summaries


def _partial_summary(conn: sqlite3.Connection, run_id: int) -> tuple[int, str]:
    """Length and preview of an unfinished run's text, read from its chunks."""
    row = conn.execute(
        "SELECT text_end FROM run_chunks INDEXED BY run_chunks_ends WHERE run_id = ? "
        "ORDER BY seq DESC LIMIT 1",
        (run_id,),
    ).fetchone()
    return (0 if row is None else int(row[0])), chunks_preview(conn, run_id)


def chunks_preview(conn: sqlite3.Connection, run_id: int) -> str:
    """The preview of a text kept in ``run_chunks``, reading only the pieces it needs.

    Which pieces those are is found in the index of piece ends, so the text of the pieces
    after them is never read.
    """
    (last,) = conn.execute(
        "SELECT min(seq) FROM run_chunks INDEXED BY run_chunks_ends "
        "WHERE run_id = ? AND text_end >= ?",
        (run_id, PREVIEW_HEAD),
    ).fetchone()
    rows = conn.execute(
        "SELECT substr(text, 1, ?) FROM run_chunks WHERE run_id = ? AND seq <= ? ORDER BY seq",
        (PREVIEW_HEAD, run_id, last if last is not None else 2**62),
    )
    return preview("".join(text for (text,) in rows))


# ---------------------------------------------------------------------------------------------
# Stats


#: The percentiles stats reports.
_PERCENTILES = (50, 95)
#: Progress figures stats reports the median of. Unlike the timings above, the GROUP BY's
#: covering indexes do not hold them: each is counted along its own partial index.
_MEDIANS = ("first_progress_s", "prompt_tokens_per_s")
_Group = tuple[str | None, int | None, str | None]
#: What stats can group runs by, beside the model: the prompt's name, or each of its versions.
STATS_BY = ("prompt", "version")


def query_stats(
    conn: sqlite3.Connection,
    *,
    prompt: str | None,
    model: str | None,
    since: float | datetime | None,
    by: str = "prompt",
    batch: str | None = None,
) -> RunStats:
    """Success rate, outcome counts and timing percentiles (see ``PromptStore.stats``).

    All in SQL, and no query returns a row per run: one GROUP BY counts the runs of each
    (prompt, model, status) and the timings each measured; then each percentile is the one or
    two values at its ranks, read with ``ORDER BY ... LIMIT 2 OFFSET rank`` along an index that
    keeps the timing in order (per group, and overall), so nothing is sorted. Window functions
    (``row_number() OVER (PARTITION BY ...)``) give the same ranks but number every run through
    a sort, which measured 4 to 12 times the GROUP BY alone over 100,000 runs; the walks along
    the indexes add a fraction of it (``benchmarks/store.py``). The progress medians are
    counted per group along their own partial indexes, which hold only the runs that
    measured them. ``by="version"`` groups by (prompt, version, model) instead; the indexes
    do not hold the version, so those walks read the run rows of the groups (fine for the
    runs of a comparison, ``batch``, or of one prompt).
    """
    if by not in STATS_BY:
        raise ValueError(f"by must be one of {', '.join(STATS_BY)}, not {by!r}")
    version_column = "prompt_version" if by == "version" else "NULL"
    grouped = "prompt_name, prompt_version, model" if by == "version" else "prompt_name, model"
    where, params = _filters(prompt=prompt, model=model, since=since, status=None, batch=batch)
    rows = conn.execute(
        f"SELECT prompt_name, {version_column}, model, status, count(*), count(ttft_s), "
        f"count(duration_s) FROM runs{where} GROUP BY {grouped}, status",
        params,
    ).fetchall()
    by_status: dict[_Group, dict[str, int]] = {}
    measured: dict[_Group, list[int]] = {}
    for prompt_name, prompt_version, run_model, status, runs, ttfts, durations in rows:
        key = (prompt_name, prompt_version, run_model)
        by_status.setdefault(key, {})[status] = runs
        counts = measured.setdefault(key, [0, 0])
        counts[0] += ttfts
        counts[1] += durations
    measured_medians: dict[str, dict[_Group, int]] = {}
    for column in _MEDIANS:
        measured_medians[column] = {
            (prompt_name, prompt_version, run_model): count
            for prompt_name, prompt_version, run_model, count in conn.execute(
                f"SELECT prompt_name, {version_column}, model, count(*) FROM runs "
                f"INDEXED BY runs_{column}_in_group"
                f"{where}{' AND ' if where else ' WHERE '}{column} IS NOT NULL "
                f"GROUP BY {grouped}",
                params,
            )
        }

    def values_at(
        column: str, count: int, group: _Group | None, percentiles: Sequence[int] = _PERCENTILES
    ) -> dict[int, float | None]:
        """The ``column`` percentiles of a group (or of all runs, ``None``) by percentile."""
        found: dict[int, float | None] = {}
        clauses = [f"{column} IS NOT NULL"]
        extra: list[Any] = []
        if group is not None:
            clauses[:0] = ["prompt_name IS ?", "model IS ?"]
            extra = [group[0], group[2]]
            if by == "version":
                clauses.insert(1, "prompt_version IS ?")
                extra.insert(1, group[1])
        sql = (
            f"SELECT {column} FROM runs{where}{' AND ' if where else ' WHERE '}"
            f"{' AND '.join(clauses)} ORDER BY {column} LIMIT 2 OFFSET ?"
        )
        for p in percentiles:
            if count == 0:
                found[p] = None
                continue
            k, low, high = _ranks(count, p)
            pair = [row[0] for row in conn.execute(sql, [*params, *extra, low])]
            found[p] = _interpolate(k, low, pair[0], pair[high - low])
        return found

    def group_stats(
        group: _Group | None, statuses: dict[str, int], counts: list[int]
    ) -> GroupStats:
        runs = sum(statuses.values())
        ok = statuses.get("ok", 0)
        ttft = values_at("ttft_s", counts[0], group)
        duration = values_at("duration_s", counts[1], group)
        medians: dict[str, float | None] = {}
        for column in _MEDIANS:
            found = measured_medians[column]
            count = sum(found.values()) if group is None else found.get(group, 0)
            medians[column] = values_at(column, count, group, (50,))[50]
        return GroupStats(
            prompt=None if group is None else group[0],
            model=None if group is None else group[2],
            runs=runs,
            ok=ok,
            success_rate=ok / runs if runs else 0.0,
            by_status=dict(sorted(statuses.items())),
            ttft_p50=ttft[50],
            ttft_p95=ttft[95],
            duration_p50=duration[50],
            duration_p95=duration[95],
            first_progress_p50=medians["first_progress_s"],
            prompt_tokens_per_s_p50=medians["prompt_tokens_per_s"],
            version=None if group is None else group[1],
        )

    def order(key: _Group) -> tuple[bool, str, int, bool, str]:
        return (key[0] is not None, key[0] or "", key[1] or 0, key[2] is not None, key[2] or "")

    groups = [
        group_stats(key, by_status[key], measured[key]) for key in sorted(by_status, key=order)
    ]
    overall_statuses: dict[str, int] = {}
    for statuses in by_status.values():
        for status, runs in statuses.items():
            overall_statuses[status] = overall_statuses.get(status, 0) + runs
    overall_counts = [sum(c[0] for c in measured.values()), sum(c[1] for c in measured.values())]
    overall = group_stats(None, overall_statuses, overall_counts)
    return RunStats(overall=overall, groups=groups)
