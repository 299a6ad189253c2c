"""The schema of the workspace store: its migrations, and the step that runs them.

Schema changes are migrations: ``MIGRATIONS`` is an ordered list, version *n* of a file means
its first *n* migrations ran, and each pending one runs in its own transaction when the
store opens. To change the schema, append a migration; never edit one that has shipped.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from pyro_mcp.errors import InvalidState

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

# The process creating or starting a workspace ("pid:start time"), while it does.
_V3_OWNER = sql_migration("ALTER TABLE workspaces ADD COLUMN owner TEXT")

# The network policy the workspace was created with (``NetworkPolicy.to_dict``).
_V4_NETWORK = sql_migration(
    """ALTER TABLE workspaces ADD COLUMN network TEXT NOT NULL DEFAULT '{"mode": "off"}'"""
)

# Secret values only sealed (nonce + AES-GCM ciphertext); the key lives outside the store.
_V5_SECRETS = sql_migration(
    """
    CREATE TABLE secrets (
        workspace_id TEXT NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        source_kind TEXT NOT NULL,
        sealed BLOB NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (workspace_id, name)
    )
    """
)

# Records of two kinds share the table, the lifecycle and its upkeep (``states.Kind``);
# ``expired`` remembers, for a while, what a TTL deleted, so that a later call on it is
# told it expired rather than that it never existed.
_V6_KINDS_AND_EXPIRED = sql_migration(
    "ALTER TABLE workspaces ADD COLUMN kind TEXT NOT NULL DEFAULT 'workspace'",
    """
    CREATE TABLE expired (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        name TEXT,
        expires_at REAL NOT NULL,
        deleted_at REAL NOT NULL
    )
    """,
    "CREATE INDEX expired_name ON expired (name) WHERE name IS NOT NULL",
)

# Append only. Version n of a store file means MIGRATIONS[:n] have run on it.
MIGRATIONS: Final[tuple[Migration, ...]] = (
    _V1_WORKSPACES_COMMANDS_CHECKPOINTS,
    _V2_SERVICES,
    _V3_OWNER,
    _V4_NETWORK,
    _V5_SECRETS,
    _V6_KINDS_AND_EXPIRED,
)

# ---------------------------------------------------------------------------------------
# Running them


def read_version(conn: sqlite3.Connection) -> int:
    """The schema version of the file (how many migrations have run on it)."""
    return int(conn.execute("SELECT version FROM schema_version").fetchone()[0])


def run_next_migration(
    conn: sqlite3.Connection, migrations: Sequence[Migration], path: Path
) -> bool:
    """Run the first of ``migrations`` not yet run on the store at ``path``, if any.

    Call inside a write transaction: the migration and the new version commit together.
    Returns ``False`` when the schema is already up to date; raises ``InvalidState`` if
    the file was written by a newer pyro (a version beyond ``len(migrations)``).
    """
    target = len(migrations)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
    )
    conn.execute("INSERT OR IGNORE INTO schema_version (id, version) VALUES (1, 0)")
    version = read_version(conn)
    if version > target:
        raise InvalidState(
            f"workspace store {path} has schema version {version}, newer than "
            f"this pyro-mcp knows ({target})",
            hint="upgrade pyro-mcp, or set PYRO_STATE_DIR to use another store",
        )
    if version == target:
        return False
    migrations[version](conn)
    conn.execute("UPDATE schema_version SET version = ?", (version + 1,))
    return True
