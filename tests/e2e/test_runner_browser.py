"""The PromptRunner in a real JupyterLab, in headless Chromium driven by Playwright.

The test starts JupyterLab on a free loopback port with every Jupyter directory in a temporary
folder, opens a notebook whose kernel starts the simulator and shows a runner, types a
variable, clicks Run and watches the text grow, runs again and clicks Stop, and checks that
HTML in the model's answer stays text. Screenshots go to ``test-artifacts/``. Debian's
``chromium`` is used (Playwright cannot download its own browser here); without it the test is
skipped with that reason.
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
    import nbformat

    base, token, root = lab
    page = browser_page
    ARTIFACTS.mkdir(exist_ok=True)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = [nbformat.v4.new_code_cell(NOTEBOOK_CELL.strip())]
    nbformat.write(nb, str(root / "runner.ipynb"))
    try:
        page.goto(f"{base}/lab/tree/runner.ipynb?token={token}&reset")
        page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
        page.wait_for_function(KERNEL_READY_JS, timeout=60_000)
        page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        page.wait_for_selector(".lmstream-runner .lmstream-var-name textarea", timeout=60_000)
        page.fill(".lmstream-runner .lmstream-var-name textarea", "World")
        page.wait_for_function(
            "() => [...document.querySelectorAll('.lmstream-runner select option')]"
            ".some(o => o.textContent.includes('lmstream-sim-8b'))",
            timeout=30_000,
        )
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
        page.screenshot(path=str(ARTIFACTS / "runner-cancelled.png"))
    finally:
        page.screenshot(path=str(ARTIFACTS / "runner-final.png"))
