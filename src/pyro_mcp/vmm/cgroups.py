"""Removing a VM's cgroup directory, whichever backend made it (the jailer or QEMU's
confinement): both live at ``<hierarchy>/pyro-mcp/<vm id>``."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from pathlib import Path

RELEASE_TIMEOUT_S = 10.0  # for a killed VMM to finish exiting and leave its cgroups


def remove_cgroup(directory: Path, deadline: float) -> bool:
    """Remove ``directory``; True once it is gone.

    A killed VMM may not have finished exiting yet (freeing guest RAM takes a while) and
    keeps its cgroup busy until it has: whatever is still in it is killed (nothing but the
    VM ever runs there), and the removal retried until ``deadline`` (``time.monotonic``).
    """
    while True:
        try:
            directory.rmdir()
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                return False
            _kill_members(directory)
            time.sleep(0.02)
        else:
            return True


def _kill_members(directory: Path) -> None:
    with contextlib.suppress(OSError):
        for pid in (directory / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                os.kill(int(pid), signal.SIGKILL)
