"""`lmstream prompts|run --prompt|history|stats` as real subprocesses on a temporary home."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pty_run import read_stdout_on_a_terminal
from store_helpers import finish, start

from lmstream_nb import PromptStore, simulator
from lmstream_nb._prompt_fields import RULES


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LMSTREAM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def lmstream(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmstream_nb", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_prompts_lifecycle(home: Path, tmp_path: Path) -> None:
    added = lmstream(
        "prompts",
        "add",
        "greet",
        "Hello {{name}}, from {{place}}.",
        "--description",
        "a greeting",
        "--temperature",
        "0.2",
    )
    assert added.returncode == 0, added.stderr
    assert "greet@1" in added.stdout
    assert "name, place" in added.stdout
    again = lmstream("prompts", "add", "greet", "-", stdin="Hi {{name}}!")
    assert "greet@2" in again.stdout
    listed = lmstream("prompts", "list", "--json")
    [entry] = json.loads(listed.stdout)
    assert entry["name"] == "greet"
    assert entry["version"] == 2
    assert entry["variables"] == ["name"]
    assert "greet" in lmstream("prompts", "list").stdout
    shown = lmstream("prompts", "show", "greet", "--version", "1")
    assert "Hello {{name}}, from {{place}}." in shown.stdout
    assert "temperature: 0.2" in shown.stdout
    versions = json.loads(lmstream("prompts", "versions", "greet", "--json").stdout)
    assert [v["version"] for v in versions] == [1, 2]
    out_dir = tmp_path / "library"
    exported = lmstream("prompts", "export", str(out_dir))
    assert exported.returncode == 0
    assert (out_dir / "greet.toml").exists()
    removed = lmstream("prompts", "rm", "greet")
    assert removed.returncode == 0
    assert "2 versions" in removed.stdout
    missing = lmstream("prompts", "show", "greet")
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1
    assert "Traceback" not in missing.stderr
    imported = lmstream("prompts", "import", str(out_dir))
    assert imported.returncode == 0
    assert "greet@3" in imported.stdout


def test_import_error_names_file_and_line(home: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "ok.toml").write_text('template = "fine {{x}}"\n', encoding="utf-8")
    (folder / "broken.toml").write_text('template = "a"\nmodel = = 3\n', encoding="utf-8")
    result = lmstream("prompts", "import", str(folder))
    assert result.returncode == 1
    assert "broken.toml" in result.stderr
    assert "line 2" in result.stderr
    assert json.loads(lmstream("prompts", "list", "--json").stdout) == []


def test_run_prompt_then_history_and_stats(home: Path, sim: simulator.SimServer) -> None:
    lmstream("prompts", "add", "topic", "Tell me about {{t}}.")
    ok = lmstream(
        "run",
        "--prompt",
        "topic",
        "--var",
        "t=owls",
        "--base-url",
        sim.base_url,
        "--max-tokens",
        "8",
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip()
    assert "run #1" in ok.stderr
    defaults = simulator.Scenario(disconnect_at=3)
    with simulator.serve(profile="test-fast", defaults=defaults) as broken:
        failed = lmstream(
            "run", "--prompt", "topic", "--var", "t=bats", "--base-url", broken.base_url
        )
    assert failed.returncode == 1
    assert failed.stdout.strip()
    missing = lmstream("run", "--prompt", "topic", "--base-url", sim.base_url)
    assert missing.returncode == 2
    assert "t" in missing.stderr
    unknown = lmstream("run", "--prompt", "topik", "--base-url", sim.base_url)
    assert unknown.returncode == 1
    assert "'topic'" in unknown.stderr

    runs = json.loads(lmstream("history", "--json").stdout)
    assert [r["status"] for r in runs] == ["interrupted", "ok"]
    table = lmstream("history", "--status", "ok").stdout
    assert "topic@1" in table
    assert "interrupted" not in table
    one = lmstream("history", "--run", str(runs[0]["id"]))
    assert "interrupted" in one.stdout
    assert failed.stdout.strip() in one.stdout

    report = json.loads(lmstream("stats", "--json").stdout)
    assert report["overall"]["runs"] == 2
    assert report["overall"]["success_rate"] == 0.5
    text = lmstream("stats", "--prompt", "topic").stdout
    assert "50%" in text
    assert "interrupted 1" in text

    with PromptStore(home / "lmstream.db") as store:
        assert store.get_run(runs[1]["id"]).variables == {"t": "owls"}


def test_corrupt_database_is_one_sentence(home: Path) -> None:
    home.mkdir(parents=True)
    (home / "lmstream.db").write_bytes(b"this is not a database" * 100)
    result = lmstream("prompts", "list")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "LMSTREAM_HOME" in result.stderr


def test_batch_command_csv_and_jsonl(home: Path, tmp_path: Path, sim: simulator.SimServer) -> None:
    lmstream("prompts", "add", "pet", "Tell me about {{animal}}.")
    rows = tmp_path / "rows.csv"
    rows.write_text("animal\nowls\nbats\n\ncats\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    done = lmstream(
        "batch",
        "pet",
        str(rows),
        "--base-url",
        sim.base_url,
        "--max-tokens",
        "4",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert "3 ok, 0 failed" in done.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["animal"] for r in results] == ["owls", "bats", "cats"]
    assert all(r["status"] == "ok" and r["text"] for r in results)
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"animal": "eels"}\n{"animal2": "x"}\n', encoding="utf-8")
    partial = lmstream("batch", "pet", str(bad), "--base-url", sim.base_url, "--max-tokens", "4")
    assert partial.returncode == 1
    assert "1 ok, 1 failed" in partial.stderr
    assert "  1 row: The template needs a value for the variable animal:" in partial.stderr
    assert "--resume" not in partial.stderr, "a rerun would meet the same bad row"
    assert "A rerun would fail the same way" in partial.stderr
    assert "Traceback" not in partial.stderr


def _summary(stderr: str) -> list[str]:
    """The lines a batch ends with, after its progress bar."""
    return stderr[stderr.index("\nbatch ") + 1 :].split("\n")[:-1]


def test_batch_groups_why_rows_failed_and_offers_resume_only_when_it_can_help(
    home: Path, tmp_path: Path, sim: simulator.SimServer
) -> None:
    lmstream("prompts", "add", "pet", "Tell me about {{animal}}.")
    rows = tmp_path / "rows.csv"
    rows.write_text("animal\nowls\nbats\ncats\n", encoding="utf-8")
    with simulator.serve(profile="test-fast", defaults=simulator.Scenario(disconnect_at=2)) as bad:
        broken = lmstream("batch", "pet", str(rows), "--base-url", bad.base_url)
        bad_url = bad.base_url
    assert broken.returncode == 1
    lines = _summary(broken.stderr)
    batch_id = lines[0].split()[1].rstrip(":")
    assert lines[0] == f"batch {batch_id}: 0 ok, 3 failed"
    assert len(lines) == 3, "one sentence for three rows that failed alike, then the advice"
    assert lines[1].startswith(f"  3 rows, the first: The stream from {bad_url} broke off")
    assert f"lmstream batch pet {rows} --resume {batch_id}" in lines[2]
    resumed = lmstream("batch", "pet", str(rows), "--base-url", sim.base_url, "--resume", batch_id)
    assert resumed.returncode == 0, resumed.stderr
    assert _summary(resumed.stderr) == [f"batch {batch_id}: 3 ok, 0 failed"]

    unknown = lmstream("batch", "pet", str(rows), "--base-url", sim.base_url, "--model", "nope")
    assert unknown.returncode == 1
    assert "  3 rows: The model 'nope' is not available" in unknown.stderr
    assert "--resume" not in unknown.stderr

    table = lmstream("history", "--batch", batch_id).stdout.splitlines()
    assert len(table) == 2 + 6, "three failed and three resumed runs of that batch only"
    assert "error / text" in table[0]
    assert sum("interrupted" in line and "The stream from" in line for line in table) == 3
    listed = json.loads(lmstream("history", "--batch", batch_id, "--json").stdout)
    assert {r["batch_id"] for r in listed} == {batch_id}


def test_history_run_shows_the_whole_record(home: Path, sim: simulator.SimServer) -> None:
    lmstream("prompts", "add", "topic", "Tell me about {{t}}.", "--system", "Be brief, {{t}}.")
    ran = lmstream(
        "run",
        "--prompt",
        "topic",
        "--var",
        "t=owls",
        "--base-url",
        sim.base_url,
        "--max-tokens",
        "5",
    )
    assert ran.returncode == 0, ran.stderr
    [run] = json.loads(lmstream("history", "--json").stdout)
    shown = lmstream("history", "--run", str(run["id"])).stdout
    assert shown.startswith(f"run #{run['id']}  ok  topic@1  lmstream-sim-8b")
    for line in (
        f"server: {sim.base_url}",
        "finish reason: length",
        "answer tokens: 5",
        "--- variables\nt = owls",
        "--- system\nBe brief, owls.",
        "--- user\nTell me about owls.",
    ):
        assert line in shown, line
    assert "first token: " in shown
    assert "total: " in shown
    with PromptStore(home / "lmstream.db") as store:
        recorded = store.get_run(run["id"])
        assert shown.endswith(f"--- answer\n{recorded.text}\n")
    assert recorded.api in ("native", "openai")
    assert f"\nendpoint: {recorded.api} (" in shown
    assert run["api"] == recorded.api


def test_history_shows_where_a_run_went_and_what_progress_told_only_where_known(
    home: Path,
) -> None:
    with PromptStore(home / "lmstream.db") as store:
        told = start(store, base_url="http://127.0.0.1:1234/v1")
        finish(
            store,
            told,
            api="native",
            first_progress_s=0.04,
            load_s=3.5,
            prompt_s=12.25,
            prompt_tokens_per_s=640.0,
            ttft_s=15.9,
        )
        silent = start(store)
        finish(store, silent)  # an older run, or a server that reports no progress
    shown = lmstream("history", "--run", str(told)).stdout.splitlines()
    facts = shown[1 : shown.index("--- variables")]
    assert facts[:8] == [
        "server: http://127.0.0.1:1234/v1",
        "endpoint: native (LM Studio's /api/v1/chat)",
        "finish reason: stop",
        "first sign of life: 0.04 s",
        "model load: 3.50 s",
        "prompt processing: 12.25 s",
        "prompt tokens/s: 640.0",
        "first token: 15.90 s",
    ]
    plain = lmstream("history", "--run", str(silent)).stdout
    for fact in ("endpoint", "first sign of life", "model load", "prompt processing"):
        assert f"{fact}:" not in plain, fact
    assert "prompt tokens/s:" not in plain
    assert "first token: 0.10 s" in plain
    assert "prompt tokens: 3" in plain  # the facts always shown stay, known or not

    record = json.loads(lmstream("history", "--run", str(told), "--json").stdout)
    assert {key: record[key] for key in ("api", "first_progress_s", "load_s", "prompt_s")} == {
        "api": "native",
        "first_progress_s": 0.04,
        "load_s": 3.5,
        "prompt_s": 12.25,
    }
    assert record["prompt_tokens_per_s"] == 640.0
    listed = {run["id"]: run for run in json.loads(lmstream("history", "--json").stdout)}
    assert (listed[told]["api"], listed[told]["prompt_tokens_per_s"]) == ("native", 640.0)
    assert (listed[silent]["api"], listed[silent]["load_s"]) == (None, None)
    stats = json.loads(lmstream("stats", "--json").stdout)
    assert stats["overall"]["first_progress_p50"] == 0.04


def test_export_refuses_a_foreign_file_unless_forced(home: Path, tmp_path: Path) -> None:
    assert lmstream("prompts", "add", "greet", "Hi {{name}}").returncode == 0
    folder = tmp_path / "library"
    folder.mkdir()
    foreign = folder / "greet.toml"
    foreign.write_text("not mine\n", encoding="utf-8")
    refused = lmstream("prompts", "export", str(folder))
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1
    assert "--force" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert foreign.read_text(encoding="utf-8") == "not mine\n"
    forced = lmstream("prompts", "export", str(folder), "--force")
    assert forced.returncode == 0, forced.stderr
    assert "Hi {{name}}" in foreign.read_text(encoding="utf-8")


def test_a_placeholder_that_is_no_name_is_a_usage_error(home: Path) -> None:
    result = lmstream("prompts", "add", "greet", "Hi {{first name}}")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "{{first name}}" in result.stderr
    assert json.loads(lmstream("prompts", "list", "--json").stdout) == []


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("Hi {{name", "placeholder {{name at line 1, column 4 that is not closed"),
        ("Hi {{ 1x }}", "placeholder {{ 1x }} at line 1, column 4"),
        ("Hi {{my name}}", "whose inside is not a variable name"),
    ],
)
def test_prompts_add_reports_a_placeholder_typo_and_saves_nothing(
    home: Path, template: str, fragment: str
) -> None:
    added = lmstream("prompts", "add", "typo", template)
    assert added.returncode == 2
    assert fragment in added.stderr
    assert "{{my_var}}" in added.stderr  # the allowed form
    assert added.stderr.count("\n") == 1
    assert "Traceback" not in added.stderr
    assert lmstream("prompts", "list", "--json").stdout.strip() == "[]"


def test_prompts_add_keeps_unchanged_settings_and_says_so_one_line_each(home: Path) -> None:
    first = lmstream(
        "prompts", "add", "greet", "Hi {{name}}", "--system", "Be kind", "--temperature", "0.2"
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout == "Saved greet@1 (variables: name).\n"
    second = lmstream("prompts", "add", "greet", "Hello {{name}}", "--temperature", "none")
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == [
        "Saved greet@2 (variables: name).",
        "Kept from greet@1: the system prompt (--system '' drops it).",
        "Dropped: temperature 0.2 of greet@1.",
    ]
    shown = json.loads(lmstream("prompts", "show", "greet", "--json").stdout)
    assert (shown["system"], shown["temperature"]) == ("Be kind", None)
    same = lmstream("prompts", "add", "greet", "Hello {{name}}")
    assert same.returncode == 0, same.stderr
    assert same.stdout.startswith("Unchanged: greet@2 already holds this template")
    versions = json.loads(lmstream("prompts", "versions", "greet", "--json").stdout)
    assert [v["version"] for v in versions] == [1, 2]


def test_prompts_import_twice_says_unchanged_and_adds_no_version(
    home: Path, tmp_path: Path
) -> None:
    library = tmp_path / "library"
    library.mkdir()
    (library / "a.toml").write_text('template = "A {{x}}"\nsystem = "S"\n', encoding="utf-8")
    (library / "b.toml").write_text('template = "B"\n', encoding="utf-8")
    first = lmstream("prompts", "import", str(library))
    assert first.stdout == "Imported 2 new version(s): a@1, b@1.\n"
    (library / "b.toml").write_text('template = "B, edited"\n', encoding="utf-8")
    again = lmstream("prompts", "import", str(library))
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [
        "Imported 1 new version(s): b@2.",
        "Unchanged (no new version): a@1.",
    ]


@pytest.mark.parametrize(
    ("option", "value", "shown", "setting"),
    [
        ("--temperature", "5", "5.0", "temperature"),
        ("--temperature", "-1", "-1.0", "temperature"),
        ("--max-tokens", "0", "0", "max_tokens"),
        ("--max-tokens", "-2", "-2", "max_tokens"),
    ],
)
def test_run_and_batch_refuse_settings_out_of_range_like_every_front_end(
    home: Path,
    tmp_path: Path,
    sim: simulator.SimServer,
    option: str,
    value: str,
    shown: str,
    setting: str,
) -> None:
    def expected(command: str) -> str:  # refused while the options are read, by the one rule
        return (
            f"lmstream {command}: {option} {shown} is not {RULES[setting]}: give {option} such a "
            f"value, or leave it out for the prompt's own (see lmstream {command} --help).\n"
        )

    ran = lmstream("run", "Say {{x}}", "--var", "x=hi", option, value, "--base-url", sim.base_url)
    assert (ran.returncode, ran.stderr) == (2, expected("run"))
    lmstream("prompts", "add", "say", "Say {{x}}")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"x": "hi"}\n', encoding="utf-8")
    if option == "--max-tokens":  # batch has no --temperature
        batch = lmstream("batch", "say", str(rows), option, value, "--base-url", sim.base_url)
        assert (batch.returncode, batch.stderr) == (2, expected("batch"))
    assert json.loads(lmstream("history", "--json").stdout) == [], "nothing was sent"


def test_an_empty_value_is_sent_as_typed_and_no_limit_is_minus_one(
    home: Path, sim: simulator.SimServer
) -> None:
    ran = lmstream(
        "run", "Say {{x}}!", "--var", "x=", "--max-tokens", "-1", "--base-url", sim.base_url
    )
    assert ran.returncode == 0, ran.stderr
    [run] = json.loads(lmstream("history", "--json").stdout)
    record = json.loads(lmstream("history", "--run", str(run["id"]), "--json").stdout)
    assert record["messages"] == [{"role": "user", "content": "Say !"}]


def test_advice_names_the_command_line_options(home: Path, sim: simulator.SimServer) -> None:
    missing = lmstream("run", "Say {{x}} to {{y}}", "--base-url", sim.base_url)
    assert missing.returncode == 2
    assert "add --var x=... --var y=... and run again." in missing.stderr
    stalled = lmstream(
        "run",
        'Tell me a story. [[sim {"stall_at": 3, "stall_s": 30}]]',
        "--idle-timeout",
        "0.5",
        "--base-url",
        sim.base_url,
    )
    assert stalled.returncode == 1
    assert "kept above and in `lmstream history`; raise --idle-timeout" in stalled.stderr
    assert "partial_text" not in stalled.stderr
    assert "idle_timeout" not in stalled.stderr
    [run] = json.loads(lmstream("history", "--status", "stalled", "--json").stdout)
    assert "raise --idle-timeout" in run["error"], "recorded in the words it was shown in"


def test_unreachable_server_advice_names_where_the_url_came_from(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    given = lmstream("models", "--base-url", dead)
    assert given.returncode == 1
    assert "or give --base-url where it listens." in given.stderr
    monkeypatch.setenv("LMSTREAM_BASE_URL", dead)
    from_env = lmstream("models")
    assert "or fix the environment variable LMSTREAM_BASE_URL, which gave this address" in (
        from_env.stderr
    )


def test_prompts_diff_is_a_plain_unified_diff_when_piped(home: Path) -> None:
    lmstream("prompts", "add", "greet", "Hello {{name}}.\nBe brief.", "--temperature", "0.2")
    lmstream("prompts", "add", "greet", "Hello {{name}}!\nBe brief.", "--model", "m1")
    diff = lmstream("prompts", "diff", "greet", "1", "2")
    assert diff.returncode == 0, diff.stderr
    assert "\x1b" not in diff.stdout, "no colour when piped"
    assert diff.stdout == (
        "--- greet@1 template\n"
        "+++ greet@2 template\n"
        "@@ -1,2 +1,2 @@\n"
        "-Hello {{name}}.\n"
        "+Hello {{name}}!\n"
        " Be brief.\n"
        "--- greet@1 model\n"
        "+++ greet@2 model\n"
        "@@ -0,0 +1 @@\n"
        "+m1\n"
    ), "the temperature was kept, so it is no difference"
    assert lmstream("prompts", "diff", "greet", "1").stdout == diff.stdout, "B: the latest"
    same = lmstream("prompts", "diff", "greet", "2", "2")
    assert same.returncode == 0
    assert same.stdout == "No differences between greet@2 and greet@2.\n"


def test_prompts_diff_is_coloured_on_a_terminal(home: Path) -> None:
    lmstream("prompts", "add", "greet", "Hello {{name}}.")
    lmstream("prompts", "add", "greet", "Hello {{name}}!")
    status, shown, err = read_stdout_on_a_terminal("prompts", "diff", "greet", "1", "2")
    assert status == 0, err
    text = shown.decode().replace("\r\n", "\n")  # the terminal turns \n into \r\n
    assert "\x1b[31m-Hello {{name}}.\x1b[m\n" in text
    assert "\x1b[32m+Hello {{name}}!\x1b[m\n" in text
    assert "\x1b[1m--- greet@1 template\x1b[m\n" in text


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["greet", "1", "9"], "The prompt 'greet' has no version 9: see `lmstream prompts"),
        (["gret", "1", "2"], "No prompt is named 'gret'"),
    ],
)
def test_prompts_diff_of_an_unknown_prompt_or_version_is_one_sentence(
    home: Path, argv: list[str], said: str
) -> None:
    lmstream("prompts", "add", "greet", "Hi")
    missing = lmstream("prompts", "diff", *argv)
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert missing.stderr.startswith("lmstream: " + said)
    assert missing.stderr.count("\n") == 1
    assert "Traceback" not in missing.stderr


def test_a_prompt_keeps_its_schema_and_a_run_uses_it(
    home: Path, tmp_path: Path, sim: simulator.SimServer
) -> None:
    schema = tmp_path / "city.json"
    schema.write_text('{"type": "object", "properties": {"city": {"type": "string"}}}', "utf-8")
    added = lmstream("prompts", "add", "city", "Name a city.", "--schema", str(schema))
    assert added.returncode == 0, added.stderr
    kept = lmstream("prompts", "add", "city", "Name a city by the sea.")
    assert "Kept from city@1: the schema (--schema '' drops it)" in kept.stdout
    shown = lmstream("prompts", "show", "city")
    assert '--- schema\n{\n  "properties": {' in shown.stdout
    assert json.loads(lmstream("prompts", "show", "city", "--json").stdout)["schema"] == {
        "type": "object",
        "properties": {"city": {"type": "string"}},
    }
    ran = lmstream("run", "--prompt", "city", "--json", "--base-url", sim.base_url)
    assert ran.returncode == 0, ran.stderr
    assert set(json.loads(ran.stdout.splitlines()[-1])["parsed"]) == {"city"}
    dropped = lmstream("prompts", "add", "city", "Name a city.", "--schema", "")
    assert "city@3" in dropped.stdout
    bad = lmstream("prompts", "add", "city", "x", "--schema", '{"type": 1}')
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1
    assert "is not a valid JSON Schema at $.type" in bad.stderr
