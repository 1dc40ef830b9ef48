"""One SQLite file holds the user's prompts (every version) and a record of every run.

Why SQLite, and why this shape:

* Prompts are versioned, never overwritten: a saved change is a new version, and a version
  number is never reused (not even after the prompt is deleted), so ``summarize@3`` in a
  recorded run always means one text.
* A run is recorded *before* it starts (status ``unfinished``, with the process that owns it)
  and its text is appended as it arrives, one row per append into ``run_chunks`` holding only
  the new text: a kernel that dies mid-answer leaves the partial answer on disk, and nothing is
  ever read back or rewritten, so recording costs time and space in proportion to the answer.
  Finishing writes only what was not appended yet; a short answer (``INLINE_TEXT_CHARS``) is
  moved into the run row instead, which is cheap at that size. The write-ahead log is cut back
  after checkpoints (``journal_size_limit``), so a long answer does not leave a log as large.
* A run whose owner has died (``_owners``) is ended as ``interrupted`` when a store is opened,
  keeping its text.
* The file is shared by notebooks, the CLI and background threads. One connection per store
  serves all threads behind a lock; every write is ``BEGIN IMMEDIATE`` so two processes queue
  for the write lock instead of deadlocking while upgrading a read lock, WAL keeps readers from
  ever waiting for a writer, and a 30 s busy timeout absorbs the queue.
* A file we did not create is never modified: ``PRAGMA application_id`` marks ours, and a
  corrupt, foreign, newer or unwritable file is refused with ``StoreUnavailable`` naming the
  file and what to do.

Prompt files (export and import) live in ``_prompt_files``, history and stats queries in
``_history``; the methods here delegate to them, so ``PromptStore`` stays the one way in.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import difflib
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, overload

import platformdirs

from ._diff import PromptDiff
from ._errors import (
    ConversationBusy,
    ConversationNotFound,
    InvalidOutput,
    LMStreamError,
    PromptNotFound,
    RunNotFound,
    StoreError,
    StoreUnavailable,
)
from ._estimate import WINDOW, Estimate, estimate, prompt_chars
from ._events import Stats
from ._history import (
    CONVERSATION_NAME,
    STATUSES,
    GroupStats,
    History,
    RunStats,
    RunSummary,
    chunks_preview,
    percentile,
    preview,
    query_history,
    query_stats,
)
from ._migrations import APPLICATION_ID, FIRST_TOKEN_HISTORY, LATEST_VERSION, migrate
from ._owners import Owner, current_owner
from ._prompt_fields import (
    KEEP,
    SETTINGS,
    Keep,
    PromptFields,
    revise,
    validate_fields,
    validate_name,
)
from ._prompt_files import export_prompts, import_prompts
from ._structured import parse_answer
from ._template import Prompt, prompt_label

__all__ = [
    "HOME_ENV",
    "STATUSES",
    "GroupStats",
    "History",
    "PromptStore",
    "RunRecord",
    "RunStats",
    "RunSummary",
    "SavedVersion",
    "default_path",
    "percentile",
]

#: Environment variable naming the folder that holds the database (overrides the default).
HOME_ENV = "LMSTREAM_HOME"
DB_NAME = "lmstream.db"

BUSY_TIMEOUT_S = 30.0
#: A finished answer (text and reasoning) up to this many characters is moved into its run's
#: row; a longer one stays in the pieces it was appended as, so it is never copied again.
INLINE_TEXT_CHARS = 64 * 1024
#: After a checkpoint the write-ahead log is cut back to this size (SQLite leaves it at its
#: largest otherwise), so a long answer does not leave a WAL as large as itself.
WAL_SIZE_LIMIT = 4 * 1024 * 1024
#: The error recorded on a run whose recording process ended before the run did.
ORPHANED_ERROR = (
    "The process recording this run ended before the run finished (it was killed or crashed): "
    "the text received until then is kept; run the prompt again for a complete answer."
)

# Code points UTF-8 cannot encode (lone surrogates, which JSON escapes can produce).
_SURROGATE = re.compile("[\ud800-\udfff]")

# SQLite primary result codes (the low byte of an extended code).
_SQLITE_PERM = 3
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_READONLY = 8
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14


@overload
def _storable(text: str) -> str: ...
@overload
def _storable(text: None) -> None: ...
def _storable(text: str | None) -> str | None:
    """``text`` with lone surrogates replaced by U+FFFD (same length), so SQLite can store it.

    The checks are the fast ones first (ASCII, then UTF-8 encoding, both in C); the pattern
    runs only on text that has a surrogate in it.
    """
    if text is None or text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def default_path() -> Path:
    """``$LMSTREAM_HOME/lmstream.db`` if that is set, else the per-user data folder; created."""
    home = os.environ.get(HOME_ENV)
    if home:
        folder = Path(home).expanduser()
    else:
        folder = Path(platformdirs.user_data_dir("lmstream_nb", appauthor=False))
    path = folder / DB_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable(path, exc.strerror or str(exc)) from exc
    return path


# ---------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class RunRecord:
    """Everything recorded about one run, including its full text.

    A conversation's turn names its ``conversation`` and stores only the messages it added
    (``context_messages`` were sent before them, the earlier turns); ``schema`` is the JSON
    Schema the run asked for, as canonical JSON.

    For an ``unfinished`` run, ``text`` and ``reasoning`` are what had arrived when it was read.
    ``started_at`` is unix time; the other times are seconds from the start of the request.
    ``api`` is the endpoint the request went to (``native`` or ``openai``); it and the
    progress figures (see ``Stats``) are ``None`` where unknown, as for runs recorded before
    they were.
    """

    id: int
    prompt_name: str | None
    prompt_version: int | None
    template: str
    system: str | None
    messages: list[dict[str, str]]
    variables: dict[str, str]
    model: str | None
    base_url: str
    started_at: float
    ttft_s: float | None
    duration_s: float | None
    chunks: int
    prompt_tokens: int | None
    completion_tokens: int | None
    tokens_per_s: float | None
    finish_reason: str | None
    status: str
    error: str | None
    text: str
    reasoning: str
    batch_id: str | None
    batch_row: int | None = None
    api: str | None = None
    first_progress_s: float | None = None
    load_s: float | None = None
    prompt_s: float | None = None
    prompt_tokens_per_s: float | None = None
    context_messages: int = 0
    schema: str | None = None
    conversation: str | None = None

    @property
    def label(self) -> str:
        """The prompt the run used, as every front end names it (see ``prompt_label``)."""
        return prompt_label(self.prompt_name, self.prompt_version, self.conversation)

    def parsed_value(self, schema: Mapping[str, Any] | None = None) -> Any:
        """The JSON value of a structured answer that passed, else None: it was validated when
        the run ended, and is read again against ``schema`` or the one the run recorded (runs
        recorded before runs kept their schema need ``schema``)."""
        if schema is None and self.schema is not None:
            schema = json.loads(self.schema)
        if schema is None or self.status != "ok":
            return None
        with contextlib.suppress(InvalidOutput):
            return parse_answer(self.text, schema)
        return None

    def stats(self) -> Stats:
        """The run's figures, as a stream reports them."""
        return Stats(
            ttft_s=self.ttft_s,
            duration_s=self.duration_s or 0.0,
            chunks=self.chunks,
            text_chars=len(self.text),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            tokens_per_s=self.tokens_per_s,
            first_progress_s=self.first_progress_s,
            load_s=self.load_s,
            prompt_s=self.prompt_s,
            prompt_tokens_per_s=self.prompt_tokens_per_s,
        )


# ---------------------------------------------------------------------------------------------
# Translating SQLite's errors (the one place this happens)


def _unwritable(path: Path | str, reason: str) -> StoreUnavailable:
    return StoreUnavailable(
        f"The database {path} cannot be written ({reason}): set {HOME_ENV} to a writable folder.",
        path=str(path),
    )


def _read_only(path: Path | str, reason: str) -> StoreUnavailable:
    return StoreUnavailable(
        f"The database {path} is in a read-only location ({reason}), so it can be read but "
        "nothing can be saved or run: make the folder and the file writable, or copy the "
        f"database to a writable folder and set {HOME_ENV} to it.",
        path=str(path),
    )


def _full(path: Path | str, reason: str) -> StoreUnavailable:
    return StoreUnavailable(
        f"The disk that holds the database {path} is full ({reason}): free some space and try "
        "again (everything stored before is kept).",
        path=str(path),
    )


def _unusable(path: Path | str, reason: str) -> StoreUnavailable:
    return StoreUnavailable(
        f"The file {path} is not a usable lmstream_nb database ({reason}): move it aside or set "
        f"{HOME_ENV} to another folder.",
        path=str(path),
    )


def _primary_code(exc: sqlite3.Error) -> int | None:
    """SQLite's primary result code (Python 3.11+ reports it; before that, None)."""
    code: int | None = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if code is not None else None


def _cannot_write(exc: sqlite3.Error) -> bool:
    """The file or its folder cannot be written (or a -shm file cannot be made there)."""
    primary = _primary_code(exc)
    if primary is not None:
        return primary in (_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_CANTOPEN)
    lowered = str(exc).lower()
    return any(word in lowered for word in ("readonly", "unable to open", "permission"))


def _is_full(exc: sqlite3.Error) -> bool:
    primary = _primary_code(exc)
    if primary is not None:
        return primary == _SQLITE_FULL
    return "disk is full" in str(exc).lower()


def _translate(exc: sqlite3.Error, path: Path | str) -> StoreError:
    """Turn a SQLite failure into the StoreUnavailable that says what to do about it."""
    reason = str(exc)
    if _is_full(exc):
        return _full(path, reason)
    if _cannot_write(exc):
        return _unwritable(path, reason)
    if _is_busy(exc):
        return StoreUnavailable(
            f"The database {path} is locked by another connection ({reason}): close other "
            "programs that use it and try again.",
            path=str(path),
        )
    return _unusable(path, reason)


def _is_busy(exc: sqlite3.Error) -> bool:
    primary = _primary_code(exc)
    if primary is None:
        return "locked" in str(exc).lower()
    return primary in (_SQLITE_BUSY, _SQLITE_LOCKED)


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL (a lasting property of the file), waiting out other openers.

    The switch needs an exclusive lock, and SQLite reports "database is locked" at once rather
    than calling the busy handler when another connection is opening the same new file, so
    this waits itself, for at most the busy timeout.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


class _CannotWrite(Exception):
    """Opening for writing failed because the file or folder cannot be written."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _has_content(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def _is_environmental(exc: BaseException) -> bool:
    """SQLite errors caused by the file or the machine, not by a bug in our SQL."""
    return isinstance(exc, sqlite3.DatabaseError) and not isinstance(
        exc, (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)
    )


# ---------------------------------------------------------------------------------------------
# The store


_PROMPT_COLUMNS = (
    "name, version, template, system, model, temperature, max_tokens, description, created_at, "
    "schema"
)
_RECORD_COLUMNS = (
    "id, prompt_name, prompt_version, template, system, messages, variables, model, base_url, "
    "started_at, ttft_s, duration_s, chunks, prompt_tokens, completion_tokens, tokens_per_s, "
    "finish_reason, status, error, text, reasoning, batch_id, batch_row, api, first_progress_s, "
    "load_s, prompt_s, prompt_tokens_per_s, context_messages, schema, "
    f"{CONVERSATION_NAME}"
)


def _settings(prompt: Prompt) -> dict[str, object]:
    return {key: getattr(prompt, key) for key in SETTINGS}


def _fields(prompt: Prompt) -> PromptFields:
    """A stored version's fields, as ``validate_fields`` returns them (to compare content)."""
    return PromptFields(
        prompt.name or "",
        prompt.template,
        prompt.system,
        prompt.model,
        prompt.temperature,
        prompt.max_tokens,
        prompt.description,
        prompt.schema,
    )


@dataclass(frozen=True)
class SavedVersion:
    """What saving a prompt did: the version that now holds it, whether it is new, and which
    settings were taken over from (or cleared against) ``base``, the version revised."""

    prompt: Prompt
    created: bool  # False: the latest version already held exactly this, so none was added
    carried: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    base: Prompt | None = None


def _prompt_from_row(row: Sequence[Any]) -> Prompt:
    name, version, template, system, model, temperature, max_tokens, description, created = row[:9]
    return Prompt(
        template=template,
        system=system,
        name=name,
        version=version,
        model=model,
        temperature=temperature,
        max_tokens=max_tokens,
        description=description,
        created_at=created,
        schema=row[9],
    )


class PromptStore:
    """Versioned prompts and recorded runs in one SQLite file (safe across threads and processes).

    ``PromptStore()`` opens the default database (``$LMSTREAM_HOME/lmstream.db`` or the per-user
    data folder), creating and migrating it as needed, and ends the runs whose recording
    process has died (``end_orphaned_runs``). Where the file or its folder cannot be written, an
    existing database is opened for reading only (``read_only``): reads work, and every write
    raises StoreUnavailable saying so. Close it with ``close()`` or use it as a context manager.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = default_path() if path is None else Path(path)
        self._lock = threading.RLock()
        #: True when the database could only be opened for reading (see ``_open``).
        self.read_only = False
        self._read_only_reason = ""
        self._conn: sqlite3.Connection | None = self._open()
        # Tidying up must not stop anyone reading (a full disk, say): it is tried again later.
        with contextlib.suppress(StoreError):
            self.end_orphaned_runs()

    def __repr__(self) -> str:
        return f"PromptStore({str(self.path)!r})"

    def __enter__(self) -> PromptStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the database connection; closing twice is harmless."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    # -- opening ------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        """Open for reading and writing, or, where the file or folder cannot be written, for
        reading only (``read_only``), or refuse with StoreUnavailable saying why."""
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _unwritable(path, exc.strerror or str(exc)) from exc
        try:
            conn = sqlite3.connect(
                str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise _translate(exc, path) from exc
        try:
            self._prepare(conn)
        except _CannotWrite as exc:
            conn.close()
            if not _has_content(path):
                raise _unwritable(path, exc.reason) from exc
            return self._open_read_only(exc.reason)
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_read_only(self, reason: str) -> sqlite3.Connection:
        """Open the existing database for reading where it cannot be written.

        ``mode=ro`` reads a WAL database where its ``-shm`` file exists or can be made. In a
        read-only folder it can be neither, and ``immutable=1`` tells SQLite that the file
        cannot change, so it reads without the ``-shm`` file and without locks. That is safe
        only if nobody is writing it, which holds there: no writer can work without a ``-shm``
        file either. It is not safe if a ``-wal`` file holds changes not yet copied into the
        database (immutable ignores them), so that case is refused.
        """
        path = self.path
        uri = Path(os.path.abspath(path)).as_uri() + "?mode=ro"
        try:
            try:
                conn = self._connect_read_only(uri)
            except sqlite3.Error as exc:
                if not _cannot_write(exc):
                    raise
                wal = Path(f"{path}-wal")
                if wal.exists() and wal.stat().st_size > 0:
                    raise StoreUnavailable(
                        f"The database {path} has changes in {wal.name} that cannot be read "
                        "from a read-only folder: make the folder writable once (any lmstream "
                        f"command then folds them in), or copy the database and {wal.name} to a "
                        f"writable folder and set {HOME_ENV} to it.",
                        path=str(path),
                    ) from exc
                conn = self._connect_read_only(uri + "&immutable=1")
        except sqlite3.Error as exc:
            raise _unwritable(path, reason) from exc
        try:
            version = self._check_header(conn)
        except _CannotWrite as exc:
            conn.close()
            raise _unwritable(path, exc.reason) from exc
        except BaseException:
            conn.close()
            raise
        if version != LATEST_VERSION:
            conn.close()
            raise StoreUnavailable(
                f"The database {path} has schema version {version}, older than the "
                f"{LATEST_VERSION} this lmstream_nb reads, and it cannot be upgraded where it is "
                f"({reason}): make it writable once, or copy it to a writable folder and set "
                f"{HOME_ENV} to it.",
                path=str(path),
            )
        self.read_only = True
        self._read_only_reason = reason
        return conn

    @staticmethod
    def _connect_read_only(uri: str) -> sqlite3.Connection:
        conn = sqlite3.connect(
            uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_header(self, conn: sqlite3.Connection) -> int:
        """The schema version, once the file is known to be ours (or empty); else refused."""
        path = self.path
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000):d}")
            # One read transaction, so a process creating the file meanwhile is seen whole or
            # not at all. Nothing is written before the file is known to be ours (or empty).
            conn.execute("BEGIN")
            try:
                application_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                objects = int(conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0])
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if _cannot_write(exc):
                raise _CannotWrite(str(exc)) from exc
            raise _translate(exc, path) from exc

        fresh = application_id == 0 and version == 0 and objects == 0
        if application_id != APPLICATION_ID and not fresh:
            owner = (
                f"application_id 0x{application_id:08X}"
                if application_id
                else "tables but no application_id"
            )
            raise StoreUnavailable(
                f"The file {path} is a SQLite database of another program ({owner}), so "
                f"lmstream_nb leaves it untouched: pass another path or set {HOME_ENV} to "
                "another folder.",
                path=str(path),
            )
        if version > LATEST_VERSION:
            raise StoreUnavailable(
                f"The database {path} has schema version {version}, newer than the "
                f"{LATEST_VERSION} this lmstream_nb knows: upgrade lmstream_nb "
                f"(pip install -U lmstream_nb) or set {HOME_ENV} to another folder.",
                path=str(path),
            )
        return version

    def _prepare(self, conn: sqlite3.Connection) -> None:
        self._check_header(conn)
        try:
            _enable_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT:d}")
            conn.execute("PRAGMA foreign_keys = ON")
            migrate(conn)
            # Probe: a read-only file still accepts BEGIN IMMEDIATE, but not a write.
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("DELETE FROM schema_migrations WHERE 0")
            finally:
                conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            if _cannot_write(exc):
                raise _CannotWrite(str(exc)) from exc
            raise _translate(exc, self.path) from exc

    # -- transactions -------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(
                f"The store for {self.path} is closed: open a new PromptStore to use it again.",
                path=str(self.path),
            )
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, taken with BEGIN IMMEDIATE; rolled back if the block fails."""
        with self._lock:
            conn = self._connection()
            if self.read_only:
                raise _read_only(self.path, self._read_only_reason)
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    # Also after a failed COMMIT (disk full): the next write must start clean.
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                if _is_environmental(exc):
                    raise _translate(exc, self.path) from exc
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: several queries see one consistent snapshot."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN")
                try:
                    yield conn
                finally:
                    if conn.in_transaction:
                        conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if _is_environmental(exc):
                    raise _translate(exc, self.path) from exc
                raise

    # -- prompts ------------------------------------------------------------------------------

    def add(
        self,
        name: str,
        template: str,
        *,
        system: str | Keep | None = KEEP,
        model: str | Keep | None = KEEP,
        temperature: float | Keep | None = KEEP,
        max_tokens: int | Keep | None = KEEP,
        description: str | Keep | None = KEEP,
        base_version: int | None = None,
        schema: object = KEEP,
    ) -> SavedVersion:
        """Store ``template`` as a new version of ``name``, keeping what was not changed.

        A setting left out is taken over from the latest version (or from ``base_version``,
        the version the change started from); ``None`` clears it. Content identical to the
        latest version is not stored again: the latest version comes back with
        ``created=False``, so importing or saving the same prompt twice adds nothing.
        ``schema`` (a dict, a pydantic model class or JSON text) is the JSON Schema its
        answers must match, stored as canonical JSON: a changed schema makes a new version.

        Raises ValueError for a name that cannot be a file name (a separator, a control or
        invisible character, ``.`` or ``..``), InvalidSetting for a temperature or max tokens
        out of range, and InvalidPlaceholder for a ``{{...}}`` that is not a name or not closed.
        """
        given = {
            "system": system,
            "model": model,
            "temperature": temperature,
            "max_tokens": max_tokens,
            "description": description,
            "schema": schema,
        }
        with self._write() as conn:
            return self._add(conn, name, template, given, base_version)

    def save(
        self,
        name: str,
        template: str,
        *,
        system: str | Keep | None = KEEP,
        model: str | Keep | None = KEEP,
        temperature: float | Keep | None = KEEP,
        max_tokens: int | Keep | None = KEEP,
        description: str | Keep | None = KEEP,
        schema: object = KEEP,
    ) -> Prompt:
        """Store a new version of the prompt ``name`` and return it (see :meth:`add`: settings
        left out are kept from the latest version, identical content adds no version).

        Versions count up from 1 and are never reused, not even after ``delete``: a recorded
        run's ``name@version`` always refers to one text.
        """
        return self.add(
            name,
            template,
            system=system,
            model=model,
            temperature=temperature,
            max_tokens=max_tokens,
            description=description,
            schema=schema,
        ).prompt

    def save_all(self, prompts: Sequence[PromptFields]) -> builtins.list[SavedVersion]:
        """Store checked prompts (from ``validate_fields``) in one transaction, each exactly as
        given (nothing taken over), each only if it differs from its latest version: all of
        them or, if the write fails, none."""
        with self._write() as conn:
            return [
                self._add(conn, fields.name, fields.template, fields._asdict(), None)
                for fields in prompts
            ]

    def save_prompt(self, prompt: Prompt, name: str | None = None) -> Prompt:
        """Store ``prompt`` as a new version of ``name`` (default: the prompt's own name), with
        exactly its settings; nothing is stored when the latest version is the same."""
        chosen = name if name is not None else prompt.name
        if chosen is None:
            raise ValueError(
                "The prompt has no name: pass name=... to save it, e.g. "
                "store.save_prompt(prompt, name='summarize')."
            )
        return self.save(
            chosen,
            prompt.template,
            system=prompt.system,
            model=prompt.model,
            temperature=prompt.temperature,
            max_tokens=prompt.max_tokens,
            description=prompt.description,
            schema=prompt.schema,
        )

    def _add(
        self,
        conn: sqlite3.Connection,
        name: object,
        template: object,
        given: Mapping[str, object],
        base_version: int | None,
    ) -> SavedVersion:
        latest = self._latest(conn, validate_name(name))
        base = latest
        if base_version is not None:
            row = conn.execute(
                f"SELECT {_PROMPT_COLUMNS} FROM prompts WHERE name = ? AND version = ?",
                (name, base_version),
            ).fetchone()
            if row is None:
                raise PromptNotFound(str(name), version=base_version, path=str(self.path))
            base = _prompt_from_row(row)
        revision = revise(None if base is None else _settings(base), given)
        fields = validate_fields(name, template, *(revision.values[k] for k in SETTINGS))
        unchanged = latest is not None and fields == _fields(latest)
        return SavedVersion(
            prompt=latest if unchanged and latest is not None else self._insert(conn, fields),
            created=not unchanged,
            carried=revision.carried,
            dropped=revision.dropped,
            base=base,
        )

    @staticmethod
    def _latest(conn: sqlite3.Connection, name: str) -> Prompt | None:
        row = conn.execute(
            f"SELECT {_PROMPT_COLUMNS} FROM prompts WHERE name = ? ORDER BY version DESC LIMIT 1",
            (name,),
        ).fetchone()
        return None if row is None else _prompt_from_row(row)

    @staticmethod
    def _insert(conn: sqlite3.Connection, fields: PromptFields) -> Prompt:
        name, template, system, model, temperature, max_tokens, description, schema = fields
        row = conn.execute(
            "SELECT max(coalesce((SELECT last_version FROM prompt_names WHERE name = ?), 0),"
            " coalesce((SELECT max(version) FROM prompts WHERE name = ?), 0)) + 1",
            (name, name),
        ).fetchone()
        version = int(row[0])
        conn.execute(
            "INSERT INTO prompt_names (name, last_version) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET last_version = excluded.last_version",
            (name, version),
        )
        row = (
            name,
            version,
            template,
            system,
            model,
            temperature,
            max_tokens,
            description,
            time.time(),
            schema,
        )
        conn.execute(
            f"INSERT INTO prompts ({_PROMPT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row
        )
        return _prompt_from_row(row)

    def get(self, name: str, version: int | None = None) -> Prompt:
        """The latest version of ``name``, or the given version; PromptNotFound otherwise."""
        with self._read() as conn:
            if version is None:
                latest = self._latest(conn, name)
                if latest is not None:
                    return latest
            else:
                row = conn.execute(
                    f"SELECT {_PROMPT_COLUMNS} FROM prompts WHERE name = ? AND version = ?",
                    (name, version),
                ).fetchone()
                if row is not None:
                    return _prompt_from_row(row)
            if version is not None and self._exists(conn, name):
                raise PromptNotFound(name, version=version, path=str(self.path))
            raise self._not_found(conn, name)

    def list(self) -> builtins.list[Prompt]:
        """The latest version of every prompt, sorted by name."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_PROMPT_COLUMNS} FROM prompts AS p WHERE version = "
                "(SELECT max(version) FROM prompts WHERE name = p.name) ORDER BY name"
            ).fetchall()
        return [_prompt_from_row(row) for row in rows]

    def versions(self, name: str) -> builtins.list[Prompt]:
        """Every version of ``name``, oldest first; PromptNotFound if there is none."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_PROMPT_COLUMNS} FROM prompts WHERE name = ? ORDER BY version",
                (name,),
            ).fetchall()
            if not rows:
                raise self._not_found(conn, name)
        return [_prompt_from_row(row) for row in rows]

    def diff(self, name: str, a: int, b: int | None = None) -> PromptDiff:
        """What changed from version ``a`` of ``name`` to version ``b`` (default: the latest);
        PromptNotFound, as ``get`` raises it, for an unknown name or version."""
        return PromptDiff.between(self.get(name, a), self.get(name, b))

    def delete(self, name: str) -> int:
        """Delete every version of ``name`` and return how many there were.

        Recorded runs are kept: they carry the prompt's name, version and text themselves. A
        prompt saved later under the same name continues the version numbers.
        """
        with self._write() as conn:
            deleted = conn.execute("DELETE FROM prompts WHERE name = ?", (name,)).rowcount
            if deleted == 0:
                raise self._not_found(conn, name)
        return int(deleted)

    @staticmethod
    def _exists(conn: sqlite3.Connection, name: str) -> bool:
        return (
            conn.execute("SELECT 1 FROM prompts WHERE name = ? LIMIT 1", (name,)).fetchone()
            is not None
        )

    def _not_found(self, conn: sqlite3.Connection, name: str) -> PromptNotFound:
        names = [row[0] for row in conn.execute("SELECT DISTINCT name FROM prompts")]
        return PromptNotFound(
            name, path=str(self.path), suggestions=difflib.get_close_matches(name, names)
        )

    # -- prompt files -------------------------------------------------------------------------

    def export(self, folder: str | os.PathLike[str], *, force: bool = False) -> builtins.list[Path]:
        """Write the latest version of every prompt to ``<folder>/<name>.toml``; return the files.

        Each file holds the keys name, description, model, temperature, max_tokens, system and
        template (keys without a value are left out); multi-line text is written as TOML
        multi-line strings so the files read well and diff well. A symbolic link at a file's
        name is never written through, and an existing file that is not the prompt file of
        that prompt is left alone unless ``force``: PromptFileError names it, and every file
        is checked before any is written.
        """
        return export_prompts(self, folder, force=force)

    def import_(self, folder: str | os.PathLike[str]) -> builtins.list[Prompt]:
        """Store every ``*.toml`` prompt file in ``folder``; all or nothing. A file whose content
        the latest version already holds adds no version (its latest version is returned), so
        a prompt library kept in git can be imported again and again.

        Every file is read and checked before anything is written; the first bad file raises
        PromptFileError naming the file and line, and nothing is imported. ``name`` defaults to
        the file name without ``.toml``; unknown keys are refused (they are usually typos), and
        so are files over 1 MiB, TOML nested too deeply, and two files with the same name.
        """
        return [saved.prompt for saved in import_prompts(self, folder)]

    def import_versions(self, folder: str | os.PathLike[str]) -> builtins.list[SavedVersion]:
        """``import_``, saying for each prompt whether a version was added (``created``) or the
        latest version already held the file's content."""
        return import_prompts(self, folder)

    # -- runs ---------------------------------------------------------------------------------

    def start_run(
        self,
        *,
        prompt_name: str | None,
        prompt_version: int | None,
        template: str,
        system: str | None,
        messages: builtins.list[dict[str, str]],
        variables: dict[str, str],
        model: str | None,
        base_url: str,
        started_at: float,
        batch_id: str | None = None,
        batch_row: int | None = None,
        conversation_id: int | None = None,
        parent_run_id: int | None = None,
        context: Sequence[Mapping[str, Any]] = (),
        schema: str | None = None,
    ) -> int:
        """Record a run that is about to start (status ``unfinished``, owned by this process);
        return its id. A conversation's turn becomes its latest in the same transaction.

        ``context`` is what was sent before ``messages``: a conversation's earlier turns,
        which their own runs hold, so only their number is stored (see ``m009``). ``schema``
        is the canonical JSON of the schema the run asks for, if any."""
        with self._write() as conn:
            if conversation_id is not None:
                self._check_turn(conn, conversation_id, parent_run_id)
            cursor = conn.execute(
                "INSERT INTO runs (prompt_name, prompt_version, template, system, messages, "
                "prompt_chars, variables, model, base_url, started_at, status, batch_id, "
                "batch_row, owner, text_in_chunks, conversation_id, parent_run_id, "
                "context_messages, schema) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'unfinished', ?, ?, ?, 1, ?, ?, ?, ?)",
                (
                    prompt_name,
                    prompt_version,
                    _storable(template),
                    _storable(system),
                    _storable(json.dumps(messages, ensure_ascii=False)),
                    prompt_chars([*context, *messages]),
                    _storable(json.dumps(variables, ensure_ascii=False)),
                    model,
                    base_url,
                    float(started_at),
                    batch_id,
                    batch_row,
                    current_owner().to_json(),
                    conversation_id,
                    parent_run_id,
                    len(context),
                    _storable(schema),
                ),
            )
            run_id = cursor.lastrowid
            if conversation_id is not None:
                conn.execute(
                    "UPDATE conversations SET head_run_id = ? WHERE id = ?",
                    (run_id, conversation_id),
                )
        assert run_id is not None
        return run_id

    @staticmethod
    def _check_turn(conn: sqlite3.Connection, conversation_id: int, parent: int | None) -> None:
        """Refuse a turn whose context is stale: the conversation's latest turn is not the one
        it was built after, or is still being answered by a live process (this one or
        another: a notebook and ``lmstream serve`` may share the database). Checked in the
        transaction that writes the turn, so two processes cannot both pass it."""
        row = conn.execute(
            "SELECT conversations.name, head_run_id, runs.status, runs.owner FROM conversations "
            "LEFT JOIN runs ON runs.id = conversations.head_run_id WHERE conversations.id = ?",
            (conversation_id,),
        ).fetchone()
        if row is None:
            return
        name, head, status, owner_text = row
        owner = Owner.from_json(owner_text) if owner_text else None
        answering = status == "unfinished" and not (owner is not None and owner.is_gone())
        if head != parent or answering:
            raise ConversationBusy(name)

    def first_token_estimate(
        self, *, model: str, base_url: str, messages: Sequence[Mapping[str, Any]]
    ) -> Estimate | None:
        """How long ``messages`` should wait for their first token on ``model`` at ``base_url``,
        from the latest runs there that succeeded (see ``_estimate``); None when too few did.

        One walk along a partial index over at most ``WINDOW`` entries, whatever the length of
        the history: cheap enough to run before every request that has no progress.
        """
        with self._read() as conn:
            rows = conn.execute(
                "SELECT prompt_chars, ttft_s FROM runs INDEXED BY runs_first_token_history "
                f"WHERE model = ? AND base_url = ? AND {FIRST_TOKEN_HISTORY} "
                "ORDER BY started_at DESC LIMIT ?",
                (model, base_url, WINDOW),
            ).fetchall()
        return estimate([(int(x), float(y)) for x, y in rows], prompt_chars(messages))

    def batch_outcomes(self, batch_id: str) -> dict[int, int]:
        """For each row of a batch, the id of its latest run (to resume what did not succeed)."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT batch_row, id FROM runs WHERE batch_id = ? AND batch_row IS NOT NULL "
                "ORDER BY id",
                (batch_id,),
            ).fetchall()
        return {int(row): int(run_id) for row, run_id in rows}

    def append_run_text(self, run_id: int, text: str, reasoning: str = "") -> None:
        """Add text that arrived for an unfinished run: one row holding only the new text.

        Nothing recorded before is read or rewritten (the run's own row is not touched
        either), so recording an answer costs time and space in proportion to its length.
        """
        if not text and not reasoning:
            return
        with self._write() as conn:
            if not self._is_open(conn, run_id):
                raise self._not_open(conn, run_id)
            seq, text_end, reasoning_end = self._last_chunk(conn, run_id)
            conn.execute(
                "INSERT INTO run_chunks (run_id, seq, text, reasoning, text_end, reasoning_end)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    seq + 1,
                    _storable(text),
                    _storable(reasoning),
                    text_end + len(text),
                    reasoning_end + len(reasoning),
                ),
            )

    @staticmethod
    def _is_open(conn: sqlite3.Connection, run_id: int) -> bool:
        # The partial index holds only unfinished runs, so this never reads the run's row.
        return (
            conn.execute(
                "SELECT 1 FROM runs INDEXED BY runs_unfinished "
                "WHERE status = 'unfinished' AND id = ?",
                (run_id,),
            ).fetchone()
            is not None
        )

    def _not_open(self, conn: sqlite3.Connection, run_id: int) -> LMStreamError | ValueError:
        row = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            return RunNotFound(run_id, path=str(self.path))
        return ValueError(
            f"The run {run_id} is already finished (status {row[0]}), so no text can be "
            "appended: start a new run for new text."
        )

    @staticmethod
    def _last_chunk(conn: sqlite3.Connection, run_id: int) -> tuple[int, int, int]:
        """(seq, text_end, reasoning_end) of a run's last piece; zeros when it has none."""
        row = conn.execute(
            "SELECT seq, text_end, reasoning_end FROM run_chunks INDEXED BY run_chunks_ends "
            "WHERE run_id = ? ORDER BY seq DESC LIMIT 1",
            (run_id,),
        ).fetchone()
        return (0, 0, 0) if row is None else (int(row[0]), int(row[1]), int(row[2]))

    def finish_run(
        self,
        run_id: int,
        *,
        status: str,
        text: str | None,
        reasoning: str | None,
        error: str | None,
        finish_reason: str | None,
        model: str | None,
        ttft_s: float | None,
        duration_s: float | None,
        chunks: int,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        tokens_per_s: float | None,
        api: str | None = None,
        first_progress_s: float | None = None,
        load_s: float | None = None,
        prompt_s: float | None = None,
        prompt_tokens_per_s: float | None = None,
    ) -> None:
        """Write a run's outcome; ``text`` and ``reasoning`` are the run's whole text, or
        ``None`` when the pieces appended so far are the whole text (the caller appended the
        rest first, so a long answer is never held or bound whole once more to finish it).

        Only what was not appended yet is written: the text appended so far is kept where it
        is, and the rest becomes one more piece. An answer of at most INLINE_TEXT_CHARS is
        moved into the run's row instead (cheap at that size, and one row is quicker to
        read). If ``text`` does not continue what was appended (a caller that passes another
        text), the recorded text is replaced by it. ``model`` is what the server reported;
        ``None`` keeps the model recorded at the start. ``api`` is the endpoint the request
        went to (``None`` when none was sent); the progress figures are ``None`` where unknown.
        """
        if status not in STATUSES or status == "unfinished":
            final = ", ".join(s for s in STATUSES if s != "unfinished")
            raise ValueError(
                f"The status {status!r} is not a final run status: use one of {final}."
            )
        if (text is None) != (reasoning is None):
            raise ValueError("Pass both text and reasoning, or neither (the appended pieces).")
        with self._write() as conn:
            seq, text_end, reasoning_end = self._last_chunk(conn, run_id)
            if text is None or reasoning is None:  # the pieces hold it all
                chars = text_end
                inline = text_end + reasoning_end <= INLINE_TEXT_CHARS
                if inline:  # small: read back and moved into the row
                    pieces = conn.execute(
                        "SELECT text, reasoning FROM run_chunks WHERE run_id = ? ORDER BY seq",
                        (run_id,),
                    ).fetchall()
                    text = "".join(piece for piece, _ in pieces)
                    reasoning = "".join(piece for _, piece in pieces)
                head = preview(text) if text is not None else chunks_preview(conn, run_id)
                tail: tuple[str, str] | None = None
            else:
                if seq and not self._continues(conn, run_id, seq, text, reasoning):
                    seq = text_end = reasoning_end = 0  # another text: it replaces the pieces
                chars = len(text)
                inline = len(text) + len(reasoning) <= INLINE_TEXT_CHARS
                head = preview(text)
                tail = None
                if not inline and (len(text) > text_end or len(reasoning) > reasoning_end):
                    tail = (text[text_end:], reasoning[reasoning_end:])
            updated = conn.execute(
                "UPDATE runs SET status = ?, text = ?, reasoning = ?, text_in_chunks = ?, "
                "error = ?, finish_reason = ?, model = coalesce(?, model), ttft_s = ?, "
                "duration_s = ?, chunks = ?, prompt_tokens = ?, completion_tokens = ?, "
                "tokens_per_s = ?, text_chars = ?, preview = ?, api = ?, first_progress_s = ?, "
                "load_s = ?, prompt_s = ?, prompt_tokens_per_s = ? WHERE id = ?",
                (
                    status,
                    _storable(text) if inline and text is not None else "",
                    _storable(reasoning) if inline and reasoning is not None else "",
                    0 if inline else 1,
                    _storable(error),
                    finish_reason,
                    model,
                    ttft_s,
                    duration_s,
                    chunks,
                    prompt_tokens,
                    completion_tokens,
                    tokens_per_s,
                    chars,
                    _storable(head),
                    api,
                    first_progress_s,
                    load_s,
                    prompt_s,
                    prompt_tokens_per_s,
                    run_id,
                ),
            ).rowcount
            if updated == 0:
                raise RunNotFound(run_id, path=str(self.path))
            if inline or seq == 0:
                conn.execute("DELETE FROM run_chunks WHERE run_id = ?", (run_id,))
            if tail is not None:
                conn.execute(
                    "INSERT INTO run_chunks (run_id, seq, text, reasoning, text_end, "
                    "reasoning_end) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        run_id,
                        seq + 1,
                        _storable(tail[0]),
                        _storable(tail[1]),
                        text_end + len(tail[0]),
                        reasoning_end + len(tail[1]),
                    ),
                )

    @staticmethod
    def _continues(
        conn: sqlite3.Connection, run_id: int, seq: int, text: str, reasoning: str
    ) -> bool:
        """Whether ``text`` and ``reasoning`` extend what the run has recorded so far.

        Checked against the last piece only (at most about a second of text), which is what
        a caller passing another text would break.
        """
        last_text: str
        last_reasoning: str
        last_text, last_reasoning, text_end, reasoning_end = conn.execute(
            "SELECT text, reasoning, text_end, reasoning_end FROM run_chunks "
            "WHERE run_id = ? AND seq = ?",
            (run_id, seq),
        ).fetchone()
        return (
            len(text) >= text_end
            and len(reasoning) >= reasoning_end
            and _storable(text[text_end - len(last_text) : text_end]) == last_text
            and _storable(reasoning[reasoning_end - len(last_reasoning) : reasoning_end])
            == last_reasoning
        )

    def get_run(self, run_id: int) -> RunRecord:
        """Everything recorded about one run; RunNotFound if there is no such run."""
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_RECORD_COLUMNS}, text_in_chunks FROM runs WHERE id = ?", (run_id,)
            ).fetchone()
            if row is None:
                raise RunNotFound(run_id, path=str(self.path))
            values = list(row[:-1])
            values[5] = json.loads(values[5])
            values[6] = json.loads(values[6])
            record = RunRecord(*values)
            if row[-1]:
                texts: list[str] = []
                reasonings: list[str] = []
                for text, reasoning in conn.execute(
                    "SELECT text, reasoning FROM run_chunks WHERE run_id = ? ORDER BY seq",
                    (run_id,),
                ):
                    texts.append(text)
                    reasonings.append(reasoning)
                record = dataclasses.replace(
                    record, text="".join(texts), reasoning="".join(reasonings)
                )
        return record

    def end_orphaned_runs(self) -> builtins.list[int]:
        """Finish every unfinished run whose recording process on this host has ended.

        Such a run (its process was killed or crashed mid-answer) becomes ``interrupted``
        with the text recorded until then and an error saying so; its id is returned. Runs
        of live processes, of other hosts and runs recorded before owners were (no owner) are
        left alone. Called when a store is opened; cheap, since only unfinished runs are read.
        """
        if self.read_only:
            return []
        with self._read() as conn:
            rows = conn.execute(
                "SELECT id, owner FROM runs INDEXED BY runs_unfinished "
                "WHERE status = 'unfinished' AND owner IS NOT NULL"
            ).fetchall()
        gone = [
            int(run_id)
            for run_id, text in rows
            if (owner := Owner.from_json(text)) is not None and owner.is_gone()
        ]
        ended: list[int] = []
        for run_id in gone:
            with self._write() as conn:
                if not self._is_open(conn, run_id):
                    continue  # another process ended it meanwhile
                _, text_end, _ = self._last_chunk(conn, run_id)
                conn.execute(
                    "UPDATE runs SET status = 'interrupted', error = ?, text_in_chunks = 1, "
                    "text_chars = ?, preview = ? WHERE id = ?",
                    (ORPHANED_ERROR, text_end, chunks_preview(conn, run_id), run_id),
                )
            ended.append(run_id)
        return ended

    def history(
        self,
        prompt: str | None = None,
        status: str | None = None,
        since: float | datetime | None = None,
        limit: int | None = 50,
        model: str | None = None,
        batch: str | None = None,
    ) -> History:
        """Recorded runs, newest first, without their text; each filter narrows the list.

        ``since`` is unix time or a datetime (runs started at or after it); ``batch`` is a
        batch id (the runs of one ``run_many``); ``limit=None`` returns every match.
        """
        with self._read() as conn:
            return query_history(
                conn,
                prompt=prompt,
                status=status,
                since=since,
                limit=limit,
                model=model,
                batch=batch,
            )

    def stats(
        self,
        prompt: str | None = None,
        model: str | None = None,
        since: float | datetime | None = None,
        *,
        by: str = "prompt",
        batch: str | None = None,
    ) -> RunStats:
        """Success rate, outcome counts and timing percentiles, overall and per (prompt, model);
        ``by="version"`` per (prompt, version, model) instead. ``batch`` is a batch or
        comparison id (only its runs)."""
        with self._read() as conn:
            return query_stats(conn, prompt=prompt, model=model, since=since, by=by, batch=batch)

    # -- conversations ------------------------------------------------------------------------

    def conversation(
        self, name: str, *, create: bool = False, prompt_name: str | None = None
    ) -> ConversationRecord:
        """The conversation ``name``; with ``create``, a new one is made if there is none
        (remembering ``prompt_name``). ConversationNotFound otherwise."""
        if create:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO conversations (name, created, prompt_name) VALUES (?, ?, ?) "
                    "ON CONFLICT (name) DO NOTHING",
                    (name, time.time(), prompt_name),
                )
        with self._read() as conn:
            return self._conversation(conn, name)

    def _conversation(self, conn: sqlite3.Connection, name: str) -> ConversationRecord:
        row = conn.execute(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            known = [n for (n,) in conn.execute("SELECT name FROM conversations ORDER BY name")]
            raise ConversationNotFound(
                name, difflib.get_close_matches(name, known, n=3), path=str(self.path)
            )
        return ConversationRecord(*row)

    def conversations(self) -> builtins.list[ConversationRecord]:
        """Every conversation, by name."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_CONVERSATION_COLUMNS} FROM conversations ORDER BY name"
            ).fetchall()
        return [ConversationRecord(*row) for row in rows]

    def conversation_runs(self, name: str) -> builtins.list[RunRecord]:
        """The turns of conversation ``name``, oldest first: its latest run and the parents
        before it (a fork's chain runs on into the conversation it was forked from)."""
        with self._read() as conn:
            head = self._conversation(conn, name).head_run_id
            ids = [
                int(run_id)
                for (run_id,) in conn.execute(
                    "WITH RECURSIVE chain (id, depth) AS ("
                    " SELECT ?, 0 WHERE ? IS NOT NULL"
                    " UNION ALL SELECT runs.parent_run_id, chain.depth + 1 FROM runs"
                    " JOIN chain ON runs.id = chain.id WHERE runs.parent_run_id IS NOT NULL)"
                    " SELECT id FROM chain ORDER BY depth DESC",
                    (head, head),
                )
            ]
        return [self.get_run(run_id) for run_id in ids]

    def fork_conversation(self, name: str, new_name: str) -> ConversationRecord:
        """A new conversation ``new_name`` with the turns of ``name`` so far (none copied: it
        starts from the same latest turn); StoreError if ``new_name`` is taken."""
        with self._write() as conn:
            source = self._conversation(conn, name)
            if conn.execute("SELECT 1 FROM conversations WHERE name = ?", (new_name,)).fetchone():
                raise StoreError(
                    f"There is already a conversation named {new_name!r} in {self.path}: "
                    "choose another name for the fork.",
                    path=str(self.path),
                )
            conn.execute(
                "INSERT INTO conversations (name, created, forked_from, head_run_id, "
                "context_from_run, prompt_name) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    new_name,
                    time.time(),
                    source.id,
                    source.head_run_id,
                    source.context_from_run,
                    source.prompt_name,
                ),
            )
            return self._conversation(conn, new_name)

    def update_conversation(
        self, name: str, *, head_run_id: int | None, context_from_run: int | None
    ) -> None:
        """Move a conversation's latest turn and where its context starts (reset: both None).
        Its runs stay in the history."""
        with self._write() as conn:
            self._conversation(conn, name)
            conn.execute(
                "UPDATE conversations SET head_run_id = ?, context_from_run = ? WHERE name = ?",
                (head_run_id, context_from_run, name),
            )


_CONVERSATION_COLUMNS = "id, name, created, forked_from, head_run_id, context_from_run, prompt_name"


@dataclass(frozen=True)
class ConversationRecord:
    """A conversation's row: its latest turn, where its context starts, what it came from."""

    id: int
    name: str
    created: float
    forked_from: int | None
    head_run_id: int | None
    context_from_run: int | None
    prompt_name: str | None
