"""The host ends of a QEMU VM's agent channels, and the locks that make one a process's own.

Each agent channel is a virtio-serial port (``pyro.agent.N``) backed by a host Unix socket
in the directory QEMU makes its sockets in; the port serves one host connection at a
time, so whoever talks to the agent on port N holds ``agent.N.lock`` while attached. A
process that attaches to a running VM needs only this (not the backend that started it).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from pyro_mcp.vmm.qemu.confinement import vmm_dir


def lock_port(run_dir: Path, port: int, *, wait: bool = False) -> int | None:
    """An fd holding the exclusive lock of agent port ``port``, or None if it is taken.

    A virtio-serial port serves one host connection at a time: whoever talks to the
    agent on port N holds ``agent.N.lock`` while attached.
    """
    fd = os.open(run_dir / f"agent.{port}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def agent_socket(run_dir: Path, port: int) -> Path:
    """The host end of agent channel ``port`` (a virtio-serial port named pyro.agent.N),
    in the directory QEMU makes its sockets in."""
    return vmm_dir(run_dir) / f"agent.{port}.sock"
