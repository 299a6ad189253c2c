"""Lifecycle VMs (``pyro vm ...``): records of kind ``vm`` on the workspace lifecycle.

The first half needs no VM: the store's kinds, the ``created`` state, TTL expiry and its
memory, on a clock the test moves. The second drives the operations on fake VMs
(tests/unit/fake_vm.py: the real lifecycle, store and guest agent, no kernel)."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from tests.leftovers import records_left_after_ttl
from tests.unit import fake_vm
from tests.unit.test_store import Clock

from pyro_mcp.api.context import Context
from pyro_mcp.api.operations import vm_lifecycle as vm
from pyro_mcp.api.operations import workspace_content as wc
from pyro_mcp.api.operations import workspaces as ws
from pyro_mcp.api.operations.workspaces import open_workspaces
from pyro_mcp.errors import Expired, InvalidArgument, InvalidState, NotFound, TooLarge
from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.workspace import vms
from pyro_mcp.workspace.admission import MAX_WORKSPACES_ENV
from pyro_mcp.workspace.lifecycle import Workspaces
from pyro_mcp.workspace.schema import MIGRATIONS
from pyro_mcp.workspace.states import Kind, WorkspaceState, require_state, shown_state
from pyro_mcp.workspace.store import EXPIRED_KEPT_S, WorkspaceStore


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "store.sqlite3"


def _record(store: WorkspaceStore, **kwargs: Any) -> Any:
    values: dict[str, Any] = {"environment": "debian:12", "vcpu_count": 1, "mem_mib": 256}
    values["disk_mib"] = 0 if store.kind == Kind.VM else 64
    values.update(kwargs)
    return store.create(**values)


def _gone(store: WorkspaceStore, ref: str) -> None:
    """Delete a record as the lifecycle does once its VM and files are gone."""
    store.transition(ref, "deleting")
    store.delete_record(ref)


# --- the store: kinds ------------------------------------------------------------------


def test_each_kind_finds_lists_and_creates_only_records_of_its_kind(path: Path) -> None:
    with WorkspaceStore(path) as workspaces:
        machines = workspaces.scoped(Kind.VM)
        every = workspaces.scoped(None)
        web = _record(workspaces, name="web")
        box = _record(machines)
        assert (web.kind, box.kind, box.disk_mib) == ("workspace", "vm", 0)
        assert [r.id for r in workspaces.list()] == [web.id]
        assert [r.id for r in machines.list()] == [box.id]
        assert {r.id for r in every.list()} == {web.id, box.id}
        assert machines.get(box.id[:6]) == box
        for ref in (box.id, box.id[:6]):
            with pytest.raises(NotFound) as caught:
                workspaces.get(ref)
            assert caught.value.message == f"no workspace {ref!r}: {box.id} is a VM"
            assert caught.value.hint == "use the `pyro vm` commands for it"
        with pytest.raises(NotFound) as caught:
            machines.get("web")
        assert caught.value.message == f"no VM 'web': {web.id} is a workspace"
        assert caught.value.hint == "use the `pyro workspace` commands for it"
        with pytest.raises(NotFound) as caught:
            machines.get("ffffffffffff")
        assert caught.value.message == "no VM 'ffffffffffff'"
        with pytest.raises(InvalidArgument, match=r"^kind: a store of every kind creates"):
            _record(every)
        with pytest.raises(InvalidArgument, match=r"^disk_mib:"):
            _record(workspaces, disk_mib=0)  # only a VM has no workspace disk


def test_admission_counts_the_vms_that_hold_memory_with_the_workspaces(path: Path) -> None:
    with WorkspaceStore(path) as workspaces:
        machines = workspaces.scoped(Kind.VM)
        started = _record(machines)
        machines.transition(started.id, "running")
        idle = machines.transition(_record(machines).id, "created")
        seen: list[list[str]] = []
        _record(workspaces, admit=lambda live: seen.append([r.id for r in live]))
        assert seen == [[started.id]]  # a created VM holds nothing
        assert idle.state is WorkspaceState.CREATED


def test_a_store_of_the_last_version_is_upgraded_and_its_records_are_workspaces(
    path: Path,
) -> None:
    WorkspaceStore(path, migrations=MIGRATIONS[:5]).close()
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO workspaces (id, name, environment, state, created_at, updated_at, "
            "vcpu_count, mem_mib, disk_mib) "
            "VALUES ('0123456789ab', 'old', 'debian:12', 'stopped', 1, 1, 1, 256, 64)"
        )
    with WorkspaceStore(path) as store:
        assert store.schema_version() == len(MIGRATIONS)
        assert store.get("old").kind == "workspace"
        assert store.scoped(Kind.VM).list() == []


# --- the state machine ------------------------------------------------------------------


def test_a_created_vm_can_only_start_or_be_deleted(path: Path) -> None:
    with WorkspaceStore(path, kind=Kind.VM) as store:
        created = store.transition(_record(store).id, "created")
        for refused in ("running", "stopped", "stopping", "failed", "created"):
            with pytest.raises(InvalidState, match=f"^VM {created.id} is created; "):
                store.transition(created.id, refused)
        assert store.transition(created.id, "starting").state is WorkspaceState.STARTING


def test_a_vm_is_shown_started_when_it_runs_and_its_refusals_name_vm_commands(
    path: Path,
) -> None:
    assert shown_state("vm", WorkspaceState.RUNNING) == "started"
    assert shown_state("workspace", WorkspaceState.RUNNING) == "running"
    assert shown_state("vm", WorkspaceState.STOPPED) == "stopped"
    with WorkspaceStore(path, kind=Kind.VM) as store:
        created = store.transition(_record(store).id, "created")
        with pytest.raises(InvalidState) as caught:
            require_state(created, {"running"}, "exec")
        assert caught.value.message == f"VM {created.id} is created; exec needs it started"
        assert caught.value.hint == f"run `pyro vm start {created.id}`"
        running = store.transition(store.transition(created.id, "starting").id, "running")
        with pytest.raises(InvalidState) as caught:
            require_state(running, {"stopped", "failed", "created"}, "start")
        assert caught.value.message == (
            f"VM {created.id} is started; start needs it created or failed or stopped"
        )
        assert caught.value.hint == f"run `pyro vm stop {created.id}`"


# --- TTL: counted from creation, remembered once it deleted ------------------------------


def test_a_ttl_counts_from_creation_and_what_it_deleted_is_refused_as_expired(
    path: Path,
) -> None:
    clock = Clock()
    with WorkspaceStore(path, kind=Kind.VM, clock=clock) as store:
        short = _record(store, ttl_seconds=1)
        long = _record(store, ttl_seconds=600)
        assert (short.expires_at, vms.ttl_of(long)) == (clock.now + 1, 600.0)
        clock.now += 1
        assert [r.id for r in store.expired(clock.now)] == [short.id]
        _gone(store, short.id)
        _gone(store, long.id)  # deleted before its TTL ran out: simply gone
        with pytest.raises(Expired) as caught:
            store.get(short.id)
        assert caught.value.code == "expired"
        assert caught.value.message == (
            f"VM {short.id} expired at 1970-01-12T13:46:41+00:00 (its TTL ran out) and was deleted"
        )
        assert caught.value.hint == (
            "create another with `pyro vm create` (`--ttl-seconds` sets its TTL)"
        )
        with pytest.raises(Expired, match=f"^VM {short.id[:6]} expired at "):
            store.get(short.id[:6])  # a prefix names it as it did
        with pytest.raises(NotFound) as missing:
            store.get(long.id)
        assert type(missing.value) is NotFound
        # Remembered for a week: the next expiry after that forgets it.
        clock.now += EXPIRED_KEPT_S + 1
        later = _record(store, ttl_seconds=1)
        clock.now += 1
        _gone(store, later.id)
        with pytest.raises(NotFound) as forgotten:
            store.get(short.id)
        assert type(forgotten.value) is NotFound
        with pytest.raises(Expired):
            store.get(later.id)


def test_an_expired_workspace_is_refused_as_expired_by_name_too(path: Path) -> None:
    clock = Clock()
    with WorkspaceStore(path, clock=clock) as store:
        record = _record(store, name="web", ttl_seconds=5)
        clock.now += 10
        _gone(store, record.id)
        with pytest.raises(Expired, match=r"^workspace web expired at "):
            store.get("web")
        with pytest.raises(NotFound) as caught:
            store.scoped(Kind.VM).get(record.id)  # a VM command: no VM expired by that id
        assert type(caught.value) is NotFound


@pytest.fixture
def machines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A ``Workspaces`` of kind vm whose environment image is a plain file (no VM boots)."""
    from pyro_mcp.runtime import environments

    image = tmp_path / "base.ext4"
    image.write_bytes(b"\0" * 4096)
    monkeypatch.setattr(environments, "image_for", lambda _paths, _environment: image)
    paths = RuntimePaths(tmp_path / "cache", tmp_path / "run")
    opened = Workspaces(paths, tmp_path / "state", kind=Kind.VM)
    yield opened
    opened.close()


def test_reap_expired_deletes_exactly_the_vms_whose_ttl_ran_out(machines: Workspaces) -> None:
    soon = vms.create_vm(machines, "debian:12", ttl_seconds=10)
    later = vms.create_vm(machines, "debian:12", ttl_seconds=1000)
    assert soon.state is WorkspaceState.CREATED and soon.backend is None
    assert machines.layout.workspace(soon.id).base_image.exists()
    assert vms.reap_expired(machines) == []
    machines.store.update(soon.id, expires_at=time.time() - 1)  # its TTL ran out
    assert vms.reap_expired(machines) == [soon.id]
    assert not machines.layout.workspace(soon.id).directory.exists()
    with pytest.raises(Expired):
        machines.store.get(soon.id)
    assert [r.id for r in machines.store.list()] == [later.id]
    assert vms.reap_expired(machines) == []
    with pytest.raises(InvalidArgument, match=r"^kind: lifecycle VMs need"):
        vms.reap_expired(machines.every_kind())


def test_a_call_on_a_vm_whose_ttl_ran_out_deletes_it_and_says_it_expired(
    machines: Workspaces,
) -> None:
    record = vms.create_vm(machines, "debian:12")
    machines.store.update(record.id, expires_at=time.time() - 1)
    with pytest.raises(Expired, match=f"^VM {record.id} expired at "):
        machines.reconcile_one(record.id)
    assert machines.every_kind().store.list() == []
    assert not machines.layout.workspace(record.id).directory.exists()
    with pytest.raises(Expired):
        machines.start(record.id)


def test_a_vm_create_checks_its_arguments_before_recording_anything(
    machines: Workspaces,
) -> None:
    with pytest.raises(InvalidArgument, match="mem_mib must be between 128 and 65536"):
        vms.create_vm(machines, "debian:12", mem_mib=64)
    with pytest.raises(InvalidArgument, match="ttl_seconds must be positive"):
        vms.create_vm(machines, "debian:12", ttl_seconds=0)
    assert machines.every_kind().store.list() == []


def test_allow_host_compat_true_is_refused_and_records_nothing(tmp_path: Path) -> None:
    ctx = Context(paths=RuntimePaths(tmp_path / "cache", tmp_path / "run"), state_dir=tmp_path)
    with pytest.raises(InvalidArgument) as caught:
        vm.vm_create(ctx, "debian:12", allow_host_compat=True)
    assert caught.value.message == (
        "allow_host_compat: pyro never runs commands on the host; every VM is a microVM"
    )
    assert not (tmp_path / "store.sqlite3").exists()


# --- the operations, on fake VMs ---------------------------------------------------------


def _left_behind(ctx: Context) -> list[str]:
    return fake_vm.left_behind(ctx.state_dir, ctx.paths.run_root)


def test_a_vm_is_created_started_given_commands_stopped_started_and_deleted(
    fake_ctx: Context,
) -> None:
    created = vm.vm_create(fake_ctx, "debian:12", mem_mib=256, ttl_seconds=900)
    vid = created["vm_id"]
    assert {k: created[k] for k in ("state", "vcpu_count", "mem_mib", "ttl_seconds")} == {
        "state": "created",
        "vcpu_count": 1,
        "mem_mib": 256,
        "ttl_seconds": 900.0,
    }
    assert created["expires_at"] == pytest.approx(created["created_at"] + 900)
    assert (created["network_enabled"], created["vmm_pid"]) == (False, None)
    assert "guest_ip" not in created  # only a networked VM has one
    assert list(fake_ctx.paths.run_root.iterdir()) == []  # nothing booted
    with pytest.raises(InvalidState) as refused:
        vm.vm_exec(fake_ctx, vid, "true")
    assert refused.value.message == f"VM {vid} is created; exec needs it started"

    started = vm.vm_start(fake_ctx, vid)
    assert (started["state"], started["backend"]) == ("started", fake_vm.FAKE_LABEL)
    assert started["expires_at"] == created["expires_at"]  # a start does not extend it
    shell = vm.vm_exec(fake_ctx, vid, "echo one && echo two >&2; exit 3")
    assert (shell["vm_id"], shell["environment"]) == (vid, "debian:12")
    assert (shell["stdout"], shell["stderr"], shell["exit_code"]) == ("one\n", "two\n", 3)
    argv = vm.vm_exec(fake_ctx, vid, ["printf", "%s|", "a b", "$HOME"])
    assert (argv["stdout"], argv["exit_code"], argv["timed_out"]) == ("a b|$HOME|", 0, False)
    slow = vm.vm_exec(fake_ctx, vid, ["sleep", "30"], timeout_seconds=0.5)
    assert slow["timed_out"] is True
    assert vm.vm_status(fake_ctx, vid)["state"] == "started"

    stopped = vm.vm_stop(fake_ctx, vid)
    assert (stopped["state"], stopped["vmm_pid"]) == ("stopped", None)
    assert fake_vm.vmm_processes(fake_ctx.paths.run_root) == []
    with pytest.raises(InvalidState, match=f"^VM {vid} is stopped; exec needs it started"):
        vm.vm_exec(fake_ctx, vid, "true")
    assert vm.vm_start(fake_ctx, vid)["state"] == "started"
    assert vm.vm_exec(fake_ctx, vid, "echo again")["stdout"] == "again\n"

    assert vm.vm_delete(fake_ctx, vid) == {"deleted": vid}
    assert _left_behind(fake_ctx) == []
    with pytest.raises(NotFound) as caught:
        vm.vm_status(fake_ctx, vid)
    assert caught.value.message == f"no VM {vid!r}"


def test_workspace_commands_do_not_see_vms_nor_vm_commands_workspaces(
    fake_ctx: Context,
) -> None:
    vid = vm.vm_create(fake_ctx, "debian:12")["vm_id"]
    wid = ws.workspace_create(fake_ctx, "debian:12", name="web")["id"]
    assert [w["id"] for w in ws.workspace_list(fake_ctx)["workspaces"]] == [wid]
    for refused in (
        lambda: ws.workspace_status(fake_ctx, vid),
        lambda: wc.workspace_exec(fake_ctx, vid, ["true"]),
        lambda: ws.workspace_delete(fake_ctx, vid),
    ):
        with pytest.raises(NotFound) as caught:
            refused()
        assert caught.value.message == f"no workspace {vid!r}: {vid} is a VM"
    for call in (vm.vm_start, vm.vm_status, vm.vm_stop, vm.vm_delete, vm.vm_network_info):
        with pytest.raises(NotFound) as caught:
            call(fake_ctx, "web")
        assert caught.value.message == f"no VM 'web': {wid} is a workspace"
    assert vm.vm_status(fake_ctx, vid)["state"] == "created"
    assert ws.workspace_status(fake_ctx, wid)["state"] == "running"


def test_a_started_vm_whose_ttl_ran_out_is_deleted_by_the_next_call_on_it(
    fake_ctx: Context,
) -> None:
    vid = vm.vm_start(fake_ctx, vm.vm_create(fake_ctx, "debian:12")["vm_id"])["vm_id"]
    with open_workspaces(fake_ctx, Kind.VM) as workspaces:
        workspaces.store.update(vid, expires_at=time.time() - 1)
    # Whether the keeper or this call deletes it, the call says it expired.
    with pytest.raises(Expired, match=f"^VM {vid} expired at "):
        vm.vm_exec(fake_ctx, vid, "true")
    with pytest.raises(Expired):
        vm.vm_status(fake_ctx, vid)
    assert _left_behind(fake_ctx) == []
    assert vm.vm_reap_expired(fake_ctx) == {"deleted": [], "count": 0}


def test_a_workspace_whose_ttl_ran_out_is_refused_as_expired_like_a_vm(
    fake_ctx: Context,
) -> None:
    wid = ws.workspace_create(fake_ctx, "debian:12", name="web", ttl_seconds=600)["id"]
    with open_workspaces(fake_ctx) as workspaces:
        workspaces.store.update(wid, expires_at=time.time() - 1)
    with pytest.raises(Expired, match=r"^workspace web expired at "):
        wc.workspace_exec(fake_ctx, "web", ["true"])
    with pytest.raises(Expired, match=f"^workspace {wid} expired at "):
        ws.workspace_status(fake_ctx, wid)
    assert _left_behind(fake_ctx) == []


def test_reconcile_repairs_a_vm_whose_vmm_died_and_it_starts_again(fake_ctx: Context) -> None:
    vid = vm.vm_start(fake_ctx, vm.vm_create(fake_ctx, "debian:12")["vm_id"])["vm_id"]
    os.killpg(vm.vm_status(fake_ctx, vid)["vmm_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while fake_vm.vmm_processes(fake_ctx.paths.run_root):
        assert time.monotonic() < deadline, "the VMM did not die of SIGKILL"
        time.sleep(0.02)
    assert ws.reconcile(fake_ctx)["stopped"] == [vid]  # `pyro reconcile` repairs VMs too
    status = vm.vm_status(fake_ctx, vid)
    assert (status["state"], status["vmm_pid"]) == ("stopped", None)
    assert "the VMM exited unexpectedly" in status["state_note"]
    assert vm.vm_start(fake_ctx, vid)["state"] == "started"
    assert vm.vm_exec(fake_ctx, vid, ["true"])["exit_code"] == 0


def test_a_started_vm_counts_against_the_hosts_limits_with_the_workspaces(
    fake_ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MAX_WORKSPACES_ENV, "1")
    vid = vm.vm_create(fake_ctx, "debian:12")["vm_id"]  # created: it holds nothing
    wid = ws.workspace_create(fake_ctx, "debian:12")["id"]
    with pytest.raises(TooLarge, match="1 workspaces are live, the limit is 1"):
        vm.vm_start(fake_ctx, vid)
    assert vm.vm_status(fake_ctx, vid)["state"] == "created"
    ws.workspace_stop(fake_ctx, wid)
    assert vm.vm_start(fake_ctx, vid)["state"] == "started"
    with pytest.raises(TooLarge, match="1 workspaces are live"):
        ws.workspace_start(fake_ctx, wid)


def test_the_orphan_sweep_leaves_a_started_vm_alone(fake_ctx: Context) -> None:
    vid = vm.vm_start(fake_ctx, vm.vm_create(fake_ctx, "debian:12")["vm_id"])["vm_id"]
    old = time.time() - 3600  # past the sweep's grace for young run directories
    os.utime(fake_ctx.paths.run_root / vid, (old, old))
    assert ws.reconcile(fake_ctx)["orphans"] == []
    assert vm.vm_exec(fake_ctx, vid, "echo alive")["stdout"] == "alive\n"


def test_the_keeper_deletes_a_started_vm_when_its_ttl_ends(fake_ctx: Context) -> None:
    vid = vm.vm_start(fake_ctx, vm.vm_create(fake_ctx, "debian:12")["vm_id"])["vm_id"]
    with open_workspaces(fake_ctx, Kind.VM) as workspaces:
        workspaces.store.update(vid, expires_at=time.time() + 1)
    assert records_left_after_ttl(fake_ctx.state_dir) == []  # no pyro operation runs
    assert _left_behind(fake_ctx) == []
    with pytest.raises(Expired):
        vm.vm_status(fake_ctx, vid)


def test_network_info_of_a_vm_without_network_says_it_has_none(fake_ctx: Context) -> None:
    vid = vm.vm_create(fake_ctx, "debian:12")["vm_id"]
    assert vm.vm_network_info(fake_ctx, vid) == {
        "vm_id": vid,
        "policy": "off",
        "allow_cidrs": [],
        "allow_hosts": [],
        "guest_ip": None,
        "gateway": None,
        "mac": None,
        "tap": None,
        "published_ports": [],
    }


def test_the_cli_walks_a_vm_and_exits_with_its_commands_exit_code(
    fake_ctx: Context, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from pyro_mcp.cli.main import main

    monkeypatch.setenv("PYRO_CACHE_DIR", str(fake_ctx.paths.cache_dir))
    monkeypatch.setenv("PYRO_RUN_DIR", str(fake_ctx.paths.run_root))
    monkeypatch.setenv("PYRO_STATE_DIR", str(fake_ctx.state_dir))
    assert main(["vm", "create", "debian:12", "--ttl-seconds", "120", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    vid = created["vm_id"]
    assert (created["state"], created["ttl_seconds"]) == ("created", 120.0)
    assert main(["vm", "start", vid, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "started"
    assert main(["vm", "exec", vid, "--json", "--", "sh", "-c", "echo out; exit 7"]) == 7
    assert json.loads(capsys.readouterr().out)["stdout"] == "out\n"
    assert main(["vm", "status", vid, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "started"
    assert main(["vm", "reap-expired", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"deleted": [], "count": 0}
    assert main(["vm", "delete", vid, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"deleted": vid}
    assert main(["vm", "status", vid, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["error"] == "not_found"
