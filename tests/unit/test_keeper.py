"""The keeper: one per state directory, gone once it has nothing left to watch."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.workspace import keeper
from pyro_mcp.workspace.store import WorkspaceStore


def _store(state: Path) -> WorkspaceStore:
    state.mkdir(parents=True, exist_ok=True)
    return WorkspaceStore(state / "store.sqlite3")


def test_no_keeper_starts_while_no_workspace_has_a_ttl(tmp_path: Path) -> None:
    store = _store(tmp_path / "state")
    store.create(environment="debian:12", vcpu_count=1, mem_mib=256, disk_mib=64)
    assert store.next_expiry() is None
    keeper.ensure_keeper(
        RuntimePaths(tmp_path / "cache", tmp_path / "run"), tmp_path / "state", None
    )
    assert not keeper.keeper_running(tmp_path / "state")
    store.close()


def test_a_second_keeper_leaves_at_once_and_the_first_ends_with_the_last_ttl(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    store = _store(state)
    record = store.create(
        environment="debian:12", vcpu_count=1, mem_mib=256, disk_mib=64, ttl_seconds=3600
    )
    store.transition(record.id, "failed")  # a change the keeper would repair is not its TTL
    argv = [
        sys.executable,
        "-m",
        "pyro_mcp.workspace.keeper",
        str(state),
        str(tmp_path),
        str(tmp_path / "run"),
    ]
    first = subprocess.Popen(argv)
    deadline = time.monotonic() + 10
    while not keeper.keeper_running(state) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert keeper.keeper_running(state)
    assert subprocess.run(argv, timeout=30).returncode == 0  # saw the lock, left
    store.update(record.id, expires_at=None)
    assert first.wait(timeout=10) == 0  # no TTL left: the keeper is gone
    assert not keeper.keeper_running(state)
    store.close()
