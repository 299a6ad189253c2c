"""A workspace's TTL ends on time with no pyro command running: its VM and files go."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tests.leftovers import records_left_after_ttl

from pyro_mcp.api import Context
from pyro_mcp.api.operations import workspaces as ws

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
    assert records_left_after_ttl(ws_ctx.state_dir) == []  # no pyro operation runs meanwhile
    assert not _alive(pid) and not run_dir.exists() and not files.exists()
