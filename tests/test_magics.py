"""%%lmstream and %lmstream in a real kernel (jupyter_client), against in-test simulators."""

from __future__ import annotations

import ast
import datetime as dt
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from notebook_kernel import Kernel, running_kernel

from lmstream_nb import PromptStore, simulator
from lmstream_nb._prompt_fields import RULES

html_escape = __import__("html").escape

pytestmark = pytest.mark.timeout(120)

HTML_REPLY = 'Look: <script>alert("x")</script> and <img src=x onerror="alert(1)"> **bold**'


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kernel-home")


@pytest.fixture(scope="module")
def msim() -> Iterator[simulator.SimServer]:
    with simulator.serve(profile="test-fast", seed=3) as server:
        yield server


@pytest.fixture(scope="module")
def kernel(home: Path, msim: simulator.SimServer) -> Iterator[Kernel]:
    env = {**os.environ, "LMSTREAM_HOME": str(home), "LMSTREAM_BASE_URL": msim.base_url}
    with running_kernel(env) as k:
        cell = k.execute("%load_ext lmstream_nb")
        assert cell.status == "ok", cell.error()
        yield k


def answer_of(kernel: Kernel, cell: object) -> str:
    [text] = cell.plain()[:1]  # type: ignore[attr-defined]
    return str(text)


def test_plain_run_streams_deltas_and_leaves_the_answer(kernel: Kernel) -> None:
    cell = kernel.execute("%%lmstream --max-tokens 30\nTell me about rivers.")
    assert cell.status == "ok", cell.error()
    [widget] = cell.widget_ids()
    answer = answer_of(kernel, cell)
    deltas = kernel.deltas(widget)
    assert len(deltas) >= 1
    assert "".join(deltas) == answer
    assert len(answer.split()) >= 20
    assert cell.result() is None, "no RunResult repr repeats the status line"
    state = kernel.widget_state(widget)
    assert state["status"]["state"] == "done"
    assert state["show_text"] is False
    # The view is replaced by its final status line: a saved notebook needs no kernel for it.
    [final] = cell.finals()
    assert "application/vnd.jupyter.widget-view+json" in final["replaces"]
    assert "application/vnd.jupyter.widget-view+json" not in final
    line = final["text/plain"]
    assert line == "lmstream: " + state["status"]["line"]
    assert line.startswith("lmstream: done")
    assert "lmstream-sim-8b" in line
    assert "30 tokens" in line
    assert "tok/s" in line
    assert "first token " in line
    assert html_escape(state["status"]["line"]) in final["text/html"]
    [answer_bundle] = [d for d in cell.displays() if d.get("text/plain") == answer]
    assert "<pre" not in answer_bundle["text/html"], "wrapped at words, not inside them"
    assert "word-break: normal" in answer_bundle["text/html"]


def test_the_status_line_shows_the_recorded_first_token(kernel: Kernel, home: Path) -> None:
    """Live and recorded figures come from one clock: what stays on screen is in the history."""
    slow_prefill = simulator.Scenario(prefill_tps=400, output_tokens=5)
    with simulator.serve(profile="test-fast", defaults=slow_prefill) as slow:
        cell = kernel.execute(f"%%lmstream --base-url {slow.base_url}\n{'w ' * 40}")
    assert cell.status == "ok", cell.error()
    [widget] = cell.widget_ids()
    live_ttft = next(
        m["content"]["data"]["content"]["s"]["ttft"]
        for m in kernel.comm_msgs[widget]
        if m["content"].get("data", {}).get("method") == "custom"
        and "ttft" in m["content"]["data"]["content"].get("s", {})
    )
    with PromptStore(home / "lmstream.db") as store:
        [last] = store.history(limit=1)
    assert last.ttft_s is not None
    assert live_ttft == round(last.ttft_s, 3)
    [final] = cell.finals()
    assert f"first token {last.ttft_s:.2f} s" in final["text/plain"]
    assert f"run #{last.id}" in final["text/plain"]


def test_variables_from_options_then_namespace(kernel: Kernel, home: Path) -> None:
    kernel.execute("topic = 'owls'\nplace = 'the barn'")
    cell = kernel.execute("%%lmstream --var place=Paris --max-tokens 3\n{{topic}} in {{place}}")
    assert cell.status == "ok", cell.error()
    with PromptStore(home / "lmstream.db") as store:
        [last] = store.history(limit=1)
        assert store.get_run(last.id).variables == {"topic": "owls", "place": "Paris"}


def test_missing_variable_is_named_before_anything_is_sent(
    kernel: Kernel, msim: simulator.SimServer
) -> None:
    before = len(msim.records())
    cell = kernel.execute("%%lmstream\nAbout {{nothing_here}} and {{nor_this}}")
    assert cell.status == "error"
    said = cell.stream("stderr")
    assert "nothing_here, nor_this" in said
    assert "--var nothing_here=..." in said
    assert said.count("\n") == 1, "one sentence"
    assert "Traceback" not in said
    assert len(msim.records()) == before


def test_save_then_run_stored_prompt_with_assignments(kernel: Kernel, home: Path) -> None:
    saved = kernel.execute("%%lmstream --save greet --max-tokens 4\nHello {{name}}")
    assert saved.status == "error", "name is not defined in the notebook yet"
    kernel.execute("name = 'Ada'")
    saved = kernel.execute("%%lmstream --save greet --max-tokens 4\nHello {{name}}")
    assert saved.status == "ok", saved.error()
    cell = kernel.execute("%%lmstream --prompt greet\nname = Grace\n")
    assert cell.status == "ok", cell.error()
    with PromptStore(home / "lmstream.db") as store:
        assert [p.version for p in store.versions("greet")] == [1]
        [last] = store.history(limit=1)
        rec = store.get_run(last.id)
    assert (rec.prompt_name, rec.prompt_version) == ("greet", 1)
    assert rec.variables == {"name": "Grace"}
    line = kernel.execute("%lmstream run greet name=Linus")
    assert line.status == "ok", line.error()


def test_save_keeps_the_settings_left_off_the_line(kernel: Kernel, home: Path) -> None:
    first = kernel.execute(
        '%%lmstream --save keeper --system "Be brief." --temperature 0.3 --max-tokens 4\nHi'
    )
    assert first.status == "ok", first.error()
    again = kernel.execute("%%lmstream --save keeper --max-tokens 4\nHello again")
    assert again.status == "ok", again.error()
    same = kernel.execute("%%lmstream --save keeper --max-tokens 4\nHello again")
    assert same.status == "ok", same.error()
    with PromptStore(home / "lmstream.db") as store:
        versions = store.versions("keeper")
        [last] = store.history(limit=1)
        messages = store.get_run(last.id).messages
    assert [p.version for p in versions] == [1, 2], "the same cell again adds no version"
    assert (versions[1].system, versions[1].temperature) == ("Be brief.", 0.3)
    assert messages[0] == {"role": "system", "content": "Be brief."}


def test_output_option_assigns_and_returns_nothing(kernel: Kernel) -> None:
    cell = kernel.execute("%%lmstream -o answer --max-tokens 5\nHi")
    assert cell.status == "ok", cell.error()
    assert cell.result() is None
    check = kernel.execute("print(answer.status, len(answer.text) > 0, answer.run_id > 0)")
    assert check.stream().strip() == "ok True True"


def test_markdown_format_and_html_in_model_output(kernel: Kernel) -> None:
    defaults = simulator.Scenario(reply=HTML_REPLY)
    with simulator.serve(profile="test-fast", defaults=defaults) as echo:
        cell = kernel.execute(f"%%lmstream --base-url {echo.base_url} --format markdown\nShow")
    assert cell.status == "ok", cell.error()
    [final] = cell.displays()[1:]
    html = final["text/html"]
    assert "<strong>bold</strong>" in html
    assert "<script>" not in html
    assert "<img" not in html
    assert "&lt;script&gt;" in html
    assert "&lt;img src=x onerror" in html
    assert final["text/plain"] == HTML_REPLY


def test_unreachable_server_is_one_sentence(kernel: Kernel) -> None:
    cell = kernel.execute("%%lmstream --base-url http://127.0.0.1:9/v1 --model m\nHi")
    assert cell.status == "error"
    err = cell.error()
    assert err is not None
    assert err["ename"] == "ServerUnreachable"
    said = " ".join(err["traceback"])  # one sentence, cut into lines at spaces
    assert said.startswith("\x1b[0;31mServerUnreachable\x1b[0m: Cannot connect")
    assert said.count(". ") == 0
    assert said.endswith(".")
    assert "Start Server" in said


def test_stall_keeps_partial_text_and_says_why(kernel: Kernel) -> None:
    defaults = simulator.Scenario(stall_at=5, stall_s=60)
    with simulator.serve(profile="test-fast", defaults=defaults) as stalling:
        cell = kernel.execute(
            f"%%lmstream --base-url {stalling.base_url} --idle-timeout 0.5\nGo", timeout=30
        )
    assert cell.status == "error"
    err = cell.error()
    assert err is not None
    assert err["ename"] == "StreamStalled"
    said = " ".join(err["traceback"])
    assert "kept in the cell's output; raise --idle-timeout (or %lmstream config" in said
    assert "partial_text" not in said
    [partial] = cell.plain()
    assert len(partial.split()) == 5
    [widget] = cell.widget_ids()
    assert kernel.widget_state(widget)["status"]["state"] == "failed"
    [final] = cell.finals()
    assert final["text/plain"].startswith("lmstream: failed")


def test_settings_follow_the_rules_every_front_end_keeps(
    kernel: Kernel, msim: simulator.SimServer, home: Path
) -> None:
    before = len(msim.records())
    for line, shown, setting in (
        ("--temperature 5", "--temperature 5.0", "temperature"),
        ("--max-tokens 0", "--max-tokens 0", "max_tokens"),
    ):
        cell = kernel.execute(f"%%lmstream {line}\nHi")
        assert cell.status == "error"
        err = cell.error()
        assert err is not None
        assert err["ename"] == "InvalidSetting"
        assert f"{shown} is not {RULES[setting]}: give" in err["traceback"][0]
        assert cell.widget_ids() == [], "refused before a view is shown"
    assert len(msim.records()) == before
    empty = kernel.execute("%%lmstream --var thing= --max-tokens -1\nSay {{thing}}!")
    assert empty.status == "ok", empty.error()
    with PromptStore(home / "lmstream.db") as store:
        [last] = store.history(limit=1)
        assert store.get_run(last.id).messages == [{"role": "user", "content": "Say !"}]


def test_interrupt_stops_the_stream_and_records_cancelled(kernel: Kernel, home: Path) -> None:
    defaults = simulator.Scenario(output_tokens=100_000, gen_tps=200, jitter=0)
    with simulator.serve(profile="test-fast", defaults=defaults) as slow:
        cell = kernel.submit(f"%%lmstream --base-url {slow.base_url}\nA very long story")
        kernel.until(
            lambda: bool(cell.widget_ids()) and bool(kernel.deltas(cell.widget_ids()[0])),
            timeout=20,
        )
        kernel.km.interrupt_kernel()
        kernel.wait(cell, timeout=20)
        # The answer would take 500 s: a disconnect now is the interrupt's, however busy the CPU.
        record = slow.wait_for(lambda r: r.outcome == "client_disconnected", 20.0)
    assert record.ended_at is not None
    assert record.sent_tokens < record.planned_tokens
    assert cell.status == "error"
    err = cell.error()
    assert err is not None
    assert err["ename"] == "KeyboardInterrupt"
    [partial] = cell.plain()
    assert partial
    [final] = cell.finals()
    assert final["text/plain"].startswith("lmstream: cancelled")
    with PromptStore(home / "lmstream.db") as store:
        [last] = store.history(limit=1)
        assert last.status == "cancelled"
        assert store.get_run(last.id).text == partial
    after = kernel.execute("print(6 * 7)")
    assert after.stream().strip() == "42", "the kernel stays usable"


def test_three_background_runs_land_in_their_own_outputs(kernel: Kernel) -> None:
    defaults = simulator.Scenario(output_tokens=40, gen_tps=100, jitter=0)
    with simulator.serve(profile="test-fast", defaults=defaults) as paced:
        cells = [
            kernel.execute(f"%%lmstream --background --base-url {paced.base_url}\nStory {i}")
            for i in range(3)
        ]
        for cell in cells:
            assert cell.status == "ok", cell.error()
            [handle] = [d["text/plain"] for d in cell.displays() if "BackgroundRun" in str(d)]
            assert handle.endswith(" running>")
        other = kernel.execute("print('meanwhile')")
        kernel.until(
            lambda: all(len(c.plain()) == 2 and len(c.finals()) == 2 for c in cells), timeout=30
        )
    assert other.plain() == []
    assert other.stream() == "meanwhile\n"
    answers = [c.plain()[1] for c in cells]
    assert len(set(answers)) == 3
    for cell, answer in zip(cells, answers, strict=True):
        [widget] = cell.widget_ids()
        assert "".join(kernel.deltas(widget)) == answer
        status, handle = cell.finals()
        assert status["text/plain"].startswith("lmstream: done")
        assert handle["text/plain"].startswith("<BackgroundRun (inline) ")
        assert " done, run #" in handle["text/plain"], "the handle's display follows its end"


def test_line_subcommands(kernel: Kernel, msim: simulator.SimServer) -> None:
    for command in ("prompts", "history", "stats", "models", "show greet"):
        cell = kernel.execute(f"%lmstream {command}")
        assert cell.status == "ok", (command, cell.error())
    models = kernel.execute("%lmstream models")
    shown = models.displays()[0]["text/plain"].splitlines()
    assert "lmstream-sim-8b" in shown
    assert "lmstream-sim-embed  (embedding model, not for chat)" in shown
    ids = kernel.execute("print(list(get_ipython().run_line_magic('lmstream', 'models')))")
    assert "'lmstream-sim-embed'" in ids.stream(), "the returned ids are plain ids"
    bad = kernel.execute("%lmstream frobnicate")
    assert bad.status == "error"
    assert "Unknown subcommand" in bad.stream("stderr")


def test_in_kernel_simulator(kernel: Kernel) -> None:
    cell = kernel.execute("%lmstream sim start test-fast")
    assert cell.status == "ok", cell.error()
    assert "Simulator listening on http://127.0.0.1:" in cell.stream()
    run = kernel.execute("%%lmstream --max-tokens 4\nHi")
    assert run.status == "ok", run.error()
    stop = kernel.execute("%lmstream sim stop")
    assert stop.status == "ok", stop.error()


def test_terminal_ipython_streams_plain_text(tmp_path: Path, msim: simulator.SimServer) -> None:
    script = tmp_path / "run.ipy"
    script.write_text(
        "%load_ext lmstream_nb\n"
        f"%lmstream config base_url={msim.base_url}\n"
        "x = 'owls'\n"
        "get_ipython().run_cell_magic('lmstream', '--max-tokens 12', 'About {{x}}')\n",
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-m", "IPython", "--no-banner", "--colors=NoColor", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "LMSTREAM_HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) >= 10
    assert "run #1" in result.stderr
    assert "tokens/s" in result.stderr


def test_headless_execution_saves_the_final_text(
    tmp_path: Path, msim: simulator.SimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nbclient (as nbconvert and nbval use) keeps the answer as an ordinary output."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("LMSTREAM_HOME", str(tmp_path))
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("%load_ext lmstream_nb"),
        nbformat.v4.new_code_cell(
            f"%%lmstream --base-url {msim.base_url} --max-tokens 15 -o r\nAbout herons"
        ),
        nbformat.v4.new_code_cell("print(r.text)"),
    ]
    client = NotebookClient(nb, timeout=60, kernel_name="python3")
    client.km = client.create_kernel_manager()
    spec = client.km.kernel_spec
    assert spec is not None
    spec.argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    client.execute()
    status, final = nb.cells[1].outputs
    assert all("application/vnd.jupyter.widget-view+json" not in o.data for o in (status, final)), (
        "what is saved needs no kernel to show (no 'model not found' when reopened)"
    )
    assert status.data["text/plain"].startswith("lmstream: done")
    assert "run #1" in status.data["text/plain"]
    assert "lmstream-final" in status.data["text/html"]
    printed = nb.cells[2].outputs[0].text
    assert final.data["text/plain"] + "\n" == printed
    assert len(printed.split()) >= 10


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ("%%lmstream --first-token-timeout 0\nHi", "'0' is not a time budget: use a positive"),
        ("%%lmstream --idle-timeout soon\nHi", "'soon' is not a time budget"),
        ("%%lmstream --max-tokens many\nHi", "invalid int value: 'many'"),
        ("%%lmstream --temperature warm\nHi", "invalid float value: 'warm'"),
        ("%%lmstream --chat ' '\nHi", "A conversation needs a name with some text besides"),
        (
            "%lmstream config first_token_timeout=abc",
            "The setting first_token_timeout: 'abc' is not a time budget",
        ),
        ("%lmstream config idle_timeout=0", "The setting idle_timeout: '0' is not a time budget"),
        ("%lmstream config base_url=ftp://x/v1", "uses the scheme 'ftp', and only http and https"),
        ("%lmstream sim start time_scale=-1", "The simulator cannot start: time_scale must be"),
        ("%lmstream sim start warp=9", "The simulator has no setting warp: use a profile name"),
    ],
)
def test_a_bad_value_is_one_usage_sentence(
    kernel: Kernel, msim: simulator.SimServer, line: str, said: str
) -> None:
    before = len(msim.records())
    cell = kernel.execute(line)
    assert cell.status == "error"
    stderr = cell.stream("stderr")
    assert said in stderr
    assert stderr.startswith("UsageError: ")
    assert stderr.count("\n") == 1, "one sentence"
    assert "Traceback" not in stderr
    assert len(msim.records()) == before, "nothing was sent"


def test_config_never_shows_credentials_of_the_base_url(kernel: Kernel) -> None:
    shown = kernel.execute("%lmstream config base_url=http://ada:s3cret-pw@127.0.0.1:9/v1")
    try:
        assert shown.status == "ok", shown.error()
        text = shown.result() or ""
        assert "base_url='http://127.0.0.1:9/v1'" in text
        assert "s3cret-pw" not in text
        [shown_html] = [d["text/html"] for d in shown.displays()]
        assert "s3cret-pw" not in shown_html
        assert "word-break: normal" in shown_html, "wrapped at words"
    finally:
        reset = kernel.execute("%lmstream config base_url=")
        assert reset.status == "ok", reset.error()


def test_budgets_from_config_and_options(kernel: Kernel) -> None:
    """A session budget applies to the next run; ``none`` on the line lifts it for that run."""
    slow_prefill = simulator.Scenario(prefill_tps=20, output_tokens=3)  # ~2 s for this prompt
    prompt = "z" * 160
    # LM Studio 0.3: no progress while the prompt is processed, so the first-token budget ends it
    with simulator.serve(profile="test-fast", defaults=slow_prefill, native_api=False) as slow:
        config = kernel.execute("%lmstream config first_token_timeout=0.2 idle_timeout=none")
        assert config.status == "ok", config.error()
        assert "first_token_timeout=0.2, idle_timeout=None" in (config.result() or "")
        try:
            timed_out = kernel.execute(
                f"%%lmstream --base-url {slow.base_url}\n{prompt}", timeout=30
            )
            assert timed_out.status == "error"
            err = timed_out.error()
            assert err is not None
            assert err["ename"] == "FirstTokenTimeout"
            lifted = kernel.execute(
                f"%%lmstream --base-url {slow.base_url} --first-token-timeout none\n{prompt}",
                timeout=30,
            )
            assert lifted.status == "ok", lifted.error()
        finally:
            reset = kernel.execute("%lmstream config first_token_timeout=600 idle_timeout=120")
            assert reset.status == "ok", reset.error()


def test_background_views_show_the_ending_and_its_sentence(kernel: Kernel) -> None:
    """A background view says why it ended (no cell error will); Stop says it was cancelled."""
    from lmstream_nb._outcome import CANCELLED_MESSAGE

    def state(cell: object) -> dict[str, object]:
        [widget] = cell.widget_ids()  # type: ignore[attr-defined]
        status: dict[str, object] = kernel.widget_state(widget)["status"]
        return status

    stall = simulator.Scenario(stall_at=3, stall_s=60)
    endless = simulator.Scenario(output_tokens=100_000, gen_tps=200, jitter=0)
    with (
        simulator.serve(profile="test-fast", defaults=stall) as stalling,
        simulator.serve(profile="test-fast", defaults=endless) as slow,
    ):
        stalled = kernel.execute(
            f"%%lmstream --background --idle-timeout 0.5 --base-url {stalling.base_url}\nGo"
        )
        assert stalled.status == "ok", stalled.error()
        kernel.until(lambda: state(stalled).get("state") == "failed", timeout=20)
        message = str(state(stalled)["message"])
        assert message.startswith(f"The stream from {stalling.base_url} stalled: nothing new")
        assert state(stalled)["run_id"] is not None
        stopped = kernel.execute(
            "h = get_ipython().run_cell_magic("
            f"'lmstream', '--background --base-url {slow.base_url}', 'A long story')"
        )
        assert stopped.status == "ok", stopped.error()
        kernel.until(lambda: bool(kernel.deltas(stopped.widget_ids()[0])), timeout=20)
        cancel = kernel.execute("h.cancel()")
        assert cancel.status == "ok", cancel.error()
        kernel.until(lambda: state(stopped).get("state") == "cancelled", timeout=20)
    assert state(stopped)["message"] == CANCELLED_MESSAGE


def test_history_and_stats_label_runs_name_at_version(kernel: Kernel) -> None:
    saved = kernel.execute("%%lmstream --save labelled --max-tokens 3\nHi")
    assert saved.status == "ok", saved.error()
    history = kernel.execute("%lmstream history labelled")
    assert history.status == "ok", history.error()
    assert "labelled@1" in history.displays()[0]["text/plain"]
    stats = kernel.execute("%lmstream stats labelled")
    assert stats.status == "ok", stats.error()
    shown = stats.displays()[0]["text/plain"]
    assert "labelled" in shown
    assert "(all)" in shown
    inline = kernel.execute("%%lmstream --max-tokens 3\nHi")
    assert inline.status == "ok", inline.error()
    every = kernel.execute("print(list(get_ipython().run_line_magic('lmstream', 'stats').prompt))")
    rows = ast.literal_eval(every.stream())  # a printed list of labels
    assert rows[-1] == "(all)", "the overall row, as the CLI labels it"
    assert "(inline)" in rows, "an inline template's group, as the CLI labels it"


def test_the_magics_help_starts_with_its_usage(kernel: Kernel) -> None:
    """`%lmstream?` shows the inspector's text: the usage first, not a stray "::"."""
    shown = kernel.execute(
        "import re; print(re.sub(r'\\x1b\\[[0-9;]*m', '', "
        "get_ipython().object_inspect_text('%lmstream')))"
    ).stream()
    lines = shown.splitlines()
    assert lines[0] == "Docstring:"
    assert lines[1].startswith("%lmstream [--prompt NAME]"), lines[:3]
    assert "::" not in shown.split("Stream a prompt")[0]
    assert "Stream a prompt to LM Studio and watch the answer arrive." in shown


def test_the_runner_leaves_a_snapshot_of_its_last_run(kernel: Kernel) -> None:
    """Under the runner (a widget) is an ordinary output a saved notebook shows without its
    kernel; each run updates it with the status line and the text."""
    saved = kernel.execute("%%lmstream --save snap --max-tokens 6\nHi")
    assert saved.status == "ok", saved.error()
    shown = kernel.execute("ui = %lmstream ui\nui")
    assert shown.status == "ok", shown.error()
    widget, snapshot = shown.displays()
    assert widget["text/plain"] == "lmstream prompt runner"
    assert "has not run a prompt yet" in snapshot["text/plain"]
    ran = kernel.execute(
        "await ui.models_task\nui.prompt_picker.value = 'snap'\nresult = await ui.run()"
    )
    assert ran.status == "ok", ran.error()
    check = kernel.execute("print(result.run_id, len(result.text.split()))")
    run_id, words = check.stream().split()
    [after] = ran.finals(shown_in=shown)
    assert after["replaces"] == snapshot
    assert after["text/plain"].startswith("lmstream: done")
    assert f"run #{run_id}" in after["text/plain"]
    assert len(after["text/plain"].split("\n\n", 1)[1].split()) == int(words)


def test_every_option_of_the_magic_says_its_default() -> None:
    """`%lmstream?` lists the options: each says what happens when it is left out."""
    from lmstream_nb._magics import LMStreamMagics

    parser = LMStreamMagics.lmstream.parser
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0:
            continue  # the subcommand words, flags and -h
        assert "default" in (action.help or ""), action.option_strings


def test_the_view_shows_progress_before_the_first_delta(kernel: Kernel) -> None:
    """LM Studio's native chat reports prompt processing: the view gets a bar before text,
    paced like text, and the saved output is the same as without it."""
    marker = '[[sim {"prefill_tps": 1500, "batch_size": 100, "output_tokens": 12}]] '
    cell = kernel.execute("%%lmstream\n" + marker + "p" * 12000, timeout=60)
    assert cell.status == "ok", cell.error()
    [widget] = cell.widget_ids()
    customs = [
        (msg["header"]["date"], msg["content"]["data"]["content"])
        for msg in kernel.comm_msgs[widget]
        if msg["content"].get("data", {}).get("method") == "custom"
    ]
    kinds = ["p" if "p" in c else "t" if "t" in c else "-" for _, c in customs]
    assert "p" in kinds
    assert kinds.index("t") > max(i for i, k in enumerate(kinds) if k == "p"), kinds
    bars = [c["p"] for _, c in customs if "p" in c]
    fractions = [b["f"] for b in bars]
    assert len(set(fractions)) >= 3, "the bar moved"
    assert fractions == sorted(fractions)
    assert all(b["w"] == "processing prompt" and b["x"].endswith(("left", " s")) for b in bars)
    times = [dt.datetime.fromisoformat(str(d)) for d, c in customs if "p" in c]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert sum(g < 0.2 for g in gaps) <= 2, gaps  # a few a second (a phase's end always passes)
    seconds = (times[-1] - times[0]).total_seconds()
    assert len(bars) <= 5 * seconds + 2, "paced: a few a second"
    # The front-end bound for the whole run, progress included: at most 25 messages a second.
    every = [dt.datetime.fromisoformat(str(d)) for d, _ in customs]
    assert len(every) <= 25 * (every[-1] - every[0]).total_seconds() + 3
    [final] = cell.finals()
    assert final["text/plain"].startswith("lmstream: done")
    assert "progress" not in final["text/html"]


def test_where_the_server_reports_nothing_the_view_shows_the_historys_estimate(
    kernel: Kernel,
) -> None:
    """LM Studio 0.3 reports no progress: after five runs of the model on that server, the
    view's bar fills against their estimate and says it is one."""
    defaults = simulator.Scenario(prefill_tps=3000, output_tokens=3, jitter=0)
    with simulator.serve(profile="test-fast", defaults=defaults, native_api=False) as old:
        for size in (2000, 4000, 6000, 8000, 10000):
            earlier = kernel.execute(f"%%lmstream --base-url {old.base_url}\n" + "e" * size)
            assert earlier.status == "ok", earlier.error()
            [widget] = earlier.widget_ids()
            assert not progress_messages(kernel, widget), "no estimate before five runs"
        cell = kernel.execute(f"%%lmstream --base-url {old.base_url}\n" + "e" * 9000)
    assert cell.status == "ok", cell.error()
    [widget] = cell.widget_ids()
    bars = progress_messages(kernel, widget)
    assert bars, "the estimate was shown"
    assert all(b["w"] == "processing prompt (estimate)" for b in bars)
    assert bars[0]["x"].endswith("estimated from 5 earlier runs")


def progress_messages(kernel: Kernel, widget: str) -> list[dict[str, str]]:
    return [
        msg["content"]["data"]["content"]["p"]
        for msg in kernel.comm_msgs[widget]
        if "p" in msg["content"].get("data", {}).get("content", {})
    ]


def test_diff_shows_escaped_html_with_a_plain_twin(kernel: Kernel, home: Path) -> None:
    with PromptStore(home / "lmstream.db") as store:
        store.save("diffed", "Summarise {{text}}.", temperature=0.2)
        store.save("diffed", 'Summarise {{text}}. <script>alert("x")</script>', model="m1")
    cell = kernel.execute("%lmstream diff diffed 1 2")
    assert cell.status == "ok", cell.error()
    [shown] = [d for d in cell.displays() if "text/html" in d]
    page = shown["text/html"]
    assert "<script" not in page, "prompt text is shown as text, never run"
    assert html_escape('+Summarise {{text}}. <script>alert("x")</script>') in page
    plain = shown["text/plain"]
    assert plain.startswith("--- diffed@1 template\n+++ diffed@2 template\n")
    assert '+Summarise {{text}}. <script>alert("x")</script>\n' in plain
    assert plain.endswith("--- diffed@1 model\n+++ diffed@2 model\n@@ -0,0 +1 @@\n+m1")
    latest = kernel.execute("%lmstream diff diffed 1")
    assert latest.status == "ok", latest.error()
    assert latest.displays()[0]["text/plain"] == plain, "B left out is the latest"
    same = kernel.execute("%lmstream diff diffed 2 2")
    assert same.displays()[0]["text/plain"] == "No differences between diffed@2 and diffed@2."


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ("%lmstream diff diffed 1 9", "The prompt 'diffed' has no version 9: see"),
        ("%lmstream diff difed 1 2", "No prompt is named 'difed'"),
    ],
)
def test_diff_of_an_unknown_prompt_or_version_is_prompt_not_found(
    kernel: Kernel, home: Path, line: str, said: str
) -> None:
    with PromptStore(home / "lmstream.db") as store:
        store.save("diffed", "Summarise {{text}}.")
    cell = kernel.execute(line)
    assert cell.status == "error"
    err = cell.error()
    assert err is not None
    assert err["ename"] == "PromptNotFound"
    shown = " ".join(err["traceback"])  # one sentence, cut into lines at spaces
    assert shown.startswith("\x1b[0;31mPromptNotFound\x1b[0m: " + said)
    assert "Traceback" not in shown


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ("%lmstream diff diffed one 2", "'one' is not a version: use a whole number"),
        ("%lmstream diff diffed", "Name the prompt and its versions: %lmstream diff NAME A [B]"),
    ],
)
def test_diff_with_a_bad_version_is_one_usage_sentence(
    kernel: Kernel, line: str, said: str
) -> None:
    cell = kernel.execute(line)
    assert cell.status == "error"
    stderr = cell.stream("stderr")
    assert stderr.startswith("UsageError: ")
    assert said in stderr
    assert stderr.count("\n") == 1, "one sentence"


POINT_SCHEMA = '{"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"]}'  # noqa: E501


def test_a_schema_answer_is_shown_pretty_printed(kernel: Kernel, msim: simulator.SimServer) -> None:
    cell = kernel.execute(f"%%lmstream -o point --schema '{POINT_SCHEMA}'\nA point, please.")
    assert cell.status == "ok", cell.error()
    [final] = cell.displays()[1:]
    value = final["application/json"]
    assert set(value) == {"x", "y"}
    assert final["text/plain"] == json.dumps(value, indent=2)
    assert "<pre" in final["text/html"]
    check = kernel.execute("print(point.status, point.parsed == " + repr(value) + ")")
    assert check.stream().strip() == "ok True"
    assert msim.chats()[-1].path == "/v1/chat/completions"


def test_a_broken_schema_answer_fails_naming_the_path(kernel: Kernel, tmp_path: Path) -> None:
    schema = tmp_path / "point.json"
    schema.write_text(POINT_SCHEMA, encoding="utf-8")
    defaults = simulator.Scenario(schema_fault="wrong_type")
    with simulator.serve(profile="test-fast", defaults=defaults) as breaking:
        cell = kernel.execute(
            f"%%lmstream --base-url {breaking.base_url} --schema {schema}\nA point, please."
        )
    assert cell.status == "error"
    err = cell.error()
    assert err is not None
    assert err["ename"] == "InvalidOutput"
    said = " ".join(err["traceback"])
    assert "does not match the schema at $.x:" in said
    [final] = cell.finals()
    assert final["text/plain"].startswith("lmstream: failed")
    [text] = cell.plain()
    assert text.startswith('{"x": "not the right type"')


def test_a_bad_schema_option_is_one_sentence(kernel: Kernel) -> None:
    cell = kernel.execute("%%lmstream --schema '{\"type\": 3}'\nHi")
    assert cell.status == "error"
    err = cell.error()
    assert err is not None
    assert err["ename"] == "InvalidSchema"
    said = " ".join(err["traceback"])
    assert "is not a valid JSON Schema at $.type" in said
    assert cell.widget_ids() == []


def test_save_keeps_the_schema_with_the_version(kernel: Kernel, home: Path) -> None:
    cell = kernel.execute(f"%%lmstream --save point --schema '{POINT_SCHEMA}'\nA point.")
    assert cell.status == "ok", cell.error()
    with PromptStore(home / "lmstream.db") as store:
        saved = store.get("point")
    assert json.loads(saved.schema or "") == json.loads(POINT_SCHEMA)
    again = kernel.execute("%lmstream run point")
    assert again.status == "ok", again.error()
    [final] = again.displays()[1:]
    assert set(final["application/json"]) == {"x", "y"}


def test_the_api_option_chooses_the_endpoint(
    kernel: Kernel, home: Path, msim: simulator.SimServer
) -> None:
    for api, path in (("openai", "/v1/chat/completions"), ("auto", "/api/v1/chat")):
        cell = kernel.execute(f"%%lmstream --api {api} --max-tokens 3\nHi")
        assert cell.status == "ok", cell.error()
        assert msim.chats()[-1].path == path
        with PromptStore(home / "lmstream.db") as store:
            [last] = store.history(limit=1)
        assert last.api == ("openai" if api == "openai" else "native")
    bad = kernel.execute("%%lmstream --api nowhere\nHi")
    assert bad.status == "error"
    stderr = bad.stream("stderr")
    assert stderr.startswith("UsageError: ")
    assert "invalid choice: 'nowhere'" in stderr


def test_two_chat_cells_make_one_conversation(
    kernel: Kernel, msim: simulator.SimServer, home: Path
) -> None:
    """The second cell is sent with the first and its answer; both are turns in the store."""
    first = kernel.execute(
        "%%lmstream --chat trip --system 'You plan trips.' --max-tokens 5\nLyon?"
    )
    assert first.status == "ok", first.error()
    before = len(msim.records())
    second = kernel.execute("%%lmstream --chat trip --max-tokens 5\nAnd {{when}}?")
    assert second.status == "error", "when is not defined in the notebook yet"
    kernel.execute("when = 'Sunday'")
    second = kernel.execute("%%lmstream --chat trip --max-tokens 5\nAnd {{when}}?")
    assert second.status == "ok", second.error()
    [widget] = second.widget_ids()
    assert kernel.widget_state(widget)["status"]["state"] == "done"
    [final] = second.finals()
    assert final["text/plain"].startswith("lmstream: done · chat trip · "), "the turn says so"
    answer_one = answer_of(kernel, first)
    [request] = [r for r in msim.records()[before:] if r.method == "POST"]
    assert request.path == "/v1/chat/completions", "a later turn carries an answer"
    assert request.messages == (
        ("system", "You plan trips."),
        ("user", "Lyon?"),
        ("assistant", answer_one),
        ("user", "And Sunday?"),
    )
    shown = kernel.execute("%lmstream chat show trip")
    assert shown.status == "ok", shown.error()
    table = shown.displays()[0]["text/plain"]
    assert "Lyon?" in table
    assert "And Sunday?" in table
    forked = kernel.execute("%lmstream chat fork trip trip2")
    assert "'trip2' goes on from 'trip'" in forked.stream()
    listed = kernel.execute("%lmstream chat list").displays()[0]["text/plain"]
    assert "trip2" in listed
    reset = kernel.execute("%lmstream chat reset trip")
    assert reset.status == "ok", reset.error()
    with PromptStore(home / "lmstream.db") as store:
        assert store.conversation_runs("trip") == []
        assert len(store.conversation_runs("trip2")) == 2
    bad = kernel.execute("%lmstream chat show nowhere")
    assert bad.status == "error"
    err = bad.error()
    assert err is not None
    assert err["ename"] == "ConversationNotFound"
    assert "%lmstream chat list" in " ".join(err["traceback"])
    usage = kernel.execute("%lmstream chat frob")
    assert "Use %lmstream chat list | show NAME" in usage.stream("stderr")


def test_compare_streams_every_cell_into_one_paced_grid(kernel: Kernel, home: Path) -> None:
    """Four cells stream at once into their own places of one widget: every paint carries the
    new text of all of them, at most 25 messages a second; the end is a kernel-free snapshot."""
    slow = '[[sim {"gen_tps": 120}]] '
    with PromptStore(home / "lmstream.db") as store:
        store.save("side", slow + "Tell {{who}} about rivers.")
        marker = "[[sim " + json.dumps({"gen_tps": 60, "reply": HTML_REPLY}) + "]] "
        store.save("side", marker + "Tell {{who}} about lakes.")
    with simulator.serve(profile="test-fast", seed=5, models=("sim-a", "sim-b")) as two:
        cell = kernel.execute(
            f"%lmstream compare side@1 side@2 --models sim-a,sim-b --var who=Ada "
            f"--max-tokens 40 --base-url {two.base_url} --output cmp",
            timeout=60,
        )
    assert cell.status == "ok", cell.error()
    [widget] = cell.widget_ids()
    customs = [
        (dt.datetime.fromisoformat(str(m["header"]["date"])), m["content"]["data"]["content"])
        for m in kernel.comm_msgs[widget]
        if m["content"].get("data", {}).get("method") == "custom"
    ]
    # Several cells had text on screen before any cell ended.
    first_end = next(
        n
        for n, (_, c) in enumerate(customs)
        if any(s.get("state") in ("done", "failed") for s in c.get("s", {}).values())
    )
    streaming = {i for _, c in customs[:first_end] for i in c.get("c", {})}
    assert len(streaming) >= 3, (streaming, first_end)
    assert any(len(c.get("c", {})) >= 2 for _, c in customs), "one message carries several cells"
    # The traffic bound of one view, for the whole grid.
    times = [t for t, _ in customs]
    assert len(times) <= 25 * (times[-1] - times[0]).total_seconds() + 3
    # Each cell's deltas add up to its recorded text, in its own place.
    texts: dict[str, str] = {}
    for _, c in customs:
        for i, piece in c.get("c", {}).items():
            texts[i] = texts.get(i, "") + piece
    check = kernel.execute(
        "print(repr([r.text for r in cmp.results]))\n"
        "print(repr([(c.version, c.model) for c in cmp.cells]))"
    )
    recorded_texts, layout = (ast.literal_eval(x) for x in check.stream().splitlines())
    assert layout == [
        ("side@1", "sim-a"),
        ("side@1", "sim-b"),
        ("side@2", "sim-a"),
        ("side@2", "sim-b"),
    ]
    assert [texts.get(str(i), "") for i in range(4)] == recorded_texts
    assert all(t.strip() for t in recorded_texts)
    state = kernel.widget_state(widget)
    assert state["finished"] is True
    assert [c["v"] for c in state["layout"]] == ["side@1", "side@1", "side@2", "side@2"]
    assert [c["x"] for c in state["layout"]] == [0, 1, 2, 3], "side by side: a column each"
    assert state["columns"] == 4
    # Replaced by the summary and a snapshot, escaped: model output never becomes HTML.
    [final] = cell.finals()
    assert "application/vnd.jupyter.widget-view+json" in final["replaces"]
    page = final["text/html"]
    assert "<script" not in page
    assert "lmstream-compare-summary" in page
    assert page.count("lmstream-grid-cell") == 4
    for text in recorded_texts:
        assert html_escape(text) in page
    assert recorded_texts[2] == HTML_REPLY, "version 2's cells answer with markup"
    assert html_escape(HTML_REPLY) in page
    assert final["text/plain"].startswith("<Comparison ")
    assert "side@2" in final["text/plain"]
    assert cell.result() is None


def test_compare_names_a_missing_value_before_anything_is_sent(kernel: Kernel, home: Path) -> None:
    with PromptStore(home / "lmstream.db") as store:
        store.save("needy", "Tell {{who}} about {{what}}.")
    cell = kernel.execute('%lmstream compare needy@1 --var who=Ada --row "what=x" --row "who=Bo"')
    assert cell.status == "error"
    stderr = cell.stream("stderr")
    assert stderr.startswith("UsageError: Row 1 needs a value for what: add --var what=..."), stderr
    assert "Traceback" not in stderr
    assert not cell.widget_ids(), "no grid was shown"
    with PromptStore(home / "lmstream.db") as store:
        assert not [r for r in store.history(limit=None) if r.prompt_name == "needy"]
    unknown = kernel.execute("%lmstream compare needy@5")
    assert unknown.status == "error"
    assert "has no version 5" in str(unknown.error()) + unknown.stream("stderr")


def test_an_interrupted_comparison_keeps_what_each_cell_received(
    kernel: Kernel, home: Path
) -> None:
    defaults = simulator.Scenario(output_tokens=100_000, gen_tps=200, jitter=0)
    with PromptStore(home / "lmstream.db") as store:
        store.save("endless", "A very long story about {{who}}.")
    with simulator.serve(profile="test-fast", defaults=defaults) as slow:
        cell = kernel.submit(
            '%lmstream compare endless@1 --row "who=Ann" --row "who=Ben" '
            f"--base-url {slow.base_url}"
        )

        def both_streaming() -> bool:
            ids = cell.widget_ids()
            if not ids:
                return False
            seen = {
                i
                for m in kernel.comm_msgs.get(ids[0], [])
                for i in m["content"].get("data", {}).get("content", {}).get("c", {})
            }
            return seen == {"0", "1"}

        kernel.until(both_streaming, timeout=20)
        kernel.km.interrupt_kernel()
        kernel.wait(cell, timeout=20)
    assert cell.status == "error"
    [final] = cell.finals()
    assert final["text/plain"].startswith("lmstream: the comparison ended early")
    assert final["text/html"].count('data-state="cancelled"') == 2
    with PromptStore(home / "lmstream.db") as store:
        runs = [r for r in store.history(limit=None) if r.prompt_name == "endless"]
        assert sorted(r.status for r in runs) == ["cancelled", "cancelled"]
        for run in runs:
            text = store.get_run(run.id).text
            assert text
            assert html_escape(text) in final["text/html"], "the snapshot keeps the partial text"
    after = kernel.execute("print(6 * 7)")
    assert after.stream().strip() == "42", "the kernel stays usable"
