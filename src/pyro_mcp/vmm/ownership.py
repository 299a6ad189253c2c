"""Who owns a one-shot VM, so that nothing outlives the process that started it.

A one-shot VM belongs to the process that booted it. Two safeguards:

- in-process: every live VM is registered; :func:`discard_all` (called on SIGTERM by the
  servers, and at exit) kills them;
- across processes: the run directory records the owner's pid and start time and the
  VMM's pid. :func:`sweep_orphans` (run before each new one-shot VM) kills the VMM of any
  run directory whose owner is gone (SIGKILL leaves no chance to clean up) and removes it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

from pyro_mcp.vmm.base import VM
from pyro_mcp.vmm.qemu.confinement import release

OWNER_FILE = "owner.json"

_live: set[VM] = set()
_lock = threading.Lock()


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a live owner from a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def register(vm: VM) -> None:
    """Record that this process owns ``vm`` (call after the VMM started)."""
    with _lock:
        _live.add(vm)
    record = {"owner_pid": os.getpid(), "owner_start": _start_time(os.getpid()), "vmm_pid": vm.pid}
    path = vm.spec.run_dir / OWNER_FILE
    path.write_text(json.dumps(record))


def unregister(vm: VM) -> None:
    with _lock:
        _live.discard(vm)


def discard_all() -> None:
    """Kill every VM this process still owns and remove their run directories."""
    with _lock:
        vms = list(_live)
        _live.clear()
    for vm in vms:
        vm.kill()
        shutil.rmtree(vm.spec.run_dir, ignore_errors=True)


atexit.register(discard_all)


def _owner_alive(record: dict[str, object]) -> bool:
    pid = record.get("owner_pid")
    if not isinstance(pid, int):
        return False
    return _start_time(pid) is not None and _start_time(pid) == record.get("owner_start")


def sweep_orphans(run_root: Path) -> list[str]:
    """Kill and remove one-shot VMs whose owning process is gone; returns their ids."""
    removed: list[str] = []
    try:
        entries = list(run_root.iterdir())
    except OSError:
        return removed
    for run_dir in entries:
        try:
            record = json.loads((run_dir / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or _owner_alive(record):
            continue
        vmm_pid = record.get("vmm_pid")
        if isinstance(vmm_pid, int) and _is_vmm_of(vmm_pid, run_dir):
            _kill(vmm_pid)
            wait_gone(vmm_pid)
        release(run_dir.name)  # the VM's cgroups (its uid went with it)
        shutil.rmtree(run_dir, ignore_errors=True)
        removed.append(run_dir.name)
    return removed


def wait_gone(pid: int, timeout_s: float = 5.0) -> bool:
    """Wait until ``pid`` has exited (a zombie counts: it runs no more); False on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.01)
    return False


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # QEMU leads its own process group
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _is_vmm_of(pid: int, run_dir: Path) -> bool:
    """True when ``pid`` is still a VMM using ``run_dir`` (never kill a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(run_dir).encode() in cmdline
