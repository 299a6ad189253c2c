"""A small synchronous QMP client (QEMU's JSON control protocol over a Unix socket)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from pyro_mcp.errors import VMError


class QMPClient:
    """Connects, negotiates capabilities, then runs commands one at a time."""

    def __init__(self, path: Path, timeout_s: float = 5.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if time.monotonic() > deadline:
                    raise VMError(f"QMP socket {path} did not accept a connection") from exc
                time.sleep(0.005)
        self._file = self._sock.makefile("rb")
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise VMError("QMP connection closed (the VMM exited?)")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise VMError(f"unexpected QMP message: {message!r}")
        return message

    def execute(self, command: str, *, fd: int | None = None, **arguments: Any) -> Any:
        """Run ``command``; ``fd`` is handed to QEMU with it (``getfd`` takes one)."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        try:
            data = json.dumps(request).encode() + b"\n"
            if fd is None:
                self._sock.sendall(data)
            else:
                sent = socket.send_fds(self._sock, [data], [fd])
                self._sock.sendall(data[sent:])
            while True:
                reply = self._read()
                if "event" in reply:
                    continue
                if "error" in reply:
                    error = reply["error"]
                    raise VMError(f"QMP {command} failed: {error.get('desc', error)}")
                return reply.get("return")
        except OSError as exc:
            raise VMError(f"QMP {command}: {exc}") from exc

    def close(self) -> None:
        try:
            self._file.close()
            self._sock.close()
        except OSError:
            pass
