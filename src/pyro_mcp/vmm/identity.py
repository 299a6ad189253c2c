"""Who a VMM process is and what it holds, recorded at launch for any later pyro process.

A pid alone names no process for long: once the VMM exits its pid can be reused. A VMM is
known by its pid and its start time (field 22 of ``/proc/PID/stat``, clock ticks since
boot), recorded the moment the pid is known, in ``<run dir>/vmm.json``
(:class:`VMMRecord`), with what the VM holds outside its process (a Firecracker jail, the
cgroups). Nothing judges a process by its command line: Firecracker's names neither the
run directory nor the jail, and anyone's may name anything.

Each run directory pyro creates carries a marker (:data:`RUN_DIR_MARKER`); whatever looks
for VMs to end or directories to remove touches only directories that carry it.
:mod:`pyro_mcp.vmm.recorded` ends a recorded VMM and cleans up after it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import stat
import time
from dataclasses import dataclass
from pathlib import Path

RUN_DIR_MARKER = ".pyro-run-dir"
VMM_FILE = "vmm.json"
KILL_TIMEOUT_S = 10.0


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (field 3 onwards)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; the rest is plain.
    return text[text.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot); None when no such process exists."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


@dataclass(frozen=True)
class ProcessIdentity:
    """One process, told apart from any later process that gets the same pid."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        """The identity of the running process ``pid`` (None when it is gone)."""
        started = start_time(pid)
        return None if started is None else cls(pid, started)

    def exists(self) -> bool:
        """This process still holds its pid (running, or exited and not yet reaped)."""
        return start_time(self.pid) == self.start

    def alive(self) -> bool:
        """This process still runs (a zombie has ended)."""
        fields = _stat_fields(self.pid)
        return fields is not None and int(fields[19]) == self.start and fields[0] not in "ZX"

    def wait_exit(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` seconds for the process to end; True once it has."""
        deadline = time.monotonic() + timeout_s
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def kill(self, timeout_s: float = KILL_TIMEOUT_S) -> bool:
        """SIGKILL this process (never a later one with its pid) and wait for it to end;
        True once it has."""
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:
            return True  # no process has this pid any more
        try:
            # The pidfd pins the process it was opened on: if that is still ours (same
            # start time), the signal cannot reach a successor.
            if not self.exists():
                return True
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False  # another user's process: not ours to end
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            poller.poll(int(timeout_s * 1000))  # readable once it exited
        finally:
            os.close(pidfd)
        return not self.alive()

    def to_dict(self) -> dict[str, int]:
        return {"pid": self.pid, "start": self.start}

    @classmethod
    def from_dict(cls, data: object) -> ProcessIdentity | None:
        if not isinstance(data, dict):
            return None
        pid, started = data.get("pid"), data.get("start")
        if type(pid) is not int or type(started) is not int or pid <= 0:
            return None
        return cls(pid, started)


@dataclass
class VMMRecord:
    """What ``vmm.json`` says of the VMM of one run directory.

    ``process`` is None until the VMM's pid is known. ``jail_dir`` is a Firecracker jail
    (``<chroot base>/firecracker/<id>``, wherever its base is); ``root_dir`` the directory
    a Firecracker without the jailer works in.
    """

    backend: str  # "firecracker" | "qemu"
    vm_id: str
    process: ProcessIdentity | None = None
    jail_dir: Path | None = None
    root_dir: Path | None = None

    def save(self, run_dir: Path) -> None:
        """Write ``run_dir/vmm.json`` atomically."""
        data = {
            "backend": self.backend,
            "vm_id": self.vm_id,
            "process": self.process.to_dict() if self.process else None,
            "jail_dir": str(self.jail_dir) if self.jail_dir else None,
            "root_dir": str(self.root_dir) if self.root_dir else None,
        }
        path = run_dir / VMM_FILE
        partial = path.with_name(f".{VMM_FILE}.{os.getpid()}")
        partial.write_text(json.dumps(data))
        os.replace(partial, path)

    @classmethod
    def load(cls, run_dir: Path) -> VMMRecord | None:
        """The record of ``run_dir``; None when it has none (or not one pyro wrote)."""
        try:
            data = json.loads((run_dir / VMM_FILE).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        backend, vm_id = data.get("backend"), data.get("vm_id")
        if not isinstance(backend, str) or not isinstance(vm_id, str):
            return None
        return cls(
            backend=backend,
            vm_id=vm_id,
            process=ProcessIdentity.from_dict(data.get("process")),
            jail_dir=_path(data.get("jail_dir")),
            root_dir=_path(data.get("root_dir")),
        )


def _path(value: object) -> Path | None:
    return Path(value) if isinstance(value, str) and value.startswith("/") else None


def mark_run_dir(run_dir: Path) -> Path:
    """Create ``run_dir`` (private) if needed and mark it as a run directory of pyro's."""
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    marker = run_dir / RUN_DIR_MARKER
    if not is_run_dir(run_dir):
        marker.write_text("a VM's run directory, made by pyro-mcp\n")
    return run_dir


def is_run_dir(path: Path) -> bool:
    """True for a real directory (not a link) holding pyro's marker, owned by this user."""
    try:
        directory = path.lstat()
        marker = (path / RUN_DIR_MARKER).lstat()
    except OSError:
        return False
    uid = os.geteuid()
    return (
        stat.S_ISDIR(directory.st_mode)
        and stat.S_ISREG(marker.st_mode)
        and directory.st_uid == uid
        and marker.st_uid == uid
    )
