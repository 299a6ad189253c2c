"""The vsock handshake, against a stand-in for Firecracker's vsock Unix socket.

The stand-in speaks Firecracker's host side (``CONNECT <port>\\n`` -> ``OK <n>\\n``) and
hands accepted connections to the real guest agent running in a thread, so
``wait_ready`` is exercised up to a real hello while a tiny-guest VM is alive.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fc_support import TINY_MARKER, VMFactory

from pyro_mcp.guest.client import AgentClient
from pyro_mcp.guest.protocol import AGENT_VSOCK_PORT, PROTOCOL_VERSION
from pyro_mcp.guest_agent.agent import Agent
from pyro_mcp.vmm.firecracker import FirecrackerVM, VsockRefused, connect_vsock

pytestmark = pytest.mark.firecracker


class FakeVsock:
    """Accepts on a Unix socket; refuses the first ``refuse`` connections like an unready guest."""

    def __init__(self, path: Path, *, refuse: int = 0, reply: bytes | None = None) -> None:
        self.path = path
        self.refuse = refuse
        self.reply = reply
        self.requests: list[bytes] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            line = b""
            while not line.endswith(b"\n"):
                chunk = conn.recv(1)
                if not chunk:
                    break
                line += chunk
            self.requests.append(line)
            if self.refuse > 0:
                self.refuse -= 1
                conn.close()
                continue
            if self.reply is not None:
                conn.sendall(self.reply)
                continue  # never answers further: the client must give up on its own
            conn.sendall(b"OK 1073741824\n")
            agent = Agent(conn.fileno(), poweroff=lambda: None)
            threading.Thread(target=agent.serve, daemon=True).start()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def fake_path(short_dir: Path) -> Iterator[Path]:
    path = short_dir / f"fake-{time.monotonic_ns()}.sock"
    yield path
    path.unlink(missing_ok=True)


def test_the_handshake_returns_a_socket_the_agent_answers_on(fake_path: Path) -> None:
    fake = FakeVsock(fake_path)
    try:
        client = AgentClient(connect_vsock(fake_path, AGENT_VSOCK_PORT, timeout_s=5))
        assert client.hello(timeout_s=5)["protocol"] == PROTOCOL_VERSION
        client.close()
    finally:
        fake.close()
    assert fake.requests == [f"CONNECT {AGENT_VSOCK_PORT}\n".encode()]


@pytest.mark.parametrize(
    ("refuse", "reply", "message"),
    [
        (1, None, "closed during the handshake"),
        (0, b"NOPE\n", "unexpected vsock handshake reply"),
        (0, b"OK 12", "timed out"),  # no end of line: the wait is bounded
    ],
    ids=["refused", "garbage", "silent"],
)
def test_a_failed_handshake_raises_and_closes_the_socket(
    fake_path: Path, refuse: int, reply: bytes | None, message: str
) -> None:
    fake = FakeVsock(fake_path, refuse=refuse, reply=reply)
    try:
        with pytest.raises(VsockRefused, match=message):
            connect_vsock(fake_path, AGENT_VSOCK_PORT, timeout_s=0.3)
    finally:
        fake.close()


def test_a_missing_socket_is_refused(short_dir: Path) -> None:
    with pytest.raises(VsockRefused, match="No such file"):
        connect_vsock(short_dir / "absent.sock", AGENT_VSOCK_PORT, timeout_s=1)


def test_wait_ready_retries_until_the_agent_listens_then_says_hello(
    make_vm: VMFactory, fake_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = make_vm()
    vm.start()
    vm.wait_for_console(TINY_MARKER, timeout_s=10)
    # The tiny guest has no vsock driver: point the VM at the stand-in instead.
    monkeypatch.setattr(FirecrackerVM, "vsock_socket", property(lambda self: fake_path))
    fake = FakeVsock(fake_path, refuse=3)
    try:
        client = vm.wait_ready(timeout_s=10)
        assert client is vm.agent
        assert client.exec(["echo", "hi"], timeout_s=5).stdout == b"hi\n"
    finally:
        fake.close()
    assert len(fake.requests) == 4  # three refusals, then the connection that stayed
    assert vm.timings["agent_ready_ms"] > vm.timings["console_marker_ms"]
