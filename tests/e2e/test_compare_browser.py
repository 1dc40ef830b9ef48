"""%lmstream compare in a real JupyterLab, in headless Chromium: the grid grows live, every cell
in its own place and at once, model output stays text, and the grid is replaced at the end by a
snapshot that needs no kernel. Uses the JupyterLab and browser fixtures of the runner's test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_runner_browser import (  # the fixtures and helpers of one JupyterLab and one browser
    ARTIFACTS,
    KERNEL_READY_JS,
    REPLY,
    _assert_no_widget_error,
    _run_all,
    browser_page,
    lab,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
__all__ = ["browser_page", "lab"]  # used as fixtures

SETUP_CELL = f"""
%load_ext lmstream_nb
from lmstream_nb import PromptStore, simulator
sim = simulator.serve(profile="test-fast", models=("sim-a", "sim-b"), defaults=simulator.Scenario(
    reply={REPLY!r}, output_tokens=40, gen_tps=12, jitter=0))
store = PromptStore()
store.save("cmp", "Say hello to {{{{name}}}}.")
store.save("cmp", "Greet {{{{name}}}} warmly.")
"""

COMPARE_CELL = """
line = f"compare cmp@1 cmp@2 --models sim-a,sim-b --var name=World --base-url {sim.base_url}"
get_ipython().run_line_magic("lmstream", line)
"""

SAMPLER_JS = """() => {
  window.__grid = [];  // [ms, [length of each cell], [state of each cell]]
  window.__gridSampler = setInterval(() => {
    const cells = [...document.querySelectorAll('.lmstream-grid .lmstream-grid-cell')];
    if (!cells.length) return;
    const lengths = cells.map(c => c.querySelector('.lmstream-grid-text').textContent.length);
    const states = cells.map(c => c.dataset.state);
    const last = window.__grid[window.__grid.length - 1];
    if (!last || last[1].join() !== lengths.join() || last[2].join() !== states.join())
      window.__grid.push([performance.now(), lengths, states]);
  }, 40);
}"""


def _write_notebook(path: Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = [
        nbformat.v4.new_code_cell(SETUP_CELL.strip()),
        nbformat.v4.new_code_cell(COMPARE_CELL.strip()),
    ]
    nbformat.write(nb, str(path))


def test_the_grid_grows_live_side_by_side_and_keeps_output_as_text(
    lab: tuple[str, str, Path], browser_page: Any
) -> None:
    base, token, root = lab
    page = browser_page
    ARTIFACTS.mkdir(exist_ok=True)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    _write_notebook(root / "compare.ipynb")
    try:
        page.goto(f"{base}/lab/tree/compare.ipynb?token={token}&reset")
        page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
        page.wait_for_function(KERNEL_READY_JS, timeout=60_000)
        page.evaluate(SAMPLER_JS)
        # Not awaited: the command's promise ends with the cells, when the grid is replaced.
        _run_all(page)
        try:
            page.wait_for_function(
                "() => document.querySelectorAll('.lmstream-grid .lmstream-grid-cell').length"
                " === 4",
                polling=50,
                timeout=60_000,
            )
        except Exception as exc:
            raise AssertionError(f"no live grid; the console said: {console}") from exc
        # Side by side: four columns in one line, version and model in each head.
        heads = page.evaluate(
            "[...document.querySelectorAll('.lmstream-grid .lmstream-grid-head')]"
            ".map(h => h.textContent)"
        )
        assert heads == [
            "cmp@1 · sim-a · row 0",
            "cmp@1 · sim-b · row 0",
            "cmp@2 · sim-a · row 0",
            "cmp@2 · sim-b · row 0",
        ]
        tops = page.evaluate(
            "[...document.querySelectorAll('.lmstream-grid .lmstream-grid-cell')]"
            ".map(c => Math.round(c.getBoundingClientRect().top))"
        )
        assert len(set(tops)) == 1, tops
        page.wait_for_function(
            "() => [...document.querySelectorAll('.lmstream-grid .lmstream-grid-text')]"
            ".every(t => t.textContent.length > 30)",
            timeout=30_000,
        )
        page.screenshot(path=str(ARTIFACTS / "compare-streaming.png"))
        page.wait_for_selector(".lmstream-grid-final", timeout=60_000)
        samples = page.evaluate("window.__grid")
        (ARTIFACTS / "compare-samples.json").write_text(json.dumps(samples))
        page.screenshot(path=str(ARTIFACTS / "compare-done.png"))
        # Every cell grew in several steps, only ever grew, and all four grew at once.
        for cell in range(4):
            lengths = [s[1][cell] for s in samples]
            assert lengths == sorted(lengths), "text only ever grows"
            assert len({n for n in lengths if n}) >= 3, lengths
        # Cells stream at once (three here: sim-b is not loaded yet, so its slots are not
        # reported and the server gets the default three at once).
        together = [s for s in samples if sum(n > 0 for n in s[1]) >= 3 and "done" not in s[2]]
        assert len(together) >= 5, samples
        # The end: the summary and a snapshot, model output as text, nothing ran.
        final = page.inner_text(".lmstream-grid-final")
        assert "<img src=x onerror=" in final
        assert "<script>" in final
        summary = page.inner_text(".lmstream-compare-summary")
        assert "cmp@2" in summary
        assert "sim-b" in summary
        assert "100%" in summary
        for scope in (".lmstream-grid-final", ".lmstream-compare-summary"):
            assert page.evaluate(f"document.querySelectorAll('{scope} img').length") == 0
            assert page.evaluate(f"document.querySelectorAll('{scope} script').length") == 0
        assert page.evaluate("window.__xss === undefined")
        assert dialogs == []
        _assert_no_widget_error(page)
    finally:
        page.screenshot(path=str(ARTIFACTS / "compare-final.png"))
