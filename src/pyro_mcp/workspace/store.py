"""The records of persistent workspaces, in one SQLite file shared by every pyro process.

The CLI, an SDK process and an MCP server may all open ``<state_dir>/store.sqlite3`` at
once. The file runs in WAL mode (readers never block the writer), every write is one
``BEGIN IMMEDIATE`` transaction (writers queue on the busy timeout instead of failing), and
state changes are compare-and-set against the lifecycle table in ``states``, so two processes
racing to start the same workspace cannot both win.

Its records are of two kinds (``states.Kind``): workspaces and lifecycle VMs, on one
lifecycle. A store is scoped to one kind: it finds and lists only records of that kind, so
a workspace command never acts on a VM nor a VM command on a workspace. What a host keeps
up for every kind at once (admission, the keeper, reconcile, the orphan sweep) uses the
store of every kind (``kind=None``, or :meth:`WorkspaceStore.scoped`).

This module holds ``WorkspaceStore``: opening the file and the queries of the records
themselves (lookups, create, state changes, delete). The queries of what a workspace owns
(its command journal, secrets and checkpoints) are in ``owned_records``; the connection and
its transactions in ``connection``; the records it hands out, their checks and their row
form in ``records``; the tables and their migrations in ``schema``. The names other modules
use are re-exported from here.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import json
import os
import re
import sqlite3
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any, Final

from pyro_mcp.errors import Conflict, Expired, InvalidArgument, InvalidState, NotFound
from pyro_mcp.runtime.paths import state_dir
from pyro_mcp.workspace.connection import StoreConnection
from pyro_mcp.workspace.owned_records import BASELINE, OwnedRecords
from pyro_mcp.workspace.records import (
    ID_RE,
    LIST_HINT,
    TAIL_BYTES,
    CheckpointRecord,
    CommandRecord,
    SecretRecord,
    WorkspaceRecord,
    from_row,
    insert_record,
    select_sql,
    validate_count,
    validate_fields,
    validate_labels,
    validate_name,
    validate_optional_str,
)
from pyro_mcp.workspace.schema import (
    MIGRATIONS,
    Migration,
    read_version,
    run_next_migration,
    sql_migration,
)
from pyro_mcp.workspace.states import (
    COMMANDS,
    NOUNS,
    RESERVING_STATES,
    TRANSITIONS,
    Kind,
    WorkspaceState,
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
    "SecretRecord",
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
_HINTS: Final[dict[str, str]] = {
    Kind.WORKSPACE: LIST_HINT,
    Kind.VM: "a VM's id is what `pyro vm create` printed",
}
_CREATE_HINTS: Final[dict[str, str]] = {
    Kind.WORKSPACE: "create another with `pyro workspace create` (`--ttl-seconds` sets its TTL)",
    Kind.VM: "create another with `pyro vm create` (`--ttl-seconds` sets its TTL)",
}
EXPIRED_KEPT_S: Final = 7 * 24 * 3600.0  # how long a deleted record's expiry is remembered

_ID_PREFIX_RE = re.compile(r"[0-9a-f]{4,12}")


def noun(kind: str | None) -> str:
    """How messages call a record of ``kind`` (``None``: of any kind)."""
    return NOUNS.get(kind, kind) if kind is not None else "workspace or VM"


def expired_error(kind: str, ref: str, expires_at: float) -> Expired:
    """The error for a call on a record whose TTL ran out at ``expires_at``."""
    when = datetime.fromtimestamp(expires_at, UTC).isoformat(timespec="seconds")
    return Expired(
        f"{noun(kind)} {ref} expired at {when} (its TTL ran out) and was deleted",
        hint=_CREATE_HINTS.get(kind),
    )


def default_store_path() -> Path:
    """``<state_dir>/store.sqlite3``: where the store lives unless told otherwise."""
    return state_dir() / STORE_FILENAME


class _Unset(Enum):
    UNSET = "unset"


UNSET: Final = _Unset.UNSET
"""Passed for a field ``update`` must leave alone (``None`` clears the field)."""


# ---------------------------------------------------------------------------------------
# The store


class WorkspaceStore(OwnedRecords):
    """Workspaces, their command journals and checkpoints, in one SQLite file.

    Safe to share between threads (one connection behind a lock) and between processes
    (WAL, busy timeout, ``BEGIN IMMEDIATE`` writes). A store used after ``fork`` opens its
    own connection in the child. Every lookup by ``ref`` accepts an id, a unique id prefix
    of at least 4 characters, or a name, of a record of the store's kind, and raises
    ``NotFound`` when nothing matches (``Expired`` when a TTL deleted it).
    """

    def __init__(
        self,
        path: Path,
        *,
        migrations: Sequence[Migration] = MIGRATIONS,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = BUSY_TIMEOUT_S,
        kind: str | None = Kind.WORKSPACE,
    ) -> None:
        """Open (creating if needed) the store at ``path`` and bring its schema up to date.

        ``migrations`` replaces the schema history (tests); ``clock`` gives epoch seconds;
        ``kind`` the records it finds, lists and creates (``None``: it finds and lists
        every kind, and creates none). Raises ``InvalidState`` if the file was written by
        a newer pyro (a schema version beyond ``len(migrations)``).
        """
        self.path = path
        self._kind = None if kind is None else Kind(kind)
        self._migrations = tuple(migrations)
        self._clock = clock
        self._db = StoreConnection(path, busy_timeout_s=busy_timeout_s)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Command output tails may hold secrets: the file is private from the start. Never
        # open and close a descriptor of a store that exists: closing any descriptor of a
        # file drops every POSIX lock this process holds on it, those of SQLite connections
        # in other threads too, and another process then reads a half-checkpointed WAL.
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
        try:
            self._db.open()
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

    def _migrate(self) -> None:
        # Each pending migration runs in its own write transaction, with its new version.
        while True:
            with self._db.write() as conn:
                if not run_next_migration(conn, self._migrations, self.path):
                    return

    @property
    def kind(self) -> str | None:
        """The kind of record this store finds, lists and creates (``None``: every kind)."""
        return self._kind

    def scoped(self, kind: str | None) -> WorkspaceStore:
        """The same store (the same connection) scoped to ``kind`` (``None``: every kind).
        Close the store it came from, never the view."""
        view = copy.copy(self)
        view._kind = None if kind is None else Kind(kind)
        return view

    def _scope(self, column: str = "kind") -> tuple[str, list[object]]:
        """The SQL condition (`` AND ...``) and its parameters that keep to the kind."""
        if self._kind is None:
            return "", []
        return f" AND {column} = ?", [self._kind.value]

    def schema_version(self) -> int:
        """The schema version of the file (how many migrations have run on it)."""
        with self._db.read() as conn:
            return read_version(conn)

    def close(self) -> None:
        """Close the connection; the store cannot be used afterwards. Idempotent."""
        self._db.close()

    def __enter__(self) -> WorkspaceStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- lookups ---------------------------------------------------------------------

    def _find(self, conn: sqlite3.Connection, ref: str) -> WorkspaceRecord:
        if not isinstance(ref, str) or not ref:
            raise InvalidArgument(f"ref: expected a {noun(self._kind)} id, id prefix or name")
        found = self._match(conn, ref, self._scope())
        if found is not None:
            return found
        raise self._missing(conn, ref)

    def _match(
        self, conn: sqlite3.Connection, ref: str, scope: tuple[str, list[object]]
    ) -> WorkspaceRecord | None:
        """The record ``ref`` names among those ``scope`` keeps to, if one."""
        select = select_sql(WorkspaceRecord, "workspaces")
        where, params = scope
        lowered = ref.lower()
        if ID_RE.fullmatch(lowered):
            row = conn.execute(f"{select} WHERE id = ?{where}", (lowered, *params)).fetchone()
            if row is not None:
                return from_row(WorkspaceRecord, row)
        # A live workspace wins over one being deleted that had the same name.
        row = conn.execute(
            f"{select} WHERE name = ?{where} ORDER BY state = 'deleting', created_at DESC LIMIT 1",
            (ref, *params),
        ).fetchone()
        if row is not None:
            return from_row(WorkspaceRecord, row)
        if _ID_PREFIX_RE.fullmatch(lowered):
            rows = conn.execute(
                f"{select} WHERE substr(id, 1, ?) = ?{where} ORDER BY id LIMIT 6",
                (len(lowered), lowered, *params),
            ).fetchall()
            if len(rows) == 1:
                return from_row(WorkspaceRecord, rows[0])
            if rows:
                shown = ", ".join(r["id"] for r in rows[:5])
                raise InvalidArgument(
                    f"ref: {ref!r} matches several {noun(self._kind)}s ({shown}); "
                    "give more characters"
                )
        return None

    def _missing(self, conn: sqlite3.Connection, ref: str) -> NotFound:
        """Why nothing of the store's kind is ``ref``: a TTL deleted it, it is a record of
        another kind, or it never was."""
        where, params = self._scope()
        lowered = ref.lower()
        prefix = lowered if _ID_PREFIX_RE.fullmatch(lowered) else ""
        gone = conn.execute(
            "SELECT kind, expires_at FROM expired "
            f"WHERE (id = ? OR name = ? OR (? <> '' AND substr(id, 1, ?) = ?)){where} "
            "ORDER BY name = ? DESC, deleted_at DESC LIMIT 1",
            (lowered, ref, prefix, len(prefix), prefix, *params, ref),
        ).fetchone()
        if gone is not None:
            return expired_error(gone["kind"], ref, gone["expires_at"])
        message = f"no {noun(self._kind)} {ref!r}"
        if self._kind is not None:
            for other in Kind:
                if other is self._kind:
                    continue
                found = self._match(conn, ref, (" AND kind = ?", [other.value]))
                if found is not None:
                    return NotFound(
                        f"{message}: {found.id} is a {noun(other)}",
                        hint=f"use the `{COMMANDS[other]}` commands for it",
                    )
        return NotFound(message, hint=_HINTS.get(self._kind) if self._kind else None)

    def get(self, ref: str) -> WorkspaceRecord:
        """The workspace with id, unique id prefix (4+ chars) or name ``ref``.

        Raises ``NotFound`` if none matches, ``InvalidArgument`` if a prefix is ambiguous.
        """
        with self._db.read() as conn:
            return self._find(conn, ref)

    def list(
        self,
        *,
        labels: dict[str, str] | None = None,
        states: Collection[str] | None = None,
    ) -> list[WorkspaceRecord]:
        """Records of the store's kind, oldest first, having all of ``labels`` and one of
        ``states`` (if given)."""
        where, params = self._scope()
        query = select_sql(WorkspaceRecord, "workspaces") + " WHERE 1" + where
        if states is not None:
            wanted = sorted({parse_state(s, field="states").value for s in states})
            if not wanted:
                return []
            query += f" AND state IN ({', '.join('?' * len(wanted))})"
            params.extend(wanted)
        query += " ORDER BY created_at, id"
        with self._db.read() as conn:
            records = [from_row(WorkspaceRecord, r) for r in conn.execute(query, params)]
        if labels:
            wanted_labels = labels.items()
            records = [r for r in records if wanted_labels <= r.labels.items()]
        return records

    def expired(self, now: float) -> builtins.list[WorkspaceRecord]:
        """Records of the store's kind whose TTL ran out at or before ``now`` (epoch
        seconds), soonest first.

        Includes ones already ``deleting`` so a sweeper can finish an interrupted delete.
        """
        where, params = self._scope()
        with self._db.read() as conn:
            rows = conn.execute(
                f"{select_sql(WorkspaceRecord, 'workspaces')} "
                f"WHERE expires_at IS NOT NULL AND expires_at <= ?{where} "
                "ORDER BY expires_at, id",
                (now, *params),
            ).fetchall()
        return [from_row(WorkspaceRecord, r) for r in rows]

    def next_expiry(self) -> float | None:
        """When the soonest TTL of any kind runs out (epoch seconds), or None if no record
        has one (the keeper watches every kind)."""
        with self._db.read() as conn:
            row = conn.execute("SELECT MIN(expires_at) FROM workspaces").fetchone()
        value = row[0] if row else None
        return float(value) if value is not None else None

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
        owner: str | None = None,
        network: dict[str, Any] | None = None,
        admit: Callable[[builtins.list[WorkspaceRecord]], None] | None = None,
    ) -> WorkspaceRecord:
        """Record a new workspace (a record of the store's kind) in state ``creating``,
        with a fresh id.

        ``ttl_seconds`` sets ``expires_at`` that long from now; ``owner`` is the process
        creating it. ``admit`` is called with the workspaces that hold (or are about to
        hold) a VM, in the same transaction as the insert, and refuses by raising: two
        concurrent creates cannot both pass a limit only one fits under. Raises
        ``InvalidArgument`` naming a bad field, ``Conflict`` if a live workspace already
        has ``name``.
        """
        if self._kind is None:
            raise InvalidArgument("kind: a store of every kind creates nothing; scope it")
        import secrets

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
            vcpu_count=validate_count(vcpu_count, "vcpu_count", minimum=1),
            mem_mib=validate_count(mem_mib, "mem_mib", minimum=1),
            # A VM has no workspace disk: 0.
            disk_mib=validate_count(disk_mib, "disk_mib", minimum=int(self._kind is not Kind.VM)),
            labels=checked_labels,
            backend=validate_optional_str(backend, "backend"),
            vmm_pid=None,
            run_dir=None,
            agent_endpoint=None,
            boot_id=None,
            error=None,
            baseline_manifest=None,
            seed=validate_optional_str(seed, "seed"),
            owner=validate_optional_str(owner, "owner"),
            network=dict(network) if network is not None else {"mode": "off"},
            kind=self._kind.value,
        )
        with self._db.write() as conn:
            if name is not None:
                self._check_name_free(conn, name)
            if admit is not None:
                admit(self._reserving(conn))
            while True:
                new_id = secrets.token_hex(6)
                taken = conn.execute("SELECT 1 FROM workspaces WHERE id = ?", (new_id,))
                if taken.fetchone() is None:
                    break
            record = replace(record, id=new_id)
            insert_record(conn, "workspaces", record)
        return record

    @staticmethod
    def _reserving(conn: sqlite3.Connection) -> builtins.list[WorkspaceRecord]:
        """The workspaces that hold, or are about to hold, a VM (what admission counts)."""
        wanted = sorted(state.value for state in RESERVING_STATES)
        rows = conn.execute(
            f"{select_sql(WorkspaceRecord, 'workspaces')} "
            f"WHERE state IN ({', '.join('?' * len(wanted))})",
            wanted,
        ).fetchall()
        return [from_row(WorkspaceRecord, r) for r in rows]

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
        with self._db.write() as conn:
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
            f"{select_sql(WorkspaceRecord, 'workspaces')} WHERE id = ?", (workspace_id,)
        ).fetchone()
        return from_row(WorkspaceRecord, row)

    def transition(
        self,
        ref: str,
        to: str,
        *,
        expect: Collection[str] | None = None,
        note: str | None = None,
        action: str | None = None,
        admit: Callable[[builtins.list[WorkspaceRecord]], None] | None = None,
        **fields: object,
    ) -> WorkspaceRecord:
        """Move a workspace to state ``to``, atomically, if it may go there now.

        Compare-and-set: the current state must be in ``expect`` (when given) and allowed to
        reach ``to`` by ``TRANSITIONS``; otherwise ``InvalidState`` names the workspace, its
        current state and the wanted ones (``action`` names the operation in that message).
        ``note`` becomes ``state_note`` (cleared when not given); ``fields`` (``vmm_pid``,
        ``run_dir``, ``boot_id``, ``error``, ...) change in the same transaction, and so is
        ``admit`` called with the other workspaces holding a VM (see ``create``).
        """
        target = parse_state(to, field="to")
        allowed = {s for s, nexts in TRANSITIONS.items() if target in nexts}
        if expect is not None:
            allowed &= {parse_state(s, field="expect") for s in expect}
        changes = validate_fields(fields)
        changes["state"] = target.value
        changes["state_note"] = validate_optional_str(note, "note")
        with self._db.write() as conn:
            record = self._find(conn, ref)
            if record.state not in allowed:
                raise state_error(record, allowed, action or f"moving to {target.value}")
            if admit is not None:
                admit([r for r in self._reserving(conn) if r.id != record.id])
            return self._update_row(conn, record.id, changes)

    def set_fields(self, ref: str, **fields: object) -> WorkspaceRecord:
        """Change non-state fields (``backend``, ``vmm_pid``, ``run_dir``, ``agent_endpoint``,
        ``boot_id``, ``error``, ``baseline_manifest``, ``seed``) in one transaction, any state.
        """
        changes = validate_fields(fields)
        with self._db.write() as conn:
            record = self._find(conn, ref)
            if not changes:
                return record
            return self._update_row(conn, record.id, changes)

    def delete_record(self, ref: str) -> None:
        """Remove a workspace's record, with its journal and checkpoints.

        Only from state ``deleting`` (its VM and disks are already gone); otherwise
        ``InvalidState``. A record whose TTL had run out is remembered as expired for
        ``EXPIRED_KEPT_S``: a later lookup of it raises ``Expired``, not ``NotFound``.
        """
        with self._db.write() as conn:
            record = self._find(conn, ref)
            require_state(record, {WorkspaceState.DELETING}, "removing its record")
            conn.execute("DELETE FROM workspaces WHERE id = ?", (record.id,))
            now = self._clock()
            if record.expires_at is not None and record.expires_at <= now:
                conn.execute("DELETE FROM expired WHERE deleted_at < ?", (now - EXPIRED_KEPT_S,))
                conn.execute(
                    "INSERT OR REPLACE INTO expired (id, kind, name, expires_at, deleted_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (record.id, record.kind, record.name, record.expires_at, now),
                )
