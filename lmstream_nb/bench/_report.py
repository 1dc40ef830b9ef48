"""The benchmark's result: one tidy row per mode x size x concurrency, and ways to show it.

Tidy rows (plain dicts of numbers and strings) are the one source for every output: the
terminal table, CSV, JSON, a DataFrame and the plots all read them, so they cannot disagree.
matplotlib and pandas are imported only when a plot or a DataFrame is asked for: the benchmark
itself must run without them.

Times are in simulated seconds (wall seconds divided by the time scale) and are taken from the
successful runs only: a failed run has no complete answer to time. "Time to first visible
output" (ttfv) is the time to the first token for a stream and the whole duration for a blocking
request, which shows nothing until it is done. "Time to first visible progress" (ttfp) is when
the user first sees that something happens: a stream's first progress report (LM Studio 0.4's
native chat reports prompt processing), else its first token; for a blocking request, again its
whole duration. A stream's ttfp on the simulator is the simulated server's wait plus the real
time the client took beyond it (see ``_runner._first_signs``): mostly real time, which a time
scale must not multiply.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._workload import SpeedProfile

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["TIMEOUT_STATUSES", "BenchReport", "summarize"]

#: Statuses counted as "timed out": the total timeout, the first-token and the idle budget.
TIMEOUT_STATUSES = frozenset({"timeout", "first_token_timeout", "stalled"})

_KEY = ("queue", "mode", "bucket", "concurrency")

#: A cell's key in the tables: (queue, mode, bucket, concurrency).
CellKey = tuple[str, str, str, int]


def _percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolation percentile (numpy's default), ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group per-run records into tidy rows, in the order the cells first appear."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(tuple(run[k] for k in _KEY), []).append(run)
    rows: list[dict[str, Any]] = []
    for members in groups.values():
        first = members[0]
        n = len(members)
        statuses = Counter(str(r["status"]) for r in members)
        ok = [r for r in members if r["status"] == "ok"]
        timeouts = sum(c for s, c in statuses.items() if s in TIMEOUT_STATUSES)
        ttfv = [float(r["ttfv_s"]) for r in ok if r["ttfv_s"] is not None]
        ttfp = [float(r["ttfp_s"]) for r in ok if r.get("ttfp_s") is not None]
        total = [float(r["total_s"]) for r in ok]
        late = [float(r["late_ms"]) for r in members if r.get("late_ms") is not None]
        rows.append(
            {
                "queue": first["queue"],
                "mode": first["mode"],
                "timeout_s": first["timeout_s"],
                "bucket": first["bucket"],
                "prompt_tokens": first["prompt_tokens"],
                "answer_tokens": first["answer_tokens"],
                "concurrency": first["concurrency"],
                "runs": n,
                "ok": len(ok),
                "success_rate": len(ok) / n,
                "timeout_rate": timeouts / n,
                "other_failures": n - len(ok) - timeouts,
                "ttfv_p50_s": _percentile(ttfv, 50),
                "ttfv_p95_s": _percentile(ttfv, 95),
                "ttfp_p50_s": _percentile(ttfp, 50),
                "ttfp_p95_s": _percentile(ttfp, 95),
                "total_p50_s": _percentile(total, 50),
                "total_p95_s": _percentile(total, 95),
                "statuses": " ".join(f"{s}:{c}" for s, c in sorted(statuses.items())),
                "scale": first.get("scale"),
                "margin_ms": first.get("margin_ms"),
                "gap_margin_ms": first.get("gap_margin_ms"),
                "late_ms": max(late) if late else None,
            }
        )
    return rows


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s"


def _need_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "The benchmark plots need matplotlib: pip install matplotlib "
            "(or pip install 'lmstream_nb[bench]')."
        ) from exc


@dataclass
class BenchReport:
    """What a benchmark measured.

    ``rows``: the tidy summary, one dict per queue model x mode x size bucket x concurrency
    (``queue``: "parallel 4", "one at a time", or "real server").
    ``runs``: one dict per run (queue, mode, bucket, concurrency, row, fault, status, run id,
    batch id, time to first visible output, to first visible progress and total time in
    simulated seconds).
    ``scale``: the time scale of the cells far from any verdict boundary (each run records its
    cell's own ``scale``; 1.0 against a real server). ``predicted``: the statuses the timing
    model expected per (queue, mode, bucket, concurrency), on the simulator.
    """

    rows: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    scale: float
    base_url: str | None
    profile: SpeedProfile | None
    wall_s: float
    meta: dict[str, Any] = field(default_factory=dict)
    predicted: dict[CellKey, dict[str, int]] = field(default_factory=dict)

    def success_table(self) -> dict[CellKey, dict[str, int]]:
        """Statuses counted per (queue, mode, bucket, concurrency): the verdicts, without any
        times."""
        table: dict[CellKey, dict[str, int]] = {}
        for run in self.runs:
            key = (
                str(run["queue"]),
                str(run["mode"]),
                str(run["bucket"]),
                int(run["concurrency"]),
            )
            counts = table.setdefault(key, {})
            counts[str(run["status"])] = counts.get(str(run["status"]), 0) + 1
        return table

    def predicted_table(self) -> dict[CellKey, dict[str, int]]:
        """The :meth:`success_table` the timing model predicted (empty against a real server)."""
        return {key: dict(counts) for key, counts in self.predicted.items()}

    def unexpected(self) -> dict[CellKey, tuple[dict[str, int], dict[str, int]]]:
        """The predicted cells whose measured statuses differ from the prediction, as
        (measured, predicted); empty when every verdict came as worked out."""
        table = self.success_table()
        return {
            key: (table.get(key, {}), dict(counts))
            for key, counts in self.predicted.items()
            if table.get(key, {}) != counts
        }

    def _least(self, key: str) -> float | None:
        values = [float(r[key]) for r in self.runs if r.get(key) is not None]
        return min(values) if values else None

    @property
    def margin_ms(self) -> float | None:
        """The closest a verdict on a whole request (a total timeout, a first-token budget) was
        designed to be to its boundary, in real milliseconds (``None`` if none was predicted)."""
        return self._least("margin_ms")

    @property
    def gap_margin_ms(self) -> float | None:
        """The same for a verdict on one gap between two events of a stream (the idle budget)."""
        return self._least("gap_margin_ms")

    @property
    def late_ms(self) -> float | None:
        """The most any successful blocking answer came after its predicted time, in real
        milliseconds: how much of the margin the machine used up."""
        late = [float(r["late_ms"]) for r in self.runs if r.get("late_ms") is not None]
        return max(late) if late else None

    def table(self) -> str:
        """The summary as an aligned text table for a terminal."""
        head = [
            "queue",
            "mode",
            "size",
            "conc",
            "runs",
            "success",
            "timeouts",
            "other",
            "ttfv p50",
            "ttfv p95",
            "ttfp p50",
            "ttfp p95",
            "total p50",
            "total p95",
        ]
        lines = [
            [
                str(r["queue"]),
                str(r["mode"]),
                str(r["bucket"]),
                str(r["concurrency"]),
                str(r["runs"]),
                f"{r['success_rate']:.0%}",
                f"{r['timeout_rate']:.0%}",
                str(r["other_failures"]),
                _duration(r["ttfv_p50_s"]),
                _duration(r["ttfv_p95_s"]),
                _duration(r["ttfp_p50_s"]),
                _duration(r["ttfp_p95_s"]),
                _duration(r["total_p50_s"]),
                _duration(r["total_p95_s"]),
            ]
            for r in self.rows
        ]
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
        text_cols = {0, 1, 2}

        def fmt(cells: list[str]) -> str:
            return "  ".join(
                c.ljust(w) if i in text_cols else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        out = [fmt(head), fmt(["-" * w for w in widths])]
        out += [fmt(line) for line in lines]
        out.append(f"({'; '.join(self._footnotes())})")
        return "\n".join(out)

    def _footnotes(self) -> list[str]:
        if self.base_url is not None:
            notes = [self.base_url, "real time"]
        else:
            scales = [float(r["scale"]) for r in self.runs if r.get("scale") is not None]
            low, high = (min(scales), max(scales)) if scales else (self.scale, self.scale)
            where = f"embedded simulator, profile {self.profile.name}" if self.profile else ""
            notes = [where or "simulator"]
            notes.append(
                f"time scale {low:.3g}" if high == low else f"time scale {low:.3g} to {high:.3g}"
            )
            margins = [
                f"{what} at least {value:.0f} ms"
                for what, value in (
                    ("on a request", self.margin_ms),
                    ("on a gap", self.gap_margin_ms),
                )
                if value is not None
            ]
            if margins:
                late = self.late_ms
                notes.append(
                    f"every verdict {' and '.join(margins)} of real time from its boundary"
                    + ("" if late is None else f", blocking answers at most {late:.0f} ms late")
                )
        notes += [
            "times in simulated seconds, successful runs only",
            "ttfv = time to first visible output (text), ttfp = to first visible progress "
            "(a stream's: the server's simulated wait plus the client's real time)",
            f"wall time {self.wall_s:.1f} s",
        ]
        return notes

    def __str__(self) -> str:
        return self.table()

    def to_csv(self, path: str | Path) -> Path:
        """Write the tidy rows as CSV (one header line, one line per row)."""
        target = Path(path)
        with target.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(self.rows[0]) if self.rows else [])
            writer.writeheader()
            writer.writerows(self.rows)
        return target

    def to_json(self, path: str | Path) -> Path:
        """Write the rows, the per-run records and the settings as one JSON document."""
        target = Path(path)
        document = {
            "scale": self.scale,
            "base_url": self.base_url,
            "profile": None
            if self.profile is None
            else {
                "name": self.profile.name,
                "prefill_tps": self.profile.prefill_tps,
                "gen_tps": self.profile.gen_tps,
                "load_s": self.profile.load_s,
                "source": self.profile.source,
            },
            "wall_s": self.wall_s,
            "meta": self.meta,
            "predicted": [
                {
                    "queue": queue,
                    "mode": mode,
                    "bucket": bucket,
                    "concurrency": conc,
                    "statuses": counts,
                }
                for (queue, mode, bucket, conc), counts in self.predicted.items()
            ],
            "rows": self.rows,
            "runs": self.runs,
        }
        target.write_text(json.dumps(document, indent=2), encoding="utf-8")
        return target

    def to_pandas(self) -> Any:
        """The tidy rows as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def _modes(self) -> list[str]:
        return list(dict.fromkeys(str(r["mode"]) for r in self.rows))

    def queues(self) -> list[str]:
        """The queue models of the report, in the order they ran."""
        return list(dict.fromkeys(str(r["queue"]) for r in self.rows))

    def _queue(self, queue: str | None) -> str:
        """``queue``, or the report's first; a queue it does not have is a clear error."""
        names = self.queues()
        if queue is None:
            return names[0] if names else ""
        if queue not in names:
            raise ValueError(f"queue must be one of {', '.join(names)}, not {queue!r}")
        return queue

    def plot_success(self, target: str | Path | Axes | None = None) -> Figure:
        """Success rate against prompt size, one line per mode and queue model (all
        concurrencies pooled; the second queue model dashed).

        ``target``: a file to save to (PNG, SVG, ...), an existing matplotlib Axes to draw
        on, or ``None`` for a new figure. Returns the figure.
        """
        _need_matplotlib()
        fig, ax = _figure_and_axes(target)
        styles = ("-", "--", ":", "-.")
        for q, queue in enumerate(self.queues()):
            for m, mode in enumerate(self._modes()):
                per_size: dict[int, list[int]] = {}
                for r in self.rows:
                    if r["mode"] == mode and r["queue"] == queue:
                        counts = per_size.setdefault(int(r["prompt_tokens"]), [0, 0])
                        counts[0] += int(r["ok"])
                        counts[1] += int(r["runs"])
                sizes = sorted(per_size)
                rates = [per_size[s][0] / per_size[s][1] for s in sizes]
                ax.plot(
                    sizes,
                    rates,
                    marker="o",
                    color=f"C{m}",
                    linestyle=styles[q % len(styles)],
                    label=f"{mode}, {queue}",
                )
        ax.set_xscale("log")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("success rate")
        levels = sorted({int(r["concurrency"]) for r in self.rows})
        ax.set_title(
            f"Success rate by prompt size (concurrency {', '.join(map(str, levels))} pooled)"
        )
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        _save(fig, target)
        return fig

    def plot_first_visible(
        self,
        target: str | Path | Axes | None = None,
        *,
        queue: str | None = None,
        concurrency: int | None = None,
    ) -> Figure:
        """When the user first sees something, against prompt size: p50 (dashed) and p95
        (solid) of the time to first visible progress per mode, over successful runs.

        A blocking request shows nothing before its answer; a stream without progress shows
        its first token; a stream with progress its first progress report. ``queue``: one queue
        model (default the first); ``concurrency``: one level (default all pooled).
        """
        _need_matplotlib()
        fig, ax = _figure_and_axes(target)
        chosen = self._queue(queue)
        for m, mode in enumerate(self._modes()):
            per_size: dict[int, list[float]] = {}
            for r in self.runs:
                if r["queue"] != chosen or r["mode"] != mode or r["status"] != "ok":
                    continue
                if concurrency is not None and r["concurrency"] != concurrency:
                    continue
                if r.get("ttfp_s") is not None:
                    per_size.setdefault(int(r["prompt_tokens"]), []).append(float(r["ttfp_s"]))
            sizes = sorted(per_size)
            if not sizes:
                continue
            for q, style, label in ((95, "-", f"{mode} p95"), (50, "--", None)):
                values = [_percentile(per_size[s], q) or 0.0 for s in sizes]  # never empty
                ax.plot(sizes, values, marker="o", color=f"C{m}", linestyle=style, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("time to first visible progress (simulated s)")
        which = "all concurrencies" if concurrency is None else f"concurrency {concurrency}"
        ax.set_title(f"First visible progress, {chosen} ({which}; p95 solid, p50 dashed)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        _save(fig, target)
        return fig

    def plot_ttfv(
        self, target: str | Path | Axes | None = None, *, queue: str | None = None
    ) -> Figure:
        """The distribution of the time to first visible output, per prompt size and mode.

        One box per mode within each size, over its successful runs (a failed run shows
        nothing at all), with how many of the runs succeeded written under it: pooling all
        sizes would compare the streams' long prompts with blocking's short ones. ``queue``: one
        queue model (default the first).
        """
        _need_matplotlib()
        fig, ax = _figure_and_axes(target)
        chosen = self._queue(queue)
        modes = self._modes()
        buckets = list(dict.fromkeys(str(r["bucket"]) for r in self.rows))
        width = 0.8 / max(1, len(modes))
        colors = [f"C{i}" for i in range(len(modes))]
        for m, mode in enumerate(modes):
            for b, bucket in enumerate(buckets):
                runs = [
                    r
                    for r in self.runs
                    if r["mode"] == mode and r["bucket"] == bucket and r["queue"] == chosen
                ]
                times = [
                    float(r["ttfv_s"])
                    for r in runs
                    if r["status"] == "ok" and r["ttfv_s"] is not None
                ]
                x = b + (m - (len(modes) - 1) / 2) * width
                if times:
                    box = ax.boxplot(
                        [times],
                        positions=[x],
                        widths=width * 0.8,
                        patch_artist=True,
                        manage_ticks=False,
                    )
                    for patch in box["boxes"]:
                        patch.set_facecolor(colors[m])
                        patch.set_alpha(0.6)
                ax.annotate(
                    f"{len(times)}/{len(runs)}",
                    (x, 0),
                    xycoords=("data", "axes fraction"),
                    xytext=(0, 3),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    rotation=90,
                    fontsize=7,
                    color=colors[m],
                )
        ax.set_xticks(range(len(buckets)), [f"{b} tokens" for b in buckets])
        ax.set_yscale("log")
        ax.set_ylabel("time to first visible output (simulated s)")
        ax.set_title(f"Time to first visible output, {chosen} (successful runs / runs)")
        ax.grid(True, axis="y", alpha=0.3)
        from matplotlib.patches import Patch

        ax.legend(
            handles=[
                Patch(color=c, alpha=0.6, label=m) for c, m in zip(colors, modes, strict=True)
            ],
            fontsize=8,
            loc="upper left",
        )
        _save(fig, target)
        return fig


def _figure_and_axes(target: str | Path | Axes | None) -> tuple[Figure, Axes]:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    if isinstance(target, Axes):
        fig = target.get_figure(root=True)
        if not isinstance(fig, Figure):
            raise TypeError("the Axes to plot on must belong to a figure")
        return fig, target
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    return fig, fig.add_subplot()


def _save(fig: Figure, target: str | Path | Axes | None) -> None:
    if isinstance(target, (str, Path)):
        fig.savefig(target, dpi=110)
