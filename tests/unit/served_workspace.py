"""A running workspace without a VM: its record in a temporary store, its agent the real
guest agent served in this process, its ``/workspace`` a temporary directory.

Everything above the agent link is pyro's own code (the operations, their checks, the
store, the journal), so a test drives the SDK, the CLI or the MCP server and sees what a
user sees. Only :meth:`Workspaces.agent` is replaced: it hands out the in-process client
instead of attaching to a VM.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.unit.conftest import InProcessAgent

from pyro_mcp.guest.client import AgentClient
from pyro_mcp.guest_agent import ops_services
from pyro_mcp.workspace import content, paths
from pyro_mcp.workspace.layout import StateLayout
from pyro_mcp.workspace.lifecycle import Workspaces
from pyro_mcp.workspace.store import WorkspaceStore


@dataclass
class ServedWorkspace:
    id: str
    root: Path  # what the workspace's /workspace is
    state_dir: Path
    client: AgentClient


@pytest.fixture
def served_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServedWorkspace]:
    root = tmp_path / "workspace"
    root.mkdir()
    state = tmp_path / "state"
    monkeypatch.setenv("PYRO_STATE_DIR", str(state))
    monkeypatch.setenv("PYRO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(ops_services.RUN_DIR_ENV, str(tmp_path / "agent-run"))
    monkeypatch.setattr(paths, "WORKSPACE_ROOT", str(root))
    monkeypatch.setattr(content, "WORKSPACE_ROOT", str(root))
    state.mkdir()
    with WorkspaceStore(StateLayout(state).store_path) as store:
        record = store.create(environment="debian:12", vcpu_count=1, mem_mib=256, disk_mib=64)
        store.transition(record.id, "running")
    served = InProcessAgent()

    @contextmanager
    def agent(
        self: Workspaces, ref: str, action: str, *, changes: bool = False
    ) -> Iterator[AgentClient]:
        self.running(ref, action)  # unknown or not running: the real errors
        yield served.client

    monkeypatch.setattr(Workspaces, "agent", agent)
    monkeypatch.setattr(Workspaces, "reconcile_one", lambda self, ref: None)
    try:
        yield ServedWorkspace(record.id, root, state, served.client)
    finally:
        ops_services.registry().stop_all(signal.SIGKILL, "KILL", 0.0)
        served.close()
        # A TTL a test gave the record started a keeper for this state dir: with the
        # record gone it has nothing to watch and leaves (within a second).
        with WorkspaceStore(StateLayout(state).store_path) as store:
            if store.list():  # a test may have deleted it already
                store.transition(record.id, "deleting")
                store.delete_record(record.id)
