"""Talking to the agent of a VM that another process started (persistent workspaces).

A workspace VM outlives the process that booted it; every later call (a CLI command, an
SDK process, an MCP server) attaches to its agent. Under QEMU each virtio-serial port
takes one host connection at a time, so a VM has several ports and a caller holds an
exclusive lock on the port it uses (``agent.N.lock`` beside ``agent.N.sock``) for as long
as it is attached. Under Firecracker every vsock connection is independent.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pyro_mcp.errors import AgentUnavailable, OperationTimeout, PyroError
from pyro_mcp.guest.client import AgentClient
from pyro_mcp.guest.protocol import AGENT_VSOCK_PORT

BUSY_WAIT_S = 2.0  # for a channel to come free before "all are held" (a short call ends)
VIRTIO_SERIAL = "virtio-serial"
VSOCK = "vsock"


@dataclass(frozen=True)
class AgentEndpoint:
    """Where a VM's agent listens: ``virtio-serial`` (a run dir with N port sockets) or
    ``vsock`` (Firecracker's vsock Unix socket)."""

    kind: str
    path: Path
    ports: int = 1

    def to_str(self) -> str:
        return f"{self.kind}:{self.ports}:{self.path}"

    @classmethod
    def from_str(cls, text: str) -> AgentEndpoint:
        kind, ports, path = text.split(":", 2)
        return cls(kind, Path(path), int(ports))


class AttachedAgent:
    """An agent connection plus the port lock that makes it ours; close() releases both."""

    def __init__(self, client: AgentClient, lock_fd: int | None) -> None:
        self.client = client
        self._lock_fd = lock_fd

    def close(self) -> None:
        self.client.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> AgentClient:
        return self.client

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def attach(endpoint: AgentEndpoint, *, timeout_s: float = 30.0) -> AttachedAgent:
    """Connect to the agent and say hello; AgentUnavailable when it cannot be reached."""
    from pyro_mcp.vmm.qemu.channels import lock_port

    deadline = time.monotonic() + timeout_s
    busy_until = time.monotonic() + BUSY_WAIT_S
    if endpoint.kind == VSOCK:
        return _attach_vsock(endpoint, deadline)
    if endpoint.kind != VIRTIO_SERIAL:
        raise AgentUnavailable(f"unknown agent endpoint kind {endpoint.kind!r}")
    while True:
        for port in range(endpoint.ports):
            fd = lock_port(endpoint.path, port)
            if fd is None:
                continue
            try:
                return AttachedAgent(_hello(_connect_unix(endpoint.path, port), deadline), fd)
            except BaseException:
                os.close(fd)
                raise
        if time.monotonic() > min(deadline, busy_until):
            raise AgentUnavailable(
                f"all {endpoint.ports} agent channels of the VM are held by other processes "
                f"(each process working on a VM holds one, however many calls it makes)",
                hint="retry when one of them finishes (a `service logs --follow` holds one "
                "until it ends)",
            )
        time.sleep(0.05)


@dataclass
class _Shared:
    attached: AttachedAgent
    users: int


_SHARED: dict[tuple[int, str], _Shared] = {}
_SHARED_LOCK = threading.Lock()


class SharedAgent:
    """One user's hold on the attachment a process shares between its threads."""

    def __init__(self, key: tuple[int, str], shared: _Shared) -> None:
        self._key = key
        self._shared: _Shared | None = shared

    @property
    def client(self) -> AgentClient:
        assert self._shared is not None, "used after close"
        return self._shared.attached.client

    def __enter__(self) -> AgentClient:
        return self.client

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        shared, self._shared = self._shared, None
        if shared is None:
            return
        with _SHARED_LOCK:
            shared.users -= 1
            last = shared.users == 0
            if last and _SHARED.get(self._key) is shared:
                del _SHARED[self._key]
        if last:
            shared.attached.close()


def attach_shared(endpoint: AgentEndpoint, *, timeout_s: float = 30.0) -> SharedAgent:
    """An attachment to the agent shared by every thread of this process: concurrent calls
    go over one connection (the agent serves many calls at once on it), so a process
    holds one of the VM's channels however many calls it makes. Closed with its last user.
    """
    key = (os.getpid(), endpoint.to_str())  # a forked child never uses its parent's link
    with _SHARED_LOCK:
        shared = _SHARED.get(key)
        if shared is not None and not shared.attached.client.closed:
            shared.users += 1
            return SharedAgent(key, shared)
    attached = attach(endpoint, timeout_s=timeout_s)  # slow: outside the lock
    spare: AttachedAgent | None = None
    with _SHARED_LOCK:
        shared = _SHARED.get(key)
        if shared is not None and not shared.attached.client.closed:
            shared.users += 1  # another thread attached meanwhile: share its link
            spare = attached
        else:
            shared = _Shared(attached, 1)
            _SHARED[key] = shared
    if spare is not None:
        spare.close()
    return SharedAgent(key, shared)


def _connect_unix(run_dir: Path, port: int) -> socket.socket:
    from pyro_mcp.vmm.qemu.channels import agent_socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(agent_socket(run_dir, port)))
    except OSError as exc:
        sock.close()
        raise AgentUnavailable(f"the VM's agent socket cannot be reached: {exc}") from exc
    return sock


def _attach_vsock(endpoint: AgentEndpoint, deadline: float) -> AttachedAgent:
    from pyro_mcp.vmm.firecracker.vsock import VsockRefused, connect_vsock

    try:
        sock = connect_vsock(endpoint.path, AGENT_VSOCK_PORT, max(0.1, deadline - time.monotonic()))
    except VsockRefused as exc:
        raise AgentUnavailable(f"the VM's agent cannot be reached over vsock: {exc}") from exc
    return AttachedAgent(_hello(sock, deadline), None)


def _hello(sock: socket.socket, deadline: float) -> AgentClient:
    client = AgentClient(sock)
    try:
        client.hello(timeout_s=max(0.1, deadline - time.monotonic()))
    except (OperationTimeout, PyroError):
        with contextlib.suppress(OSError):
            client.close()
        raise
    return client
