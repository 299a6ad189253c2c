"""Hold one template's guest RAM in a sealed memfd and hand it to the VMMs restoring from it.

Run as ``python -I -S ram_holder.py RAM_FILE DIGEST SOCKET`` (stdlib only). It

1. takes ``SOCKET.lock`` (a second holder of the same socket leaves at once);
2. copies RAM_FILE into a memfd, only its non-zero blocks, computing the content digest
   (:func:`ram_digest`) as it goes; a digest other than DIGEST ends it with status 3
   before anything is served;
3. seals the memfd: no write, no growing or shrinking, no further seals. A VMM maps it
   privately (copy-on-write): its guest's writes stay its own, and not even an escaped
   VMM holding the descriptor can change what the next clone maps;
4. prints ``ready`` and serves: each connection on SOCKET (0600, in a directory only its
   user reaches) from a process of the same uid (or root) is sent the descriptor
   (SCM_RIGHTS) and closed;
5. exits after ``IDLE_S`` without a connection. The VMMs that mapped the memfd keep it
   alive; the next restore starts a new holder (a new copy).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable

BLOCK = 1 << 20
IDLE_S = 300.0
F_ADD_SEALS = 1033
F_GET_SEALS = 1034
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 1, 2, 4, 8
SEALS = F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE
DIGEST_MISMATCH = 3


def ram_digest(fd: int, size: int, sink: Callable[[int, bytes], None] | None = None) -> str:
    """sha256 over the size and every non-zero BLOCK (its offset, then its bytes), in
    order: the same for a file however sparse it is. ``sink`` gets each such block."""
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    zero = bytes(BLOCK)
    position = 0
    while position < size:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        position = data - data % BLOCK
        while position < hole:
            chunk = os.pread(fd, min(BLOCK, size - position), position)
            if chunk != zero[: len(chunk)]:
                digest.update(position.to_bytes(8, "little"))
                digest.update(chunk)
                if sink is not None:
                    sink(position, chunk)
            position += BLOCK
    return digest.hexdigest()


def _sealed_copy(path: str, expected: str) -> int:
    source = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(source).st_size
        memfd = os.memfd_create("pyro-template-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(memfd, size)
        got = ram_digest(source, size, lambda at, chunk: _write_all(memfd, chunk, at))
    finally:
        os.close(source)
    if got != expected:
        sys.stderr.write(f"pyro-ram-holder: {path} does not match its digest\n")
        raise SystemExit(DIGEST_MISMATCH)
    fcntl.fcntl(memfd, F_ADD_SEALS, SEALS)
    return memfd


def _write_all(fd: int, data: bytes, at: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, at)
        view, at = view[written:], at + written


def _peer_allowed(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.getuid())


def serve(listener: socket.socket, memfd: int) -> None:
    listener.settimeout(IDLE_S)
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            return
        with conn:
            if _peer_allowed(conn):
                socket.send_fds(conn, [b"ram"], [memfd])


def main(argv: list[str]) -> int:
    path, expected, sock_path = argv[1], argv[2], argv[3]
    lock = os.open(sock_path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another holder serves this socket
    signal.signal(signal.SIGTERM, lambda _signo, _frame: sys.exit(0))  # via the finally
    memfd = _sealed_copy(path, expected)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock_path)
    old = os.umask(0o177)
    try:
        listener.bind(sock_path)
    finally:
        os.umask(old)
    listener.listen(64)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    os.close(1)
    try:
        serve(listener, memfd)
    finally:
        with contextlib.suppress(FileNotFoundError):  # before the lock goes: a newcomer
            os.unlink(sock_path)  # never finds a socket no one serves
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
