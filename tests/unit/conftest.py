"""Fixtures for the unit tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.fake_vmm.harness import FakeHostFactory, fake_hosts
from tests.unit import fake_vm

from pyro_mcp.api.context import Context
from pyro_mcp.guest.client import AgentClient
from pyro_mcp.guest_agent.agent import Agent
from pyro_mcp.runtime.paths import RuntimePaths


class InProcessAgent:
    """A guest agent (``Agent`` or a subclass) served in this process over a socketpair,
    and a host client that has said hello to it."""

    def __init__(self, agent_class: type[Agent] = Agent) -> None:
        host, self.guest = socket.socketpair()
        agent = agent_class(self.guest.fileno(), poweroff=lambda: None)
        self.thread = threading.Thread(target=agent.serve, daemon=True)
        self.thread.start()
        self.client = AgentClient(host)
        self.client.hello()

    def close(self) -> None:
        self.client.close()
        self.thread.join(timeout=10)  # the agent stops on EOF; only then is its fd free
        self.guest.close()


@pytest.fixture
def agent_client() -> Iterator[AgentClient]:
    """A host client talking to the guest agent run in this process over a socketpair."""
    served = InProcessAgent()
    yield served.client
    served.close()


@pytest.fixture(scope="session")
def fake_vms_available() -> None:
    """Skip when fake VMs cannot run on this host (they need root, namespaces, loop)."""
    why = fake_vm.unavailable()
    if why:
        pytest.skip(why)


@pytest.fixture
def fake_ctx(
    fake_vms_available: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Context]:
    """A context whose workspaces boot fake VMs (tests/unit/fake_vm.py): the real
    lifecycle, store, disks and guest agent, with no kernel. Every workspace or VM left is
    deleted after the test, and nothing of any VM may be left then."""
    from pyro_mcp.api.operations.workspaces import open_workspaces

    run_root = Path(tempfile.mkdtemp(prefix="pyro-unit-", dir="/tmp"))  # short socket paths
    base_image = tmp_path / "base.ext4"
    base_image.write_bytes(bytes(1 << 20))
    fake_vm.install(monkeypatch, base_image)
    ctx = Context(paths=RuntimePaths(tmp_path / "cache", run_root), state_dir=tmp_path / "state")
    try:
        yield ctx
        with open_workspaces(ctx) as workspaces:
            every = workspaces.every_kind()  # lifecycle VMs too
            for record in every.store.list():
                every.delete(record.id)
    finally:
        running = fake_vm.vmm_processes(run_root)
        for pid in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        leftovers = sorted(p.name for p in run_root.iterdir())
        shutil.rmtree(run_root, ignore_errors=True)
    assert (running, leftovers) == ([], []), "VMMs or run directories left behind"


@pytest.fixture
def fake_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHostFactory]:
    """``fake_host(jailed=True, other_filesystem=False)``: pyro pointed at the fake
    Firecracker (tests/fake_vmm); the test fails if anything of its VMs is left after it."""
    yield from fake_hosts(monkeypatch, tmp_path)
