"""Fixtures for the unit tests."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.fake_vmm.harness import FakeHostFactory, fake_hosts

from pyro_mcp.guest.client import AgentClient
from pyro_mcp.guest_agent.agent import Agent


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


@pytest.fixture
def fake_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHostFactory]:
    """``fake_host(jailed=True, other_filesystem=False)``: pyro pointed at the fake
    Firecracker (tests/fake_vmm); the test fails if anything of its VMs is left after it."""
    yield from fake_hosts(monkeypatch, tmp_path)
