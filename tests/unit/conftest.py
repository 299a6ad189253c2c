"""Fixtures for the unit tests."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from pyro_mcp.guest.client import AgentClient
from pyro_mcp.guest_agent.agent import Agent


@pytest.fixture
def agent_client() -> Iterator[AgentClient]:
    """A host client talking to the guest agent run in this process over a socketpair."""
    host, guest = socket.socketpair()
    agent = Agent(guest.fileno(), poweroff=lambda: None)
    thread = threading.Thread(target=agent.serve, daemon=True)
    thread.start()
    conn = AgentClient(host)
    yield conn
    conn.close()
    thread.join(timeout=10)  # the agent stops on EOF; only then is its fd free to close
    guest.close()
