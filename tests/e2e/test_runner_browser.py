"""The PromptRunner in a real JupyterLab, in headless Chromium driven by Playwright.

The test starts JupyterLab on a free loopback port with every Jupyter directory in a temporary
folder, opens a notebook whose kernel starts the simulator and shows a runner, types a
variable, clicks Run and watches the text grow, runs again and clicks Stop, and checks that
HTML in the model's answer stays text. It also opens notebooks 01 and 02 as committed (their
kernel long gone) to check that every run still shows, and runs notebook 02, reloads the page
and removes its kernel to check what the runner keeps. A runner and a batch are saved as a user
saves them (JupyterLab's default: no widget state) and reopened without their kernel.
Screenshots go to ``test-artifacts/``; ``LMSTREAM_UPDATE_SCREENSHOTS=1`` also refreshes the
picture of the runner in notebook 02. Debian's ``chromium`` is used (Playwright cannot download
its own browser here); without it the test is skipped with that reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
REPLY = (
    'Hello <img src=x onerror="window.__xss=1;alert(1)"> and <script>window.__xss=2'
    "</script> - the answer keeps going, word after word, so the text grows."
)

NOTEBOOK_CELL = f"""
from lmstream_nb import PromptRunner, PromptStore, simulator
sim = simulator.serve(profile="test-fast", defaults=simulator.Scenario(
    reply={REPLY!r}, output_tokens=48, gen_tps=10, jitter=0))
store = PromptStore()
store.save("greet", "Say hello to {{{{name}}}}.")
runner = PromptRunner(store, sim.base_url)
runner
"""

KERNEL_READY_JS = """() => {
  const name = document.querySelector('[data-jp-item-name="kernelName"]');
  const state = document.querySelector('.jp-Notebook-ExecutionIndicator');
  return name && !name.textContent.includes('No Kernel') && state
    && state.dataset.status === 'idle';
}"""

SAMPLER_JS = """() => {
  window.__lengths = [];
  window.__sampler = setInterval(() => {
    const views = document.querySelectorAll('.lmstream-runner .lmstream-text');
    const text = views.length ? views[views.length - 1].textContent : '';
    const last = window.__lengths[window.__lengths.length - 1];
    if (last === undefined || last !== text.length) window.__lengths.push(text.length);
  }, 50);
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _api(base: str, token: str, path: str, method: str = "GET") -> Any:
    request = urllib.request.Request(
        f"{base}{path}", method=method, headers={"Authorization": f"token {token}"}
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=5) as response:
        body = response.read()
    return json.loads(body) if body else None


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    if not Path(CHROMIUM).exists():
        pytest.skip(
            "Debian's chromium is not installed (apt-get install chromium); .ci/run installs it"
        )
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "root"
    root.mkdir()
    config = tmp / "config"
    (config / "labconfig").mkdir(parents=True)
    (config / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}})
    )
    # Every cell in the page (no lazy rendering of cells out of view): tests read whole notebooks.
    tracker = tmp / "settings" / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)
    (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
        "JUPYTER_DATA_DIR": str(tmp / "data"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces"),
        "IPYTHONDIR": str(tmp / "ipython"),
        "JUPYTER_PLATFORM_DIRS": "1",
        "LMSTREAM_HOME": str(tmp / "home"),
    }
    port, token = _free_port(), secrets.token_hex(16)
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--port-retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--LabApp.expose_app_in_browser=True",
    ]
    if os.geteuid() == 0:
        command.append("--allow-root")
    log = (tmp / "server.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"JupyterLab exited: {(tmp / 'server.log').read_text()}")
            try:
                _api(base, token, "/api/status")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.25)  # polling a process that offers no readiness event
        yield base, token, root
    finally:
        with contextlib.suppress(OSError):
            _api(base, token, "/api/shutdown", method="POST")
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.send_signal(signal.SIGKILL)
            server.wait(5)
        log.close()


def _write_runner_notebook(path: Path) -> None:
    """A notebook whose one cell starts the simulator and shows a runner."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = [nbformat.v4.new_code_cell(NOTEBOOK_CELL.strip())]
    nbformat.write(nb, str(path))


def _assert_no_widget_error(page: Any) -> None:
    """No output of the notebook is a widget JupyterLab cannot draw (hidden ones included)."""
    body = page.evaluate("document.querySelector('.jp-NotebookPanel').textContent")
    assert "Error displaying widget" not in body
    assert "model not found" not in body


def _reopen_without_its_kernel(page: Any, base: str, token: str) -> None:
    """Remove every kernel and reload the page: the notebook opens with a new kernel, which has
    none of the old one's widgets (as a notebook reopened another day)."""
    for kernel in _api(base, token, "/api/kernels"):
        _api(base, token, f"/api/kernels/{kernel['id']}", method="DELETE")
    page.reload()
    page.wait_for_selector(".jp-NotebookPanel .jp-CodeCell", timeout=60_000)
    page.wait_for_function(KERNEL_READY_JS, timeout=60_000)


def _saved_widgets(path: Path) -> tuple[list[str], dict[str, Any]]:
    """The ids of the widget outputs in a saved notebook, and its saved widget state."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    view = "application/vnd.jupyter.widget-view+json"
    shown = [
        output["data"][view]["model_id"]
        for cell in nb.cells
        for output in cell.get("outputs", [])
        if view in output.get("data", {})
    ]
    saved = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    return shown, dict(saved.get("state", {}))


PROMPTS_JS = (
    "() => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent)"
)
# A cell has started once its prompt turns to [*], or (if the poll missed that) changed.
CELLS_STARTED_JS = f"""(before) => ({PROMPTS_JS})()
  .some((text, i) => text.includes('[*]') || text !== before[i])"""


def _run_all(page: Any) -> None:
    """Run every cell of the open notebook. The command acts on the notebook the shell holds as
    current; should it come before the notebook is, nothing starts (no prompt turns to [*]),
    so it is sent again, up to three times, rather than waiting a minute for cells that never
    ran. A cell that started is never sent twice: [*] shows the moment it is queued."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    before = page.evaluate(PROMPTS_JS)
    for _ in range(3):
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
        try:
            page.wait_for_function(CELLS_STARTED_JS, arg=before, timeout=10_000)
            return
        except PlaywrightTimeout:
            continue
    raise AssertionError(f"run-all started no cell; the page showed {page.evaluate(PAGE_STATE_JS)}")


def _show_runner(page: Any) -> None:
    """Run the notebook, fill the runner's variable and wait for its model list."""
    _run_all(page)
    page.wait_for_selector(".lmstream-runner .lmstream-var-name textarea", timeout=60_000)
    page.fill(".lmstream-runner .lmstream-var-name textarea", "World")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.lmstream-runner select option')]"
        ".some(o => o.textContent.includes('lmstream-sim-8b'))",
        timeout=30_000,
    )


@pytest.fixture(scope="module")
def browser_page(lab: tuple[str, str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    playwright_api = pytest.importorskip("playwright.sync_api")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with playwright_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
            viewport={"width": 1280, "height": 1000},
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def test_runner_streams_stops_and_keeps_html_as_text(
    lab: tuple[str, str, Path], browser_page: Any
) -> None:

    base, token, root = lab
    page = browser_page
    ARTIFACTS.mkdir(exist_ok=True)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    _write_runner_notebook(root / "runner.ipynb")
    try:
        page.goto(f"{base}/lab/tree/runner.ipynb?token={token}&reset")
        page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
        page.wait_for_function(KERNEL_READY_JS, timeout=60_000)
        _show_runner(page)
        page.evaluate(SAMPLER_JS)
        page.click(".lmstream-runner button:has-text('Run')")
        page.wait_for_function(
            "() => { const t = document.querySelector('.lmstream-runner .lmstream-text');"
            " return t && t.textContent.length > 40; }",
            timeout=30_000,
        )
        page.screenshot(path=str(ARTIFACTS / "runner-streaming.png"))
        page.wait_for_selector(".lmstream-runner .lmstream-view[data-state='done']", timeout=60_000)
        lengths = page.evaluate("window.__lengths")
        page.screenshot(path=str(ARTIFACTS / "runner-done.png"))
        grown = [n for n in lengths if n > 1]
        assert len(set(grown)) >= 3, lengths
        assert grown == sorted(grown), "the text only ever grows"
        text = page.inner_text(".lmstream-runner .lmstream-text")
        assert "<img src=x onerror=" in text
        assert "<script>" in text
        assert page.evaluate("document.querySelectorAll('.lmstream-view img').length") == 0
        assert page.evaluate("document.querySelectorAll('.lmstream-view script').length") == 0
        assert page.evaluate("window.__xss === undefined")
        assert dialogs == []

        page.click(".lmstream-runner button:has-text('Run')")
        page.wait_for_selector(
            ".lmstream-runner .lmstream-view[data-state='generating']", timeout=30_000
        )
        page.wait_for_function(
            "() => document.querySelector('.lmstream-runner .lmstream-text')"
            ".textContent.length > 20",
            timeout=30_000,
        )
        clicked = time.monotonic()
        page.click(".lmstream-runner button:has-text('Stop')")
        page.wait_for_selector(
            ".lmstream-runner .lmstream-view[data-state='cancelled']", timeout=10_000
        )
        assert time.monotonic() - clicked < 3.0
        status = page.inner_text(".lmstream-runner .lmstream-status")
        assert "cancelled" in status
        partial = page.inner_text(".lmstream-runner .lmstream-text")
        assert len(partial) > 20
        # A deliberate Stop is not shown like an error.
        assert not page.evaluate(ERROR_COLOR_JS, ".lmstream-runner .lmstream-status")
        assert not page.evaluate(ERROR_COLOR_JS, ".lmstream-runner .lmstream-message")
        assert "the text received is kept" in page.inner_text(".lmstream-runner .lmstream-message")
        # The line that says the run waits for its first token stands out (bold, marked).
        waiting = page.evaluate(
            "(() => { const v = document.querySelector('.lmstream-runner .lmstream-view');"
            " const s = v.querySelector('.lmstream-status'); const was = v.dataset.state;"
            " const quiet = getComputedStyle(s).fontWeight; v.dataset.state = 'processing';"
            " const style = getComputedStyle(s); const shown = [quiet, style.fontWeight,"
            " style.borderLeftStyle]; v.dataset.state = was; return shown; })()"
        )
        assert waiting == ["400", "600", "solid"], waiting
        page.screenshot(path=str(ARTIFACTS / "runner-cancelled.png"))
    finally:
        page.screenshot(path=str(ARTIFACTS / "runner-final.png"))


NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
#: Set to refresh the committed picture of the runner that notebook 02 shows.
UPDATE_PICTURE = os.environ.get("LMSTREAM_UPDATE_SCREENSHOTS") == "1"

ALL_CELLS_RAN_JS = """() => {
  const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')];
  return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
}"""

ERROR_COLOR_JS = """(selector) => {
  const probe = document.createElement('span');
  probe.style.color = 'var(--jp-error-color1)';
  document.body.appendChild(probe);
  const error = getComputedStyle(probe).color;
  probe.remove();
  return getComputedStyle(document.querySelector(selector)).color === error;
}"""


def _open(page: Any, base: str, token: str, name: str) -> None:
    page.goto(f"{base}/lab/tree/{name}?token={token}&reset")
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
    page.wait_for_function(KERNEL_READY_JS, timeout=60_000)


def _save(page: Any) -> None:
    page.evaluate("window.jupyterapp.commands.execute('docmanager:save')")
    page.wait_for_function(
        "() => !document.querySelector('.lm-TabBar-tab.jp-mod-dirty')", timeout=30_000
    )


def _wait_or_say(
    page: Any, name: str, *, selector: str = "", function: str = "", timeout_ms: int = 60_000
) -> None:
    """Wait for ``selector`` to show or ``function`` (JavaScript) to become true; if it never
    does, keep a screenshot and fail saying what the page showed instead (the cells'
    prompts, the kernel's state, the views' states, the notebook's text), for failures seen
    once in a full run and not reproduced alone."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        if function:
            page.wait_for_function(function, timeout=timeout_ms)
        else:
            page.wait_for_selector(selector, timeout=timeout_ms)
    except PlaywrightTimeout:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
        seen = page.evaluate(PAGE_STATE_JS)
        text = page.inner_text(".jp-NotebookPanel")[-1500:]
        raise AssertionError(
            f"{name}: what was waited for never came in {timeout_ms / 1000:g} s; the page "
            f"showed {seen}; the notebook ends with: {text}"
        ) from None


PAGE_STATE_JS = """() => ({
  prompts: [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent),
  kernel: (document.querySelector('.jp-Notebook-ExecutionIndicator') || {dataset: {}})
    .dataset.status || null,
  kernelName: (document.querySelector('[data-jp-item-name="kernelName"]') || {}).textContent,
  current: (window.jupyterapp.shell.currentWidget || {}).title?.label || null,
  views: [...document.querySelectorAll('.lmstream-view')].map(e => e.dataset.state),
})"""


def _visible_texts(page: Any, selector: str) -> list[str]:
    texts: list[str] = page.evaluate(
        f"[...document.querySelectorAll({selector!r})]"
        ".filter(e => e.offsetParent !== null).map(e => e.textContent)"
    )
    return texts


def test_a_saved_notebook_shows_every_run_without_its_kernel(
    lab: tuple[str, str, Path], browser_page: Any
) -> None:
    """Notebook 01 as committed, opened in a new session: its views' kernel is gone, and every
    %%lmstream cell still shows its status line and its answer, wrapped at words."""
    base, token, root = lab
    page = browser_page.context.new_page()  # its own tab: the others may hold unsaved work
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(NOTEBOOKS / "01-quickstart.ipynb", root / "quickstart.ipynb")
    try:
        _open(page, base, token, "quickstart.ipynb")
        # Trusted, as a notebook its user saved is: every renderer is used, widgets included.
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:trust'); }")
        page.click(".jp-Dialog button.jp-mod-accept", timeout=30_000)
        page.wait_for_selector(".jp-Dialog", state="detached", timeout=30_000)
        page.wait_for_selector(".lmstream-final", timeout=30_000)
        body = page.inner_text(".jp-NotebookPanel")
        assert "model not found" not in body
        assert "Error displaying widget" not in body
        statuses = _visible_texts(page, ".lmstream-final-status")
        assert len(statuses) == 4, statuses  # the long prompt's run included
        assert all(s.startswith("done · ") and " tok/s · run #" in s for s in statuses)
        answers = _visible_texts(page, ".lmstream-answer")
        assert len(answers) == 4
        assert answers[0].startswith("The warm notebook watches the old baker")
        wrap = page.evaluate(
            "(() => { const s = getComputedStyle(document.querySelector('.lmstream-answer'));"
            " return [s.whiteSpace, s.wordBreak]; })()"
        )
        assert wrap == ["pre-wrap", "normal"], "line breaks kept, words not broken"
        page.screenshot(path=str(ARTIFACTS / "quickstart-reopened.png"), full_page=True)
    finally:
        page.screenshot(path=str(ARTIFACTS / "quickstart-final.png"))
        page.close(run_before_unload=False)


COMMITTED = sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb"))


@pytest.mark.parametrize("name", COMMITTED)
def test_every_committed_notebook_renders_without_its_kernel(
    lab: tuple[str, str, Path], browser_page: Any, name: str
) -> None:
    """Opened trusted (as its author's own notebook is) and with no kernel, each committed
    notebook renders every output, widgets from their saved state, none as "model not found"."""
    base, token, root = lab
    cells = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text(encoding="utf-8"))["cells"]
    with_outputs = sum(1 for cell in cells if cell.get("outputs"))
    page = browser_page.context.new_page()
    shutil.copy(NOTEBOOKS / f"{name}.ipynb", root / f"reopened-{name}.ipynb")
    shutil.copytree(NOTEBOOKS / "images", root / "images", dirs_exist_ok=True)
    try:
        _open(page, base, token, f"reopened-{name}.ipynb")
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:trust'); }")
        page.click(".jp-Dialog button.jp-mod-accept", timeout=30_000)
        page.wait_for_selector(".jp-Dialog", state="detached", timeout=30_000)
        page.wait_for_function(
            "n => document.querySelectorAll('.jp-NotebookPanel .jp-OutputArea-output').length >= n",
            arg=with_outputs,
            timeout=30_000,
        )
        page.wait_for_function(  # widgets are restored from the notebook's saved state
            "() => !document.querySelector('.jp-NotebookPanel').textContent"
            ".includes('Loading widget')",
            timeout=30_000,
        )
        _assert_no_widget_error(page)
    finally:
        page.close(run_before_unload=False)


def test_notebook_02_shows_the_runner_saved_and_live(
    lab: tuple[str, str, Path], browser_page: Any
) -> None:
    """Notebook 02 as committed shows a picture of the runner and its last run's snapshot;
    run, it shows the live runner (snapshot hidden), whose text survives a page reload."""
    base, token, root = lab
    page = browser_page.context.new_page()  # its own tab: the others may hold unsaved work
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(NOTEBOOKS / "02-prompt-runner.ipynb", root / "runner02.ipynb")
    shutil.copytree(NOTEBOOKS / "images", root / "images", dirs_exist_ok=True)
    try:
        _open(page, base, token, "runner02.ipynb")
        # -- as saved: the snapshot stands in for the runner, which needs its kernel ----------
        page.wait_for_selector(".lmstream-snapshot", timeout=30_000)
        [snapshot] = _visible_texts(page, ".lmstream-snapshot")
        assert snapshot.startswith("done · haiku@2 · lmstream-sim-8b · first token")
        assert "Again, every model follows Ada" in snapshot
        assert page.evaluate("document.querySelectorAll('.lmstream-runner').length") == 0
        errors = page.inner_text(".jp-NotebookPanel")
        assert "type such a value in Max tokens, or leave it empty" in errors
        assert "run #1" in errors

        # -- live: run every cell --------------------------------------------------------------
        _run_all(page)
        _wait_or_say(
            page, "runner02-stuck", selector=".lmstream-runner .lmstream-view[data-state='done']"
        )
        _wait_or_say(page, "notebook02-cells-stuck", function=ALL_CELLS_RAN_JS)
        page.wait_for_function(KERNEL_READY_JS, timeout=60_000)
        assert _visible_texts(page, ".lmstream-snapshot") == [], "hidden while the runner lives"
        page.click(".lmstream-runner .jupyter-widget-Collapse-header:has-text('Edit template')")
        page.click(".lmstream-runner .jupyter-widget-Collapse-header:has-text('History')")
        page.wait_for_selector(".lmstream-runner .lmstream-history select option", timeout=10_000)
        page.select_option(".lmstream-runner .lmstream-history select", index=1)
        page.wait_for_selector(".lmstream-runner .lmstream-history-text", timeout=10_000)
        save = page.locator(".lmstream-runner button:has-text('Save as new version')")
        assert save.evaluate("b => b.scrollWidth <= b.clientWidth"), "the label is not cut off"
        font = page.evaluate(
            "getComputedStyle(document.querySelector('.lmstream-history select')).fontFamily"
        )
        assert "mono" in font.lower(), font
        runner = page.locator(".lmstream-runner")
        runner.screenshot(path=str(ARTIFACTS / "prompt-runner.png"))
        if UPDATE_PICTURE:
            for folder in (NOTEBOOKS / "images", root / "images"):
                shutil.copy(ARTIFACTS / "prompt-runner.png", folder / "prompt-runner.png")
        text = page.inner_text(".lmstream-runner .lmstream-text")
        assert text.startswith("Again, every model follows Ada")

        # -- saved, a reload keeps the last run's text (the kernel and its widgets live on) ------
        _save(page)
        page.reload()
        page.wait_for_selector(".jp-NotebookPanel .jp-CodeCell", timeout=60_000)
        page.wait_for_selector(
            ".lmstream-runner .lmstream-view[data-state='done']", state="attached", timeout=60_000
        )
        page.wait_for_function(
            "(t) => document.querySelector('.lmstream-runner .lmstream-text').innerText === t",
            arg=text,
            timeout=30_000,
        )
        status = page.inner_text(".lmstream-runner .lmstream-status")
        assert status.startswith("done · haiku@2"), status
        assert _visible_texts(page, ".lmstream-snapshot") == []

        # -- reopened after its kernel is gone: the snapshot shows the last run ----------------
        _reopen_without_its_kernel(page, base, token)
        page.wait_for_selector(".lmstream-snapshot", timeout=30_000)
        [snapshot] = _visible_texts(page, ".lmstream-snapshot")
        assert snapshot.startswith(status), "the status line the live runner showed"
        assert text in snapshot
        page.screenshot(path=str(ARTIFACTS / "runner02-reopened.png"))
        # The picture of the runner in the notebook's introduction is there and loads.
        page.wait_for_function(
            "() => { const i = document.querySelector('img[src*=\"prompt-runner\"]');"
            " return i && i.complete && i.naturalWidth > 0; }",
            timeout=30_000,
        )
        page.screenshot(path=str(ARTIFACTS / "runner02-reloaded.png"))
    finally:
        page.screenshot(path=str(ARTIFACTS / "runner02-final.png"))
        page.close(run_before_unload=False)


def test_a_runner_its_user_saved_reopens_without_its_kernel(
    lab: tuple[str, str, Path], browser_page: Any
) -> None:
    """What a user does: run the cell, use the runner, save (JupyterLab's default: no widget
    state saved), close. Reopened with the kernel gone, the cell shows a note in the runner's
    place and the snapshot of its last run (status line and text), never "model not found"."""
    base, token, root = lab
    page = browser_page.context.new_page()
    ARTIFACTS.mkdir(exist_ok=True)
    _write_runner_notebook(root / "saved-runner.ipynb")
    try:
        _open(page, base, token, "saved-runner.ipynb")
        _show_runner(page)
        page.click(".lmstream-runner button:has-text('Run')")
        page.wait_for_selector(".lmstream-runner .lmstream-view[data-state='done']", timeout=60_000)
        page.wait_for_function(KERNEL_READY_JS, timeout=60_000)
        status = page.inner_text(".lmstream-runner .lmstream-status")
        text = page.inner_text(".lmstream-runner .lmstream-text")
        assert status.startswith("done · greet@1 · lmstream-sim-8b · first token"), status
        page.wait_for_function(  # the snapshot follows the run, hidden while the runner is shown
            "() => { const s = document.querySelector('.lmstream-snapshot');"
            " return s && s.textContent.includes('run #') && s.offsetParent === null; }",
            timeout=30_000,
        )
        assert (
            page.evaluate(
                "window.jupyterapp.commands.isToggled("
                "'@jupyter-widgets/jupyterlab-manager:saveWidgetState')"
            )
            is False
        ), "JupyterLab's default: widget state is not saved"
        _save(page)

        _reopen_without_its_kernel(page, base, token)
        page.wait_for_selector(".lmstream-snapshot", timeout=30_000)
        page.wait_for_function(  # the widget manager has looked for the runner's model
            "() => { const t = document.querySelector('.jp-NotebookPanel').textContent;"
            " return !t.includes('Loading widget') && (t.includes('needs its kernel')"
            " || t.includes('Error displaying widget')); }",
            timeout=30_000,
        )
        _assert_no_widget_error(page)
        assert "needs its kernel" in page.inner_text(".lmstream-runner-stand-in")
        [snapshot] = _visible_texts(page, ".lmstream-snapshot")
        assert snapshot.startswith(status), "the status line the live runner showed"
        assert text in snapshot
        page.screenshot(path=str(ARTIFACTS / "saved-runner-reopened.png"))

        # In the file: the stand-in is the only widget state saved.
        [runner_id], state = _saved_widgets(root / "saved-runner.ipynb")
        assert list(state) == [runner_id], "only the stand-in, nothing else saved"
        assert state[runner_id]["model_name"] == "HTMLModel"

        # Run again in the new kernel and save: the new runner's stand-in replaces the old one.
        _run_all(page)
        page.wait_for_selector(".lmstream-runner .lmstream-var-name textarea", timeout=60_000)
        page.wait_for_function(KERNEL_READY_JS, timeout=60_000)
        _save(page)
        [again], state = _saved_widgets(root / "saved-runner.ipynb")
        assert again != runner_id
        assert list(state) == [again]
    finally:
        page.screenshot(path=str(ARTIFACTS / "saved-runner-final.png"))
        page.close(run_before_unload=False)


SAVE_WIDGET_STATE = "@jupyter-widgets/jupyterlab-manager:saveWidgetState"


def _set_save_widget_state(page: Any, on: bool) -> None:
    if page.evaluate(f"window.jupyterapp.commands.isToggled({SAVE_WIDGET_STATE!r})") != on:
        page.evaluate(f"window.jupyterapp.commands.execute({SAVE_WIDGET_STATE!r})")
        page.wait_for_function(
            f"on => window.jupyterapp.commands.isToggled({SAVE_WIDGET_STATE!r}) === on",
            arg=on,
            timeout=10_000,
        )


def test_a_runner_saved_with_its_widget_state_is_left_as_saved(
    lab: tuple[str, str, Path], browser_page: Any
) -> None:
    """With Save Widget State Automatically on, JupyterLab saves the whole runner and the
    stand-in stays out: reopened without its kernel, the runner is drawn as it was."""
    base, token, root = lab
    page = browser_page.context.new_page()
    _write_runner_notebook(root / "state-runner.ipynb")
    try:
        _open(page, base, token, "state-runner.ipynb")
        _set_save_widget_state(page, True)
        _show_runner(page)
        page.click(".lmstream-runner button:has-text('Run')")
        page.wait_for_selector(".lmstream-runner .lmstream-view[data-state='done']", timeout=60_000)
        page.wait_for_function(KERNEL_READY_JS, timeout=60_000)
        text = page.inner_text(".lmstream-runner .lmstream-text")
        _save(page)
        [runner_id], state = _saved_widgets(root / "state-runner.ipynb")
        assert state[runner_id]["model_name"] == "VBoxModel", "the runner itself, not a stand-in"
        assert len(state) > 50, "all its widgets"

        _reopen_without_its_kernel(page, base, token)
        page.wait_for_selector(".lmstream-runner .lmstream-text", timeout=30_000)
        _assert_no_widget_error(page)
        assert page.inner_text(".lmstream-runner .lmstream-text") == text
        assert _visible_texts(page, ".lmstream-snapshot") == [], "the runner stands for itself"
    finally:
        _set_save_widget_state(page, False)
        page.close(run_before_unload=False)


BATCH_CELL = """
from lmstream_nb import Prompt, run_many, simulator
pace = simulator.Scenario(output_tokens=30, gen_tps=60)
sim = simulator.serve(profile="test-fast", defaults=pace)
rows = [{"name": str(i)} for i in range(6)]
batch = run_many(Prompt("Say hello to {{name}}."), rows, base_url=sim.base_url, concurrency=2)
"""


def test_a_batch_its_user_saved_keeps_its_progress_line(
    lab: tuple[str, str, Path], browser_page: Any
) -> None:
    """run_many's progress in a notebook is an ordinary output: saved (widget state off) and
    reopened with the kernel gone, it shows the batch as it ended, not a widget error."""
    import nbformat

    base, token, root = lab
    page = browser_page.context.new_page()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    nb.cells = [nbformat.v4.new_code_cell(BATCH_CELL.strip())]
    nbformat.write(nb, str(root / "batch.ipynb"))
    try:
        _open(page, base, token, "batch.ipynb")
        _run_all(page)
        _wait_or_say(page, "batch-cells-stuck", function=ALL_CELLS_RAN_JS)
        page.wait_for_function(KERNEL_READY_JS, timeout=60_000)
        page.wait_for_selector(".lmstream-progress[data-state='done']", timeout=30_000)
        _save(page)
        _reopen_without_its_kernel(page, base, token)
        page.wait_for_selector(".lmstream-progress", timeout=30_000)
        _assert_no_widget_error(page)
        [line] = _visible_texts(page, ".lmstream-progress")
        assert line.startswith("lmstream batch: 6/6 rows (100%)"), line
        assert "ok=6, failed=0" in line
        page.screenshot(path=str(ARTIFACTS / "batch-reopened.png"))
    finally:
        page.close(run_before_unload=False)


PROGRESS_CELLS = [
    "%load_ext lmstream_nb\n%lmstream sim start test-fast",
    "%%lmstream\n"
    '[[sim {"prefill_tps": 1000, "batch_size": 100, "output_tokens": 30, "gen_tps": 30}]] '
    + "p"
    * 20000,
]

PROGRESS_SAMPLER_JS = """() => {
  window.__bars = [];
  window.__barSampler = setInterval(() => {
    const view = document.querySelector('.lmstream-view');
    if (!view) return;
    const bar = view.querySelector('.lmstream-progress');
    const text = view.querySelector('.lmstream-text');
    window.__bars.push({
      shown: !!bar && !bar.hidden,
      fraction: Number(view.dataset.progress || 0),
      facts: bar ? bar.textContent : '',
      status: (view.querySelector('.lmstream-status') || {}).textContent || '',
      text: text && text.firstChild ? text.firstChild.length || 0 : 0,
    });
  }, 50);
}"""


def test_the_view_shows_a_moving_progress_bar_then_the_text(
    lab: tuple[str, str, Path], browser_page: Any
) -> None:
    """A long prompt on LM Studio's native chat: the bar moves while the prompt is processed,
    then the text replaces it."""
    import nbformat

    base, token, root = lab
    page = browser_page.context.new_page()
    ARTIFACTS.mkdir(exist_ok=True)
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    nb.cells = [nbformat.v4.new_code_cell(source) for source in PROGRESS_CELLS]
    nbformat.write(nb, str(root / "progress.ipynb"))
    try:
        _open(page, base, token, "progress.ipynb")
        page.evaluate(PROGRESS_SAMPLER_JS)
        # Not awaited: the command's promise settles only when every cell has run.
        _run_all(page)
        page.wait_for_function(
            "() => window.__bars.some((b) => b.shown && b.fraction > 0.3)",
            timeout=60_000,
            polling=100,
        )
        # What a user sees while a long prompt is processed (the docs show this image). On a
        # busy machine the text may have replaced the bar by now: the picture is then skipped.
        with contextlib.suppress(Exception):  # playwright's TimeoutError
            page.locator(".lmstream-view:has(.lmstream-progress:visible)").first.screenshot(
                path=str(ARTIFACTS / "view-progress.png"), timeout=2_000
            )
        page.wait_for_selector(".lmstream-final", timeout=60_000)
        bars = page.evaluate(
            "(() => { clearInterval(window.__barSampler); return window.__bars; })()"
        )
    finally:
        page.close(run_before_unload=False)
    shown = [b for b in bars if b["shown"]]
    assert len({b["fraction"] for b in shown}) >= 2, "the bar moved"
    assert all(b["text"] == 0 for b in shown), "the bar comes before the text"
    assert shown[0]["status"].startswith("processing prompt · "), "the line names the phase"
    assert all(b["facts"].split(" · ")[0].endswith("%") for b in shown), "the bar its facts"
    assert "left" in " ".join(b["facts"] for b in shown)
    later = [b for b in bars[bars.index(shown[-1]) + 1 :] if b["text"]]
    assert later, "then the text"
    assert not any(b["shown"] for b in later), "the text replaced the bar"
