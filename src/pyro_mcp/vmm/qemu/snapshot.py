"""Save a running QEMU guest's device and memory state to a file, and start from one.

Saving is a migration to a file descriptor QEMU is handed over QMP (``getfd``): the VM is
stopped first, so the stream is one consistent instant; when it completes QEMU has also
flushed every disk. The file is fsynced and renamed into place before it counts: a state
file that exists is whole. Restoring starts QEMU with the same device layout, ``-S`` and
``-incoming defer``, handed the state file open read-only: the host sets the migration
capabilities and names the descriptor; QEMU loads the state and stays paused until the
host resumes it, so nothing runs before the host has checked what it loaded.

QEMU's sandbox forbids it to spawn anything, so ``exec:`` migrations are not used.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from pathlib import Path
from typing import Any

from pyro_mcp.errors import VMError
from pyro_mcp.runtime.rootfs_disk import fsync_dir
from pyro_mcp.vmm.qemu.qmp import QMPClient

SAVE_TIMEOUT_S = 120.0
POLL_S = 0.002
# A stopped VM is saved as fast as the disk takes it: no bandwidth cap (QEMU's default is
# 32 MiB/s, made for live migrations over a network).
MAX_BANDWIDTH = 1 << 40
FD_NAME = "pyro-state"


def _ignore_shared(qmp: QMPClient, on: bool) -> None:
    """With ``x-ignore-shared`` a RAM block the VM shares with a file (a template's RAM)
    stays out of the stream: the clone maps that RAM instead of loading it."""
    capability = {"capability": "x-ignore-shared", "state": on}
    qmp.execute("migrate-set-capabilities", capabilities=[capability])


def save_state(
    qmp: QMPClient, path: Path, *, ignore_shared: bool = False, timeout_s: float = SAVE_TIMEOUT_S
) -> int:
    """Stop the VM and write its state to ``path``; its size in bytes.

    The VM stays stopped (the caller resumes it with ``cont`` or ends it). DiskFull when
    the disk filled (nothing is left behind), VMError for any other failure.
    """
    temp = path.with_name(f".{path.name}.{os.getpid()}.part")
    qmp.execute("stop")
    qmp.execute("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
    _ignore_shared(qmp, ignore_shared)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        qmp.execute("getfd", fd=fd, fdname=FD_NAME)
        qmp.execute("migrate", uri=f"fd:{FD_NAME}")
        _await_migration(qmp, timeout_s)
        os.fsync(fd)
    except BaseException as exc:
        os.close(fd)
        temp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise _disk_full(path.parent) from exc
        raise
    os.close(fd)
    os.replace(temp, path)
    fsync_dir(path.parent)
    return path.stat().st_size


def _await_migration(qmp: QMPClient, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        info: dict[str, Any] = qmp.execute("query-migrate") or {}
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            why = str(info.get("error-desc", status))
            if "No space left" in why:
                raise _disk_full(None)
            raise VMError(f"saving the VM's state failed: {why}")
        if time.monotonic() > deadline:
            with contextlib.suppress(VMError):
                qmp.execute("migrate_cancel")
            raise VMError(f"saving the VM's state took longer than {timeout_s} s")
        time.sleep(POLL_S)


# What a QEMU argv gets to start from a saved state: it waits (paused) for the host to set
# the migration capabilities and name the descriptor (:func:`load_state`).
INCOMING_ARGS = ["-S", "-incoming", "defer"]


def load_state(qmp: QMPClient, fd: int, *, ignore_shared: bool) -> None:
    """Have a QEMU started with INCOMING_ARGS load the state on its descriptor ``fd``."""
    _ignore_shared(qmp, ignore_shared)
    qmp.execute("migrate-incoming", uri=f"fd:{fd}")


def await_incoming(qmp: QMPClient, deadline: float) -> None:
    """Wait until QEMU has loaded the state it started from (it is then paused)."""
    while True:
        status = (qmp.execute("query-status") or {}).get("status")
        if status not in ("inmigrate", None):
            break
        if time.monotonic() > deadline:
            raise VMError("QEMU did not finish loading the saved state in time")
        time.sleep(POLL_S)
    info = qmp.execute("query-migrate") or {}
    if info.get("status") not in (None, "completed"):
        raise VMError(f"loading the saved state failed: {info.get('error-desc', info)}")


def _disk_full(directory: Path | None) -> VMError:
    where = f" in {directory}" if directory else ""
    return VMError(
        f"no space left on the disk to save the VM's state{where}",
        hint="free some space and try again",
    )
