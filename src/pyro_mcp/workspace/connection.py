"""The SQLite connection under the workspace store, shared by threads and processes.

One connection per process, used by its threads one at a time behind a lock; a child
made by ``fork`` opens its own. The file runs in WAL mode (readers never block the
writer) and every write is one ``BEGIN IMMEDIATE`` transaction, so writers queue on the
busy timeout instead of failing; one still waiting when it runs out gets
``OperationTimeout``.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from pyro_mcp.errors import InvalidState, OperationTimeout


class StoreConnection:
    """The connection to one store file, handing out read and write transactions."""

    def __init__(self, path: Path, *, busy_timeout_s: float) -> None:
        """Ready to connect to the SQLite file at ``path``; ``open`` connects."""
        self.path = path
        self._busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self._closed = False

    def open(self) -> None:
        """Connect, in WAL mode.

        Raises ``InvalidState`` if the file cannot use WAL journaling, and lets through the
        ``sqlite3.DatabaseError`` of a file that is not an SQLite database.
        """
        self._conn = self._connect()

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

    def write(self) -> AbstractContextManager[sqlite3.Connection]:
        """A write transaction: takes the database's write lock up front (no upgrade races)."""
        return self._transaction("BEGIN IMMEDIATE")

    def read(self) -> AbstractContextManager[sqlite3.Connection]:
        """A read transaction: one consistent snapshot for several statements."""
        return self._transaction("BEGIN")

    def close(self) -> None:
        """Close the connection; it cannot be used afterwards. Idempotent."""
        if os.getpid() != self._pid:  # a forked child never opened the inherited handle
            self._conn, self._closed = None, True
            return
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn, self._closed = None, True
