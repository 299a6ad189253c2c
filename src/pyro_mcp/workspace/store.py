"""The records of persistent workspaces, in one SQLite file shared by every pyro process.

The CLI, an SDK process and an MCP server may all open ``<state_dir>/store.sqlite3`` at
once. The file runs in WAL mode (readers never block the writer), every write is one
``BEGIN IMMEDIATE`` transaction (writers queue on the busy timeout instead of failing), and
state changes are compare-and-set against the lifecycle table in ``states``, so two processes
racing to start the same workspace cannot both win.

Schema changes are migrations: ``MIGRATIONS`` is an ordered list, version *n* of a file means
its first *n* migrations ran, and each pending one runs in its own transaction when the
store opens. To change the schema, append a migration; never edit one that has shipped.
"""

from __future__ import annotations

import builtins
import copy
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any, Final, TypeVar

from pyro_mcp.errors import Conflict, InvalidArgument, InvalidState, NotFound, OperationTimeout
from pyro_mcp.runtime.paths import state_dir
from pyro_mcp.workspace.states import (
    RESERVING_STATES,
    TRANSITIONS,
    WorkspaceState,
    describe,
    parse_state,
    require_state,
    state_error,
)

__all__ = [
    "BASELINE",
    "MIGRATIONS",
    "TAIL_BYTES",
    "UNSET",
    "CheckpointRecord",
    "CommandRecord",
    "Migration",
    "WorkspaceRecord",
    "WorkspaceState",
    "WorkspaceStore",
    "default_store_path",
    "require_state",
    "sql_migration",
    "validate_labels",
    "validate_name",
]

STORE_FILENAME: Final = "store.sqlite3"
BUSY_TIMEOUT_S: Final = 10.0
TAIL_BYTES: Final = 4096  # how much of a command's stdout and stderr the journal keeps
BASELINE: Final = "baseline"  # the checkpoint name reserved for the seeded contents
MAX_LABELS: Final = 64

LIST_HINT: Final = "list workspaces with `pyro workspace list`"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_ID_RE = re.compile(r"[0-9a-f]{12}")
_ID_PREFIX_RE = re.compile(r"[0-9a-f]{4,12}")
_LABEL_KEY_RE = re.compile(r"[a-z0-9][a-z0-9._/-]{0,252}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def default_store_path() -> Path:
    """``<state_dir>/store.sqlite3``: where the store lives unless told otherwise."""
    return state_dir() / STORE_FILENAME


class _Unset(Enum):
    UNSET = "unset"


UNSET: Final = _Unset.UNSET
"""Passed for a field ``update`` must leave alone (``None`` clears the field)."""


# ---------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True, kw_only=True)
class WorkspaceRecord:
    """One persistent workspace, as the store knows it."""

    id: str
    """12 lowercase hex characters, generated at creation; never reused."""
    name: str | None
    """Optional human name, unique among workspaces that are not being deleted."""
    environment: str
    """The environment the root disk was made from (e.g. ``debian:12``)."""
    state: WorkspaceState
    """Where the workspace is in its lifecycle (see ``states.TRANSITIONS``)."""
    state_note: str | None
    """Why the state last changed (e.g. ``VMM exited unexpectedly``), if anyone said."""
    created_at: float
    """Creation time, epoch seconds."""
    updated_at: float
    """Time of the last change to this record, epoch seconds."""
    expires_at: float | None
    """When the workspace may be reclaimed (its TTL), epoch seconds; ``None``: never."""
    vcpu_count: int
    """Virtual CPUs given to the VM."""
    mem_mib: int
    """Guest memory, MiB."""
    disk_mib: int
    """Size of the workspace disk mounted at ``/workspace``, MiB."""
    labels: dict[str, str]
    """Free-form labels for selecting workspaces (``pyro workspace list --label k=v``)."""
    backend: str | None
    """The VMM backend that runs (or last ran) it, e.g. ``qemu-tcg``; ``None`` before boot."""
    vmm_pid: int | None
    """Host process id of the VMM while it runs."""
    run_dir: str | None
    """Host directory of the live VM's sockets and logs while it runs."""
    agent_endpoint: str | None
    """How to reach the guest agent of the running VM (the backend's own encoding)."""
    boot_id: str | None
    """Identifies one boot: a new value on every start, to tell a restarted VM from the last."""
    error: str | None
    """The last error an operation on this workspace hit, if any."""
    baseline_manifest: str | None
    """sha256 of the manifest (in the blob store) of the seeded ``/workspace`` contents."""
    seed: str | None
    """What ``/workspace`` was seeded from (a human description), if anything."""
    services: dict[str, Any] = field(default_factory=dict)
    """The guest's services as last seen (name -> status), mirrored from the agent."""

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-able data (state as its string value)."""
        data = _plain(self)
        data["state"] = self.state.value
        return data


@dataclass(frozen=True, kw_only=True)
class CommandRecord:
    """One command run in a workspace, as kept in its journal.

    Exactly one of ``argv`` and ``shell`` is set. Environment variable values are never
    stored (they may be secrets): only their names.
    """

    workspace_id: str
    """The workspace the command ran in."""
    started_at: float
    """When the command started, epoch seconds."""
    argv: list[str] | None = None
    """The program and its arguments, when run without a shell."""
    shell: str | None = None
    """The shell command line, when run through a shell."""
    cwd: str | None = None
    """Working directory in the guest; ``None``: the default."""
    env_keys: list[str] = field(default_factory=list)
    """Names of the environment variables passed (never their values)."""
    duration_ms: float | None = None
    """Wall-clock run time, milliseconds; ``None`` if it never ran."""
    exit_code: int | None = None
    """The exit status; ``None`` if killed by a signal, timed out or never ran."""
    timed_out: bool = False
    """Whether pyro killed it at its deadline."""
    signal: str | None = None
    """The signal that ended it, by name (e.g. ``SIGKILL``), if one did."""
    stdout_tail: str = ""
    """The last ``TAIL_BYTES`` of its standard output (UTF-8, cut at a character)."""
    stderr_tail: str = ""
    """The last ``TAIL_BYTES`` of its standard error (UTF-8, cut at a character)."""
    stdout_bytes: int = 0
    """Total size of its standard output, bytes."""
    stderr_bytes: int = 0
    """Total size of its standard error, bytes."""
    error: str | None = None
    """Why the call failed before the command produced an exit status, if it did."""
    id: int | None = None
    """Journal sequence number, assigned by the store (``None`` until journaled)."""

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-able data."""
        return _plain(self)


@dataclass(frozen=True, kw_only=True)
class CheckpointRecord:
    """A saved copy of a workspace's ``/workspace`` contents."""

    workspace_id: str
    """The workspace it belongs to."""
    name: str
    """Unique within its workspace; ``baseline`` is the seeded contents."""
    manifest: str
    """sha256 of its manifest in the blob store."""
    created_at: float
    """When it was taken, epoch seconds."""
    file_count: int
    """Number of files it holds."""
    total_bytes: int
    """Total size of those files, bytes."""

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-able data."""
        return _plain(self)


def _plain(record: WorkspaceRecord | CommandRecord | CheckpointRecord) -> dict[str, Any]:
    # Copies: editing the returned labels or argv must not change the frozen record.
    return {f.name: copy.copy(getattr(record, f.name)) for f in fields(record)}


# ---------------------------------------------------------------------------------------
# Rows <-> records: the only place that knows how a field is stored.

_Record = TypeVar("_Record", WorkspaceRecord, CommandRecord, CheckpointRecord)

_JSON_COLUMNS: Final = frozenset({"labels", "argv", "env_keys", "services"})
_BOOL_COLUMNS: Final = frozenset({"timed_out"})


def _columns(cls: type[_Record]) -> list[str]:
    return [f.name for f in fields(cls)]


def _select(cls: type[_Record], table: str) -> str:
    return f"SELECT {', '.join(_columns(cls))} FROM {table}"


def _to_row(record: _Record) -> dict[str, object]:
    row: dict[str, object] = {}
    for name in _columns(type(record)):
        value = getattr(record, name)
        if value is None:
            row[name] = None
        elif name in _JSON_COLUMNS:
            row[name] = json.dumps(value, sort_keys=True)
        elif name in _BOOL_COLUMNS:
            row[name] = int(value)
        elif isinstance(value, WorkspaceState):
            row[name] = value.value
        else:
            row[name] = value
    return row


def _from_row(cls: type[_Record], row: sqlite3.Row) -> _Record:
    values: dict[str, Any] = {}
    for name in _columns(cls):
        value = row[name]
        if value is not None and name in _JSON_COLUMNS:
            value = json.loads(value)
        elif name in _BOOL_COLUMNS:
            value = bool(value)
        elif name == "state":
            value = WorkspaceState(value)
        values[name] = value
    return cls(**values)


def _insert(conn: sqlite3.Connection, table: str, record: _Record) -> int:
    row = _to_row(record)
    names = ", ".join(row)
    params = ", ".join(f":{name}" for name in row)
    cursor = conn.execute(f"INSERT INTO {table} ({names}) VALUES ({params})", row)
    return cursor.lastrowid or 0


# ---------------------------------------------------------------------------------------
# Schema

Migration = Callable[[sqlite3.Connection], None]
"""One schema step; it runs inside the transaction that also records the new version."""


def sql_migration(*statements: str) -> Migration:
    """A migration that runs ``statements`` in order (one SQL statement each)."""

    def migrate(conn: sqlite3.Connection) -> None:
        for statement in statements:
            conn.execute(statement)

    return migrate


_V1_WORKSPACES_COMMANDS_CHECKPOINTS = sql_migration(
    """
    CREATE TABLE workspaces (
        id TEXT PRIMARY KEY,
        name TEXT,
        environment TEXT NOT NULL,
        state TEXT NOT NULL,
        state_note TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        expires_at REAL,
        vcpu_count INTEGER NOT NULL,
        mem_mib INTEGER NOT NULL,
        disk_mib INTEGER NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        backend TEXT,
        vmm_pid INTEGER,
        run_dir TEXT,
        agent_endpoint TEXT,
        boot_id TEXT,
        error TEXT,
        baseline_manifest TEXT,
        seed TEXT
    )
    """,
    # A name is unique among workspaces that are not on their way out.
    """
    CREATE UNIQUE INDEX workspaces_live_name ON workspaces (name)
        WHERE name IS NOT NULL AND state <> 'deleting'
    """,
    "CREATE INDEX workspaces_state ON workspaces (state)",
    "CREATE INDEX workspaces_expires_at ON workspaces (expires_at) WHERE expires_at IS NOT NULL",
    """
    CREATE TABLE commands (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        workspace_id TEXT NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
        argv TEXT,
        shell TEXT,
        cwd TEXT,
        env_keys TEXT NOT NULL DEFAULT '[]',
        started_at REAL NOT NULL,
        duration_ms REAL,
        exit_code INTEGER,
        timed_out INTEGER NOT NULL DEFAULT 0,
        signal TEXT,
        stdout_tail TEXT NOT NULL DEFAULT '',
        stderr_tail TEXT NOT NULL DEFAULT '',
        stdout_bytes INTEGER NOT NULL DEFAULT 0,
        stderr_bytes INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        CHECK ((argv IS NULL) <> (shell IS NULL))
    )
    """,
    "CREATE INDEX commands_workspace ON commands (workspace_id, id)",
    """
    CREATE TABLE checkpoints (
        workspace_id TEXT NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        manifest TEXT NOT NULL,
        created_at REAL NOT NULL,
        file_count INTEGER NOT NULL,
        total_bytes INTEGER NOT NULL,
        PRIMARY KEY (workspace_id, name)
    )
    """,
)

_V2_SERVICES = sql_migration(
    "ALTER TABLE workspaces ADD COLUMN services TEXT NOT NULL DEFAULT '{}'"
)

# Append only. Version n of a store file means MIGRATIONS[:n] have run on it.
MIGRATIONS: Final[tuple[Migration, ...]] = (_V1_WORKSPACES_COMMANDS_CHECKPOINTS, _V2_SERVICES)


# ---------------------------------------------------------------------------------------
# Validation: every message starts with the field it is about.


def validate_name(value: object, *, field: str = "name") -> str:
    """A workspace or checkpoint name: 1-63 of ``[A-Za-z0-9_.-]``, starting alphanumeric."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise InvalidArgument(
            f"{field}: {value!r} is not a valid name: use 1-63 letters, digits, '_', '.' or "
            "'-', starting with a letter or digit"
        )
    if _ID_RE.fullmatch(value):
        raise InvalidArgument(
            f"{field}: {value!r} looks like a workspace id (12 hex characters); choose another"
        )
    return value


def validate_labels(value: object, *, field: str = "labels") -> dict[str, str]:
    """Labels: keys ``[a-z0-9][a-z0-9._/-]*`` up to 253 characters, string values up to 253."""
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field}: expected a mapping of strings to strings")
    if len(value) > MAX_LABELS:
        raise InvalidArgument(f"{field}: at most {MAX_LABELS} labels, got {len(value)}")
    labels: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not _LABEL_KEY_RE.fullmatch(key):
            raise InvalidArgument(
                f"{field}: key {key!r} is invalid: use 1-253 lowercase letters, digits, '.', "
                "'_', '/' or '-', starting with a letter or digit"
            )
        if not isinstance(item, str) or len(item) > 253:
            raise InvalidArgument(
                f"{field}: value of {key!r} must be a string of at most 253 chars"
            )
        labels[key] = item
    return labels


def _validate_sha256(value: object, field: str) -> str:
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise InvalidArgument(f"{field}: expected a sha256 as 64 lowercase hex characters")
    return value


def _validate_count(value: object, field: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgument(f"{field}: expected an integer >= {minimum}, got {value!r}")
    return value


def _validate_optional_str(value: object, field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    raise InvalidArgument(f"{field}: expected a string or nothing, got {type(value).__name__}")


def _validate_vmm_pid(value: object, field: str) -> int | None:
    return None if value is None else _validate_count(value, field, minimum=1)


def _validate_baseline(value: object, field: str) -> str | None:
    return None if value is None else _validate_sha256(value, field)


def _validate_services(value: object, name: str) -> str:
    """A name -> status mapping, stored as JSON text."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise InvalidArgument(f"{name}: expected a mapping of service names to their status")
    return json.dumps(value, sort_keys=True)


# The non-state fields ``transition`` and ``set_fields`` may change, and their checks.
_SETTABLE: Final[dict[str, Callable[[object, str], object]]] = {
    "backend": _validate_optional_str,
    "vmm_pid": _validate_vmm_pid,
    "run_dir": _validate_optional_str,
    "agent_endpoint": _validate_optional_str,
    "boot_id": _validate_optional_str,
    "error": _validate_optional_str,
    "baseline_manifest": _validate_baseline,
    "seed": _validate_optional_str,
    "services": _validate_services,
}


def _validate_fields(values: dict[str, object]) -> dict[str, object]:
    checked: dict[str, object] = {}
    for name, value in values.items():
        check = _SETTABLE.get(name)
        if check is None:
            raise InvalidArgument(
                f"{name}: not a field that can be set here (one of {', '.join(sorted(_SETTABLE))})"
            )
        checked[name] = check(value, name)
    return checked


def _tail(text: str, limit: int = TAIL_BYTES) -> str:
    # Cutting bytes may split a character: drop the partial one rather than store garbage.
    return text.encode("utf-8", "replace")[-limit:].decode("utf-8", "ignore")


def _validate_command(record: CommandRecord) -> CommandRecord:
    if (record.argv is None) == (record.shell is None):
        raise InvalidArgument("argv/shell: a command has exactly one of argv and shell")
    if record.argv is not None and (
        not record.argv or not all(isinstance(a, str) for a in record.argv)
    ):
        raise InvalidArgument("argv: expected a non-empty list of strings")
    for key in record.env_keys:
        # A "KEY=value" here would put a secret on disk.
        if not isinstance(key, str) or "=" in key or not key:
            raise InvalidArgument("env_keys: expected variable names only, never values")
    return replace(
        record,
        id=None,
        env_keys=sorted(record.env_keys),
        stdout_tail=_tail(record.stdout_tail),
        stderr_tail=_tail(record.stderr_tail),
    )


# ---------------------------------------------------------------------------------------
# The store


class WorkspaceStore:
    """Workspaces, their command journals and checkpoints, in one SQLite file.

    Safe to share between threads (one connection behind a lock) and between processes
    (WAL, busy timeout, ``BEGIN IMMEDIATE`` writes). A store used after ``fork`` opens its
    own connection in the child. Every lookup by ``ref`` accepts an id, a unique id prefix
    of at least 4 characters, or a name, and raises ``NotFound`` when nothing matches.
    """

    def __init__(
        self,
        path: Path,
        *,
        migrations: Sequence[Migration] = MIGRATIONS,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = BUSY_TIMEOUT_S,
    ) -> None:
        """Open (creating if needed) the store at ``path`` and bring its schema up to date.

        ``migrations`` replaces the schema history (tests); ``clock`` gives epoch seconds.
        Raises ``InvalidState`` if the file was written by a newer pyro (a schema version
        beyond ``len(migrations)``).
        """
        self.path = path
        self._migrations = tuple(migrations)
        self._clock = clock
        self._busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self._closed = False
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Command output tails may hold secrets: the file is private from the start.
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        try:
            self._conn = self._connect()
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self.close()
            if "not a database" in str(exc):
                raise InvalidState(
                    f"{path} is not a workspace store (not an SQLite file)",
                    hint="move it aside, or set PYRO_STATE_DIR to use another store",
                ) from exc
            raise
        except BaseException:
            self.close()
            raise

    # -- connection and transactions -------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout_s,
            isolation_level=None,  # transactions are explicit (BEGIN IMMEDIATE)
            check_same_thread=False,  # shared between threads behind self._lock
        )
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        try:
            mode = self._enable_wal(conn)
        except BaseException:
            conn.close()
            raise
        if mode != "wal":
            conn.close()
            raise InvalidState(
                f"workspace store {self.path}: cannot use WAL journaling (got {mode!r})",
                hint="put PYRO_STATE_DIR on a local filesystem",
            )
        return conn

    def _adopt_after_fork(self) -> None:
        # A forked child must not use (or close) its parent's SQLite handle, nor a lock
        # another parent thread may have held at the fork: it gets its own of both.
        if os.getpid() != self._pid and not self._closed:
            self._pid = os.getpid()
            self._lock = threading.Lock()
            self._conn = self._connect()

    def _enable_wal(self, conn: sqlite3.Connection) -> str:
        # Switching a new file to WAL needs an exclusive lock and SQLite does not wait for
        # it on the busy timeout: processes opening a fresh store together retry here.
        deadline = time.monotonic() + self._busy_timeout_s
        while True:
            try:
                return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(0.005)

    def _connection(self) -> sqlite3.Connection:
        if self._closed or self._conn is None:
            raise InvalidState(f"workspace store {self.path} is closed")
        return self._conn

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        self._adopt_after_fork()
        with self._lock:
            conn = self._connection()
            try:
                conn.execute(begin)
                yield conn
                conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                self._rollback(conn)
                if "locked" in str(exc) or "busy" in str(exc):
                    raise OperationTimeout(
                        f"workspace store {self.path} stayed busy for "
                        f"{self._busy_timeout_s:g} s: another pyro process holds it",
                        hint="retry; if it persists, look for a stuck pyro process",
                    ) from exc
                raise
            except BaseException:
                self._rollback(conn)
                raise

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        """A write transaction: takes the database's write lock up front (no upgrade races)."""
        return self._transaction("BEGIN IMMEDIATE")

    def _read(self) -> AbstractContextManager[sqlite3.Connection]:
        """A read transaction: one consistent snapshot for several statements."""
        return self._transaction("BEGIN")

    def _migrate(self) -> None:
        target = len(self._migrations)
        while True:
            with self._write() as conn:
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version ("
                    " id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
                )
                conn.execute("INSERT OR IGNORE INTO schema_version (id, version) VALUES (1, 0)")
                version = int(conn.execute("SELECT version FROM schema_version").fetchone()[0])
                if version > target:
                    raise InvalidState(
                        f"workspace store {self.path} has schema version {version}, newer than "
                        f"this pyro-mcp knows ({target})",
                        hint="upgrade pyro-mcp, or set PYRO_STATE_DIR to use another store",
                    )
                if version == target:
                    return
                self._migrations[version](conn)
                conn.execute("UPDATE schema_version SET version = ?", (version + 1,))

    def schema_version(self) -> int:
        """The schema version of the file (how many migrations have run on it)."""
        with self._read() as conn:
            return int(conn.execute("SELECT version FROM schema_version").fetchone()[0])

    def close(self) -> None:
        """Close the connection; the store cannot be used afterwards. Idempotent."""
        if os.getpid() != self._pid:  # a forked child never opened the inherited handle
            self._conn, self._closed = None, True
            return
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn, self._closed = None, True

    def __enter__(self) -> WorkspaceStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- lookups ---------------------------------------------------------------------

    def _find(self, conn: sqlite3.Connection, ref: str) -> WorkspaceRecord:
        if not isinstance(ref, str) or not ref:
            raise InvalidArgument("ref: expected a workspace id, id prefix or name")
        select = _select(WorkspaceRecord, "workspaces")
        lowered = ref.lower()
        if _ID_RE.fullmatch(lowered):
            row = conn.execute(f"{select} WHERE id = ?", (lowered,)).fetchone()
            if row is not None:
                return _from_row(WorkspaceRecord, row)
        # A live workspace wins over one being deleted that had the same name.
        row = conn.execute(
            f"{select} WHERE name = ? ORDER BY state = 'deleting', created_at DESC LIMIT 1",
            (ref,),
        ).fetchone()
        if row is not None:
            return _from_row(WorkspaceRecord, row)
        if _ID_PREFIX_RE.fullmatch(lowered):
            rows = conn.execute(
                f"{select} WHERE substr(id, 1, ?) = ? ORDER BY id LIMIT 6",
                (len(lowered), lowered),
            ).fetchall()
            if len(rows) == 1:
                return _from_row(WorkspaceRecord, rows[0])
            if rows:
                shown = ", ".join(r["id"] for r in rows[:5])
                raise InvalidArgument(
                    f"ref: {ref!r} matches several workspaces ({shown}); give more characters"
                )
        raise NotFound(f"no workspace {ref!r}", hint=LIST_HINT)

    def get(self, ref: str) -> WorkspaceRecord:
        """The workspace with id, unique id prefix (4+ chars) or name ``ref``.

        Raises ``NotFound`` if none matches, ``InvalidArgument`` if a prefix is ambiguous.
        """
        with self._read() as conn:
            return self._find(conn, ref)

    def list(
        self,
        *,
        labels: dict[str, str] | None = None,
        states: Collection[str] | None = None,
    ) -> list[WorkspaceRecord]:
        """Workspaces, oldest first, having all of ``labels`` and one of ``states`` (if given)."""
        query = _select(WorkspaceRecord, "workspaces")
        params: list[object] = []
        if states is not None:
            wanted = sorted({parse_state(s, field="states").value for s in states})
            if not wanted:
                return []
            query += f" WHERE state IN ({', '.join('?' * len(wanted))})"
            params.extend(wanted)
        query += " ORDER BY created_at, id"
        with self._read() as conn:
            records = [_from_row(WorkspaceRecord, r) for r in conn.execute(query, params)]
        if labels:
            wanted_labels = labels.items()
            records = [r for r in records if wanted_labels <= r.labels.items()]
        return records

    def expired(self, now: float) -> builtins.list[WorkspaceRecord]:
        """Workspaces whose TTL ran out at or before ``now`` (epoch seconds), soonest first.

        Includes ones already ``deleting`` so a sweeper can finish an interrupted delete.
        """
        with self._read() as conn:
            rows = conn.execute(
                f"{_select(WorkspaceRecord, 'workspaces')} "
                "WHERE expires_at IS NOT NULL AND expires_at <= ? ORDER BY expires_at, id",
                (now,),
            ).fetchall()
        return [_from_row(WorkspaceRecord, r) for r in rows]

    def count_live(self) -> int:
        """How many workspaces hold host resources (creating, starting or running)."""
        return int(self._reserving("COUNT(*)"))

    def reserved_mem_mib(self) -> int:
        """Guest memory, MiB, of the workspaces counted by ``count_live``."""
        return int(self._reserving("COALESCE(SUM(mem_mib), 0)"))

    def _reserving(self, aggregate: str) -> int:
        states = sorted(s.value for s in RESERVING_STATES)
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {aggregate} FROM workspaces WHERE state IN "
                f"({', '.join('?' * len(states))})",
                states,
            ).fetchone()
        return int(row[0])

    # -- workspace writes ------------------------------------------------------------

    def create(
        self,
        *,
        environment: str,
        vcpu_count: int,
        mem_mib: int,
        disk_mib: int,
        name: str | None = None,
        labels: dict[str, str] | None = None,
        ttl_seconds: float | None = None,
        seed: str | None = None,
        backend: str | None = None,
    ) -> WorkspaceRecord:
        """Record a new workspace in state ``creating``, with a fresh id.

        ``ttl_seconds`` sets ``expires_at`` that long from now. Raises ``InvalidArgument``
        naming a bad field, ``Conflict`` if a live workspace already has ``name``.
        """
        if not isinstance(environment, str) or not environment:
            raise InvalidArgument("environment: expected an environment name")
        if name is not None:
            validate_name(name)
        checked_labels = validate_labels(labels if labels is not None else {})
        if ttl_seconds is not None and (
            isinstance(ttl_seconds, bool)
            or not isinstance(ttl_seconds, int | float)
            or not ttl_seconds > 0
        ):
            raise InvalidArgument(f"ttl_seconds: expected a positive number, got {ttl_seconds!r}")
        now = self._clock()
        record = WorkspaceRecord(
            id="",
            name=name,
            environment=environment,
            state=WorkspaceState.CREATING,
            state_note=None,
            created_at=now,
            updated_at=now,
            expires_at=None if ttl_seconds is None else now + ttl_seconds,
            vcpu_count=_validate_count(vcpu_count, "vcpu_count", minimum=1),
            mem_mib=_validate_count(mem_mib, "mem_mib", minimum=1),
            disk_mib=_validate_count(disk_mib, "disk_mib", minimum=1),
            labels=checked_labels,
            backend=_validate_optional_str(backend, "backend"),
            vmm_pid=None,
            run_dir=None,
            agent_endpoint=None,
            boot_id=None,
            error=None,
            baseline_manifest=None,
            seed=_validate_optional_str(seed, "seed"),
        )
        with self._write() as conn:
            if name is not None:
                self._check_name_free(conn, name)
            while True:
                new_id = secrets.token_hex(6)
                taken = conn.execute("SELECT 1 FROM workspaces WHERE id = ?", (new_id,))
                if taken.fetchone() is None:
                    break
            record = replace(record, id=new_id)
            _insert(conn, "workspaces", record)
        return record

    @staticmethod
    def _check_name_free(conn: sqlite3.Connection, name: str, *, other_than: str = "") -> None:
        row = conn.execute(
            "SELECT id FROM workspaces WHERE name = ? AND state <> 'deleting' AND id <> ?",
            (name, other_than),
        ).fetchone()
        if row is not None:
            raise Conflict(
                f"name: workspace {row['id']} is already named {name!r}",
                hint="choose another name, or rename or delete that workspace",
            )

    def update(
        self,
        ref: str,
        *,
        name: str | _Unset | None = UNSET,
        labels: dict[str, str] | _Unset | None = UNSET,
        expires_at: float | _Unset | None = UNSET,
    ) -> WorkspaceRecord:
        """Change a workspace's name, labels or expiry; ``None`` clears one, ``UNSET`` keeps it.

        Labels are replaced as a whole. Raises ``NotFound``, ``InvalidArgument``, ``Conflict``
        (name taken) or ``InvalidState`` (the workspace is being deleted).
        """
        changes: dict[str, object] = {}
        if name is not UNSET:
            changes["name"] = None if name is None else validate_name(name)
        if labels is not UNSET:
            changes["labels"] = json.dumps(
                validate_labels(labels if labels is not None else {}), sort_keys=True
            )
        if expires_at is not UNSET:
            if expires_at is not None and (
                isinstance(expires_at, bool) or not isinstance(expires_at, int | float)
            ):
                raise InvalidArgument("expires_at: expected epoch seconds or nothing")
            changes["expires_at"] = expires_at
        with self._write() as conn:
            record = self._find(conn, ref)
            live = [s for s in WorkspaceState if s is not WorkspaceState.DELETING]
            require_state(record, live, "changing its name, labels or expiry")
            if isinstance(changes.get("name"), str):
                self._check_name_free(conn, str(changes["name"]), other_than=record.id)
            return self._update_row(conn, record.id, changes)

    def _update_row(
        self, conn: sqlite3.Connection, workspace_id: str, changes: dict[str, object]
    ) -> WorkspaceRecord:
        changes = {**changes, "updated_at": self._clock()}
        assignments = ", ".join(f"{column} = :{column}" for column in changes)
        conn.execute(
            f"UPDATE workspaces SET {assignments} WHERE id = :_id", {**changes, "_id": workspace_id}
        )
        row = conn.execute(
            f"{_select(WorkspaceRecord, 'workspaces')} WHERE id = ?", (workspace_id,)
        ).fetchone()
        return _from_row(WorkspaceRecord, row)

    def transition(
        self,
        ref: str,
        to: str,
        *,
        expect: Collection[str] | None = None,
        note: str | None = None,
        action: str | None = None,
        **fields: object,
    ) -> WorkspaceRecord:
        """Move a workspace to state ``to``, atomically, if it may go there now.

        Compare-and-set: the current state must be in ``expect`` (when given) and allowed to
        reach ``to`` by ``TRANSITIONS``; otherwise ``InvalidState`` names the workspace, its
        current state and the wanted ones (``action`` names the operation in that message).
        ``note`` becomes ``state_note`` (cleared when not given); ``fields`` (``vmm_pid``,
        ``run_dir``, ``boot_id``, ``error``, ...) change in the same transaction.
        """
        target = parse_state(to, field="to")
        allowed = {s for s, nexts in TRANSITIONS.items() if target in nexts}
        if expect is not None:
            allowed &= {parse_state(s, field="expect") for s in expect}
        changes = _validate_fields(fields)
        changes["state"] = target.value
        changes["state_note"] = _validate_optional_str(note, "note")
        with self._write() as conn:
            record = self._find(conn, ref)
            if record.state not in allowed:
                raise state_error(record, allowed, action or f"moving to {target.value}")
            return self._update_row(conn, record.id, changes)

    def set_fields(self, ref: str, **fields: object) -> WorkspaceRecord:
        """Change non-state fields (``backend``, ``vmm_pid``, ``run_dir``, ``agent_endpoint``,
        ``boot_id``, ``error``, ``baseline_manifest``, ``seed``) in one transaction, any state.
        """
        changes = _validate_fields(fields)
        with self._write() as conn:
            record = self._find(conn, ref)
            if not changes:
                return record
            return self._update_row(conn, record.id, changes)

    def delete_record(self, ref: str) -> None:
        """Remove a workspace's record, with its journal and checkpoints.

        Only from state ``deleting`` (its VM and disks are already gone); otherwise
        ``InvalidState``.
        """
        with self._write() as conn:
            record = self._find(conn, ref)
            require_state(record, {WorkspaceState.DELETING}, "removing its record")
            conn.execute("DELETE FROM workspaces WHERE id = ?", (record.id,))

    # -- command journal -------------------------------------------------------------

    def journal_command(self, record: CommandRecord) -> int:
        """Append ``record`` to its workspace's journal; returns its journal id.

        Output tails are cut to their last ``TAIL_BYTES``. Raises ``NotFound`` if the
        workspace is unknown, ``InvalidArgument`` if the record is malformed (both or
        neither of argv and shell, or an ``env_keys`` entry holding a value).
        """
        checked = _validate_command(record)
        with self._write() as conn:
            known = conn.execute("SELECT 1 FROM workspaces WHERE id = ?", (record.workspace_id,))
            if known.fetchone() is None:
                raise NotFound(f"no workspace {record.workspace_id!r}", hint=LIST_HINT)
            return _insert(conn, "commands", checked)

    def commands(self, ref: str, *, limit: int = 100) -> builtins.list[CommandRecord]:
        """The last ``limit`` commands run in a workspace, oldest first."""
        _validate_count(limit, "limit", minimum=1)
        with self._read() as conn:
            record = self._find(conn, ref)
            rows = conn.execute(
                f"SELECT * FROM ({_select(CommandRecord, 'commands')} WHERE workspace_id = ? "
                "ORDER BY id DESC LIMIT ?) ORDER BY id",
                (record.id, limit),
            ).fetchall()
        return [_from_row(CommandRecord, r) for r in rows]

    # -- checkpoints -----------------------------------------------------------------

    def add_checkpoint(
        self,
        ref: str,
        name: str,
        *,
        manifest: str,
        file_count: int,
        total_bytes: int,
    ) -> CheckpointRecord:
        """Record a checkpoint of a workspace.

        Raises ``InvalidArgument`` for a bad or reserved name (``baseline``: see
        ``add_baseline``), ``Conflict`` if the workspace already has one by that name.
        """
        validate_name(name)
        if name == BASELINE:
            raise InvalidArgument(
                f"name: {BASELINE!r} is reserved for the seeded contents; choose another"
            )
        return self._add_checkpoint(ref, name, manifest, file_count, total_bytes)

    def add_baseline(
        self, ref: str, *, manifest: str, file_count: int, total_bytes: int
    ) -> CheckpointRecord:
        """Record the seeded contents as checkpoint ``baseline`` and as the workspace's
        ``baseline_manifest``, in one transaction. ``Conflict`` if it already has one.
        """
        return self._add_checkpoint(ref, BASELINE, manifest, file_count, total_bytes)

    def _add_checkpoint(
        self, ref: str, name: str, manifest: str, file_count: int, total_bytes: int
    ) -> CheckpointRecord:
        _validate_sha256(manifest, "manifest")
        _validate_count(file_count, "file_count", minimum=0)
        _validate_count(total_bytes, "total_bytes", minimum=0)
        with self._write() as conn:
            workspace = self._find(conn, ref)
            taken = conn.execute(
                "SELECT 1 FROM checkpoints WHERE workspace_id = ? AND name = ?",
                (workspace.id, name),
            ).fetchone()
            if taken is not None:
                raise Conflict(
                    f"name: workspace {describe(workspace)} already has a checkpoint {name!r}",
                    hint="choose another name, or delete that checkpoint first",
                )
            record = CheckpointRecord(
                workspace_id=workspace.id,
                name=name,
                manifest=manifest,
                created_at=self._clock(),
                file_count=file_count,
                total_bytes=total_bytes,
            )
            _insert(conn, "checkpoints", record)
            if name == BASELINE:
                self._update_row(conn, workspace.id, {"baseline_manifest": manifest})
        return record

    def checkpoints(self, ref: str) -> builtins.list[CheckpointRecord]:
        """A workspace's checkpoints, oldest first."""
        with self._read() as conn:
            workspace = self._find(conn, ref)
            rows = conn.execute(
                f"{_select(CheckpointRecord, 'checkpoints')} WHERE workspace_id = ? "
                "ORDER BY created_at, name",
                (workspace.id,),
            ).fetchall()
        return [_from_row(CheckpointRecord, r) for r in rows]

    def get_checkpoint(self, ref: str, name: str) -> CheckpointRecord:
        """A workspace's checkpoint by name; ``NotFound`` names both when missing."""
        with self._read() as conn:
            return self._find_checkpoint(conn, ref, name)

    def _find_checkpoint(self, conn: sqlite3.Connection, ref: str, name: str) -> CheckpointRecord:
        workspace = self._find(conn, ref)
        row = conn.execute(
            f"{_select(CheckpointRecord, 'checkpoints')} WHERE workspace_id = ? AND name = ?",
            (workspace.id, name),
        ).fetchone()
        if row is None:
            raise NotFound(
                f"workspace {describe(workspace)} has no checkpoint {name!r}",
                hint=f"list them with `pyro workspace snapshot list {workspace.id}`",
            )
        return _from_row(CheckpointRecord, row)

    def delete_checkpoint(self, ref: str, name: str) -> None:
        """Forget a checkpoint (its blobs go at the next blob GC).

        The ``baseline`` is kept for the workspace's life: ``InvalidArgument``.
        """
        if name == BASELINE:
            raise InvalidArgument(
                f"name: the {BASELINE!r} checkpoint lives as long as its workspace"
            )
        with self._write() as conn:
            checkpoint = self._find_checkpoint(conn, ref, name)
            conn.execute(
                "DELETE FROM checkpoints WHERE workspace_id = ? AND name = ?",
                (checkpoint.workspace_id, name),
            )

    def referenced_manifests(self) -> set[str]:
        """Every manifest sha256 a workspace or checkpoint points to (what blob GC keeps)."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT baseline_manifest FROM workspaces WHERE baseline_manifest IS NOT NULL "
                "UNION SELECT manifest FROM checkpoints"
            ).fetchall()
        return {str(r[0]) for r in rows}
