"""Ordered, named schema steps: each runs once, and stepping up matches a fresh build."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from store_helpers import finish, start

from lmstream_nb import _migrations
from lmstream_nb._errors import StoreUnavailable
from lmstream_nb._migrations import APPLICATION_ID, LATEST_VERSION, MIGRATIONS, migrate
from lmstream_nb._store import PromptStore


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    try:
        yield connection
    finally:
        connection.close()


def schema(conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
    """Every table and index with its SQL, in a stable order."""
    return sorted(
        (row[0], row[1], row[2] or "")
        for row in conn.execute("SELECT type, name, sql FROM sqlite_master")
    )


def columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def indexes(conn: sqlite3.Connection, table: str) -> dict[str, list[str]]:
    return {
        row[1]: [c[2] for c in conn.execute(f"PRAGMA index_info({row[1]})")]
        for row in conn.execute(f"PRAGMA index_list({table})")
        if not row[1].startswith("sqlite_autoindex")
    }


def test_steps_are_named_in_order() -> None:
    names = [step.__name__ for step in MIGRATIONS]
    assert names[0] == "m001_initial"
    assert names == sorted(names)
    assert [name[:4] for name in names] == [f"m{i:03d}" for i in range(1, len(names) + 1)]
    assert len(MIGRATIONS) == LATEST_VERSION


def test_a_fresh_database_ends_at_the_latest_schema(conn: sqlite3.Connection) -> None:
    applied = migrate(conn)
    assert applied == [step.__name__ for step in MIGRATIONS]
    assert conn.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    recorded = conn.execute("SELECT version, name FROM schema_migrations ORDER BY version")
    assert recorded.fetchall() == [(i + 1, s.__name__) for i, s in enumerate(MIGRATIONS)]

    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {
        "schema_migrations",
        "prompts",
        "prompt_names",
        "runs",
        "run_chunks",
        "conversations",
    }
    assert columns(conn, "prompts") == [
        "id",
        "name",
        "version",
        "template",
        "system",
        "model",
        "temperature",
        "max_tokens",
        "description",
        "created_at",
        "schema",
    ]
    assert columns(conn, "runs") == [
        "id",
        "prompt_name",
        "prompt_version",
        "template",
        "system",
        "messages",
        "variables",
        "model",
        "base_url",
        "started_at",
        "ttft_s",
        "duration_s",
        "chunks",
        "prompt_tokens",
        "completion_tokens",
        "tokens_per_s",
        "finish_reason",
        "status",
        "error",
        "text",
        "reasoning",
        "text_chars",
        "preview",
        "batch_id",
        "batch_row",
        "owner",
        "text_in_chunks",
        "api",
        "first_progress_s",
        "load_s",
        "prompt_s",
        "prompt_tokens_per_s",
        "prompt_chars",
        "conversation_id",
        "parent_run_id",
        "context_messages",
        "schema",
    ]
    assert columns(conn, "conversations") == [
        "id",
        "name",
        "created",
        "forked_from",
        "head_run_id",
        "context_from_run",
        "prompt_name",
    ]
    assert columns(conn, "run_chunks") == [
        "run_id",
        "seq",
        "text",
        "reasoning",
        "text_end",
        "reasoning_end",
    ]
    run_indexes = indexes(conn, "runs")
    assert run_indexes["runs_started_at"][:2] == ["started_at", "id"]
    assert run_indexes["runs_batch"] == ["batch_id", "batch_row"]
    assert run_indexes["runs_prompt_started_at"][:3] == ["prompt_name", "started_at", "id"]
    assert run_indexes["runs_status_started_at"] == ["status", "started_at"]
    # Only unfinished runs, with their owner: finding orphans and checking a run is still open
    # never read the wide run rows.
    assert run_indexes["runs_unfinished"] == ["id", "owner"]
    partial = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'runs_unfinished'")
    assert "WHERE status = 'unfinished'" in partial.fetchone()[0]
    # Where each piece of a run's text ends, without reading the pieces.
    assert indexes(conn, "run_chunks")["run_chunks_ends"] == [
        "run_id",
        "seq",
        "text_end",
        "reasoning_end",
    ]
    # Each timing in order within its group and overall, for stats' percentiles.
    for column in ("ttft_s", "duration_s", "first_progress_s", "prompt_tokens_per_s"):
        assert run_indexes[f"runs_{column}_in_group"][:3] == ["prompt_name", "model", column]
        assert run_indexes[f"runs_{column}_overall"][0] == column
        where = conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = ?", (f"runs_{column}_overall",)
        ).fetchone()[0]
        assert f"WHERE {column} IS NOT NULL" in where
    # Stats reads only these columns; the two main indexes cover them.
    for name in ("runs_started_at", "runs_prompt_started_at"):
        assert {"prompt_name", "model", "status", "ttft_s", "duration_s"} <= set(run_indexes[name])


def test_running_migrations_twice_is_a_no_op(conn: sqlite3.Connection) -> None:
    migrate(conn)
    before = schema(conn)
    assert migrate(conn) == []
    assert schema(conn) == before
    assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == LATEST_VERSION


@pytest.mark.parametrize("start", range(1, LATEST_VERSION + 1))
def test_upgrading_step_by_step_matches_a_fresh_build(tmp_path: Path, start: int) -> None:
    fresh = sqlite3.connect(tmp_path / "fresh.db", isolation_level=None)
    stepped = sqlite3.connect(tmp_path / "stepped.db", isolation_level=None)
    try:
        migrate(fresh)
        assert migrate(stepped, target=start) == [s.__name__ for s in MIGRATIONS[:start]]
        assert stepped.execute("PRAGMA user_version").fetchone()[0] == start
        migrate(stepped)
        assert schema(stepped) == schema(fresh)
    finally:
        fresh.close()
        stepped.close()


def test_a_version_1_database_with_data_upgrades_keeping_the_data(
    conn: sqlite3.Connection,
) -> None:
    migrate(conn, target=1)
    conn.execute(
        "INSERT INTO prompts (name, version, template, created_at) VALUES ('p', 1, 'T {{x}}', 1.0)"
    )
    conn.execute(
        "INSERT INTO runs (prompt_name, prompt_version, template, messages, variables, base_url,"
        " started_at, status, text) VALUES ('p', 1, 'T {{x}}', '[]', '{}', 'u', 5.0, 'ok', 'hi')"
    )
    conn.execute("INSERT INTO run_chunks (run_id, seq, text, reasoning) VALUES (1, 1, 'a', '')")
    migrate(conn)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
    assert conn.execute("SELECT name, version, template FROM prompts").fetchall() == [
        ("p", 1, "T {{x}}")
    ]
    assert conn.execute("SELECT prompt_name, status, text FROM runs").fetchall() == [
        ("p", "ok", "hi")
    ]
    assert conn.execute("SELECT run_id, text FROM run_chunks").fetchall() == [(1, "a")]


def test_a_failing_step_leaves_the_database_at_the_previous_version(
    conn: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    def m999_broken(c: sqlite3.Connection) -> None:
        c.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("step failed")

    monkeypatch.setattr(_migrations, "MIGRATIONS", (*MIGRATIONS, m999_broken))
    monkeypatch.setattr(_migrations, "LATEST_VERSION", LATEST_VERSION + 1)
    with pytest.raises(RuntimeError, match="step failed"):
        _migrations.migrate(conn)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
    assert not conn.in_transaction
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "half_done" not in names


def test_a_newer_database_is_refused(conn: sqlite3.Connection) -> None:
    migrate(conn)
    conn.execute(f"PRAGMA user_version = {LATEST_VERSION + 5}")
    with pytest.raises(StoreUnavailable, match="upgrade lmstream_nb"):
        migrate(conn)
    assert not conn.in_transaction


def test_target_out_of_range_is_refused(conn: sqlite3.Connection) -> None:
    with pytest.raises(ValueError, match="target"):
        migrate(conn, target=LATEST_VERSION + 1)


def test_a_version_2_database_with_an_unfinished_run_keeps_its_text(tmp_path: Path) -> None:
    """Chunks of a run left unfinished before owners were recorded get their offsets, the run
    reads as before through the store, and (having no owner) it is left unfinished."""
    path = tmp_path / "v2.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, target=2)
    conn.execute(
        "INSERT INTO runs (prompt_name, template, messages, variables, base_url, started_at, "
        "status, text, text_chars, preview) VALUES "
        "('done', 't', '[]', '{}', 'u', 1.0, 'ok', 'finished text', 13, 'finished text'), "
        "('left', 't', '[]', '{}', 'u', 2.0, 'unfinished', '', 0, '')"
    )
    conn.executemany(
        "INSERT INTO run_chunks (run_id, seq, text, reasoning) VALUES (2, ?, ?, ?)",
        [(1, "Hel", "th"), (2, "lo ", ""), (3, "wörld", "ink")],
    )
    conn.close()
    with PromptStore(path) as store:
        assert store.end_orphaned_runs() == []
        done, left = store.get_run(1), store.get_run(2)
        assert (done.status, done.text) == ("ok", "finished text")
        assert (left.status, left.text, left.reasoning) == ("unfinished", "Hello wörld", "think")
        summary = {r.id: r for r in store.history()}
        assert (summary[2].text_chars, summary[2].preview) == (11, "Hello wörld")
        store.append_run_text(2, "!")
        assert store.get_run(2).text == "Hello wörld!"
    check = sqlite3.connect(path)
    try:
        ends = check.execute("SELECT seq, text_end, reasoning_end FROM run_chunks ORDER BY seq")
        assert ends.fetchall() == [(1, 3, 2), (2, 6, 2), (3, 11, 5), (4, 12, 5)]
        flags = check.execute("SELECT id, text_in_chunks, owner FROM runs ORDER BY id")
        assert flags.fetchall() == [(1, 0, None), (2, 1, None)]
    finally:
        check.close()


def test_a_version_4_database_gains_the_progress_figures_unknown_for_old_runs(
    tmp_path: Path,
) -> None:
    """Runs recorded before progress was measured read back with every new figure None (not
    zero), keep their old figures, and new runs beside them record theirs."""
    path = tmp_path / "v4.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, target=4)
    conn.execute(
        "INSERT INTO runs (prompt_name, model, template, messages, variables, base_url, "
        "started_at, status, text, text_chars, preview, ttft_s, duration_s, tokens_per_s) "
        "VALUES ('p', 'm', 't', '[]', '{}', 'u', 1.0, 'ok', 'old answer', 10, 'old answer', "
        "0.5, 2.0, 30.0)"
    )
    conn.close()
    with PromptStore(path) as store:
        old = store.get_run(1)
        assert (old.text, old.ttft_s, old.duration_s, old.tokens_per_s) == (
            "old answer",
            0.5,
            2.0,
            30.0,
        )
        assert (old.api, old.first_progress_s, old.load_s, old.prompt_s) == (None,) * 4
        assert old.prompt_tokens_per_s is None
        [summary] = store.history()
        assert (summary.api, summary.first_progress_s) == (None, None)
        assert store.stats().overall.first_progress_p50 is None
        new = start(store, prompt_name="p", model="m")
        finish(store, new, api="native", first_progress_s=0.25, prompt_tokens_per_s=900.0)
        assert (store.get_run(new).api, store.get_run(new).load_s) == ("native", None)
        assert store.stats().overall.first_progress_p50 == 0.25
        assert store.stats().overall.ttft_p50 == pytest.approx(0.3)  # 0.5 and 0.1
    check = sqlite3.connect(path)
    try:
        assert check.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
        row = check.execute(
            "SELECT api, first_progress_s, load_s, prompt_s, prompt_tokens_per_s FROM runs "
            "WHERE id = 1"
        ).fetchone()
        assert row == (None, None, None, None, None)
    finally:
        check.close()


def test_a_version_5_database_gains_prompt_sizes_for_the_runs_an_estimate_reads(
    tmp_path: Path,
) -> None:
    """Streamed runs that succeeded get their size from their messages, so the history of a
    user who upgrades can estimate at once; other runs (blocking, failed) stay unknown."""
    path = tmp_path / "v5.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, target=5)
    messages = '[{"role": "system", "content": "abc"}, {"role": "user", "content": "héllo"}]'
    for status, first_progress in (("ok", 0.5), ("ok", None), ("stalled", 0.5)):
        conn.execute(
            "INSERT INTO runs (model, template, messages, variables, base_url, started_at, "
            "status, ttft_s, first_progress_s) VALUES ('m', 't', ?, '{}', 'u', 1.0, ?, 0.5, ?)",
            (messages, status, first_progress),
        )
    conn.execute(
        "INSERT INTO runs (model, template, messages, variables, base_url, started_at, status, "
        "ttft_s, first_progress_s) VALUES ('m', 't', 'not json', '{}', 'u', 2.0, 'ok', 0.5, 0.5)"
    )
    migrate(conn)
    sizes = conn.execute("SELECT prompt_chars FROM runs ORDER BY id").fetchall()
    assert sizes == [(8,), (None,), (None,), (None,)]
    conn.close()


def test_a_version_6_database_gains_prompt_schemas_none_for_old_versions(tmp_path: Path) -> None:
    """Prompt versions saved before structured output read back with no schema; saving one
    with a schema makes a new version, and the same schema again adds none."""
    path = tmp_path / "v6.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, target=6)
    conn.execute(
        "INSERT INTO prompts (name, version, template, created_at) VALUES ('p', 1, 'Hi', 1.0)"
    )
    conn.execute("INSERT INTO prompt_names (name, last_version) VALUES ('p', 1)")
    conn.close()
    with PromptStore(path) as store:
        assert store.get("p").schema is None
        saved = store.add("p", "Hi", schema={"type": "object"})
        assert (saved.created, saved.prompt.version) == (True, 2)
        assert saved.prompt.schema == '{"type":"object"}'
        assert not store.add("p", "Hi", schema='{ "type" : "object" }').created
        assert store.add("p", "Hi, again").prompt.schema == '{"type":"object"}'  # kept


def test_a_version_8_conversation_with_whole_arrays_goes_on(tmp_path: Path) -> None:
    """Turns recorded before m009 store the whole messages array; they read back as the same
    turns, count no context of their own, and the next turn stores only what it adds."""
    path = tmp_path / "v8.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, target=8)
    conn.execute(
        "INSERT INTO conversations (id, name, created, head_run_id) VALUES (1, 'c', 1.0, 2)"
    )
    first = '[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]'
    second = (
        '[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},'
        ' {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]'
    )
    for run_id, messages, text, parent in ((1, first, "Hello", None), (2, second, "Bye", 1)):
        conn.execute(
            "INSERT INTO runs (id, template, messages, variables, base_url, started_at, status, "
            "text, conversation_id, parent_run_id) VALUES (?, 't', ?, '{}', 'u', 1.0, 'ok', ?, "
            "1, ?)",
            (run_id, messages, text, parent),
        )
    conn.close()
    with PromptStore(path) as store:
        from lmstream_nb import Conversation

        turns = Conversation("c", store=store).turns
        assert [(t.user, t.answer) for t in turns] == [("Hi", "Hello"), ("Bye", "Bye")]
        assert [store.get_run(i).context_messages for i in (1, 2)] == [0, 0]
        context = Conversation._context(store.conversation_runs("c"), None, False)
        assert [m["content"] for m in context] == ["Be brief.", "Hi", "Hello", "Bye", "Bye"]
