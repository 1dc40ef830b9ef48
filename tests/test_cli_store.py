"""`lmstream prompts|run --prompt|history|stats` as real subprocesses on a temporary home."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmstream_nb import PromptStore, simulator


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
        assert shown.endswith(f"--- answer\n{store.get_run(run['id']).text}\n")


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
