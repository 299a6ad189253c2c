"""Track one Firecracker process by a pidfd, whoever its parent is.

Started directly, Firecracker is our child. Started by the jailer with ``--new-pid-ns``,
it is the jailer's child, and the jailer exits at once: Firecracker is then reparented to
the host's init, which reaps it. A pidfd (held from the moment the PID is known) lets us
see it exit and signal it without racing PID reuse in both cases.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time

from pyro_mcp.errors import VMError
from pyro_mcp.vmm.identity import ProcessIdentity


class VMMProcess:
    """A running (or exited) Firecracker process."""

    def __init__(self, pid: int, child: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self._child = child  # the Popen when Firecracker is our own child
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except OSError as exc:
            raise VMError(f"Firecracker (PID {pid}) is already gone: {exc}") from exc
        # Who it is, for any later process (see vmm.identity): read as it has just started.
        self.identity = ProcessIdentity.of(pid)
        self._returncode: int | None = None

    @property
    def returncode(self) -> int | None:
        """The exit status when known (our own child only): negative N for signal N."""
        if self._child is not None:
            return self._child.poll()
        return self._returncode

    def alive(self) -> bool:
        return not self.wait(0)

    def wait(self, timeout_s: float | None) -> bool:
        """Wait up to ``timeout_s`` seconds (None: forever) for the exit; True once exited."""
        if self._pidfd is None:
            return True
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        timeout_ms = None if timeout_s is None else max(0, int(timeout_s * 1000))
        if not poller.poll(timeout_ms):
            return False
        if self._child is not None:
            self._child.wait()  # reap our own child
        return True

    def kill(self) -> None:
        """SIGKILL (Firecracker as PID 1 of its namespace ignores SIGTERM) and wait for exit."""
        if self._pidfd is None:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        if not self.wait(10.0):
            raise VMError(f"Firecracker (PID {self.pid}) did not exit 10 s after SIGKILL")

    def reaped(self) -> bool:
        """True once no process holds this PID any more (a zombie still does)."""
        return self.identity is None or not self.identity.exists()

    def wait_reaped(self, timeout_s: float) -> bool:
        """Wait (bounded) until the exited process is reaped by its parent (init when jailed)."""
        deadline = time.monotonic() + timeout_s
        while not self.reaped():
            if self.identity is not None and self.identity.alive():
                return False  # still running
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
