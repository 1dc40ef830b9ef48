"""The ``lmstream serve`` page in headless Chromium: run, reconnect mid-stream, escape, stop.

The simulator and the service run in threads of the test process on free loopback ports, with
a token, so the page must pass it (``?token=`` in its own address, a bearer header on fetch, the
query on the EventSource URL). Chromium (Debian's, driven by Playwright) loads the page, picks a
prompt, fills its variables and clicks Run. Once text has arrived the server drops the event
stream (``ServeHandle.drop_listeners``); the browser's EventSource reconnects with
``Last-Event-ID`` and the page must end with exactly the text the run recorded: nothing lost,
nothing twice. A second prompt whose answer is HTML checks that the page shows it as text, and
a third run checks Stop. Screenshots go to ``test-artifacts/``. Without Chromium or Playwright
the test is skipped with that reason.
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from waiting import wait_until

from lmstream_nb import PromptStore, simulator

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
MODEL = "lmstream-sim-8b"
TOKEN = secrets.token_hex(8)
# The simulator streams this answer verbatim for the "html" prompt ([[sim …]] marker).
HTML_REPLY = (
    "Look: <img src=x onerror='window.__xss=1'> and <script>window.__xss=2</script>"
    " <b>bold?</b> & done."
)

# Records every state the status line takes, so the test can check the sequence afterwards.
PHASES_JS = """() => {
  window.__phases = [];
  const status = document.getElementById('status');
  const note = () => {
    const phase = status.dataset.state;
    if (window.__phases[window.__phases.length - 1] !== phase) window.__phases.push(phase);
  };
  note();
  new MutationObserver(note).observe(status, {attributes: true, attributeFilter: ['data-state']});
}"""


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any, PromptStore]]:
    serve_module = pytest.importorskip("lmstream_nb.serve")
    store = PromptStore(tmp_path_factory.mktemp("serve-home") / "lmstream.db")
    # About 1 s of prompt processing (the template is ~50 characters, 4 per token), then 60
    # tokens at 12 tokens/s: 5 s of steady text, time enough to drop the connection mid-way.
    store.save("greet", "Write a short note to {{name}} about {{topic}}.", model=MODEL)
    store.save(
        "html",
        '[[sim {"reply": "' + HTML_REPLY + '", "output_tokens": null, '
        '"gen_tps": 100, "prefill_tps": 100000}]] Repeat after me: {{what}}',
        model=MODEL,
    )
    # About 3 s of prompt processing, reported in batches of 200 tokens, then a short answer.
    store.save(
        "long",
        '[[sim {"prefill_tps": 1200, "batch_size": 200, "gen_tps": 200, "output_tokens": 20}]] '
        + "Read all of this. " * 650
        + "{{what}}",
        model=MODEL,
    )
    defaults = simulator.Scenario(prefill_tps=12, gen_tps=12, output_tokens=60, jitter=0)
    with (
        simulator.serve(profile="test-fast", seed=7, defaults=defaults) as sim,
        serve_module.serve(store=store, base_url=sim.base_url, token=TOKEN) as handle,
    ):
        yield sim, handle, store


@pytest.fixture(scope="module")
def page(service: tuple[Any, Any, PromptStore]) -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(
            "Debian's chromium is not installed (apt-get install chromium); .ci/run installs it"
        )
    playwright_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')"
    )
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            context = browser.new_context(viewport={"width": 1100, "height": 900})
            yield context.new_page()
        finally:
            browser.close()


def _recorded(store: PromptStore, run_id: int, timeout: float = 10.0) -> Any:
    """The run's row once the server has completed it (the row is written on the server's
    loop, which offers this test no event to wait on)."""
    return wait_until(
        lambda: (record := store.get_run(run_id)).status != "unfinished" and record,
        timeout=timeout,
        what=f"run {run_id} is recorded as ended",
    )


def test_page_runs_reconnects_escapes_and_stops(
    service: tuple[Any, Any, PromptStore], page: Any
) -> None:
    sim, handle, store = service
    ARTIFACTS.mkdir(exist_ok=True)
    dialogs: list[str] = []

    def note_dialog(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", note_dialog)
    event_requests: list[Any] = []

    def note_request(request: Any) -> None:
        if "/events" in request.url:
            event_requests.append(request)

    page.on("request", note_request)
    failed: list[str] = []
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    try:
        page.goto(f"{handle.url}/?token={TOKEN}")
        page.wait_for_selector("#prompt option[value='greet']", state="attached", timeout=10_000)
        page.select_option("#prompt", "greet")
        page.wait_for_selector("[data-testid='var-topic']", timeout=10_000)
        page.wait_for_selector(f"#model option[value='{MODEL}']", state="attached", timeout=10_000)
        page.fill("[data-testid='var-name']", "Ada")
        page.fill("[data-testid='var-topic']", "rivers & <bridges>")
        page.evaluate(PHASES_JS)

        # -- run, let text arrive, drop the connection, watch it resume --------------------
        page.click("#run")
        page.wait_for_function("() => window.lmstream.runId !== null", timeout=10_000)
        run_id = page.evaluate("window.lmstream.runId")
        page.wait_for_function("() => window.lmstream.text.length > 30", timeout=15_000)
        page.screenshot(path=str(ARTIFACTS / "serve-page-streaming.png"))
        before = page.evaluate("window.lmstream.text")
        assert handle.drop_listeners(run_id) == 1
        page.wait_for_function("() => window.lmstream.reconnects >= 1", timeout=15_000)
        page.wait_for_selector("#status[data-state='done']", timeout=20_000)
        page.screenshot(path=str(ARTIFACTS / "serve-page-done.png"))

        shown = page.evaluate("document.getElementById('output').textContent")
        text = page.evaluate("window.lmstream.text")
        counters = page.evaluate(
            "({resynced: window.lmstream.resynced, opens: window.lmstream.opens})"
        )
        record = _recorded(store, run_id)
        assert record.status == "ok", record.error
        assert text == record.text, "the page got exactly the recorded text"
        assert shown == record.text
        assert len(before) < len(record.text), "the drop happened mid-stream"
        assert record.text.startswith(before)
        assert counters == {"resynced": False, "opens": 2}, counters
        # The simulator saw one chat request: reconnecting replays the run, it doesn't re-run it.
        assert len(sim.chats()) == 1
        # Both EventSource requests carried the token; the second resumed with Last-Event-ID.
        assert len(event_requests) == 2, [r.url for r in event_requests]
        assert all(f"token={TOKEN}" in r.url for r in event_requests)
        assert "last-event-id" not in event_requests[0].all_headers()
        assert event_requests[1].all_headers().get("last-event-id")
        phases = page.evaluate("window.__phases")
        for earlier, later in [
            ("waiting", "streaming"),
            ("streaming", "reconnecting"),
            ("reconnecting", "done"),
        ]:
            assert earlier in phases, phases
            assert later in phases, phases
            assert phases.index(earlier) < len(phases) - 1 - phases[::-1].index(later), phases
        stats = page.inner_text("#stats")
        assert "60 tokens" in stats, stats
        assert f"run #{run_id}" in stats, stats
        assert "Done" in page.inner_text("#status")
        assert failed == [], "no request of the page failed"

        # -- HTML in the answer stays text ----------------------------------------------------
        page.select_option("#prompt", "html")
        page.wait_for_selector("[data-testid='var-what']", timeout=10_000)
        page.fill("[data-testid='var-what']", "<i>hi</i>")
        page.click("#run")
        page.wait_for_function("() => window.lmstream.runId !== null", timeout=10_000)
        html_run = page.evaluate("window.lmstream.runId")
        page.wait_for_selector("#status[data-state='done']", timeout=15_000)
        assert page.evaluate("window.lmstream.text") == _recorded(store, html_run).text
        assert page.evaluate("document.getElementById('output').textContent") == HTML_REPLY
        assert page.evaluate("document.querySelectorAll('#output *').length") == 0
        assert page.evaluate("document.images.length + document.scripts.length") == 1
        assert page.evaluate("window.__xss === undefined")
        assert dialogs == []
        page.screenshot(path=str(ARTIFACTS / "serve-page-html.png"))

        # -- Stop ends the run promptly and keeps the partial text ----------------------------
        page.select_option("#prompt", "greet")
        page.wait_for_selector("[data-testid='var-topic']", timeout=10_000)
        assert page.input_value("[data-testid='var-name']") == "Ada"  # values are kept
        page.click("#run")
        page.wait_for_function("() => window.lmstream.text.length > 10", timeout=15_000)
        stop_run = page.evaluate("window.lmstream.runId")
        clicked = time.monotonic()
        page.click("#stop")
        page.wait_for_selector("#status[data-state='cancelled']", timeout=10_000)
        assert time.monotonic() - clicked < 3.0
        assert _recorded(store, stop_run).status == "cancelled"
        assert len(page.evaluate("window.lmstream.text")) > 10
        assert page.is_enabled("#run")
        assert not page.is_enabled("#stop")

        # -- a reconnect the server refuses: the page shows the run's record instead ----------
        opened: list[str] = []

        def refuse_reconnects(route: Any) -> None:
            opened.append(route.request.url)
            if len(opened) == 1:
                route.continue_()
            else:
                route.fulfill(status=503, body="")

        page.route(lambda url: "/events" in url, refuse_reconnects)
        page.click("#run")
        page.wait_for_function("() => window.lmstream.text.length > 10", timeout=15_000)
        lost_run = page.evaluate("window.lmstream.runId")
        assert handle.drop_listeners(lost_run) == 1
        page.wait_for_selector(
            "#status:is([data-state='error'], [data-state='done'])", timeout=15_000
        )
        status = page.inner_text("#status")
        if page.get_attribute("#status", "data-state") == "error":  # the run was still going
            assert f"Lost the event stream; run #{lost_run} goes on" in status, status
        else:  # it had ended by the time the browser tried again: the recorded text is shown
            assert page.evaluate("window.lmstream.text") == _recorded(store, lost_run).text
        assert len(opened) == 2  # the browser tried once more, then gave up
        assert page.evaluate("window.lmstream.source") is None
        page.unroute_all()
    finally:
        page.screenshot(path=str(ARTIFACTS / "serve-page-final.png"))
        page.emulate_media(color_scheme="dark")
        page.screenshot(path=str(ARTIFACTS / "serve-page-dark.png"))


def test_the_page_shows_a_moving_progress_bar_before_the_text(
    service: tuple[Any, Any, PromptStore], page: Any
) -> None:
    _, handle, store = service
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(f"{handle.url}/?token={TOKEN}")
    page.wait_for_selector("#prompt option[value='long']", state="attached", timeout=10_000)
    page.select_option("#prompt", "long")
    page.wait_for_selector("[data-testid='var-what']", timeout=10_000)
    page.fill("[data-testid='var-what']", "then answer")
    page.click("#run")
    page.wait_for_function(
        "() => window.lmstream.progress.filter((f) => f > 0).length >= 2", timeout=15_000
    )
    run_id = page.evaluate("window.lmstream.runId")
    assert page.is_visible("#progress")
    assert page.evaluate("window.lmstream.text") == "", "the bar comes before the text"
    shown = page.inner_text("#progress-text")
    assert shown.startswith("processing prompt: ")
    assert "%" in shown
    value = float(page.get_attribute("#progress-bar", "value") or "0")
    assert 0 < value <= 1
    page.screenshot(path=str(ARTIFACTS / "serve-page-progress.png"))
    page.wait_for_selector("#status[data-state='done']", timeout=20_000)
    fractions = page.evaluate("window.lmstream.progress")
    assert fractions == sorted(fractions)
    assert len(set(fractions)) >= 2, "the bar moved"
    assert not page.is_visible("#progress"), "the text replaced the bar"
    assert page.evaluate("window.lmstream.text") == _recorded(store, run_id).text


def test_the_page_fills_a_bar_against_an_estimate_where_the_server_reports_nothing(
    page: Any, tmp_path: Path
) -> None:
    """LM Studio 0.3 says nothing while it processes the prompt; five earlier runs of the
    model there let the page fill its bar against the expected wait, saying it is an estimate."""
    serve_module = pytest.importorskip("lmstream_nb.serve")
    from lmstream_nb import Prompt, run

    defaults = simulator.Scenario(prefill_tps=1000, gen_tps=200, output_tokens=20, jitter=0)
    with (
        simulator.serve(profile="test-fast", defaults=defaults, native_api=False) as silent,
        PromptStore(tmp_path / "silent.db") as store,
    ):
        for chars in (400, 1000, 1600, 2200, 3000):
            run(Prompt("q" * chars, model=MODEL), store=store, base_url=silent.base_url)
        store.save("wait", "q" * 10000, model=MODEL)  # 2,500 tokens: about 2.5 s
        with serve_module.serve(store=store, base_url=silent.base_url, token=TOKEN) as handle:
            page.goto(f"{handle.url}/?token={TOKEN}")
            page.wait_for_selector("#prompt option[value='wait']", state="attached", timeout=10_000)
            page.select_option("#prompt", "wait")
            page.click("#run")
            page.wait_for_function(
                "() => new Set(window.lmstream.progress.filter((f) => f > 0)).size >= 3",
                timeout=15_000,
            )
            assert page.evaluate("window.lmstream.text") == "", "the bar comes before the text"
            shown = page.inner_text("#progress-text")
            assert shown.startswith("processing prompt (estimate): ")
            assert shown.endswith("estimated from 5 earlier runs")
            assert page.get_attribute("#progress", "data-phase") == "estimate"
            page.screenshot(path=str(ARTIFACTS / "serve-page-estimate.png"))
            page.wait_for_selector("#status[data-state='done']", timeout=20_000)
            fractions = page.evaluate("window.lmstream.progress")
            assert fractions == sorted(fractions)
            assert max(fractions) < 1, "an estimate never fills the bar"
            assert not page.is_visible("#progress"), "the text replaced the bar"
