"""The committed notebooks as a reader opens them, without a kernel: nothing in them needs one.

A widget output in a saved notebook shows "Error displaying widget: model not found" once its
kernel is gone, so only the prompt runner may leave one (it is a widget by nature), and it
leaves an ordinary snapshot of its last run beside it. Progress lines are ordinary HTML. The
browser test opens them for real.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
WIDGET = "application/vnd.jupyter.widget-view+json"


def _outputs(name: str) -> list[tuple[str, dict[str, object]]]:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    return [
        (cell.source, output.get("data", {"stream": output.get("text", "")}))
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    ]


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_only_the_runner_is_a_widget_and_it_has_a_snapshot(path: Path) -> None:
    outputs = _outputs(path.name)
    widgets = [source for source, data in outputs if WIDGET in data]
    for source in widgets:
        assert "PromptRunner(" in source or "%lmstream ui" in source, source
    snapshots = [data for _, data in outputs if "lmstream-snapshot" in str(data.get("text/html"))]
    assert len(snapshots) == len(widgets)
    for source, data in outputs:
        if source.startswith("%%lmstream") and "text/plain" in data:
            assert "text/html" in data, "every answer and status line is HTML that wraps at words"


def test_every_lmstream_cell_keeps_its_status_line() -> None:
    outputs = _outputs("01-quickstart.ipynb")
    lines = [
        str(d["text/plain"])
        for _, d in outputs
        if str(d.get("text/plain")).startswith("lmstream: ")
    ]
    assert len(lines) == 4  # the long prompt's run included
    assert all(line.startswith("lmstream: done · ") and " tok/s · run #" in line for line in lines)
    assert not any("RunResult" in str(d.get("text/plain")) for _, d in outputs)


def test_the_runners_snapshot_names_its_runner() -> None:
    """The snapshot is hidden while its own runner is shown, found by the runner's id."""
    nb = nbformat.read(NOTEBOOKS / "02-prompt-runner.ipynb", as_version=4)
    [cell] = [c for c in nb.cells if any(WIDGET in o.get("data", {}) for o in c.get("outputs", []))]
    widget, snapshot = (o["data"] for o in cell.outputs)
    assert f'data-lmstream-runner="{widget[WIDGET]["model_id"]}"' in snapshot["text/html"]


def test_notebook_03_keeps_its_progress_lines_as_they_ended() -> None:
    lines = [
        data
        for source, data in _outputs("03-long-prompt-success-rates.ipynb")
        if "lmstream-progress" in str(data.get("text/html"))
    ]
    assert len(lines) == 3, "one for each benchmark run"
    for data in lines:
        assert 'data-state="done"' in str(data["text/html"])
        assert "(100%)" in str(data["text/plain"])


def test_notebook_02_shows_the_runner_and_05_its_plot() -> None:
    nb = nbformat.read(NOTEBOOKS / "02-prompt-runner.ipynb", as_version=4)
    assert "](images/prompt-runner.png)" in nb.cells[0].source
    assert (NOTEBOOKS / "images" / "prompt-runner.png").stat().st_size > 10_000
    shown = [str(d.get("text/html")) for _, d in _outputs("02-prompt-runner.ipynb")]
    assert any("is not a whole number" in h for h in shown), "a field error, as the user sees it"
    assert any("<b>History</b>" in h for h in shown)
    printed = [str(d.get("stream", "")) for _, d in _outputs("02-prompt-runner.ipynb")]
    assert "None\n" not in printed, "what the user sees, not a return value"
    plots = [d for _, d in _outputs("05-real-model.ipynb") if "image/png" in d]
    assert len(plots) == 2, "both plots are stored: success by size, and the progress curve"


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_every_widget_left_in_a_notebook_has_its_saved_state(path: Path) -> None:
    """JupyterLab draws a saved widget from the notebook's widget state (no kernel needed);
    a widget output whose model is not in it is "model not found"."""
    nb = nbformat.read(path, as_version=4)
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    saved = set(state.get("state", {}))
    for _, data in _outputs(path.name):
        if WIDGET in data:
            view = data[WIDGET]
            assert isinstance(view, dict)
            assert view["model_id"] in saved, f"{path.name}: a widget without saved state"


def test_notebook_06_keeps_the_conversation_the_json_the_grid_and_the_diff() -> None:
    outputs = _outputs("06-prompt-engineering.ipynb")
    chat = [d for s, d in outputs if s.startswith("%%lmstream --chat trip")]
    statuses = [str(d["text/plain"]) for d in chat if str(d["text/plain"]).startswith("lmstream:")]
    assert len(statuses) == 3, "three cells, three turns"
    assert all("lmstream: done" in s for s in statuses)
    printed = "".join(str(d.get("stream", "")) for _, d in outputs)
    assert "3 turns: ['ok', 'ok', 'ok']" in printed
    assert "['user', 'assistant', 'user', 'assistant', 'user']" in printed, "earlier turns sent"
    [grid] = [d for s, d in outputs if "%lmstream compare" in s]
    assert "8 of 8 ok" in str(grid["text/plain"])
    page = str(grid["text/html"])
    assert page.count('class="lmstream-grid-cell" data-state="done"') == 8
    assert "{&quot;city&quot;:" in page, "the model's JSON is shown as escaped text"
    [diff] = [d for s, d in outputs if s.startswith("%lmstream diff plan")]
    assert '+    "budget_eur": {' in str(diff["text/plain"]), "the schema is diffed as JSON"
