"""Repairing what crashes leave (``Workspaces.reconcile``): a change (create, start, stop)
whose process is gone, a VMM that died, a VM in our run root no record owns, a checkpoint
that did not finish, a TTL that ran out.

What change is under way is decided by whether the process doing it runs, never by a
clock; a record whose change is still owned by a live process is left to that process.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pyro_mcp.errors import PyroError
from pyro_mcp.workspace.states import RESERVING_STATES
from pyro_mcp.workspace.store import WorkspaceRecord, expired_error

if TYPE_CHECKING:
    from pyro_mcp.workspace.lifecycle import Workspaces

ORPHAN_GRACE_S = 60.0  # a run dir younger than this may be a VM still being set up


def reconcile(ws: Workspaces) -> dict[str, list[str]]:
    """Repair every record of every kind, delete those whose TTL ran out, finish the
    collection of blobs a checkpoint left, and end orphan VMs: what changed, by id."""
    if ws.store.kind is not None:  # crashes and TTLs of every kind are repaired alike
        return reconcile(ws.every_kind())
    report: dict[str, list[str]] = {
        "stopped": [],
        "failed": [],
        "discarded": [],
        "expired": [],
        "collected": [],
        "orphans": [],
    }
    for record in ws.store.list():
        change = reconcile_record(ws, record)
        if change:
            report[change].append(record.id)
    for record in ws.store.expired(time.time()):
        ws.delete(record.id)
        report["expired"].append(record.id)
    for record in ws.store.list():
        if ws.blobs(record.id).needs_collection:  # a checkpoint did not finish
            ws.collect_blobs(record.id)
            report["collected"].append(record.id)
    report["orphans"] = sweep_orphans(ws)
    return report


def reconcile_one(ws: Workspaces, ref: str) -> None:
    """Repair the record ``ref`` names (see ``reconcile_record``); one whose TTL ran out
    is deleted and refused (``Expired``) unless a change of it is under way."""
    from pyro_mcp.workspace.admission import owner_alive
    from pyro_mcp.workspace.keeper import CHANGING

    reconcile_record(ws, ws.store.get(ref))
    record = ws.store.get(ref)  # by ``ref``: if the keeper deleted it, Expired names it so
    expired = record.expires_at is not None and record.expires_at <= time.time()
    if expired and not (record.state in CHANGING and owner_alive(record.owner)):
        ws.delete(record.id)
        raise expired_error(record.kind, ref, record.expires_at or 0.0)


def reconcile_record(ws: Workspaces, record: WorkspaceRecord) -> str | None:
    """Repair ``record`` if what it says no longer holds: the report key of what was done
    (``discarded``, ``failed``, ``stopped``), or None."""
    from pyro_mcp.workspace.keeper import CHANGING

    if record.state in CHANGING:
        from pyro_mcp.workspace.admission import owner_alive

        if owner_alive(record.owner):
            return None  # the change under way finishes it (a repair here would race it)
    if record.state in ("pausing", "resuming"):
        from pyro_mcp.workspace import memory

        return memory.reconcile_change(ws, record)
    if record.state == "creating":
        ws._discard(record.id)  # it never came to be: nothing of it is kept
        return "discarded"
    if record.state == "starting":
        ws._end_vm(record)
        note = "the process starting it went away before it finished"
        ws.store.transition(record.id, "failed", note=note, error=note, vmm_pid=None, owner=None)
        return "failed"
    if record.state not in ("running", "stopping"):
        return None
    stop_died = record.state == "stopping" and record.owner is not None
    if not stop_died and ws._vmm(record).alive():
        return None
    try:
        ws._end_vm(record)
    except PyroError as exc:
        ws._mark_services_stopped(record.id)
        ws._fail(record.id, f"the VMM exited unexpectedly: {exc}")
        return "failed"
    note = (
        "the process stopping it went away; its VM was ended, disks kept"
        if stop_died
        else "the VMM exited unexpectedly; disks kept: `pyro workspace start` boots it again"
    )
    ws._mark_services_stopped(record.id)
    if record.state == "running":
        ws.store.transition(record.id, "stopping", expect={"running"}, note=note)
    ws.store.transition(record.id, "stopped", note=note, vmm_pid=None, owner=None)
    return "stopped"


def sweep_orphans(ws: Workspaces) -> list[str]:
    """End the VMs in our run root that no active workspace owns; drop stale run dirs.

    Only run directories pyro marked as its own are looked at (``PYRO_RUN_DIR`` may hold
    anything else). One-shot VMs (their run dir has an ``owner.json``) are left to their
    own sweep; a run dir younger than ORPHAN_GRACE_S may be a VM that is still being set
    up; a workspace that is stopping still owns its VM.
    """
    from pyro_mcp.vmm.identity import is_run_dir
    from pyro_mcp.vmm.ownership import OWNER_FILE
    from pyro_mcp.vmm.recorded import RecordedVMM

    active = {r.id for r in ws.store.list(states=RESERVING_STATES)}
    removed: list[str] = []
    root = ws.paths.run_root
    if not root.is_dir():
        return removed
    for run_dir in root.iterdir():
        if not is_run_dir(run_dir) or run_dir.name in active:
            continue
        if (run_dir / OWNER_FILE).exists():
            continue
        try:
            if time.time() - run_dir.stat().st_mtime < ORPHAN_GRACE_S:
                continue
        except OSError:
            continue
        try:
            RecordedVMM.load(run_dir).end()
        except PyroError:
            continue  # left in place (say, a jail mount that will not go): next time
        removed.append(run_dir.name)
    return removed
