"""The ``lmstream`` command, run as a real subprocess against in-process simulators."""

from __future__ import annotations

import csv
import json
import os
import re
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pty_run import read_stderr_on_a_terminal

from lmstream_nb import Prompt, PromptStore, run, simulator

MODEL = "lmstream-sim-8b"


def lmstream(
    *args: str, stdin: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmstream_nb", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def slow_sim() -> Iterator[simulator.SimServer]:
    """Long answers at 500 tokens/s, so a run is still streaming when we interrupt it."""
    defaults = simulator.Scenario(output_tokens=20000)
    with simulator.serve(profile="test-fast", defaults=defaults) as server:
        yield server


def test_run_streams_text_and_prints_stats(sim: simulator.SimServer) -> None:
    result = lmstream(
        "run",
        "Tell me about {{topic}}",
        "--var",
        "topic=rivers",
        "--base-url",
        sim.base_url,
        "--max-tokens",
        "25",
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) >= 20
    assert "finish: length" in result.stderr
    assert "tokens/s" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_json_prints_one_event_per_line(sim: simulator.SimServer) -> None:
    result = lmstream(
        "run", "Hi", "--json", "--base-url", sim.base_url, "--model", MODEL, "--max-tokens", "6"
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [e["event"] for e in events if e["event"] != "progress"]
    assert kinds == ["start"] + ["text"] * 6 + ["done", "recorded"]
    assert events[0]["api"] == "native"
    progress = [e for e in events if e["event"] == "progress"]
    assert progress, "LM Studio's native chat reports prompt processing"
    assert all(e["phase"] == "prompt" and 0 <= e["fraction"] <= 1 for e in progress)
    assert {"elapsed_s", "eta_s", "processed", "total", "cached"} <= set(progress[0])
    first_text = next(i for i, e in enumerate(events) if e["event"] == "text")
    assert events.index(progress[-1]) < first_text
    assert events[-2]["stats"]["completion_tokens"] == 6
    assert events[0]["model"] == MODEL
    recorded = events[-1]
    assert recorded["status"] == "ok"
    with PromptStore() as store:
        run = store.get_run(recorded["run_id"])
    assert run.status == "ok"
    assert run.text == "".join(e["content"] for e in events if e["event"] == "text")


def test_run_reads_template_from_stdin(sim: simulator.SimServer) -> None:
    result = lmstream(
        "run",
        "-",
        "--var",
        "x=1",
        "--base-url",
        sim.base_url,
        "--max-tokens",
        "3",
        stdin="Value {{ x }}",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_missing_variable_is_named_and_nothing_is_sent(sim: simulator.SimServer) -> None:
    before = len(sim.records())
    result = lmstream("run", "{{a}} and {{b}}", "--var", "a=1", "--base-url", sim.base_url)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "b" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(sim.records()) == before


def test_unknown_variable_is_refused(sim: simulator.SimServer) -> None:
    result = lmstream("run", "{{a}}", "--var", "a=1", "--var", "typo=2", "--base-url", sim.base_url)
    assert result.returncode == 2
    assert "typo" in result.stderr


def test_failure_keeps_partial_text_on_stdout_and_one_sentence_on_stderr() -> None:
    defaults = simulator.Scenario(disconnect_at=7)
    with simulator.serve(profile="test-fast", defaults=defaults) as broken:
        result = lmstream("run", "Hi", "--base-url", broken.base_url)
    assert result.returncode == 1
    assert len(result.stdout.split()) >= 5, "the seven tokens received stay on stdout"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("lmstream: The stream from")
    assert "Traceback" not in result.stderr


def test_unreachable_server_is_one_sentence() -> None:
    result = lmstream("run", "Hi", "--base-url", "http://127.0.0.1:9/v1", "--model", MODEL)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "http://127.0.0.1:9/v1" in result.stderr
    assert "Start Server" in result.stderr


def test_models_lists_the_servers_models(sim: simulator.SimServer) -> None:
    result = lmstream("models", "--base-url", sim.base_url)
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        "lmstream-sim-8b",
        "lmstream-sim-embed  (embedding model, not for chat)",
    ]


def test_base_url_from_environment(
    sim: simulator.SimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMSTREAM_BASE_URL", sim.base_url)
    result = lmstream("models")
    assert result.returncode == 0
    assert MODEL in result.stdout


def test_ctrl_c_stops_the_stream_and_closes_the_connection(slow_sim: simulator.SimServer) -> None:
    """The answer would take 40 s: the server must see the client go long before its end.

    No bound on how fast: a busy machine delays the signal's handling, not its effect.
    """
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmstream_nb",
            "run",
            "Go",
            "--base-url",
            slow_sim.base_url,
            "--model",
            MODEL,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # As in a person's terminal: in full CI runs the test process was seen with SIGINT and
        # SIGQUIT ignored (something in it ran system(), which ignores both meanwhile), and a
        # child inherits that, so Python installs no Ctrl-C handler in it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    ) as proc:
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 20)
            assert ready, "no text within 20 s"
            first = os.read(proc.stdout.fileno(), 100)
            assert first
            proc.send_signal(signal.SIGINT)
            try:
                _out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                signals = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                handled = [line for line in signals if line.startswith(("SigIgn", "SigCgt"))]
                pytest.fail(f"lmstream run went on 30 s after Ctrl-C ({handled})")
            record = slow_sim.wait_for(lambda r: r.outcome == "client_disconnected", 20.0)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    assert record.ended_at is not None
    assert record.sent_tokens < record.planned_tokens, "the stream stopped before its end"
    assert proc.returncode == 130
    assert b"Ctrl-C" in err
    assert b"Traceback" not in err


def test_a_terminal_shows_a_live_progress_bar_then_the_text() -> None:
    """LM Studio's native chat reports prompt processing: the waiting line becomes a bar."""
    defaults = simulator.Scenario(prefill_tps=1500, batch_size=200, output_tokens=3)
    with simulator.serve(profile="test-fast", defaults=defaults) as slow_prefill:
        prompt = "p" * 12000  # 3,000 tokens: 2 s of prompt processing
        status, out, seen = read_stderr_on_a_terminal(
            "run", prompt, "--base-url", slow_prefill.base_url, "--model", MODEL
        )
        piped = lmstream("run", prompt, "--base-url", slow_prefill.base_url, "--model", MODEL)
    assert status == 0
    lines = [part.decode() for part in seen.split(b"\r") if b"processing prompt" in part]
    percents = [int(line.split("▏ ")[1].split("%")[0]) for line in lines]
    assert len(set(percents)) >= 2, "the bar moved"
    assert percents == sorted(percents)
    assert any("left" in line for line in lines), "an estimate of the time left"
    assert "▕" in lines[0]
    assert out.strip(), "the text followed on stdout"
    assert piped.returncode == 0
    assert piped.stdout.strip() == out.decode().strip()
    assert "processing prompt" not in piped.stderr, "nothing extra off a terminal"


def test_waiting_for_first_token_is_shown_on_a_terminal() -> None:
    defaults = simulator.Scenario(prefill_tps=100, output_tokens=3)
    # LM Studio 0.3 reports nothing while it processes the prompt
    with simulator.serve(profile="test-fast", defaults=defaults, native_api=False) as slow_prefill:
        status, _, seen = read_stderr_on_a_terminal(
            "run", "z" * 600, "--base-url", slow_prefill.base_url, "--model", MODEL
        )
    assert status == 0
    assert b"waiting for the first token" in seen


def test_a_terminal_fills_a_bar_against_the_estimate_where_the_server_reports_nothing() -> None:
    """LM Studio 0.3 is silent while it processes the prompt, but five earlier runs of the
    model there tell how long this one should take: the bar fills against that, and says so;
    ``--json`` prints the estimate as a progress line."""
    defaults = simulator.Scenario(prefill_tps=1000, output_tokens=3, jitter=0)
    with simulator.serve(profile="test-fast", defaults=defaults, native_api=False) as silent:
        for chars in (400, 1000, 1600, 2200, 3000):  # the history: 0.1 to 0.75 s each
            run(Prompt("q" * chars, model=MODEL), base_url=silent.base_url)
        prompt = "q" * 10000  # 2,500 tokens: 2.5 s
        status, out, seen = read_stderr_on_a_terminal(
            "run", prompt, "--base-url", silent.base_url, "--model", MODEL
        )
        as_json = lmstream("run", prompt, "--json", "--base-url", silent.base_url, "--model", MODEL)
    assert status == 0
    lines = [part.decode() for part in seen.split(b"\r") if b"(estimate)" in part]
    # The percentage after the bar (a bar that has just begun holds a ▏ of its own).
    percents = [int(re.search(r"▏ (\d+)% · ", line)[1]) for line in lines]
    assert len(set(percents)) >= 2, "the bar moved on its own clock"
    assert percents == sorted(percents)
    assert "estimated from 5 earlier runs" in lines[-1]
    assert "left" in lines[0]
    assert out.strip(), "the text followed on stdout"
    records = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [r["event"] for r in records[:2]] == ["start", "progress"]
    estimate = records[1]
    assert (estimate["phase"], estimate["runs"]) == ("estimate", 6)
    # 2.5 s of simulated processing at least; how much more depends on the machine's load.
    assert estimate["expected_s"] > 1.0
    assert 0 <= estimate["fraction"] < 1


def test_demo_runs_end_to_end() -> None:
    result = lmstream("demo", "--time-scale", "0.05", timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) > 50
    assert "Stats:" in result.stderr
    assert "Simulator stopped" in result.stderr


def test_sim_command_serves_until_ctrl_c() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmstream_nb", "sim", "--port", "0", "--profile", "test-fast"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        ready, _, _ = select.select([proc.stderr], [], [], 20)
        assert ready
        line = proc.stderr.readline()
        assert "listening on http://127.0.0.1:" in line
        base_url = line.split("listening on ")[1].split(";")[0]
        result = lmstream("run", "Hi", "--base-url", base_url, "--max-tokens", "4")
        assert result.returncode == 0
        assert result.stdout.strip()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0
    assert "POST /api/v1/chat" in err, "one log line per request"


def test_demo_records_its_run_and_reuses_its_prompt(tmp_path: Path) -> None:
    env = {**os.environ, "LMSTREAM_HOME": str(tmp_path)}
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-m", "lmstream_nb", "demo", "--time-scale", "0.05"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )
        assert result.returncode == 0, result.stderr
    with PromptStore(tmp_path / "lmstream.db") as store:
        assert [p.version for p in store.versions("release-notes-summary")] == [1]
        runs = store.history()
    assert [r.status for r in runs] == ["ok", "ok"]
    assert runs[0].prompt_name == "release-notes-summary"


def test_none_is_no_limit_and_zero_is_refused_for_every_budget(sim: simulator.SimServer) -> None:
    run = ["run", "Hi", "--base-url", sim.base_url, "--model", MODEL, "--max-tokens", "3"]
    accepted = lmstream(*run, "--first-token-timeout", "none", "--idle-timeout", "inf")
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.strip()
    for option in ("--first-token-timeout", "--idle-timeout", "--connect-timeout"):
        refused = lmstream(*run, option, "0")
        assert refused.returncode == 2
        assert f"argument {option}: '0' is not a time budget: use a positive number of " in (
            refused.stderr
        )
        assert "or none for no limit" in refused.stderr


def test_runs_are_labelled_name_at_version_everywhere(sim: simulator.SimServer) -> None:
    with PromptStore() as store:
        store.save("greet", "Hello {{name}}")
        label = store.save("greet", "Hi {{name}}").label
    assert label == "greet@2"
    base = ["--base-url", sim.base_url, "--model", MODEL, "--max-tokens", "3"]
    stored = lmstream("run", "--prompt", "greet", "--var", "name=Ada", *base)
    assert stored.returncode == 0, stored.stderr
    assert lmstream("run", "Hi", *base).returncode == 0
    table = lmstream("history").stdout.splitlines()
    assert " (inline) " in table[2], "newest first"
    assert f" {label} " in table[3]
    [newest, older] = json.loads(lmstream("history", "--json").stdout)
    assert f"  {label}  " in lmstream("history", "--run", str(older["id"])).stdout.splitlines()[0]
    assert "  (inline)  " in lmstream("history", "--run", str(newest["id"])).stdout
    stats = lmstream("stats").stdout
    assert "\ngreet " in stats
    assert "\n(inline) " in stats


@pytest.mark.parametrize("command", [["models"], ["run", "Hi"]])
def test_a_base_url_without_v1_is_named_as_the_problem(
    sim: simulator.SimServer, command: list[str]
) -> None:
    """LM Studio answers "Unexpected endpoint or method. (GET /models)" there: that is no
    missing model, and the sentence says which URL to use instead."""
    root = sim.base_url.removesuffix("/v1")
    result = lmstream(*command, "--base-url", root)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert f"The server at {root} does not know this endpoint" in result.stderr
    assert f"use {root}/v1 as the base URL" in result.stderr
    assert "model None" not in result.stderr
    assert "Traceback" not in result.stderr


def test_a_base_url_without_a_scheme_is_a_sentence_about_the_url(
    sim: simulator.SimServer,
) -> None:
    address = sim.base_url.removeprefix("http://")
    for command in (["models"], ["run", "Hi"]):
        result = lmstream(*command, "--base-url", address)
        assert result.returncode == 2
        assert f"The base URL {address!r} does not start with http:// or https://" in (
            result.stderr
        )
        assert result.stderr.count("\n") == 1


def test_the_batch_bar_shows_100_percent_once(tmp_path: Path) -> None:
    """Each row takes long enough that the bar is drawn for it, so the last row's drawing and
    the closing one would both show 100%."""
    slow = simulator.Scenario(output_tokens=20, gen_tps=100, jitter=0)
    with simulator.serve(profile="test-fast", defaults=slow) as server:
        with PromptStore() as store:
            store.save("pet", "Tell me about {{animal}}.")
        rows = tmp_path / "rows.csv"
        rows.write_text("animal\nowls\nbats\ncats\n", encoding="utf-8")
        result = lmstream("batch", "pet", str(rows), "-c", "1", "--base-url", server.base_url)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("100%") == 1, result.stderr
    assert result.stderr.count("3/3") == 1


def test_batch_with_a_schema_writes_the_parsed_fields(
    sim: simulator.SimServer, tmp_path: Path
) -> None:
    with PromptStore() as store:
        store.save("place", "A place for {{animal}}.")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        '{"animal": "owls"}\n{"animal": "bats [[sim {\\"schema_fault\\": \\"wrong_type\\"}]]"}\n',
        encoding="utf-8",
    )
    schema = json.dumps(
        {
            "type": "object",
            "properties": {"city": {"type": "string"}, "tags": {"type": "array"}},
            "required": ["city", "tags"],
        }
    )
    out = tmp_path / "out.csv"
    result = lmstream(
        "batch", "place", str(rows), "--schema", schema, "-o", str(out), "--base-url", sim.base_url
    )
    assert result.returncode == 1, result.stderr  # one row failed
    assert "does not match the schema at $." in result.stderr
    with out.open(encoding="utf-8", newline="") as handle:
        written = list(csv.DictReader(handle))
    assert [r["status"] for r in written] == ["ok", "invalid_output"]
    assert written[0]["parsed.city"]
    assert isinstance(json.loads(written[0]["parsed.tags"]), list), "a list is a JSON cell"
    assert written[1]["parsed.city"] == "", "a failed row has no parsed fields"
    bad = lmstream("batch", "place", str(rows), "--schema", "{", "--base-url", sim.base_url)
    assert bad.returncode == 2
    assert bad.stderr.startswith("lmstream: The schema ")


def test_the_batch_runs_as_many_rows_on_each_server_as_it_has_slots(tmp_path: Path) -> None:
    """No ``-c``: each server's own slots, said on the bar; an explicit ``-c`` is the total."""
    with (
        simulator.serve(profile="test-fast", parallel=3) as three,
        simulator.serve(profile="test-fast", parallel=1) as one,
    ):
        with PromptStore() as store:
            store.save("pet", "Tell me about {{animal}}.")
        rows = tmp_path / "rows.csv"
        rows.write_text("animal\nowls\nbats\ncats\neels\nants\n", encoding="utf-8")
        urls = ["--base-url", three.base_url, "--base-url", one.base_url]
        auto = lmstream("batch", "pet", str(rows), *urls)
        capped = lmstream("batch", "pet", str(rows), "-c", "1", *urls)
        served = len(three.chats()) + len(one.chats())
    assert auto.returncode == 0, auto.stderr
    assert "2 servers: 3 + 1 slots" in auto.stderr
    assert capped.returncode == 0, capped.stderr
    assert "2 servers: 1 + 0 at once" in capped.stderr
    assert served == 10


def test_the_demo_says_its_answer_is_filler_and_ends_a_sentence() -> None:
    result = lmstream("demo", "--time-scale", "0.05", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "simulated filler text" in result.stderr
    assert "finish: stop" in result.stderr
    assert result.stdout.rstrip()[-1] in ".!🙂", result.stdout[-80:]


def _imported(*argv: str) -> set[str]:
    """The modules a fresh interpreter imports for ``argv`` (from ``-X importtime``)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


HEAVY = {"httpx", "uvicorn", "starlette", "IPython", "ipywidgets", "anywidget", "tqdm"}


def test_help_imports_no_client_server_or_notebook_module() -> None:
    modules = _imported("-m", "lmstream_nb", "--help")
    assert "lmstream_nb.cli" in modules
    assert not HEAVY & modules, HEAVY & modules
    assert not {"lmstream_nb._client", "lmstream_nb._store", "lmstream_nb.simulator._server"} & (
        modules
    )


def test_run_imports_the_client_but_no_server_or_notebook_module() -> None:
    modules = _imported("-m", "lmstream_nb", "run", "Hi", "--base-url", "http://127.0.0.1:9/v1")
    assert "httpx" in modules
    assert not {"uvicorn", "starlette", "IPython", "ipywidgets", "anywidget"} & modules


def test_load_ext_imports_no_client_or_widgets() -> None:
    code = (
        "from IPython.core.interactiveshell import InteractiveShell; "
        "InteractiveShell.instance().run_line_magic('load_ext', 'lmstream_nb')"
    )
    modules = _imported("-c", code)
    assert "lmstream_nb._magics" in modules
    assert not {"httpx", "ipywidgets", "anywidget", "uvicorn", "lmstream_nb._client"} & modules


def test_run_with_a_schema_checks_the_answer(sim: simulator.SimServer, tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    path = tmp_path / "city.json"
    path.write_text(json.dumps(schema), encoding="utf-8")
    ok = lmstream("run", "A city", "--schema", str(path), "--json", "--base-url", sim.base_url)
    assert ok.returncode == 0, ok.stderr
    events = [json.loads(line) for line in ok.stdout.splitlines()]
    assert events[0]["api"] == "openai"  # the native chat takes no response_format
    text = "".join(e["content"] for e in events if e["event"] == "text")
    assert events[-1]["parsed"] == json.loads(text)
    assert set(events[-1]["parsed"]) == {"city"}
    shown = lmstream("history", "--run", str(events[-1]["run_id"]))
    assert '--- schema\n{\n  "properties": {\n    "city": {' in shown.stdout, shown.stdout

    broken = lmstream(
        "run",
        'A city [[sim {"schema_fault": "invalid_json"}]]',
        "--schema",
        json.dumps(schema),
        "--base-url",
        sim.base_url,
    )
    assert broken.returncode == 1
    assert broken.stdout.startswith('{"city":')
    [said] = broken.stderr.splitlines()[-1:]
    assert said.startswith("lmstream: The answer is not valid JSON")
    with PromptStore() as store:
        [last, _] = store.history(limit=2)
    assert last.status == "invalid_output"


@pytest.mark.parametrize(
    ("schema", "said"),
    [
        ('{"type": ', "The schema is not valid JSON"),
        ("missing.json", "The schema file 'missing.json' does not exist"),
        ('{"type": "text"}', "is not a valid JSON Schema at $.type"),
    ],
)
def test_a_bad_schema_is_one_usage_sentence(
    sim: simulator.SimServer, schema: str, said: str
) -> None:
    before = len(sim.chats())
    result = lmstream("run", "Hi", "--schema", schema, "--base-url", sim.base_url)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert said in result.stderr
    assert "Traceback" not in result.stderr
    assert len(sim.chats()) == before


def test_run_api_chooses_the_endpoint(sim: simulator.SimServer) -> None:
    chats = len(sim.chats())
    result = lmstream("run", "Hi", "--api", "openai", "--json", "--base-url", sim.base_url)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[0])["api"] == "openai"
    assert [r.path for r in sim.chats()[chats:]] == ["/v1/chat/completions"]
    wrong = lmstream("run", "Hi", "--api", "nowhere", "--base-url", sim.base_url)
    assert wrong.returncode == 2
    assert "invalid choice: 'nowhere'" in wrong.stderr


def test_run_chat_sends_the_earlier_turns_and_chat_lists_shows_forks_resets(
    sim: simulator.SimServer,
) -> None:
    server = ("--base-url", sim.base_url, "--max-tokens", "4")
    first = lmstream("run", "--chat", "notes", "--system", "Be brief.", "Name a river.", *server)
    assert first.returncode == 0, first.stderr
    before = len(sim.records())
    second = lmstream("run", "--chat", "notes", "Another?", *server)
    assert second.returncode == 0, second.stderr
    [request] = [r for r in sim.records()[before:] if r.method == "POST"]
    assert request.path == "/v1/chat/completions"
    assert request.messages == (
        ("system", "Be brief."),
        ("user", "Name a river."),
        ("assistant", first.stdout.strip()),
        ("user", "Another?"),
    )
    [latest] = json.loads(lmstream("history", "--limit", "1", "--json").stdout)
    assert latest["conversation"] == "notes"
    assert "chat notes" in lmstream("history").stdout  # a typed turn's label
    turn = lmstream("history", "--run", str(latest["id"]))
    assert "--- 3 earlier messages (the conversation's turns before this one" in turn.stdout
    assert "Name a river." not in turn.stdout  # stored once, with the first turn
    shown = lmstream("chat", "show", "notes")
    assert shown.returncode == 0, shown.stderr
    assert "Name a river." in shown.stdout
    assert "Another?" in shown.stdout
    turns = json.loads(lmstream("chat", "show", "notes", "--json").stdout)
    assert [(t["message"], t["status"]) for t in turns] == [
        ("Name a river.", "ok"),
        ("Another?", "ok"),
    ]
    forked = lmstream("chat", "fork", "notes", "notes-2")
    assert forked.returncode == 0, forked.stderr
    assert lmstream("chat", "reset", "notes").returncode == 0
    listed = json.loads(lmstream("chat", "list", "--json").stdout)
    assert [(c["name"], c["turns"]) for c in listed] == [("notes", 0), ("notes-2", 2)]
    missing = lmstream("chat", "show", "ntoes")
    assert missing.returncode != 0
    assert "did you mean 'notes'" in missing.stderr
    usage = lmstream("chat", "fork", "notes")
    assert usage.returncode != 0
    assert "NAME" in usage.stderr


def test_compare_prints_the_summary_and_writes_every_cell(tmp_path: Path) -> None:
    with simulator.serve(profile="test-fast", seed=2, models=("sim-a", "sim-b")) as server:
        with PromptStore() as store:
            store.save("pet", "Tell me about {{animal}}.")
            store.save("pet", "Describe {{animal}} to {{who}}.")
        rows = tmp_path / "rows.jsonl"
        rows.write_text('{"animal": "owls"}\n{"animal": "bats"}\n', encoding="utf-8")
        out = tmp_path / "cells.csv"
        result = lmstream(
            "compare",
            "pet@1",
            "pet@2",
            "--models",
            "sim-a,sim-b",
            "--var",
            "who=Ada",
            "--rows",
            str(rows),
            "--out",
            str(out),
            "--max-tokens",
            "5",
            "--base-url",
            server.base_url,
        )
        refused = lmstream("compare", "pet@2", "--base-url", server.base_url)
        match = re.match(r"comparison (\w+):", result.stdout)
        assert match, result.stdout
        by_version = lmstream("stats", "--by", "version", "--batch", match.group(1))
        unknown = lmstream("compare", "pet@7", "--base-url", server.base_url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    match = re.fullmatch(r"comparison (\w+): 8 of 8 cells ok", lines[0])
    assert match, lines[0]
    assert lines[1].split() == [
        "version",
        "model",
        "ok",
        "success",
        "ttft",
        "p50",
        "ttft",
        "p95",
        "mean",
        "length",
    ]
    body = [line.split()[:4] for line in lines[3:]]
    assert body == [[v, m, "2/2", "100%"] for v in ("pet@1", "pet@2") for m in ("sim-a", "sim-b")]
    import csv

    with out.open(encoding="utf-8", newline="") as handle:
        cells = list(csv.DictReader(handle))
    assert len(cells) == 8
    assert [(c["version"], c["model"], c["row"], c["animal"]) for c in cells[:2]] == [
        ("pet@1", "sim-a", "0", "owls"),
        ("pet@1", "sim-a", "1", "bats"),
    ]
    assert {c["who"] for c in cells} == {"Ada"}
    assert all(c["status"] == "ok" and c["text"].strip() for c in cells)
    with PromptStore() as store:
        recorded = store.history(batch=match.group(1), limit=None)
    assert sorted(r.id for r in recorded) == sorted(int(c["run_id"]) for c in cells)
    # A missing value is one usage sentence, before anything is sent; so is a missing version.
    assert refused.returncode == 2
    assert "animal" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert unknown.returncode == 1
    assert "has no version 7" in unknown.stderr
    # The recorded cells, per version and model.
    assert by_version.returncode == 0, by_version.stderr
    groups = [line.split()[:4] for line in by_version.stdout.splitlines()[2:]]
    assert groups == [
        *([v, m, "2", "100%"] for v in ("pet@1", "pet@2") for m in ("sim-a", "sim-b")),
        ["(all)", "(all)", "8", "100%"],
    ]
