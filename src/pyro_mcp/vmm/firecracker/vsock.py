"""The host side of Firecracker's vsock: a Unix socket plus a one-line handshake.

The host connects to the device's Unix socket and writes ``CONNECT <port>\\n``;
Firecracker answers ``OK <host port>\\n`` once the guest accepted, or closes the connection
when nothing listens on that port in the guest.
"""

from __future__ import annotations

import socket
from pathlib import Path

from pyro_mcp.errors import VMError

MAX_REPLY = 64


class VsockRefused(VMError):
    """The guest did not accept the connection (nothing listens yet, or the device is gone)."""


def _read_line(sock: socket.socket) -> bytes:
    # Byte by byte: whatever follows the reply line belongs to the guest's stream.
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            raise VsockRefused(f"connection closed during the handshake after {bytes(line)!r}")
        line += byte
        if len(line) > MAX_REPLY:
            raise VsockRefused(f"handshake reply too long: {bytes(line)!r}")
    return bytes(line)


def connect_vsock(uds_path: Path, port: int, timeout_s: float) -> socket.socket:
    """A blocking stream socket connected to guest vsock ``port``, past the handshake.

    Raises VsockRefused (the socket is closed) when the device's socket is missing, the
    guest refused, or the handshake took longer than ``timeout_s`` seconds; never returns
    a half-open socket.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        sock.connect(str(uds_path))
        sock.sendall(f"CONNECT {port}\n".encode())
        reply = _read_line(sock)
        fields = reply.split()
        if len(fields) != 2 or fields[0] != b"OK" or not fields[1].isdigit():
            raise VsockRefused(f"unexpected vsock handshake reply {reply!r}")
        sock.settimeout(None)
        return sock
    except OSError as exc:
        sock.close()
        raise VsockRefused(f"vsock port {port} via {uds_path}: {exc}") from exc
    except BaseException:
        sock.close()
        raise
