"""The agent serves every host connection on its listening socket at once (Firecracker's
vsock port): a second host process never waits for the first to let go."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyro_mcp.guest.client import AgentClient
from pyro_mcp.guest_agent import agent


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "agent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(agent.VSOCK_BACKLOG)
    threading.Thread(target=agent.serve_connections, args=(listener,), daemon=True).start()
    yield path
    listener.close()


def _connect(path: Path) -> AgentClient:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    client = AgentClient(sock)
    client.hello(timeout_s=5)
    return client


def test_a_second_connection_is_served_while_the_first_runs_a_command(listening: Path) -> None:
    first = _connect(listening)
    running = threading.Thread(target=lambda: first.exec(["sleep", "3"], timeout_s=30))
    running.start()
    try:
        clients = [_connect(listening) for _ in range(4)]  # each hello answered at once
        outputs = [c.exec(["echo", f"client {n}"]).stdout for n, c in enumerate(clients)]
        assert outputs == [f"client {n}\n".encode() for n in range(4)]
        assert running.is_alive()  # all that happened while the first's command ran
        for client in clients:
            client.close()
    finally:
        running.join()
        first.close()
