"""The database schema, built and moved forward only by ordered, named steps.

A user's database outlives the version of lmstream_nb that created it, so the schema is never
edited in place: each change is a new step appended to ``MIGRATIONS``, and a step that has
shipped is never changed. Each step runs once, in its own ``BEGIN IMMEDIATE`` transaction, and
is recorded in ``schema_migrations`` and in ``PRAGMA user_version`` (the number the store checks
when it opens a file, so a newer database is refused instead of misread). ``BEGIN IMMEDIATE``
also serialises two processes that open a fresh database at the same moment: the second one
waits, re-reads the version inside its transaction, and finds nothing left to do.

``PRAGMA application_id`` marks the file as ours in its header, so a SQLite file that belongs to
another program is recognised and left alone.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable

from ._errors import StoreUnavailable
from ._estimate import prompt_chars

#: ``PRAGMA application_id`` of an lmstream_nb database: "lmst" in ASCII.
APPLICATION_ID = 0x6C6D7374


def m001_initial(conn: sqlite3.Connection) -> None:
    """Prompts (versioned by name), runs (one row per request) and the chunks of unfinished runs.

    ``runs`` keeps ``text_chars`` and ``preview`` beside the full text so that history never reads
    the text itself. ``run_chunks`` holds text as it arrives, one row per append, so a process
    killed mid-run leaves its partial answer behind; finishing a run moves the text into ``runs``
    and deletes its chunks. The started_at and prompt indexes also cover the columns stats reads,
    so stats over many runs never touches the wide rows that hold the text.
    """
    statements = [
        """
        CREATE TABLE prompts (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            version INTEGER NOT NULL,
            template TEXT NOT NULL,
            system TEXT,
            model TEXT,
            temperature REAL,
            max_tokens INTEGER,
            description TEXT,
            created_at REAL NOT NULL,
            UNIQUE (name, version)
        )
        """,
        # The highest version ever given to each name, kept when the prompt is deleted: a
        # version number is never reused, so a recorded "name@3" always means one text.
        """
        CREATE TABLE prompt_names (
            name TEXT PRIMARY KEY,
            last_version INTEGER NOT NULL
        )
        """,
        """
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            prompt_name TEXT,
            prompt_version INTEGER,
            template TEXT NOT NULL,
            system TEXT,
            messages TEXT NOT NULL,
            variables TEXT NOT NULL,
            model TEXT,
            base_url TEXT NOT NULL,
            started_at REAL NOT NULL,
            ttft_s REAL,
            duration_s REAL,
            chunks INTEGER NOT NULL DEFAULT 0,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            tokens_per_s REAL,
            finish_reason TEXT,
            status TEXT NOT NULL,
            error TEXT,
            text TEXT NOT NULL DEFAULT '',
            reasoning TEXT NOT NULL DEFAULT '',
            text_chars INTEGER NOT NULL DEFAULT 0,
            preview TEXT NOT NULL DEFAULT '',
            batch_id TEXT
        )
        """,
        # History is read newest first with ``id`` breaking ties, so each index that serves it
        # orders by (started_at, id); the trailing columns make the first two covering for stats.
        """
        CREATE INDEX runs_started_at
            ON runs (started_at, id, prompt_name, model, status, ttft_s, duration_s)
        """,
        """
        CREATE INDEX runs_prompt_started_at
            ON runs (prompt_name, started_at, id, model, status, ttft_s, duration_s)
        """,
        "CREATE INDEX runs_status_started_at ON runs (status, started_at)",
        """
        CREATE TABLE run_chunks (
            run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            text TEXT NOT NULL,
            reasoning TEXT NOT NULL,
            PRIMARY KEY (run_id, seq)
        )
        """,
    ]
    for statement in statements:
        conn.execute(statement)


def m002_batch_rows(conn: sqlite3.Connection) -> None:
    """Which row of a batch a run answered, so a batch can be resumed where it failed."""
    conn.execute("ALTER TABLE runs ADD COLUMN batch_row INTEGER")
    conn.execute("CREATE INDEX runs_batch ON runs (batch_id, batch_row)")


def m003_owners_and_chunked_text(conn: sqlite3.Connection) -> None:
    """Who records a running run, and text kept as appended pieces instead of rewritten.

    ``runs.owner`` names the process recording an unfinished run (host, boot, pid and the
    process's start time, as JSON), so a run whose recording process died can be told from one
    still streaming; runs recorded before this step have none and are left alone. The partial
    index ``runs_unfinished`` holds only unfinished runs, so finding them is cheap however long
    the history, and it covers the owner, so checking a run is still open before an append
    never reads the wide run row (which holds the rendered prompt).

    ``runs.text_in_chunks`` says where a run's text is: 0 in ``runs.text`` (short answers,
    moved there when the run finishes), 1 in its ``run_chunks`` rows in order (unfinished runs
    and long answers, which are never copied or rewritten). ``run_chunks.text_end`` and
    ``reasoning_end`` are the characters recorded up to and including each piece. Added
    columns come after the text in each row, where reading them would mean reading the whole
    piece, so the index ``run_chunks_ends`` carries them: the length so far is one lookup in
    it. Chunks left by unfinished runs get both filled in.
    """
    conn.execute("ALTER TABLE runs ADD COLUMN owner TEXT")
    conn.execute("ALTER TABLE runs ADD COLUMN text_in_chunks INTEGER NOT NULL DEFAULT 0")
    conn.execute("ALTER TABLE run_chunks ADD COLUMN text_end INTEGER NOT NULL DEFAULT 0")
    conn.execute("ALTER TABLE run_chunks ADD COLUMN reasoning_end INTEGER NOT NULL DEFAULT 0")
    conn.execute("UPDATE runs SET text_in_chunks = 1 WHERE status = 'unfinished'")
    totals: dict[int, tuple[int, int]] = {}
    updates: list[tuple[int, int, int, int]] = []
    for run_id, seq, text_chars, reasoning_chars in conn.execute(
        "SELECT run_id, seq, length(text), length(reasoning) FROM run_chunks ORDER BY run_id, seq"
    ).fetchall():
        text_end, reasoning_end = totals.get(run_id, (0, 0))
        text_end += text_chars
        reasoning_end += reasoning_chars
        totals[run_id] = (text_end, reasoning_end)
        updates.append((text_end, reasoning_end, run_id, seq))
    conn.executemany(
        "UPDATE run_chunks SET text_end = ?, reasoning_end = ? WHERE run_id = ? AND seq = ?",
        updates,
    )
    conn.execute("CREATE INDEX runs_unfinished ON runs (id, owner) WHERE status = 'unfinished'")
    conn.execute(
        "CREATE INDEX run_chunks_ends ON run_chunks (run_id, seq, text_end, reasoning_end)"
    )


def m004_timings_in_order(conn: sqlite3.Connection) -> None:
    """Indexes that keep each timing in order, within its (prompt, model) group and overall.

    Stats reads a percentile as the values at its rank (``ORDER BY ttft_s LIMIT 2 OFFSET k``),
    which these make a short walk along an index instead of a sort of every run. They are
    partial (runs that measured the timing), so a query that does not ask for the timing never
    picks them, and they carry the columns stats filters on, so the walk never reads a run row.
    """
    for column in ("ttft_s", "duration_s"):
        _timing_in_order(conn, column)


def _timing_in_order(conn: sqlite3.Connection, column: str) -> None:
    """The two indexes that keep ``column`` in order (see ``m004``); part of shipped steps, so
    never changed."""
    conn.execute(
        f"CREATE INDEX runs_{column}_in_group ON runs "
        f"(prompt_name, model, {column}, started_at) WHERE {column} IS NOT NULL"
    )
    conn.execute(
        f"CREATE INDEX runs_{column}_overall ON runs "
        f"({column}, started_at, prompt_name, model) WHERE {column} IS NOT NULL"
    )


def m005_progress_figures(conn: sqlite3.Connection) -> None:
    """What progress tells about a run, and which endpoint it went to.

    ``api`` is ``native`` (LM Studio's ``/api/v1/chat``) or ``openai`` (``/chat/completions``);
    ``first_progress_s`` the time to the first sign of life (a progress report, or the first
    token), ``load_s`` the model's load time for this run, ``prompt_s`` and
    ``prompt_tokens_per_s`` how long prompt processing took and how fast it went. Runs recorded
    before this step, and figures the server did not report, are NULL: unknown, never zero.
    The two figures stats takes a median of get ordered, partial indexes like ``m004``'s (runs
    that did not measure a figure are not in its indexes; old runs measured none).
    """
    conn.execute("ALTER TABLE runs ADD COLUMN api TEXT")
    for column in ("first_progress_s", "load_s", "prompt_s", "prompt_tokens_per_s"):
        conn.execute(f"ALTER TABLE runs ADD COLUMN {column} REAL")
    for column in ("first_progress_s", "prompt_tokens_per_s"):
        _timing_in_order(conn, column)


#: The runs an estimate of the wait for the first token rests on (see ``m006``); queries
#: repeat it so that SQLite can use the partial index. Part of a shipped step: never changed.
FIRST_TOKEN_HISTORY = (
    "status = 'ok' AND ttft_s IS NOT NULL AND first_progress_s IS NOT NULL "
    "AND prompt_chars IS NOT NULL"
)


def m006_prompt_chars(conn: sqlite3.Connection) -> None:
    """Each run's prompt size in characters, and the index an estimate of the wait reads.

    Where the server reports nothing while it processes a prompt, the wait for the first token
    is estimated from earlier runs of the same model and server (``_estimate``): their size,
    known before a request is sent (no tokenizer needed), against their time to first token.
    ``runs_first_token_history`` holds only the runs an estimate may rest on (finished ok,
    streamed: a blocking request's first token is its whole answer, and it records no
    ``first_progress_s``), newest last for each (model, server), and covers what the query
    reads and checks (SQLite checks the conditions again), so an estimate is one short walk
    along it. Streamed runs recorded before this step get
    their size from their recorded messages.
    """
    conn.execute("ALTER TABLE runs ADD COLUMN prompt_chars INTEGER")
    rows = conn.execute(
        "SELECT id, messages FROM runs WHERE status = 'ok' AND ttft_s IS NOT NULL "
        "AND first_progress_s IS NOT NULL"
    ).fetchall()
    updates: list[tuple[int, int]] = []
    for run_id, messages in rows:
        try:
            chat = json.loads(messages)
        except ValueError:
            continue
        if isinstance(chat, list) and all(isinstance(m, dict) for m in chat):
            updates.append((prompt_chars(chat), run_id))
    conn.executemany("UPDATE runs SET prompt_chars = ? WHERE id = ?", updates)
    conn.execute(
        "CREATE INDEX runs_first_token_history ON runs "
        "(model, base_url, started_at, prompt_chars, ttft_s, status, first_progress_s) "
        f"WHERE {FIRST_TOKEN_HISTORY}"
    )


def m007_prompt_schema(conn: sqlite3.Connection) -> None:
    """The JSON Schema a prompt version's answer must match (structured output), or NULL.

    Stored as canonical JSON text (sorted keys, no spaces: ``_structured.canonical_schema``),
    so the same schema always reads the same and a changed one makes a new version.
    """
    conn.execute("ALTER TABLE prompts ADD COLUMN schema TEXT")


def m008_conversations(conn: sqlite3.Connection) -> None:
    """Conversations: named chains of runs, each turn an ordinary run.

    A run that is a turn names its conversation and ``parent_run_id``, the turn before it (any
    status: a failed turn stays in the chain, it is only left out of the context sent). A
    conversation points at its latest turn (``head_run_id``), so a fork is a new row with the
    same head and a reset is a head of NULL: no run is copied or deleted. Turns whose id is
    below ``context_from_run`` were dropped from the context on request (``drop_oldest``);
    ``prompt_name`` is the stored prompt the first turn renders.
    """
    conn.execute(
        "CREATE TABLE conversations ("
        " id INTEGER PRIMARY KEY,"
        " name TEXT NOT NULL UNIQUE,"
        " created REAL NOT NULL,"
        " forked_from INTEGER REFERENCES conversations (id),"
        " head_run_id INTEGER,"
        " context_from_run INTEGER,"
        " prompt_name TEXT)"
    )
    conn.execute("ALTER TABLE runs ADD COLUMN conversation_id INTEGER")
    conn.execute("ALTER TABLE runs ADD COLUMN parent_run_id INTEGER")
    conn.execute(
        "CREATE INDEX runs_conversation ON runs (conversation_id) WHERE conversation_id IS NOT NULL"
    )


def m009_turns_store_their_own_messages(conn: sqlite3.Connection) -> None:
    """A conversation's turn stores only the messages it added, not the context before them.

    The context of a turn is the turns before it in its chain, which the store already holds:
    storing it again with every turn made a conversation's size grow with the square of its
    length. ``context_messages`` is how many messages were sent before the ones a run stores
    (0 for every run that is not a later turn, and for the turns recorded before this step,
    which store the whole array).
    """
    conn.execute("ALTER TABLE runs ADD COLUMN context_messages INTEGER NOT NULL DEFAULT 0")


def m010_run_schema(conn: sqlite3.Connection) -> None:
    """The JSON Schema a run asked for (canonical JSON, as ``m007`` stores a version's), or
    NULL: a schema given for one run (``schema=``, ``--schema``, a relay request) is kept with
    the run, so its parsed value can be read back later and the history shows what was asked.
    """
    conn.execute("ALTER TABLE runs ADD COLUMN schema TEXT")


Migration = Callable[[sqlite3.Connection], None]

#: Every schema step in order; step ``i`` (0-based) brings the database to version ``i + 1``.
MIGRATIONS: tuple[Migration, ...] = (
    m001_initial,
    m002_batch_rows,
    m003_owners_and_chunked_text,
    m004_timings_in_order,
    m005_progress_figures,
    m006_prompt_chars,
    m007_prompt_schema,
    m008_conversations,
    m009_turns_store_their_own_messages,
    m010_run_schema,
)

LATEST_VERSION = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    """The schema version recorded in the file (0 for a new, empty database)."""
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def database_file(conn: sqlite3.Connection) -> str:
    """The file name of the connection's main database, for messages."""
    for row in conn.execute("PRAGMA database_list"):
        if row[1] == "main":
            return str(row[2])
    return "(unknown)"  # pragma: no cover - "main" always exists


def migrate(conn: sqlite3.Connection, *, target: int | None = None) -> list[str]:
    """Apply every step the database lacks (up to ``target``); return the names applied.

    The connection must be in autocommit mode (``isolation_level=None``): each step manages its
    own transaction, so a failure leaves the database at the last completed step. Running it
    again on an up-to-date database does nothing.
    """
    goal = LATEST_VERSION if target is None else target
    if not 0 <= goal <= LATEST_VERSION:
        raise ValueError(f"target must be between 0 and {LATEST_VERSION}, not {target}")
    applied: list[str] = []
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read inside the write lock: another process may have migrated meanwhile.
            version = schema_version(conn)
            if version > LATEST_VERSION:
                raise StoreUnavailable(
                    f"The database {database_file(conn)} has schema version {version}, newer than "
                    f"the {LATEST_VERSION} this lmstream_nb knows: upgrade lmstream_nb "
                    "(pip install -U lmstream_nb) or set LMSTREAM_HOME to another folder.",
                    path=database_file(conn),
                )
            if version >= goal:
                conn.execute("ROLLBACK")
                return applied
            step = MIGRATIONS[version]
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            step(conn)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (version + 1, step.__name__, time.time()),
            )
            # PRAGMA takes no parameters; both values are integers we computed.
            conn.execute(f"PRAGMA user_version = {version + 1:d}")
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID:d}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        applied.append(step.__name__)
