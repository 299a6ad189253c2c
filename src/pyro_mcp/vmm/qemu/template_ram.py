"""The sealed copy of a template's guest RAM that its clones map (see :mod:`ram_holder`).

Clones of one template map the same memory privately, so N idle clones cost far less
than N times their guest RAM. QEMU 7.2 opens a RAM file for writing even to map it
privately, so a clone is never given the template's file: it gets a memfd holding the
same bytes, sealed against every change, from the holder process of that content (one
per content digest, started here when none runs), and maps it as ``/proc/self/fd/N``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyro_mcp.errors import IntegrityError, VMError
from pyro_mcp.vmm.qemu import ram_holder

START_TIMEOUT_S = 60.0


def holder_dir() -> Path:
    """Where the holders' sockets live: only this user reaches it."""
    if os.geteuid() == 0:
        directory = Path("/run/pyro-mcp-templates")
    else:
        directory = Path(tempfile.gettempdir()) / f"pyro-mcp-templates-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    info = directory.lstat()
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise VMError(f"{directory} is not this user's own private directory")
    return directory


def sealed_ram(ram: Path, digest: str, timeout_s: float = START_TIMEOUT_S) -> int:
    """A descriptor of the sealed memfd holding ``ram`` (whose content digest is
    ``digest``); IntegrityError when the file does not match it."""
    sock_path = holder_dir() / f"{digest[:40]}.sock"
    deadline = time.monotonic() + timeout_s
    while True:
        fd = _ask(sock_path)
        if fd is not None:
            return _checked(fd)
        if time.monotonic() > deadline:
            raise VMError(f"no holder of the template's memory answered on {sock_path}")
        _start_holder(ram, digest, sock_path, deadline)


def _ask(sock_path: Path) -> int | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(5.0)
    try:
        conn.connect(str(sock_path))
        _msg, fds, _flags, _addr = socket.recv_fds(conn, 16, 1)
    except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, TimeoutError):
        return None
    finally:
        conn.close()
    return fds[0] if fds else None


def _checked(fd: int) -> int:
    """The memfd, once it is known to be sealed against every change."""
    try:
        seals = fcntl.fcntl(fd, ram_holder.F_GET_SEALS)
    except OSError as exc:
        os.close(fd)
        raise VMError(f"the template's memory is not a sealed memfd: {exc}") from exc
    if seals & ram_holder.SEALS != ram_holder.SEALS:
        os.close(fd)
        raise VMError("the template's memory is not sealed against changes")
    return fd


def _start_holder(ram: Path, digest: str, sock_path: Path, deadline: float) -> None:
    argv = [sys.executable, "-I", "-S", ram_holder.__file__, str(ram), digest, str(sock_path)]
    holder = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # it outlives this process
        close_fds=True,
    )
    assert holder.stdout is not None
    with contextlib.closing(holder.stdout):
        ready, _, _ = select.select([holder.stdout], [], [], max(0.1, deadline - time.monotonic()))
        line = holder.stdout.readline() if ready else b""
    if line.strip() == b"ready":
        return
    try:
        code = holder.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        holder.kill()
        holder.wait()
        raise VMError("the holder of the template's memory did not get ready in time") from None
    if code == ram_holder.DIGEST_MISMATCH:
        raise IntegrityError(f"{ram} does not match its manifest (changed or damaged on disk)")
    if code != 0:
        raise VMError(f"the holder of the template's memory exited with {code}")
    time.sleep(0.02)  # another holder took the socket: ask it
