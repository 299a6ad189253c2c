"""A workspace's TTL ends on time with no pyro command running: its VM and files go."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pyro_mcp.api import Context
from pyro_mcp.api.operations import workspaces as ws
from pyro_mcp.workspace.store import WorkspaceStore

pytestmark = pytest.mark.guest


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_a_workspace_is_deleted_when_its_ttl_ends_though_no_pyro_command_runs(
    ws_ctx: Context,
) -> None:
    created = ws.workspace_create(ws_ctx, "debian:12")
    ws.workspace_update(ws_ctx, created["id"], ttl_seconds=3)  # counts from now
    status = ws.workspace_status(ws_ctx, created["id"])
    pid, run_dir = status["vmm_pid"], Path(status["run_dir"])
    files = ws_ctx.state_dir / "workspaces" / created["id"]
    assert _alive(pid) and run_dir.exists() and files.exists()
    # From here on only the store is read: no pyro operation runs (none reconciles).
    store = WorkspaceStore(ws_ctx.state_dir / "store.sqlite3")
    deadline = time.monotonic() + 60
    while store.list() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [r.id for r in store.list()]
    store.close()
    assert left == []
    assert not _alive(pid) and not run_dir.exists() and not files.exists()
