"""Memory snapshots of a running workspace: pause, resume and fork.

- **pause** stops the guest, saves its memory and device state to ``memory.state`` in the
  workspace's directory (fsynced before the pause counts), and ends the VMM: a paused
  workspace holds no host memory, and being on disk it outlives pyro and the host. When
  the state cannot be saved (a full disk) the guest is let go on and stays ``running``.
- **resume** starts a VMM from that state with the workspace's own disks: its processes,
  services, shells and page cache are as they were; only the clock is set. The state file
  is removed once the workspace runs again (it no longer matches the disks).
- **fork** saves a running workspace's state and copies its disks while it is stopped
  (copy-on-write where the file system allows), lets it go on, and starts a new
  workspace from the copies, with a name, machine-id and random state of its own. The
  fork gets the source's baseline (its diff starts from the same place) and secrets.

QEMU only, and not for a workspace with a network link (a copy would share its address).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pyro_mcp.errors import InvalidState, PyroError, VMError
from pyro_mcp.runtime.jsonfile import read_json, write_json_atomic
from pyro_mcp.storage.overlay import copy_sparse, rebase_overlay
from pyro_mcp.vmm.base import Restore, VMSpec
from pyro_mcp.vmm.qemu import snapshot
from pyro_mcp.vmm.qemu.confinement import vmm_dir
from pyro_mcp.vmm.qemu.qmp import QMPClient
from pyro_mcp.vmm.selection import choose_backend
from pyro_mcp.workspace import secret_delivery
from pyro_mcp.workspace.admission import this_owner
from pyro_mcp.workspace.boot import boot
from pyro_mcp.workspace.layout import WorkspaceFiles
from pyro_mcp.workspace.records import WorkspaceRecord
from pyro_mcp.workspace.secret_input import SecretInput
from pyro_mcp.workspace.store import require_state

if TYPE_CHECKING:
    from pyro_mcp.workspace.lifecycle import Workspaces

STATE_FILE = "memory.state"
# What of a workspace VM's device layout a saved state needs back (written at each boot):
# whether its balloon reports free pages (off for one restored from a template).
DEVICES_FILE = "devices.json"
Progress = Callable[[str], None]


def record_devices(files: WorkspaceFiles, spec: VMSpec) -> None:
    write_json_atomic(
        files.directory / DEVICES_FILE, {"free_page_reporting": spec.free_page_reporting}
    )


def with_saved_devices(files: WorkspaceFiles, spec: VMSpec) -> VMSpec:
    """``spec`` with the device settings the workspace's VM had when its state was saved."""
    saved = read_json(files.directory / DEVICES_FILE)
    reporting = saved.get("free_page_reporting") if isinstance(saved, dict) else None
    return dataclasses.replace(spec, free_page_reporting=reporting is not False)


def _require_snapshots(record: WorkspaceRecord, action: str) -> None:
    if not (record.backend or "").startswith("qemu"):
        raise InvalidState(
            f"{action} needs a QEMU workspace; {record.id} runs on {record.backend}",
            hint="memory snapshots of Firecracker workspaces are not built yet",
        )
    if (record.network or {}).get("mode", "off") != "off":
        raise InvalidState(
            f"{action} is not available for a workspace with a network link yet",
            hint="its copy would share the link's address",
        )


def _qmp(record: WorkspaceRecord) -> QMPClient:
    if not record.run_dir:
        raise VMError(f"workspace {record.id} records no run directory")
    return QMPClient(vmm_dir(Path(record.run_dir)) / "qmp.sock")


def pause(ws: Workspaces, ref: str, *, progress: Progress) -> WorkspaceRecord:
    ws.reconcile_one(ref)
    record = ws.store.get(ref)
    require_state(record, {"running"}, "pause")
    _require_snapshots(record, "pause")
    files = ws.layout.workspace(record.id)
    with ws.changing(record.id, "pause"):
        ws.store.transition(
            record.id, "pausing", expect={"running"}, action="pause", owner=this_owner()
        )
    ws._watch()
    progress("saving the workspace's memory")
    qmp = _qmp(record)
    try:
        size = snapshot.save_state(qmp, files.directory / STATE_FILE)
    except BaseException as exc:
        with contextlib.suppress(VMError):
            qmp.execute("cont")  # the guest goes on as if nothing happened
        qmp.close()
        note = f"pause failed, still running: {exc.message if isinstance(exc, PyroError) else exc}"
        ws.store.transition(record.id, "running", expect={"pausing"}, note=note, owner=None)
        raise
    qmp.close()
    ws._end_vm(record)
    return ws.store.transition(
        record.id,
        "paused",
        expect={"pausing"},
        note=f"paused: {size >> 20} MiB of memory and device state saved",
        vmm_pid=None,
        owner=None,
    )


def resume(ws: Workspaces, ref: str, *, progress: Progress) -> WorkspaceRecord:
    ws.reconcile_one(ref)
    record = ws.store.get(ref)
    require_state(record, {"paused"}, "resume")
    files = ws.layout.workspace(record.id)
    state = files.directory / STATE_FILE
    if not state.is_file():
        raise InvalidState(f"workspace {record.id} is paused but its saved state is missing")
    choice = choose_backend(ws.paths, "qemu", progress=progress)
    record = ws.store.transition(
        record.id,
        "resuming",
        expect={"paused"},
        admit=ws._admission(record.mem_mib, choice),
        owner=this_owner(),
    )
    ws._watch()
    try:
        boot(
            ws, record, files, choice=choice, progress=progress, first=False, restore=Restore(state)
        )
    except BaseException as exc:
        note = f"resume failed, still paused: {exc.message if isinstance(exc, PyroError) else exc}"
        with contextlib.suppress(PyroError):
            ws._end_vm(ws.store.get(record.id))
        ws.store.transition(record.id, "paused", note=note, vmm_pid=None, owner=None)
        raise
    state.unlink(missing_ok=True)
    return ws.store.get(record.id)


def fork(ws: Workspaces, ref: str, *, name: str | None, progress: Progress) -> WorkspaceRecord:
    ws.reconcile_one(ref)
    source = ws.store.get(ref)
    require_state(source, {"running"}, "fork")
    _require_snapshots(source, "fork")
    choice = choose_backend(ws.paths, "qemu", progress=progress)
    record = ws.store.create(
        environment=source.environment,
        vcpu_count=source.vcpu_count,
        mem_mib=source.mem_mib,
        disk_mib=source.disk_mib,
        name=name,
        labels=dict(source.labels),
        seed=source.seed,
        owner=this_owner(),
        network=dict(source.network),
        admit=ws._admission(source.mem_mib, choice),
    )
    ws._watch()
    mine, theirs = ws.layout.workspace(record.id), ws.layout.workspace(source.id)
    state = mine.directory / STATE_FILE
    try:
        mine.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        progress(f"saving {source.id}'s memory and copying its disks")
        with ws.changing(source.id, "fork"):
            _copy_running(source, theirs, mine, state)
        _copy_records(ws, source, record)
        boot(
            ws,
            record,
            mine,
            choice=choice,
            progress=progress,
            first=True,
            restore=Restore(state, identity=f"pyro-{record.id[:8]}"),
        )
    except BaseException:
        ws._discard(record.id)
        raise
    state.unlink(missing_ok=True)
    return ws.store.get(record.id)


def _copy_running(
    source: WorkspaceRecord, theirs: WorkspaceFiles, mine: WorkspaceFiles, state: Path
) -> None:
    """Save the source's state and copy its disks while it is stopped; then let it go on."""
    qmp = _qmp(source)
    try:
        snapshot.save_state(qmp, state)
        mine.link_base(theirs.base_image)
        if (theirs.directory / DEVICES_FILE).is_file():
            shutil.copyfile(theirs.directory / DEVICES_FILE, mine.directory / DEVICES_FILE)
        for disk in (theirs.root_disk("qemu"), theirs.workspace_disk):
            copy_sparse(disk, mine.directory / disk.name)
        rebase_overlay(mine.root_disk("qemu"), mine.base_image)
        blobs = theirs.blobs_dir
        if blobs.is_dir():
            shutil.copytree(blobs, mine.blobs_dir, dirs_exist_ok=True)
    finally:
        with contextlib.suppress(VMError):
            qmp.execute("cont")
        qmp.close()


def _copy_records(ws: Workspaces, source: WorkspaceRecord, fork_record: WorkspaceRecord) -> None:
    """The fork's baseline and secrets are the source's (its guest holds the same ones)."""
    if source.baseline_manifest:
        baseline = ws.store.get_checkpoint(source.id, "baseline")
        ws.store.add_baseline(
            fork_record.id,
            manifest=baseline.manifest,
            file_count=baseline.file_count,
            total_bytes=baseline.total_bytes,
        )
    values = secret_delivery.open_secrets(ws.store, ws.vault, source.id)
    kinds = {s.name: s.source_kind for s in ws.store.secrets(source.id)}
    secret_delivery.store_secrets(
        ws.store,
        ws.vault,
        fork_record.id,
        [SecretInput(name, value, kinds.get(name, "literal")) for name, value in values.items()],
    )


def reconcile_change(ws: Workspaces, record: WorkspaceRecord) -> str:
    """A pause or resume whose process died: a whole saved state means paused (its VM,
    stopped for the save or half resumed, is ended); none means a pause never got to
    save: its VM is let go on, or if it is gone the workspace is stopped. What reconcile
    reports it as."""
    saved = (ws.layout.workspace(record.id).directory / STATE_FILE).is_file()
    note = f"the process {record.state.removesuffix('ing')}ing it went away"
    if saved:
        ws._end_vm(record)
        ws.store.transition(record.id, "paused", note=note, vmm_pid=None, owner=None)
        return "stopped"
    if ws._vmm(record).alive():
        with contextlib.suppress(PyroError):
            client = _qmp(record)
            client.execute("cont")
            client.close()
        ws.store.transition(record.id, "running", note=note, owner=None)
        return "stopped"
    ws._end_vm(record)
    ws.store.transition(record.id, "stopped", note=note, vmm_pid=None, owner=None)
    return "stopped"
