"""PromptStore on real SQLite files: location, versions, refusals, runs, load."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import platformdirs
import pytest
from store_helpers import (
    finish,
    one_sentence,
    start,
    store_fixture,  # noqa: F401 (the `store` fixture)
)
from waiting import wait_until

from lmstream_nb import run, simulator
from lmstream_nb._errors import (
    InvalidPlaceholder,
    PromptNotFound,
    RunNotFound,
    StoreError,
    StoreUnavailable,
    render,
)
from lmstream_nb._migrations import APPLICATION_ID, FIRST_TOKEN_HISTORY, LATEST_VERSION
from lmstream_nb._owners import current_owner
from lmstream_nb._store import (
    ORPHANED_ERROR,
    STATUSES,
    WAL_SIZE_LIMIT,
    PromptStore,
    default_path,
)
from lmstream_nb._template import Prompt

PACKAGE = Path(__file__).resolve().parent.parent / "lmstream_nb"
URL = "http://127.0.0.1:1234/v1"  # the base URL store_helpers records


# ---------------------------------------------------------------------------------------------
# Location


def test_default_path_follows_lmstream_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "nested" / "home"
    monkeypatch.setenv("LMSTREAM_HOME", str(home))
    assert default_path() == home / "lmstream.db"
    assert home.is_dir()
    with PromptStore() as opened:
        assert opened.path == home / "lmstream.db"
        assert repr(opened) == f"PromptStore({str(home / 'lmstream.db')!r})"


@pytest.mark.skipif(sys.platform != "linux", reason="XDG_DATA_HOME steers platformdirs on Linux")
def test_default_path_without_home_is_the_user_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LMSTREAM_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    expected = Path(platformdirs.user_data_dir("lmstream_nb", appauthor=False)) / "lmstream.db"
    assert expected == tmp_path / "xdg" / "lmstream_nb" / "lmstream.db"
    assert default_path() == expected
    assert expected.parent.is_dir()


def test_the_store_imports_no_client_or_front_end_code() -> None:
    forbidden = (
        "lmstream_nb._client",
        "lmstream_nb._sse",
        "lmstream_nb.cli",
        "lmstream_nb.simulator",
        "httpx",
    )
    modules = ("_store.py", "_migrations.py", "_history.py", "_prompt_files.py")
    for module in (*modules, "_prompt_fields.py", "_owners.py"):
        tree = ast.parse((PACKAGE / module).read_text(encoding="utf-8"))
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = "lmstream_nb." if node.level else ""
                found.add(base + (node.module or ""))
        bad = {n for n in found for f in forbidden if n == f or n.startswith(f + ".")}
        assert not bad, f"{module} imports {sorted(bad)}"


# ---------------------------------------------------------------------------------------------
# Prompts


def test_save_numbers_versions_and_keeps_old_ones_readable(store: PromptStore) -> None:
    before = time.time()
    first = store.save(
        "summarize",
        "Summarize {{text}}",
        system="You are {{role}}",
        model="qwen",
        temperature=0.2,
        max_tokens=256,
        description="short summaries",
    )
    assert (first.name, first.version) == ("summarize", 1)
    assert first.created_at is not None
    assert first.created_at >= before
    second = store.save("summarize", "Summarize briefly: {{text}}", max_tokens=-1)
    assert second.version == 2
    assert store.save("other", "x").version == 1

    assert store.get("summarize") == second
    assert store.get("summarize", 1) == first
    assert store.get("summarize", 1).system == "You are {{role}}"
    assert store.get("summarize", 1).temperature == 0.2
    assert [p.version for p in store.versions("summarize")] == [1, 2]
    assert store.versions("summarize")[0] == first


def test_list_gives_the_latest_version_of_each_name_sorted(store: PromptStore) -> None:
    store.save("zeta", "z1")
    store.save("alpha", "a1")
    store.save("zeta", "z2")
    store.save("Émile", "e1")
    listed = store.list()
    assert [(p.name, p.version, p.template) for p in listed] == [
        ("alpha", 1, "a1"),
        ("zeta", 2, "z2"),
        ("Émile", 1, "e1"),
    ]


def test_delete_removes_all_versions_keeps_runs_and_never_reuses_versions(
    store: PromptStore,
) -> None:
    store.save("p", "one")
    store.save("p", "two")
    run_id = start(store, prompt_name="p", prompt_version=2)
    finish(store, run_id)
    assert store.delete("p") == 2
    with pytest.raises(PromptNotFound):
        store.get("p")
    assert store.list() == []
    assert store.get_run(run_id).prompt_version == 2
    assert store.get_run(run_id).template == "Say {{x}}"
    # A later prompt with the same name continues the numbering, so "p@2" keeps one meaning.
    assert store.save("p", "three").version == 3
    with pytest.raises(PromptNotFound):
        store.delete("nothing")


def test_save_prompt_takes_name_from_argument_or_prompt(store: PromptStore) -> None:
    prompt = Prompt(
        template="T {{x}}", system="S", model="m", temperature=1, max_tokens=5, description="d"
    )
    saved = store.save_prompt(prompt, name="given")
    assert (saved.name, saved.version, saved.template, saved.system) == ("given", 1, "T {{x}}", "S")
    assert saved.temperature == 1.0
    assert isinstance(saved.temperature, float)
    again = store.save_prompt(saved)  # the same content: no new version
    assert (again.name, again.version) == ("given", 1)
    with pytest.raises(ValueError, match="no name") as caught:
        store.save_prompt(prompt)
    one_sentence(str(caught.value))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": ""}, "empty"),
        ({"name": "a/b"}, "'/'"),
        ({"name": "a\\b"}, "'\\\\'"),
        ({"name": "line\nbreak"}, "'\\n'"),
        ({"name": "tab\there"}, "'\\t'"),
        ({"name": "bell\x7f"}, "'\\x7f'"),
        ({"name": "n" * 201}, "201 characters"),
        ({"name": "."}, "names a folder"),
        ({"name": ".."}, "names a folder"),
        ({"name": "line\u2028sep"}, "'\\u2028'"),
        ({"name": "abc\u202edcba"}, "U+202E (RIGHT-TO-LEFT OVERRIDE)"),
        ({"name": "zero\u200bwidth"}, "U+200B (ZERO WIDTH SPACE)"),
        ({"name": "join\u200dme"}, "U+200D (ZERO WIDTH JOINER)"),
        ({"name": "\ufeffbom"}, "U+FEFF (ZERO WIDTH NO-BREAK SPACE)"),
        ({"name": "iso\u2066late"}, "U+2066 (LEFT-TO-RIGHT ISOLATE)"),
        ({"name": "soft\u00adhyphen"}, "U+00AD (SOFT HYPHEN)"),
        ({"temperature": -0.1}, "temperature=-0.1 is not a number from 0 to 2"),
        ({"temperature": 2.5}, "temperature=2.5 is not a number from 0 to 2"),
        ({"temperature": math.nan}, "temperature=nan is not a number from 0 to 2"),
        ({"temperature": "hot"}, "temperature='hot' is not a number from 0 to 2"),
        ({"temperature": True}, "temperature=True is not a number"),
        ({"max_tokens": 0}, "max_tokens=0 is not a whole number from 1 to 2147483647, or -1"),
        ({"max_tokens": -2}, "max_tokens=-2 is not a whole number"),
        ({"max_tokens": 2**31}, "max_tokens=2147483648 is not a whole number"),
        ({"max_tokens": 1.5}, "max_tokens=1.5 is not a whole number"),
        ({"max_tokens": True}, "max_tokens=True is not a whole number"),
        ({"template": None}, "template must be text"),
        ({"system": 3}, "system must be text"),
    ],
)
def test_save_refuses_bad_values_with_one_sentence(
    store: PromptStore, kwargs: dict[str, Any], fragment: str
) -> None:
    values: dict[str, Any] = {"name": "ok", "template": "t", **kwargs}
    with pytest.raises(ValueError, match=re.escape(fragment)) as caught:
        store.save(**values)
    one_sentence(str(caught.value))
    assert store.list() == []


def test_a_new_version_keeps_the_settings_not_given_and_clears_those_given_as_none(
    store: PromptStore,
) -> None:
    first = store.add(
        "p", "v1", system="S", model="m", temperature=0.3, max_tokens=50, description="d"
    )
    assert (first.created, first.carried, first.dropped, first.base) == (True, (), (), None)
    second = store.add("p", "v2 {{x}}", temperature=0.7, description=None)
    assert second.created
    assert second.carried == ("system", "model", "max_tokens")
    assert second.dropped == ("description",)
    assert second.base == first.prompt
    kept = second.prompt
    assert (kept.version, kept.template, kept.system, kept.model) == (2, "v2 {{x}}", "S", "m")
    assert (kept.temperature, kept.max_tokens, kept.description) == (0.7, 50, None)
    assert store.get("p") == kept
    # save() and save_prompt() follow the same rule: save() keeps, a whole Prompt is exact.
    assert store.save("p", "v3").system == "S"
    assert store.save_prompt(Prompt(template="v4"), name="p").system is None


def test_a_version_can_revise_an_older_version(store: PromptStore) -> None:
    store.save("p", "one", system="old system")
    store.save("p", "two", system="new system")
    saved = store.add("p", "three", base_version=1)
    assert (saved.prompt.version, saved.prompt.system) == (3, "old system")
    assert saved.base is not None
    assert saved.base.version == 1
    with pytest.raises(PromptNotFound, match="has no version 9"):
        store.add("p", "four", base_version=9)


def test_saving_what_the_latest_version_holds_adds_no_version(store: PromptStore) -> None:
    store.save("p", "text {{x}}", system="S", temperature=0.5)
    store.save("p", "other")
    back = store.add("p", "text {{x}}", temperature=0.5)  # the system is kept: as version 1
    assert back.created
    assert back.prompt.version == 3
    same = store.add("p", "text {{x}}")
    assert not same.created
    assert same.prompt == back.prompt
    assert store.save("p", "text {{x}}", system="S", temperature=0.5).version == 3
    assert [v.version for v in store.versions("p")] == [1, 2, 3]
    store.delete("p")  # a deleted prompt saved again is a new version, even with that text
    assert store.add("p", "text {{x}}").prompt.version == 4


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"template": "Hi {{my name}}"}, "The template has the placeholder {{my name}}"),
        ({"system": "You are {{1x}}"}, "The system prompt has the placeholder {{1x}}"),
        ({"template": "Hi {{name"}, "The template has a placeholder {{name at line 1, column 4"),
        ({"template": "Hi {{name}"}, "The template has a placeholder {{name}"),
        ({"system": "a\n{{ x\n}}"}, "The system prompt has a placeholder {{ x at line 2"),
    ],
)
def test_save_refuses_a_placeholder_that_is_no_name(
    store: PromptStore, kwargs: dict[str, Any], fragment: str
) -> None:
    values: dict[str, Any] = {"name": "ok", "template": "t", **kwargs}
    with pytest.raises(InvalidPlaceholder, match=re.escape(fragment)) as caught:
        store.save(**values)
    one_sentence(str(caught.value))
    assert store.list() == []


def test_save_accepts_edge_values(store: PromptStore) -> None:
    assert store.save("n" * 200, "t").version == 1
    assert store.save("...", "t").version == 1  # not a folder name
    assert store.save(".hidden", "t").version == 1
    assert store.save("日本語 ✓ Ελληνικά", "t {{x}}").variables == ("x",)
    assert store.save("résumé ✓ (v2)", "t", temperature=0, max_tokens=-1).temperature == 0.0
    assert store.save("hot", "t", temperature=2, max_tokens=1).max_tokens == 1


def test_prompt_not_found_suggests_close_names(store: PromptStore) -> None:
    store.save("summarize", "s")
    store.save("translate", "t")
    with pytest.raises(PromptNotFound) as caught:
        store.get("sumarize")
    error = caught.value
    assert error.suggestions == ("summarize",)
    assert error.name == "sumarize"
    assert error.path == str(store.path)
    assert "did you mean 'summarize'?" in str(error)
    one_sentence(str(error))

    with pytest.raises(PromptNotFound) as caught:
        store.get("summarize", 9)
    assert caught.value.version == 9
    assert "no version 9" in str(caught.value)
    with pytest.raises(PromptNotFound) as caught:
        store.versions("zzz")
    assert caught.value.suggestions == ()
    assert "see PromptStore().list() for the names there are" in str(caught.value)
    assert "see `lmstream prompts list` for the names" in render(caught.value, "cli")
    assert "see %lmstream prompts for the names" in render(caught.value, "magic")


# ---------------------------------------------------------------------------------------------
# Files that are not ours, or not usable


def test_random_bytes_are_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "lmstream.db"
    content = random.Random(1).randbytes(10_000)
    path.write_bytes(content)
    with pytest.raises(StoreUnavailable) as caught:
        PromptStore(path)
    message = str(caught.value)
    assert f"The file {path} is not a usable lmstream_nb database" in message
    assert "LMSTREAM_HOME" in message
    assert caught.value.path == str(path)
    one_sentence(message)
    assert path.read_bytes() == content


def test_a_corrupt_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lmstream.db"
    with PromptStore(path) as created:
        for i in range(50):
            created.save(f"p{i}", "x" * 500)
    data = bytearray(path.read_bytes())
    data[100:4096] = random.Random(2).randbytes(3996)  # page 1: the schema's root page
    path.write_bytes(bytes(data))
    with pytest.raises(StoreUnavailable, match="not a usable lmstream_nb database") as caught:
        PromptStore(path)
    one_sentence(str(caught.value))


@pytest.mark.parametrize("application_id", [0, 0x12345678])
def test_a_foreign_sqlite_database_is_refused_untouched(
    tmp_path: Path, application_id: int
) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.execute("INSERT INTO notes VALUES ('keep me')")
    conn.execute(f"PRAGMA application_id = {application_id}")
    conn.commit()
    conn.close()
    content = path.read_bytes()
    with pytest.raises(StoreUnavailable, match="another program") as caught:
        PromptStore(path)
    one_sentence(str(caught.value))
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db"]


def test_an_empty_file_is_adopted(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    with PromptStore(path) as opened:
        opened.save("p", "t")
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lmstream.db"
    PromptStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {LATEST_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreUnavailable, match="upgrade lmstream_nb") as caught:
        PromptStore(path)
    assert f"schema version {LATEST_VERSION + 1}" in str(caught.value)
    one_sentence(str(caught.value))


def test_a_closed_store_says_so(tmp_path: Path) -> None:
    opened = PromptStore(tmp_path / "x.db")
    opened.close()
    opened.close()
    with pytest.raises(StoreError, match="is closed"):
        opened.list()


OPEN_SCRIPT = """
import json, sys
from lmstream_nb._errors import StoreUnavailable
from lmstream_nb._store import PromptStore
out = {}
for path in sys.argv[1:]:
    try:
        with PromptStore(path) as store:
            out[path] = {"read_only": store.read_only, "prompts": [p.name for p in store.list()]}
            try:
                store.save("new", "t")
            except StoreUnavailable as exc:
                out[path]["save"] = str(exc)
    except StoreUnavailable as exc:
        out[path] = str(exc)
print(json.dumps(out))
"""


def run_without_root_powers(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run Python where file permissions apply: as ``nobody``, or as root without DAC powers."""
    command = [sys.executable, "-c", OPEN_SCRIPT, *args]
    options: dict[str, Any] = {"capture_output": True, "text": True, "timeout": 50}
    if os.geteuid() != 0:
        return subprocess.run(command, check=False, **options)
    try:
        result = subprocess.run(command, check=False, user="nobody", **options)
        if result.returncode == 0:
            return result
    except (KeyError, OSError):  # no such user, or it cannot reach this interpreter
        pass
    # nobody usually cannot reach an interpreter under /root; stay root but drop the
    # capabilities that bypass permission bits.
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, 'nobody' cannot run this Python and setpriv is missing")
    dropped = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all", "--"]
    return subprocess.run([*dropped, *command], check=False, **options)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder under /tmp that another user can traverse (pytest's tmp_path is 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="lmstream-ro-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(folder)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_an_unwritable_location_is_refused_or_read_only(shared_tmp: Path) -> None:
    read_only_dir = shared_tmp / "ro"
    read_only_dir.mkdir()
    with PromptStore(read_only_dir / "existing.db") as created:
        created.save("p", "t")
    writable_dir = shared_tmp / "rw"
    writable_dir.mkdir()
    writable_dir.chmod(0o777)
    read_only_file = writable_dir / "readonly.db"
    with PromptStore(read_only_file) as created:
        created.save("p", "t")
    read_only_file.chmod(0o444)
    (read_only_dir / "existing.db").chmod(0o644)
    read_only_dir.chmod(0o555)

    refused = [str(read_only_dir / "new.db"), str(read_only_dir / "sub" / "new.db")]
    readable = [str(read_only_dir / "existing.db"), str(read_only_file)]
    result = run_without_root_powers([*refused, *readable])
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    for target in refused:  # nothing there to read, and nothing can be created
        message = outcome[target]
        assert "cannot be written" in message, (target, message)
        assert "set LMSTREAM_HOME to a writable folder" in message
        one_sentence(message)
    for target in readable:  # an existing database opens for reading, and says so on a write
        opened = outcome[target]
        assert opened["read_only"] is True, (target, opened)
        assert opened["prompts"] == ["p"]
        assert "is in a read-only location" in opened["save"]
        one_sentence(opened["save"])


# ---------------------------------------------------------------------------------------------
# Runs


def chunk_rows(store: PromptStore) -> int:
    conn = sqlite3.connect(store.path)
    try:
        return int(conn.execute("SELECT count(*) FROM run_chunks").fetchone()[0])
    finally:
        conn.close()


def test_a_run_is_recorded_at_start_grows_and_is_finished(store: PromptStore) -> None:
    t0 = time.time()
    run_id = start(
        store,
        system="You are {{role}}",
        variables={"x": "hi", "role": "kind"},
        messages=[
            {"role": "system", "content": "You are kind"},
            {"role": "user", "content": "Say hi"},
        ],
        started_at=t0,
        batch_id="b1",
    )
    store.append_run_text(run_id, "Hel", "think ")
    store.append_run_text(run_id, "lo  \n world")
    store.append_run_text(run_id, "")  # nothing to add: no row
    partial = store.get_run(run_id)
    assert partial.status == "unfinished"
    assert (partial.text, partial.reasoning) == ("Hello  \n world", "think ")
    assert partial.started_at == t0
    assert partial.batch_id == "b1"
    assert partial.variables == {"x": "hi", "role": "kind"}
    assert partial.messages[0] == {"role": "system", "content": "You are kind"}
    assert chunk_rows(store) == 2
    [summary] = store.history()
    assert (summary.status, summary.text_chars, summary.preview) == (
        "unfinished",
        14,
        "Hello world",
    )

    finish(
        store,
        run_id,
        text="Hello world!",
        reasoning="think more",
        model="m-reported",
        ttft_s=0.25,
        duration_s=2.0,
        chunks=7,
        prompt_tokens=11,
        completion_tokens=4,
        tokens_per_s=2.5,
        finish_reason="length",
    )
    record = store.get_run(run_id)
    assert record.status == "ok"
    assert record.error is None
    assert (record.text, record.reasoning) == ("Hello world!", "think more")
    assert (record.model, record.ttft_s, record.duration_s, record.chunks) == (
        "m-reported",
        0.25,
        2.0,
        7,
    )
    assert (record.prompt_tokens, record.completion_tokens, record.tokens_per_s) == (11, 4, 2.5)
    assert record.finish_reason == "length"
    assert chunk_rows(store) == 0


def test_a_failed_run_keeps_its_error_and_the_start_model(store: PromptStore) -> None:
    run_id = start(store, model="requested")
    finish(
        store,
        run_id,
        status="stalled",
        text="part",
        error="No text for 120 s.",
        model=None,
        finish_reason=None,
        ttft_s=0.3,
        duration_s=120.5,
    )
    record = store.get_run(run_id)
    assert (record.status, record.error, record.model, record.text) == (
        "stalled",
        "No text for 120 s.",
        "requested",
        "part",
    )


def test_a_run_records_its_endpoint_and_what_progress_told(store: PromptStore) -> None:
    """The progress figures and the endpoint go in with the outcome and come back out in the
    record, its Stats, its history line and its dict; figures not given stay None."""
    run_id = start(store)
    finish(
        store,
        run_id,
        api="native",
        first_progress_s=0.05,
        load_s=3.5,
        prompt_s=12.25,
        prompt_tokens_per_s=640.0,
    )
    record = store.get_run(run_id)
    assert (record.api, record.first_progress_s, record.load_s) == ("native", 0.05, 3.5)
    assert (record.prompt_s, record.prompt_tokens_per_s) == (12.25, 640.0)
    figures = record.stats()
    assert (figures.first_progress_s, figures.load_s) == (0.05, 3.5)
    assert (figures.prompt_s, figures.prompt_tokens_per_s) == (12.25, 640.0)
    assert figures.ttft_s == record.ttft_s
    exported = dataclasses.asdict(record)
    assert {key: exported[key] for key in ("api", "load_s", "prompt_tokens_per_s")} == {
        "api": "native",
        "load_s": 3.5,
        "prompt_tokens_per_s": 640.0,
    }
    json.dumps(exported)
    [line] = store.history()
    assert (line.api, line.first_progress_s, line.load_s) == ("native", 0.05, 3.5)
    assert (line.prompt_s, line.prompt_tokens_per_s) == (12.25, 640.0)

    plain = start(store)
    finish(store, plain, api="openai", first_progress_s=0.2)
    record = store.get_run(plain)
    assert (record.api, record.first_progress_s) == ("openai", 0.2)
    assert (record.load_s, record.prompt_s, record.prompt_tokens_per_s) == (None, None, None)

    unsent = start(store)
    finish(store, unsent, status="error", error="No model.", ttft_s=None)
    assert store.get_run(unsent).api is None  # no request went out: no endpoint
    unfinished = store.get_run(start(store))
    assert (unfinished.api, unfinished.first_progress_s) == (None, None)


def test_run_misuse_is_reported(store: PromptStore) -> None:
    with pytest.raises(RunNotFound) as caught:
        store.get_run(404)
    assert caught.value.run_id == 404
    assert "404" in str(caught.value)
    one_sentence(str(caught.value))
    with pytest.raises(RunNotFound):
        store.append_run_text(404, "x")
    with pytest.raises(RunNotFound):
        finish(store, 404)
    run_id = start(store)
    with pytest.raises(ValueError, match="not a final run status"):
        finish(store, run_id, status="unfinished")
    with pytest.raises(ValueError, match="not a final run status"):
        finish(store, run_id, status="okay")
    finish(store, run_id)
    with pytest.raises(ValueError, match="already finished"):
        store.append_run_text(run_id, "late")
    assert "unfinished" in STATUSES
    assert "ok" in STATUSES


def test_appending_is_linear_not_a_rewrite(store: PromptStore) -> None:
    run_id = start(store)
    piece = "x" * 1000
    began = time.perf_counter()
    for _ in range(2000):
        store.append_run_text(run_id, piece)
    elapsed = time.perf_counter() - began
    assert len(store.get_run(run_id).text) == 2_000_000
    assert elapsed < 10, elapsed  # a rewrite of the whole text per append would be quadratic
    assert stored_chars(store) == 2_000_000  # every character once
    assert database_bytes(store) < 1.3 * 2_000_000 + 200_000


def database_bytes(store: PromptStore) -> int:
    """Pages in use (the file less its free pages): what the text really occupies."""
    conn = sqlite3.connect(store.path)
    try:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)
    finally:
        conn.close()


def stored_chars(store: PromptStore) -> int:
    """Characters of answer text held anywhere in the database (chunks and run rows)."""
    conn = sqlite3.connect(store.path)
    try:
        chunks = conn.execute("SELECT coalesce(sum(length(text)), 0) FROM run_chunks")
        rows = conn.execute("SELECT coalesce(sum(length(text)), 0) FROM runs")
        return int(chunks.fetchone()[0]) + int(rows.fetchone()[0])
    finally:
        conn.close()


def test_a_long_answer_is_kept_as_appended_and_finishing_writes_only_the_rest(
    store: PromptStore,
) -> None:
    run_id = start(store)
    pieces = [f"{i:05d}" + "ü" * 19_995 for i in range(60)]  # 1.2 M characters, 60 appends
    for piece in pieces:
        store.append_run_text(run_id, piece, "r")
    rest = " and the last words."
    text = "".join(pieces) + rest
    finish(store, run_id, text=text, reasoning="r" * 60 + "R", chunks=61)

    assert stored_chars(store) == len(text)  # each character once: nothing was copied
    conn = sqlite3.connect(store.path)
    try:
        last = conn.execute(
            "SELECT text, reasoning, text_end FROM run_chunks ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        row = conn.execute("SELECT text, text_in_chunks FROM runs").fetchone()
    finally:
        conn.close()
    assert last == (rest, "R", len(text))  # the final write carried only what was missing
    assert row == ("", 1)
    record = store.get_run(run_id)
    assert (record.status, record.text, record.reasoning) == ("ok", text, "r" * 60 + "R")
    [summary] = store.history()
    assert (summary.text_chars, summary.preview) == (len(text), text[:80])
    assert database_bytes(store) < 1.3 * len(text.encode("utf-8")) + 200_000


def test_one_huge_append_does_not_leave_a_wal_as_large(store: PromptStore) -> None:
    run_id = start(store)
    store.append_run_text(run_id, "y" * 20_000_000)  # one write of 20 MB fills the WAL
    wal = Path(f"{store.path}-wal")
    assert wal.stat().st_size > 20_000_000
    store.append_run_text(run_id, "z")  # after the checkpoint, the log starts over, cut back
    finish(store, run_id, text="y" * 20_000_000 + "z!")
    assert wal.stat().st_size <= WAL_SIZE_LIMIT
    assert len(store.get_run(run_id).text) == 20_000_002


def test_finishing_with_another_text_replaces_what_was_appended(store: PromptStore) -> None:
    run_id = start(store)
    store.append_run_text(run_id, "draft " * 20_000)
    finish(store, run_id, text="final " * 20_000)  # long: stays in pieces
    assert store.get_run(run_id).text == "final " * 20_000
    assert stored_chars(store) == 120_000
    other = start(store)
    store.append_run_text(other, "abc")
    finish(store, other, text="")  # what a caller that appended nothing final passes
    assert store.get_run(other).text == ""


def test_text_utf8_cannot_hold_is_stored_as_replacement_characters(store: PromptStore) -> None:
    run_id = start(store, variables={"x": "lone \ud800"})
    store.append_run_text(run_id, "a\udc00b", "\ud83d")
    assert store.get_run(run_id).text == "a\ufffdb"
    finish(store, run_id, text="a\udc00b and more", reasoning="\ud83d", error="bad \udfff")
    record = store.get_run(run_id)
    assert (record.text, record.reasoning) == ("a\ufffdb and more", "\ufffd")
    assert record.error == "bad \ufffd"
    assert record.variables == {"x": "lone \ufffd"}


def test_a_recorded_stream_reads_back_the_same_text(
    store: PromptStore, sim: simulator.SimServer
) -> None:
    """Through arun: a 200,000-character answer over about 2.5 s is appended at least twice,
    finished with only its tail, and reads back exactly as it was received."""
    result = run(
        Prompt("Go", model="lmstream-sim-8b"),
        store=store,
        base_url=sim.base_url,
        sim={"output_tokens": 200, "chunk_chars": 1000, "gen_tps": 80, "jitter": 0},
    )
    assert result.ok
    assert len(result.text) == 200_000
    record = store.get_run(result.run_id)
    assert record.text == result.text
    assert chunk_rows(store) >= 2
    assert stored_chars(store) == len(result.text)
    assert store.history()[0].text_chars == len(result.text)


# ---------------------------------------------------------------------------------------------
# Load: several processes and threads, many runs


def start_all(processes: list[subprocess.Popen[str]]) -> None:
    """Send each waiting child its start line (a closed pipe also releases it)."""
    for process in processes:
        assert process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            process.stdin.write("go\n")
            process.stdin.flush()


WORKER = """
import os, sys, time
from lmstream_nb._store import PromptStore
path, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with PromptStore(path) as store:
    print("ready", flush=True)
    sys.stdin.readline()  # the start signal (or end of input if the test gave up)
    for i in range(count):
        run_id = store.start_run(
            prompt_name=tag, prompt_version=None, template="t", system=None, messages=[],
            variables={}, model="m", base_url="http://x", started_at=time.time(), batch_id=tag,
        )
        store.append_run_text(run_id, "a")
        store.append_run_text(run_id, "b")
        store.finish_run(
            run_id, status="ok", text=f"{tag}-{i}", reasoning="", error=None,
            finish_reason="stop", model=None, ttft_s=0.1, duration_s=0.2, chunks=2,
            prompt_tokens=None, completion_tokens=None, tokens_per_s=None,
        )
"""


def test_two_processes_and_eight_threads_write_at_once(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    per_process, per_thread, threads_n = 300, 100, 8
    with PromptStore(path) as shared:
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, str(path), f"proc{n}", str(per_process)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for n in range(2)
        ]
        failures: list[BaseException] = []
        started = threading.Event()

        def work(tag: str) -> None:
            try:
                assert started.wait(timeout=40)
                for i in range(per_thread):
                    run_id = start(shared, prompt_name=tag, batch_id=tag)
                    shared.append_run_text(run_id, "a")
                    shared.append_run_text(run_id, "b")
                    finish(shared, run_id, text=f"{tag}-{i}")
                    shared.history(limit=5)
            except BaseException as exc:  # reported below
                failures.append(exc)

        threads = [threading.Thread(target=work, args=(f"thread{n}",)) for n in range(threads_n)]
        for thread in threads:
            thread.start()
        try:
            # Everyone starts writing at the same moment: processes once they read a line.
            for process in processes:
                assert process.stdout is not None
                assert process.stdout.readline() == "ready\n"
        finally:
            start_all(processes)
            started.set()
        for thread in threads:
            thread.join(timeout=45)
        assert not any(thread.is_alive() for thread in threads)
        outputs = []
        for process in processes:
            try:
                outputs.append(process.communicate(timeout=45))
            finally:
                process.kill()
        assert not failures, failures
        for process, (_, stderr) in zip(processes, outputs, strict=True):
            assert process.returncode == 0, stderr
            assert "locked" not in stderr

        total = 2 * per_process + threads_n * per_thread
        everything = shared.history(limit=None)
        assert len(everything) == total
        assert {r.status for r in everything} == {"ok"}
        texts = {(r.batch_id, r.preview) for r in everything}
        assert len(texts) == total  # no row lost or written twice
        assert chunk_rows(shared) == 0


OPENER = """
import os, sys, time
from lmstream_nb._store import PromptStore
path = sys.argv[1]
print("ready", flush=True)
sys.stdin.readline()  # the start signal (or end of input if the test gave up)
with PromptStore(path) as store:
    store.save("shared", f"t from {os.getpid()}")  # each a change, so each a version
"""


def test_processes_creating_the_same_fresh_database_at_once(tmp_path: Path) -> None:
    path = tmp_path / "new" / "lmstream.db"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline() == "ready\n"
    finally:
        start_all(processes)
    errors = []
    for process in processes:
        try:
            errors.append(process.communicate(timeout=45)[1])
        finally:
            process.kill()
    assert [p.returncode for p in processes] == [0] * 4, errors
    with PromptStore(path) as opened:
        assert [p.version for p in opened.versions("shared")] == [1, 2, 3, 4]
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == (
            LATEST_VERSION
        )
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# Runs whose recording process died


def test_a_run_whose_process_was_killed_is_interrupted_with_its_text(tmp_path: Path) -> None:
    """`lmstream run` streams from a slow simulator and is killed with SIGKILL mid-answer; the
    next store opened ends its run as interrupted, keeping the text recorded until then."""
    home = tmp_path / "home"
    with simulator.serve(profile="laptop-gpu") as slow:  # 30 tokens a second
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lmstream_nb",
                "run",
                'Tell me about owls [[sim {"output_tokens": 100000}]]',
                "--base-url",
                slow.base_url,
            ],
            env={**os.environ, "LMSTREAM_HOME": str(home)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            db = home / "lmstream.db"
            wait_until(db.exists, timeout=30, what="the database exists")
            with PromptStore(db) as watcher:  # the owner is alive: this open leaves it alone
                [running] = wait_until(
                    lambda: [r for r in watcher.history() if r.text_chars > 0],
                    timeout=30,
                    what="the run's first text is recorded",
                )
                assert running.status == "unfinished"
                before = watcher.get_run(running.id).text
            proc.send_signal(signal.SIGKILL)
            printed, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    with PromptStore(db) as reopened:
        record = reopened.get_run(running.id)
        assert record.status == "interrupted"
        assert record.error == ORPHANED_ERROR
        one_sentence(record.error)
        assert record.text.startswith(before)
        assert printed.startswith(record.text)  # the text it showed before it died, or less
        [summary] = reopened.history()
        assert (summary.status, summary.text_chars) == ("interrupted", len(record.text))
        assert summary.preview == " ".join(record.text.split())[:80]
        assert reopened.end_orphaned_runs() == []  # done once


def set_owner(store: PromptStore, run_id: int, owner: dict[str, Any] | None) -> None:
    conn = sqlite3.connect(store.path)
    with conn:
        conn.execute(
            "UPDATE runs SET owner = ? WHERE id = ?",
            (None if owner is None else json.dumps(owner), run_id),
        )
    conn.close()


def test_only_runs_of_ended_processes_on_this_host_are_ended(store: PromptStore) -> None:
    me = current_owner()
    mine = {"host": me.host, "boot": me.boot, "pid": me.pid, "start": me.start}
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)  # a pid that has ended (and been reaped)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # ends; not reaped until wait()
    proc_stat = Path(f"/proc/{zombie.pid}/stat")
    if proc_stat.exists():
        wait_until(
            lambda: proc_stat.read_text().rsplit(")", 1)[1].split()[0] == "Z",
            timeout=30,
            what="the child is a zombie",
        )
    cases: dict[str, dict[str, Any] | None] = {
        "this process": mine,
        "no owner (an older run)": None,
        "another host": {**mine, "host": me.host + "-elsewhere", "pid": child.pid},
        "ended": {**mine, "pid": child.pid},
        "killed, not reaped": {**mine, "pid": zombie.pid},
        "pid reused": {**mine, "start": (me.start or 0) + 1},
        "rebooted": {**mine, "boot": "another-boot"},
        "unreadable": {"pid": "x"},
    }
    ids = {}
    for label, owner in cases.items():
        ids[label] = start(store)
        store.append_run_text(ids[label], f"text of {label}")
        set_owner(store, ids[label], owner)
    try:
        ended = store.end_orphaned_runs()
    finally:
        zombie.wait(timeout=30)
    expected = {"ended", "killed, not reaped", "pid reused"}
    if me.boot is not None:
        expected.add("rebooted")
    if me.start is None:  # no /proc: start times cannot be compared
        expected -= {"pid reused", "killed, not reaped"}
    assert sorted(ended) == sorted(ids[label] for label in expected)
    for label, run_id in ids.items():
        record = store.get_run(run_id)
        assert record.status == ("interrupted" if label in expected else "unfinished"), label
        assert record.text == f"text of {label}"


# ---------------------------------------------------------------------------------------------
# Read-only locations


_BIND_READ_ONLY = (
    'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && shift && exec "$@"'
)


def read_only_runner(target: Path) -> Callable[[list[str]], subprocess.CompletedProcess[str]]:
    """A way to run commands for which ``target`` (a folder or a file) really is read-only.

    Tests run as root here, and root writes through permission bits (``os.access`` says yes,
    too), so ``chmod`` alone proves nothing. So each command runs in a private mount namespace
    (``unshare --mount``) in which ``target`` is bind-mounted onto itself read-only: the kernel
    answers EROFS to every write there, root's included, and the rest of the machine is not
    affected. Where mount namespaces are not allowed, ``target`` is made read-only with
    ``chmod`` and the command runs without the capabilities that bypass permission bits
    (``setpriv``), so writes fail with EACCES. Without either, the test is skipped.
    """
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    bind = [unshare or "unshare", "--mount", "--propagation", "private", "sh", "-c"]
    bind += [_BIND_READ_ONLY, "sh", str(target)]
    probe_file = target / "probe" if target.is_dir() else target
    if unshare is not None and os.geteuid() == 0:
        probe = subprocess.run(
            [*bind, sys.executable, "-c", f"open({str(probe_file)!r}, 'a')"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if probe.returncode != 0 and "Read-only file system" in probe.stderr:

            def in_namespace(command: list[str]) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    [*bind, *command], capture_output=True, text=True, timeout=60, check=False
                )

            return in_namespace
    if setpriv is None and os.geteuid() == 0:
        pytest.skip("no mount namespace and no setpriv: cannot make a location read-only")
    target.chmod(0o555 if target.is_dir() else 0o444)
    drop = [setpriv or "setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    prefix = drop if os.geteuid() == 0 else []

    def without_powers(command: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*prefix, *command], capture_output=True, text=True, timeout=60, check=False
        )

    return without_powers


READ_SCRIPT = """
import json, sys
from lmstream_nb._errors import StoreUnavailable
from lmstream_nb._store import PromptStore
with PromptStore(sys.argv[1]) as store:
    out = {
        "read_only": store.read_only,
        "prompts": [p.name for p in store.list()],
        "text": store.get_run(int(sys.argv[2])).text,
        "history": [r.id for r in store.history()],
        "runs": store.stats().overall.runs,
        "orphans": store.end_orphaned_runs(),
    }
    for name, write in [
        ("save", lambda: store.save("new", "t")),
        ("start", lambda: store.start_run(
            prompt_name=None, prompt_version=None, template="t", system=None, messages=[],
            variables={}, model=None, base_url="u", started_at=0.0)),
    ]:
        try:
            write()
        except StoreUnavailable as exc:
            out[name] = str(exc)
print(json.dumps(out))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="mount namespaces or setpriv (Linux)")
@pytest.mark.parametrize("what", ["folder", "file"])
def test_a_read_only_location_can_be_read_and_refuses_writes_in_one_sentence(
    tmp_path: Path, sim: simulator.SimServer, what: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    db = home / "lmstream.db"
    with PromptStore(db) as store:
        store.save("greet", "Hello {{name}}")
        long_run = start(store)
        store.append_run_text(long_run, "long " * 20_000)  # kept in pieces
        finish(store, long_run, text="long " * 20_000 + "end")
        finish(store, start(store), text="short")
    monkeypatch.setenv("LMSTREAM_HOME", str(home))
    before = db.read_bytes()
    writable = {
        args: subprocess.run(
            [sys.executable, "-m", "lmstream_nb", *args.split()],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        for args in ("prompts list --json", "history --json", "stats --json")
    }
    run_read_only = read_only_runner(home if what == "folder" else db)
    lmstream = [sys.executable, "-m", "lmstream_nb"]
    for args, expected in writable.items():
        result = run_read_only([*lmstream, *args.split()])
        assert result.returncode == 0, (args, result.stderr)
        assert json.loads(result.stdout) == json.loads(expected), args
    shown = run_read_only([*lmstream, "history", "--run", str(long_run)])
    assert shown.returncode == 0, shown.stderr
    assert "long long" in shown.stdout
    assert shown.stdout.rstrip().endswith("end")

    requests = len(sim.records())
    for args in (
        ["prompts", "add", "other", "t"],
        ["run", "--prompt", "greet", "--var", "name=Ada", "--base-url", sim.base_url],
    ):
        refused = run_read_only([*lmstream, *args])
        assert refused.returncode == 1, (args, refused.stdout, refused.stderr)
        assert refused.stderr.count("\n") == 1, refused.stderr
        assert "is in a read-only location" in refused.stderr
        assert "LMSTREAM_HOME" in refused.stderr
        assert "Traceback" not in refused.stderr
        one_sentence(refused.stderr.strip().removeprefix("lmstream: "))
    assert len(sim.records()) == requests  # refused before anything was sent

    api = run_read_only([sys.executable, "-c", READ_SCRIPT, str(db), str(long_run)])
    assert api.returncode == 0, api.stderr
    seen = json.loads(api.stdout)
    assert seen["read_only"] is True
    assert seen["prompts"] == ["greet"]
    assert seen["text"] == "long " * 20_000 + "end"
    assert len(seen["history"]) == 2
    assert (seen["runs"], seen["orphans"]) == (2, [])
    for write in ("save", "start"):
        assert "is in a read-only location" in seen[write]
        one_sentence(seen[write])
    assert db.read_bytes() == before


@pytest.mark.skipif(sys.platform != "linux", reason="mount namespaces or setpriv (Linux)")
def test_unsaved_changes_in_a_read_only_folder_are_read_or_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write-ahead log left beside the database (a crash, or a copy taken while it was open)
    holds committed changes: read with its -shm file they are seen; without one SQLite could
    only open the folder as immutable, which would ignore them, so that is refused instead."""
    live, home = tmp_path / "live", tmp_path / "home"
    home.mkdir()
    with PromptStore(live / "lmstream.db") as store:
        store._connection().execute("PRAGMA wal_autocheckpoint = 0")
        store.save("only_in_the_wal", "t")
        for suffix in ("", "-wal", "-shm"):
            shutil.copy(f"{store.path}{suffix}", home / f"lmstream.db{suffix}")
    run_read_only = read_only_runner(home)
    listing = [sys.executable, "-m", "lmstream_nb", "prompts", "list", "--json"]
    monkeypatch.setenv("LMSTREAM_HOME", str(home))
    seen = run_read_only(listing)
    assert seen.returncode == 0, seen.stderr
    assert [p["name"] for p in json.loads(seen.stdout)] == ["only_in_the_wal"]
    if home.stat().st_mode & 0o200 == 0:
        home.chmod(0o755)  # the chmod fallback: let the test remove the -shm file
    (home / "lmstream.db-shm").unlink()
    run_read_only = read_only_runner(home)
    refused = run_read_only(listing)
    assert refused.returncode == 1
    assert "has changes in lmstream.db-wal that cannot be read from a read-only folder" in (
        refused.stderr
    )
    one_sentence(refused.stderr.strip().removeprefix("lmstream: "))


# ---------------------------------------------------------------------------------------------
# A full disk


def limit_pages(store: PromptStore, extra: int) -> None:
    """Let the database grow by only ``extra`` pages: SQLite then fails writes with SQLITE_FULL,
    exactly as on a full disk (``max_page_count`` holds for this connection only)."""
    conn = store._connection()
    pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
    conn.execute(f"PRAGMA max_page_count = {pages + extra}")


def test_a_full_disk_says_so_and_keeps_what_was_stored(store: PromptStore) -> None:
    store.save("kept", "t {{x}}")
    earlier = start(store)
    finish(store, earlier, text="earlier answer")
    limit_pages(store, 2)
    with pytest.raises(StoreUnavailable) as caught:
        store.save("big", "x" * 100_000)
    message = str(caught.value)
    assert "is full (database or disk is full)" in message
    assert "not a usable" not in message  # it used to blame the file and advise moving it
    one_sentence(message)
    run_id = start(store)
    with pytest.raises(StoreUnavailable, match="is full"):
        store.append_run_text(run_id, "y" * 100_000)
    assert [p.name for p in store.list()] == ["kept"]
    assert store.get_run(earlier).text == "earlier answer"
    assert store.get_run(run_id).text == ""
    limit_pages(store, 1000)  # space again: the same store carries on
    store.append_run_text(run_id, "y" * 100_000)
    assert len(store.get_run(run_id).text) == 100_000


FULL_DISK_SCRIPT = """
import sys
from lmstream_nb import cli
from lmstream_nb._run import default_store
store = default_store()
conn = store._connection()
pages = conn.execute("PRAGMA page_count").fetchone()[0]
conn.execute(f"PRAGMA max_page_count = {pages + int(sys.argv[2])}")
sys.exit(cli.main(["run", "--prompt", "long", "--base-url", sys.argv[1]]))
"""


def test_a_run_that_fills_the_disk_reports_it_once_without_stray_tracebacks(
    tmp_path: Path, sim: simulator.SimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lmstream run` on a disk with room for about 320 KB while a 600,000-character answer
    streams for about 3 s: the first append fits, the next ones from the worker thread fail
    once the disk is full, the final write too, and all the user sees is the text and one
    sentence (no "Task exception was never retrieved")."""
    home = tmp_path / "home"
    monkeypatch.setenv("LMSTREAM_HOME", str(home))
    scenario = '[[sim {"output_tokens": 600, "chunk_chars": 1000, "gen_tps": 200, "jitter": 0}]]'
    with PromptStore(home / "lmstream.db") as store:
        store.save("long", f"Go {scenario}")
        earlier = start(store)
        finish(store, earlier, text="earlier answer")
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK_SCRIPT, sim.base_url, "80"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert len(result.stdout) == 600_000  # the answer was shown whole
    [line] = result.stderr.splitlines()
    assert line.startswith("lmstream: The disk that holds the database")
    assert "is full" in line
    assert "Traceback" not in result.stderr
    with PromptStore(home / "lmstream.db") as store:  # the writer has exited: its run ends
        assert [p.name for p in store.list()] == ["long"]
        assert store.get_run(earlier).text == "earlier answer"
        [failed] = [r for r in store.history() if r.id != earlier]
        record = store.get_run(failed.id)
        assert record.status == "interrupted"
        assert 0 < len(record.text) < 600_000  # what fitted before the disk was full
        assert result.stdout.startswith(record.text)


# ---------------------------------------------------------------------------------------------
# The history an estimate of the wait for the first token rests on


def chat(chars: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "s" * 10}, {"role": "user", "content": "u" * chars}]


def record_wait(
    store: PromptStore,
    chars: int,
    ttft: float,
    *,
    status: str = "ok",
    blocking: bool = False,
    **overrides: Any,
) -> int:
    run_id = start(store, messages=chat(chars), **overrides)
    # A stream records its first sign of life; a blocking request none.
    first_progress = None if blocking else ttft
    finish(store, run_id, status=status, ttft_s=ttft, first_progress_s=first_progress)
    return run_id


def test_a_run_records_its_prompt_size(store: PromptStore) -> None:
    run_id = start(store, messages=chat(90))
    row = store._connection().execute("SELECT prompt_chars FROM runs WHERE id = ?", (run_id,))
    assert row.fetchone() == (100,)


def test_too_few_successful_runs_give_no_estimate(store: PromptStore) -> None:
    for i in range(4):
        record_wait(store, 1000 * (i + 1), 1.0 + i)
    record_wait(store, 9000, 9.0, status="stalled")  # failures do not count
    assert store.first_token_estimate(model="m", base_url=URL, messages=chat(2500)) is None
    record_wait(store, 5000, 5.0)
    guess = store.first_token_estimate(model="m", base_url=URL, messages=chat(2490))
    assert guess is not None
    assert guess.runs == 5
    assert guess.expected_s == pytest.approx(2.5, rel=0.01)


def test_the_estimate_reads_the_same_model_and_server_only(store: PromptStore) -> None:
    for i in range(6):
        record_wait(store, 1000 * (i + 1), 0.2 + (i + 1) * 0.5)  # 0.5 s per 1000 chars
        record_wait(store, 1000 * (i + 1), 50.0 * (i + 1), model="other")
        record_wait(store, 1000 * (i + 1), 90.0, base_url="http://elsewhere:1234/v1")
    guess = store.first_token_estimate(model="m", base_url=URL, messages=chat(7990))
    assert guess is not None
    assert (guess.runs, round(guess.expected_s, 2)) == (6, 4.2)


def test_blocking_runs_are_not_history_for_the_wait(store: PromptStore) -> None:
    """A blocking request's "first token" is its whole answer; it records no first progress."""
    for i in range(6):
        record_wait(store, 1000 * (i + 1), 100.0, blocking=True)
    assert store.first_token_estimate(model="m", base_url=URL, messages=chat(3000)) is None


def test_the_estimate_is_one_walk_along_its_index(store: PromptStore) -> None:
    plan = store._connection().execute(
        "EXPLAIN QUERY PLAN SELECT prompt_chars, ttft_s FROM runs "
        "INDEXED BY runs_first_token_history WHERE model = 'm' AND base_url = 'u' AND "
        f"{FIRST_TOKEN_HISTORY} ORDER BY started_at DESC LIMIT 40"
    )
    [step] = [row[3] for row in plan]
    assert "COVERING INDEX runs_first_token_history" in step
    assert "TEMP B-TREE" not in step
