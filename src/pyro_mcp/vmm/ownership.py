"""Who owns a one-shot VM, so that nothing outlives the process that started it.

A one-shot VM belongs to the process that booted it. Two safeguards:

- in-process: every live VM is registered; :func:`discard_all` (called on SIGTERM by the
  servers, and at exit) kills them;
- across processes: before the VM starts, its run directory records its owner's pid and
  start time (``owner.json``; the VMM's own identity is in ``vmm.json``, see
  :mod:`pyro_mcp.vmm.identity`). :func:`sweep_orphans` (run before each new one-shot VM)
  ends the VM of any run directory whose owner is gone (SIGKILL leaves no chance to clean
  up) and removes it. It looks only at run directories pyro marked as its own.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import threading
from pathlib import Path

from pyro_mcp.errors import PyroError
from pyro_mcp.vmm.base import VM
from pyro_mcp.vmm.identity import is_run_dir, start_time
from pyro_mcp.vmm.recorded import end_vmm

OWNER_FILE = "owner.json"

_live: set[VM] = set()
_lock = threading.Lock()


def register(vm: VM) -> None:
    """Record that this process owns ``vm`` (before it starts: a VMM is never unowned)."""
    with _lock:
        _live.add(vm)
    record = {"owner_pid": os.getpid(), "owner_start": start_time(os.getpid())}
    (vm.spec.run_dir / OWNER_FILE).write_text(json.dumps(record))


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


def _owner_gone(run_dir: Path) -> bool:
    """True when ``run_dir`` is a one-shot VM's and the process that owned it is gone."""
    try:
        record = json.loads((run_dir / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict):
        return False
    pid, started = record.get("owner_pid"), record.get("owner_start")
    return not (isinstance(pid, int) and started is not None and start_time(pid) == started)


def sweep_orphans(run_root: Path) -> list[str]:
    """End and remove the one-shot VMs whose owning process is gone; returns their ids."""
    removed: list[str] = []
    try:
        entries = list(run_root.iterdir())
    except OSError:
        return removed
    for run_dir in entries:
        if not is_run_dir(run_dir) or not _owner_gone(run_dir):
            continue
        try:
            end_vmm(run_dir)
        except PyroError:
            continue  # left in place (say, a jail mount that will not go): the next sweep
        removed.append(run_dir.name)
    return removed
