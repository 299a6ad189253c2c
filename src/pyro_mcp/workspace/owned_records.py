"""The rows a workspace owns in the store: its command journal, its secrets (names in the
clear, values sealed) and its checkpoints.

``OwnedRecords`` holds their queries; :class:`~pyro_mcp.workspace.store.WorkspaceStore`
takes them in, with the connection, the clock and the lookup of a workspace by ``ref`` that
every one of them starts from. Each query is one transaction of the store's connection, as
the workspace's own are.
"""

from __future__ import annotations

import builtins
import sqlite3
from collections.abc import Callable
from typing import Final

from pyro_mcp.errors import Conflict, InvalidArgument, NotFound
from pyro_mcp.workspace.connection import StoreConnection
from pyro_mcp.workspace.records import (
    LIST_HINT,
    CheckpointRecord,
    CommandRecord,
    SecretRecord,
    WorkspaceRecord,
    from_row,
    insert_record,
    select_sql,
    validate_command,
    validate_count,
    validate_name,
    validate_sha256,
)
from pyro_mcp.workspace.states import describe

BASELINE: Final = "baseline"  # the checkpoint name reserved for the seeded contents


class OwnedRecords:
    """The queries of what a workspace owns; the store supplies what they stand on."""

    _db: StoreConnection
    _clock: Callable[[], float]

    def _find(self, conn: sqlite3.Connection, ref: str) -> WorkspaceRecord:
        raise NotImplementedError  # the store's lookup

    def _update_row(
        self, conn: sqlite3.Connection, workspace_id: str, changes: dict[str, object]
    ) -> WorkspaceRecord:
        raise NotImplementedError  # the store's update of the workspace's own row

    # -- command journal -------------------------------------------------------------

    def journal_command(self, record: CommandRecord) -> int:
        """Append ``record`` to its workspace's journal; returns its journal id.

        Output tails are cut to their last ``TAIL_BYTES``. Raises ``NotFound`` if the
        workspace is unknown, ``InvalidArgument`` if the record is malformed (both or
        neither of argv and shell, or an ``env_keys`` entry holding a value).
        """
        checked = validate_command(record)
        with self._db.write() as conn:
            known = conn.execute("SELECT 1 FROM workspaces WHERE id = ?", (record.workspace_id,))
            if known.fetchone() is None:
                raise NotFound(f"no workspace {record.workspace_id!r}", hint=LIST_HINT)
            return insert_record(conn, "commands", checked)

    def commands(self, ref: str, *, limit: int = 100) -> builtins.list[CommandRecord]:
        """The last ``limit`` commands run in a workspace, oldest first."""
        validate_count(limit, "limit", minimum=1)
        with self._db.read() as conn:
            record = self._find(conn, ref)
            rows = conn.execute(
                f"SELECT * FROM ({select_sql(CommandRecord, 'commands')} WHERE workspace_id = ? "
                "ORDER BY id DESC LIMIT ?) ORDER BY id",
                (record.id, limit),
            ).fetchall()
        return [from_row(CommandRecord, r) for r in rows]

    def command_count(self, ref: str) -> int:
        """How many commands the workspace's journal holds, all of them."""
        with self._db.read() as conn:
            record = self._find(conn, ref)
            row = conn.execute(
                "SELECT COUNT(*) FROM commands WHERE workspace_id = ?", (record.id,)
            ).fetchone()
        return int(row[0])

    # -- secrets (names in the clear, values sealed) -----------------------------------

    def add_secrets(self, ref: str, sealed: dict[str, tuple[str, bytes]]) -> None:
        """Record a workspace's secrets, ``name -> (source_kind, sealed value)``, in one
        transaction; ``Conflict`` if it already has one of those names."""
        with self._db.write() as conn:
            workspace = self._find(conn, ref)
            for name, (kind, blob) in sorted(sealed.items()):
                taken = conn.execute(
                    "SELECT 1 FROM secrets WHERE workspace_id = ? AND name = ?",
                    (workspace.id, name),
                ).fetchone()
                if taken is not None:
                    raise Conflict(f"workspace {describe(workspace)} already has secret {name!r}")
                record = SecretRecord(
                    workspace_id=workspace.id,
                    name=name,
                    source_kind=kind,
                    sealed=blob,
                    created_at=self._clock(),
                )
                insert_record(conn, "secrets", record)

    def secrets(self, ref: str) -> builtins.list[SecretRecord]:
        """A workspace's secrets (sealed), by name."""
        with self._db.read() as conn:
            workspace = self._find(conn, ref)
            rows = conn.execute(
                f"{select_sql(SecretRecord, 'secrets')} WHERE workspace_id = ? ORDER BY name",
                (workspace.id,),
            ).fetchall()
        return [from_row(SecretRecord, r) for r in rows]

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
        validate_sha256(manifest, "manifest")
        validate_count(file_count, "file_count", minimum=0)
        validate_count(total_bytes, "total_bytes", minimum=0)
        with self._db.write() as conn:
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
            insert_record(conn, "checkpoints", record)
            if name == BASELINE:
                self._update_row(conn, workspace.id, {"baseline_manifest": manifest})
        return record

    def checkpoints(self, ref: str) -> builtins.list[CheckpointRecord]:
        """A workspace's checkpoints, oldest first."""
        with self._db.read() as conn:
            workspace = self._find(conn, ref)
            rows = conn.execute(
                f"{select_sql(CheckpointRecord, 'checkpoints')} WHERE workspace_id = ? "
                "ORDER BY created_at, name",
                (workspace.id,),
            ).fetchall()
        return [from_row(CheckpointRecord, r) for r in rows]

    def get_checkpoint(self, ref: str, name: str) -> CheckpointRecord:
        """A workspace's checkpoint by name; ``NotFound`` names both when missing."""
        with self._db.read() as conn:
            return self._find_checkpoint(conn, ref, name)

    def _find_checkpoint(self, conn: sqlite3.Connection, ref: str, name: str) -> CheckpointRecord:
        workspace = self._find(conn, ref)
        row = conn.execute(
            f"{select_sql(CheckpointRecord, 'checkpoints')} WHERE workspace_id = ? AND name = ?",
            (workspace.id, name),
        ).fetchone()
        if row is None:
            raise NotFound(
                f"workspace {describe(workspace)} has no checkpoint {name!r}",
                hint=f"list them with `pyro workspace snapshot list {workspace.id}`",
            )
        return from_row(CheckpointRecord, row)

    def delete_checkpoint(self, ref: str, name: str) -> None:
        """Forget a checkpoint (its blobs go at the next blob GC).

        The ``baseline`` is kept for the workspace's life: ``InvalidArgument``.
        """
        if name == BASELINE:
            raise InvalidArgument(
                f"name: the {BASELINE!r} checkpoint lives as long as its workspace"
            )
        with self._db.write() as conn:
            checkpoint = self._find_checkpoint(conn, ref, name)
            conn.execute(
                "DELETE FROM checkpoints WHERE workspace_id = ? AND name = ?",
                (checkpoint.workspace_id, name),
            )

    def referenced_manifests(self) -> set[str]:
        """Every manifest sha256 a workspace or checkpoint points to (what blob GC keeps)."""
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT baseline_manifest FROM workspaces WHERE baseline_manifest IS NOT NULL "
                "UNION SELECT manifest FROM checkpoints"
            ).fetchall()
        return {str(r[0]) for r in rows}
