"""Workspace lifecycle: create, start, stop, delete, reconcile, and attaching to one.

A workspace VM outlives the process that booted it. Its record (state, VMM pid, run
directory, agent endpoint) lives in the store; every later call attaches to its agent.
Whether its VMM still runs, and how to end it, comes from the identity the VMM's run
directory records (:mod:`pyro_mcp.vmm.recorded`), never from process command lines.
Each state change goes through the store's compare-and-set transition, so a CLI, an SDK
process and an MCP server can act on the same workspace safely; whatever a crash leaves
half done, :meth:`Workspaces.reconcile` repairs (:mod:`pyro_mcp.workspace.repair`). How a
VM comes up (template, saved state or cold) is :mod:`pyro_mcp.workspace.boot`.

The lifecycle VMs of ``pyro vm`` are records of another kind on this same lifecycle
(:mod:`pyro_mcp.workspace.vms`): a ``Workspaces`` of kind ``vm`` starts, stops and
deletes them with the same code; they have no ``/workspace`` disk, and their first start
may restore from a template as a workspace's create does. A call on a record whose TTL
ran out deletes it and raises ``Expired``, whichever the kind.
"""

from __future__ import annotations

import copy
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyro_mcp.errors import (
    InvalidState,
    OperationTimeout,
    PyroError,
)
from pyro_mcp.runtime.paths import key_dir, state_dir
from pyro_mcp.workspace import secret_delivery
from pyro_mcp.workspace.boot import boot
from pyro_mcp.workspace.layout import StateLayout
from pyro_mcp.workspace.paths import WORKSPACE_ROOT
from pyro_mcp.workspace.secret_input import SecretInput
from pyro_mcp.workspace.states import Kind, state_error
from pyro_mcp.workspace.store import (
    WorkspaceRecord,
    WorkspaceStore,
    require_state,
)
from pyro_mcp.workspace.vault import Vault

if TYPE_CHECKING:
    from pyro_mcp.guest.client import AgentClient
    from pyro_mcp.guest.redaction import Redactor
    from pyro_mcp.network.policy import NetworkPolicy
    from pyro_mcp.runtime.paths import RuntimePaths
    from pyro_mcp.storage.host_files import HostPath
    from pyro_mcp.vmm.attach import SharedAgent
    from pyro_mcp.vmm.launch import BackendChoice
    from pyro_mcp.vmm.recorded import RecordedVMM
    from pyro_mcp.vmm.warm import BootPlan
    from pyro_mcp.workspace.blobs import BlobStore
    from pyro_mcp.workspace.secret_input import SecretInput

Progress = Callable[[str], None]
CHANGE_LOCK = "change.lock"  # in the workspace's directory (see Workspaces.changing)
CHANGE_WAIT_S = 600.0  # how long a change waits for another to finish
STOP_GRACE_S = 10.0  # services get this long after TERM before KILL
SHUTDOWN_CALL_S = 30.0  # the agent answers shutdown at once; a slow guest gets room
POWEROFF_S = 60.0  # init stops everything (3 s), syncs the disks and powers off
DYING_S = 0.5  # a VMM whose agent socket refuses may be in the middle of exiting


def _quiet(_message: str) -> None:
    return None


class Workspaces:
    """The persistent workspaces of this host (or its lifecycle VMs: ``kind``)."""

    def __init__(
        self, paths: RuntimePaths, state: Path | None = None, *, kind: str | None = Kind.WORKSPACE
    ) -> None:
        """``kind``: the records its calls find, list and create (``None``: every kind,
        for what keeps them all up: the keeper)."""
        self.paths = paths
        self.layout = StateLayout(state or state_dir())
        self.layout.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = WorkspaceStore(self.layout.store_path, kind=kind)
        self.vault = Vault(key_dir(), self.layout.state_dir)
        self.boot_plans: dict[str, BootPlan] = {}  # how this process brought each VM up
        if self.layout.blobs_dir.is_dir():
            self._adopt_shared_blobs()

    def close(self) -> None:
        self.store.close()

    def every_kind(self) -> Workspaces:
        """This, acting on records of every kind (the same store; close this one, not it):
        what reconcile and the TTL upkeep act through."""
        if self.store.kind is None:
            return self
        view = copy.copy(self)
        view.store = self.store.scoped(None)
        return view

    # -- file contents -----------------------------------------------------------------
    def blobs(self, workspace_id: str) -> BlobStore:
        """The blob store of one workspace: never shared with another."""
        from pyro_mcp.workspace.blobs import BlobStore

        return BlobStore(self.layout.workspace(workspace_id).blobs_dir)

    def collect_blobs(self, workspace_id: str) -> tuple[int, int]:
        """Delete the blobs no baseline or checkpoint of the workspace reaches any more:
        (blobs removed, bytes freed)."""
        store = self.blobs(workspace_id)
        manifests = [c.manifest for c in self.store.checkpoints(workspace_id)]
        return store.gc(store.reachable(manifests))

    def _adopt_shared_blobs(self) -> None:
        """Earlier versions kept one blob store for every workspace: give each workspace
        hard links to the blobs its own manifests reach, then drop the shared store."""
        import shutil

        from pyro_mcp.workspace.blobs import BlobStore

        shared = BlobStore(self.layout.blobs_dir)
        for record in self.store.list():
            own = self.blobs(record.id)
            manifests = [c.manifest for c in self.store.checkpoints(record.id)]
            for sha in shared.reachable(manifests):
                if shared.has(sha) and not own.has(sha):
                    own.path(sha).parent.mkdir(parents=True, exist_ok=True)
                    os.link(shared.path(sha), own.path(sha))
        shutil.rmtree(self.layout.blobs_dir, ignore_errors=True)

    # -- create ------------------------------------------------------------------------
    def create(
        self,
        environment: str,
        *,
        seed_path: Path | HostPath | None = None,
        name: str | None = None,
        labels: dict[str, str] | None = None,
        vcpu_count: int = 1,
        mem_mib: int = 512,
        disk_mib: int = 1024,
        ttl_seconds: float | None = None,
        backend: str | None = None,
        network: NetworkPolicy | None = None,
        publish: list[str] | None = None,
        secrets: list[SecretInput] | None = None,
        progress: Progress = _quiet,
    ) -> WorkspaceRecord:
        """Create a workspace and boot it; its seed becomes the baseline for diff/reset.
        ``network``: its policy (default off), kept for every later start. ``secrets`` are
        sealed into the store and handed to the guest at every boot."""
        import shutil

        from pyro_mcp.network.policy import NetworkPolicy
        from pyro_mcp.runtime import environments
        from pyro_mcp.storage.disk_create import create_workspace_disk
        from pyro_mcp.vmm.selection import choose_backend
        from pyro_mcp.workspace import seeds
        from pyro_mcp.workspace.admission import check_sizes, this_owner

        check_sizes(vcpu_count, mem_mib, disk_mib, ttl_seconds)
        image = environments.image_for(self.paths, environment)
        self.reconcile()
        choice = choose_backend(self.paths, backend, progress=progress)
        record = self.store.create(
            environment=environment,
            vcpu_count=vcpu_count,
            mem_mib=mem_mib,
            disk_mib=disk_mib,
            name=name,
            labels=labels,
            ttl_seconds=ttl_seconds,
            seed=str(seed_path) if seed_path else None,
            owner=this_owner(),  # from the first moment: a reconcile sees the create is live
            network={**(network or NetworkPolicy()).to_dict(), "publish": publish or []},
            admit=self._admission(mem_mib, choice),
        )
        self._watch()  # if this process dies mid-create, its VM goes at once anyway
        files = self.layout.workspace(record.id)
        try:
            secret_delivery.store_secrets(self.store, self.vault, record.id, secrets or [])
            files.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            files.link_base(image)
            progress("preparing the workspace disk" + (f" from {seed_path}" if seed_path else ""))
            staging = files.directory / "seed-staging"
            shutil.rmtree(staging, ignore_errors=True)
            store = self.blobs(record.id)
            with store.writing():
                baseline = (
                    seeds.ingest_seed(seed_path, staging, store)
                    if seed_path
                    else (seeds.empty_seed(staging))
                )
                create_workspace_disk(files.workspace_disk, disk_mib, staging)
                shutil.rmtree(staging, ignore_errors=True)
                files_only = [entry for entry in baseline if entry.type == "file"]
                self.store.add_baseline(
                    record.id,
                    manifest=store.put_manifest(baseline),
                    file_count=len(files_only),
                    total_bytes=sum(entry.size for entry in files_only),
                )
            boot(self, record, files, choice=choice, progress=progress, first=True)
        except BaseException:
            self._discard(record.id)  # a create that failed leaves nothing, its name is free
            raise
        return self.store.get(record.id)

    def _watch(self) -> None:
        """A change is under way: the keeper repairs it if this process dies first."""
        from pyro_mcp.workspace.keeper import ensure_keeper

        ensure_keeper(self.paths, self.layout.state_dir, needed=True)

    def _admission(
        self, mem_mib: int, choice: BackendChoice
    ) -> Callable[[list[WorkspaceRecord]], None]:
        """The check that refuses a VM that would take the host past its limits: the
        number of live workspaces, and memory counted as each VMM really costs (guest RAM
        plus the VMM's own overhead, for every workspace that holds or is about to hold a
        VM). The store runs it in the transaction that records the new VM's claim."""
        from functools import partial

        from pyro_mcp.workspace.admission import Limits, admit

        limits = Limits.for_host()
        return partial(admit, limits, mem_mib, choice)

    # -- attach ------------------------------------------------------------------------
    @contextmanager
    def agent(self, ref: str, action: str, *, changes: bool = False) -> Iterator[AgentClient]:
        """An attached agent of a running workspace (InvalidState naming its state).

        ``changes``: the action changes ``/workspace`` in several steps (patch, reset,
        checkpoint, writes): it holds the workspace's change lock, so two such actions
        (or a stop) never interleave and "all or nothing" holds across processes. Reads
        and commands take no lock.
        """
        record = self.running(ref, action)
        with self.changing(record.id, action) if changes else nullcontext():
            if changes:
                record = self.running(record.id, action)  # it may have stopped meanwhile
            attached = self._attach(record, action)
            try:
                attached.client.redactor = self.redactor(record.id)
                yield attached.client
            finally:
                attached.close()

    @contextmanager
    def changing(self, workspace_id: str, action: str) -> Iterator[None]:
        """Hold the change lock of ``workspace_id`` (waiting up to CHANGE_WAIT_S)."""
        directory = self.layout.workspace(workspace_id).directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(directory / CHANGE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + CHANGE_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise OperationTimeout(
                            f"{action}: another change to workspace {workspace_id} (a patch, "
                            f"reset, checkpoint, write or stop) has run for {CHANGE_WAIT_S:g} s",
                            hint="retry when it has finished",
                        ) from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)  # releases the lock

    def redactor(self, workspace_id: str) -> Redactor | None:
        """What shows the workspace's secrets as ``***`` (None: it has none)."""
        return secret_delivery.redactor(self.store, self.vault, workspace_id)

    def running(self, ref: str, action: str) -> WorkspaceRecord:
        self.reconcile_one(ref)
        record = self.store.get(ref)
        require_state(record, {"running"}, action)
        return record

    def _attach(self, record: WorkspaceRecord, action: str = "attach") -> SharedAgent:
        from pyro_mcp.vmm.attach import AgentEndpoint, attach_shared

        if not record.agent_endpoint:
            raise InvalidState(f"workspace {record.id} has no agent endpoint recorded")
        try:
            return attach_shared(AgentEndpoint.from_str(record.agent_endpoint))
        except PyroError as exc:
            # The VMM may have died since the state was read (its socket refuses): then
            # the caller hears what the workspace now is, stopped, not a socket error. A
            # process killed a moment ago may still be exiting: give it that moment.
            with suppress(PyroError):
                self._vmm(record).wait_exit(DYING_S)
            self.reconcile_one(record.id)
            if record.state.value == "running":
                now = self.store.get(record.id)
                if now.state.value != "running":
                    raise state_error(now, {"running"}, action) from exc
            raise

    # -- stop, start, delete -----------------------------------------------------------
    def stop(self, ref: str, *, progress: Progress = _quiet) -> WorkspaceRecord:
        """Power the workspace off; both disks are kept."""
        from pyro_mcp.workspace.admission import this_owner

        self.reconcile_one(ref)
        record = self.store.get(ref)
        require_state(record, {"running"}, "stop")
        with self.changing(record.id, "stop"):  # never in the middle of a patch or reset
            self.store.transition(
                record.id, "stopping", expect={"running"}, action="stop", owner=this_owner()
            )
        self._watch()
        progress("stopping services and shutting the guest down")
        self._shut_down(record)
        self._mark_services_stopped(record.id)
        self._vmm(record).wait_exit(POWEROFF_S)
        self._end_vm(record)
        return self.store.transition(
            record.id, "stopped", expect={"stopping"}, note="stopped", vmm_pid=None, owner=None
        )

    def _shut_down(self, record: WorkspaceRecord) -> None:
        """Stop the services, then always ask the guest to power off (its init syncs the
        disks first); a dead or stuck agent leaves the kill that follows to stop it."""
        try:
            attached = self._attach(record)
        except PyroError:
            return
        with attached as client:
            with suppress(PyroError):  # a service that will not stop must not skip the sync
                client.service_stop_all(grace_s=STOP_GRACE_S)
            with suppress(PyroError):
                client.fs_sync(WORKSPACE_ROOT if record.kind == Kind.WORKSPACE else "/")
            with suppress(PyroError):
                client.call("shutdown", timeout_s=SHUTDOWN_CALL_S)

    def start(self, ref: str, *, progress: Progress = _quiet) -> WorkspaceRecord:
        """Boot a stopped (or failed) workspace again from its disks; a VM never booted
        (``created``) boots for the first time."""
        from pyro_mcp.vmm.selection import choose_backend
        from pyro_mcp.workspace.admission import this_owner

        self.reconcile_one(ref)
        record = self.store.get(ref)
        startable = {"stopped", "failed", "created"}
        require_state(record, startable, "start")
        fresh = record.state == "created"
        choice = choose_backend(self.paths, _family(record.backend), progress=progress)
        record = self.store.transition(
            record.id,
            "starting",
            expect=startable,
            admit=self._admission(record.mem_mib, choice),
            owner=this_owner(),
        )
        self._watch()
        files = self.layout.workspace(record.id)
        try:
            boot(self, record, files, choice=choice, progress=progress, first=False, fresh=fresh)
        except BaseException as exc:
            self._fail(record.id, f"start failed: {exc}")
            raise
        return self.store.get(record.id)

    def pause(self, ref: str, *, progress: Progress = _quiet) -> WorkspaceRecord:
        """Save the running workspace's memory to its directory and end its VMM."""
        from pyro_mcp.workspace import memory

        return memory.pause(self, ref, progress=progress)

    def resume(self, ref: str, *, progress: Progress = _quiet) -> WorkspaceRecord:
        """Run a paused workspace again from its saved memory, as it was."""
        from pyro_mcp.workspace import memory

        return memory.resume(self, ref, progress=progress)

    def fork(
        self, ref: str, *, name: str | None = None, progress: Progress = _quiet
    ) -> WorkspaceRecord:
        """A new running workspace from a running one's memory and disks."""
        from pyro_mcp.workspace import memory

        return memory.fork(self, ref, name=name, progress=progress)

    def delete(self, ref: str) -> dict[str, object]:
        """Kill the workspace's VM and remove its disks and records (expired or not)."""
        from pyro_mcp.workspace import repair

        repair.reconcile_record(self, self.store.get(ref))
        record = self.store.get(ref)
        if record.state in ("stopping", "starting"):
            # Another call is mid-change: make it a failed workspace first, then delete.
            record = self.store.transition(record.id, "failed", note="deleted mid-change")
        if record.state != "deleting":
            self.store.transition(record.id, "deleting")
        self._end_vm(record)
        self.layout.workspace(record.id).remove()
        self.store.delete_record(record.id)
        return {"deleted": record.id, "name": record.name, "workspace_id": record.id}

    def refresh_services(self, workspace_id: str) -> WorkspaceRecord:
        """Mirror the guest's service records into the store (best effort)."""
        try:
            with self.agent(workspace_id, "service list") as client:
                return self.mirror_services(workspace_id, client)
        except PyroError:
            return self.store.get(workspace_id)

    def mirror_services(self, workspace_id: str, client: AgentClient) -> WorkspaceRecord:
        """Store what the guest says of its services. Services of an earlier boot that the
        guest no longer knows stay listed, as stopped. The ports a service published go
        once it is no longer running."""
        from pyro_mcp.network.link import link_of
        from pyro_mcp.network.ports import unpublish_owner

        value, _ = client.call("service_list", {}, timeout_s=30)
        record = self.store.get(workspace_id)
        services = _as_stopped(record.services)
        services.update({str(s["name"]): s for s in value.get("services", [])})
        link = link_of(workspace_id)
        if link is not None:
            for name, service in services.items():
                if service.get("state") in SERVICE_ENDED:
                    unpublish_owner(link, f"service:{name}")
        return self.store.set_fields(workspace_id, services=services)

    def _mark_services_stopped(self, workspace_id: str) -> None:
        """The VM is down: whatever ran in it is stopped (a start does not restart it)."""
        record = self.store.get(workspace_id)
        services = _as_stopped(record.services)
        self.store.set_fields(workspace_id, services=services)

    def _vmm(self, record: WorkspaceRecord) -> RecordedVMM:
        """The workspace's VMM, as its run directory records it."""
        from pyro_mcp.vmm.recorded import RecordedVMM

        return RecordedVMM.load(self._run_dirs(record)[0], record.id)

    def _run_dirs(self, record: WorkspaceRecord) -> list[Path]:
        """The run directory the record names, and the one its id gives: a create or start
        that died before recording its VMM may have left a VM running in that one."""
        own = self.paths.run_root / record.id
        named = Path(record.run_dir) if record.run_dir else own
        return [named] if named == own else [named, own]

    def _end_vm(self, record: WorkspaceRecord) -> None:
        """End whatever VM runs for this workspace: its VMM, everything it holds outside
        its process (a jail, mounts, cgroups), and its run directory."""
        from pyro_mcp.vmm.recorded import RecordedVMM

        for run_dir in self._run_dirs(record):
            RecordedVMM.load(run_dir, record.id).end()

    def _discard(self, workspace_id: str) -> None:
        """Remove a workspace that never came to be (a failed or abandoned create): its VM,
        its files and its record, so nothing is left and its name is free again."""
        with suppress(PyroError):
            record = self.store.get(workspace_id)
            self._end_vm(record)
            self.layout.workspace(record.id).remove()
            if record.state != "deleting":
                self.store.transition(record.id, "deleting", note="create failed")
            self.store.delete_record(record.id)

    def _fail(self, workspace_id: str, note: str) -> None:
        """End the workspace's VM and make it ``failed`` (saying so when what its VM held
        could not all be given back: a later start then says what is in the way)."""
        try:
            record = self.store.get(workspace_id)
        except PyroError:
            return
        try:
            self._end_vm(record)
        except PyroError as exc:
            note = f"{note}; cleaning up after its VM failed: {exc}"
        with suppress(PyroError):
            self.store.transition(
                workspace_id, "failed", note=note, error=note, vmm_pid=None, owner=None
            )

    # -- reconcile (pyro_mcp.workspace.repair) ------------------------------------------
    def reconcile(self) -> dict[str, list[str]]:
        """Repair what crashes left: dead VMMs, orphan VMMs, stale run dirs, expired TTLs."""
        from pyro_mcp.workspace import repair

        return repair.reconcile(self)

    def reconcile_one(self, ref: str) -> None:
        """Repair the record ``ref`` names; one whose TTL ran out is deleted and refused
        (``Expired``) unless a change of it is under way."""
        from pyro_mcp.workspace import repair

        repair.reconcile_one(self, ref)


# --- helpers ------------------------------------------------------------------------------


SERVICE_ENDED = ("stopped", "exited", "failed")  # its ports go (starting/running/ready stay)


def _as_stopped(services: dict[str, Any]) -> dict[str, Any]:
    """Service records of a VM that is gone: whatever ran in it is stopped now."""
    return {
        name: {**status, "state": "stopped", "pid": None}
        if status.get("state") in ("starting", "ready", "running")
        else status
        for name, status in services.items()
    }


def _family(label: str | None) -> str | None:
    """``qemu-tcg`` -> ``qemu``: a restarted workspace keeps its VMM, re-probing the accel."""
    return label.split("-")[0] if label else None
