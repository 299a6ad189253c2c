"""Which VM holds which link slot: one table for every pyro process of a network namespace.

Addresses, TAP names and nftables chains belong to a network namespace, not to a state
directory: two workspace stores on one host (or a one-shot run beside them) share them.
So the leases live in a SQLite database per namespace under ``/run/pyro-mcp/network``
(``/run``: a reboot ends every VM and frees every slot). A lease names the VM and its run
directory; a lease whose run directory is gone is stale (every way a VM ends removes its
run directory after releasing its link) and is reclaimed, its leftovers removed, when a
new VM needs a slot.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pyro_mcp.errors import Conflict, InvalidArgument
from pyro_mcp.network.addresses import Link, slot_count
from pyro_mcp.network.namespace import configured_namespace, namespace_gone

LEASES_ROOT = Path("/run/pyro-mcp/network")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    slot INTEGER PRIMARY KEY,
    vm_id TEXT NOT NULL UNIQUE,
    run_dir TEXT NOT NULL,
    created REAL NOT NULL,
    resolver TEXT  -- JSON: the identity of the VM's DNS resolver process, once started
)
"""


@dataclass(frozen=True)
class Lease:
    slot: int
    vm_id: str
    run_dir: Path
    resolver: dict[str, int] | None = None

    @property
    def link(self) -> Link:
        return Link.of(self.slot)


def namespace_state_dir(root: Path = LEASES_ROOT, name: str | None = None) -> Path:
    """Where what pyro keeps of a namespace's guest networking lives (its leases, the
    nftables lock), found also after the namespace is gone: namespace ``name``, or the one
    configured (the host's when none is)."""
    return root / (name or configured_namespace() or "host")


def forget_namespace(name: str, root: Path = LEASES_ROOT) -> bool:
    """Remove what pyro kept of namespace ``name`` once its owner removed it, unless a lease
    is still held there (whoever releases it needs the table). Whether it is gone."""
    directory = namespace_state_dir(root, name)
    if not namespace_gone(name):
        return False
    if leases_path(root, name).exists():
        with _database(root, name) as db:
            if _rows(db):
                return False
    shutil.rmtree(directory, ignore_errors=True)
    return not directory.exists()


def leases_path(root: Path = LEASES_ROOT, name: str | None = None) -> Path:
    return namespace_state_dir(root, name) / "leases.sqlite"


@contextlib.contextmanager
def _database(root: Path, name: str | None = None) -> Iterator[sqlite3.Connection]:
    path = leases_path(root, name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(_SCHEMA)
        yield db
    finally:
        db.close()


def _rows(db: sqlite3.Connection) -> list[Lease]:
    rows = db.execute("SELECT slot, vm_id, run_dir, resolver FROM leases ORDER BY slot")
    return [
        Lease(int(slot), str(vm_id), Path(run_dir), _identity(resolver))
        for slot, vm_id, run_dir, resolver in rows.fetchall()
    ]


def _identity(text: object) -> dict[str, int] | None:
    try:
        data = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    if isinstance(data, dict) and all(type(data.get(k)) is int for k in ("pid", "start")):
        return {"pid": data["pid"], "start": data["start"]}
    return None


def acquire(
    vm_id: str,
    run_dir: Path,
    *,
    reclaim: Callable[[Lease], None],
    root: Path = LEASES_ROOT,
) -> Lease:
    """A free slot for ``vm_id`` (the same one if it holds one already).

    Stale leases found on the way are handed to ``reclaim`` (which removes what their VM
    left of its link) and freed. Conflict when every slot is held by a live VM.
    """
    if not run_dir.is_dir():
        raise InvalidArgument(f"the run directory of {vm_id} does not exist: {run_dir}")
    with _database(root) as db:
        db.execute("BEGIN IMMEDIATE")  # one allocator at a time, across processes
        try:
            held = _rows(db)
            for lease in held:
                if lease.vm_id == vm_id:
                    db.execute("COMMIT")
                    return lease
            taken = set()
            for lease in held:
                if lease.run_dir.exists():
                    taken.add(lease.slot)
                    continue
                reclaim(lease)
                db.execute("DELETE FROM leases WHERE slot = ?", (lease.slot,))
            slot = next((n for n in range(slot_count()) if n not in taken), None)
            if slot is None:
                raise Conflict(
                    f"every one of the {slot_count()} network slots is in use",
                    hint="delete VMs you no longer need, or give PYRO_NET_POOL a wider pool",
                )
            db.execute(
                "INSERT INTO leases (slot, vm_id, run_dir, created) VALUES (?, ?, ?, ?)",
                (slot, vm_id, str(run_dir), time.time()),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return Lease(slot, vm_id, run_dir)


def find(vm_id: str, root: Path = LEASES_ROOT) -> Lease | None:
    if not leases_path(root).exists():
        return None
    with _database(root) as db:
        return next((lease for lease in _rows(db) if lease.vm_id == vm_id), None)


def held(root: Path = LEASES_ROOT) -> list[Lease]:
    if not leases_path(root).exists():
        return []
    with _database(root) as db:
        return _rows(db)


def record_resolver(vm_id: str, identity: dict[str, int], root: Path = LEASES_ROOT) -> None:
    """Note the VM's resolver process (pid and start time), for whoever releases it."""
    with _database(root) as db:
        db.execute("UPDATE leases SET resolver = ? WHERE vm_id = ?", (json.dumps(identity), vm_id))


def release(vm_id: str, root: Path = LEASES_ROOT) -> None:
    if not leases_path(root).exists():
        return
    with _database(root) as db:
        db.execute("DELETE FROM leases WHERE vm_id = ?", (vm_id,))
