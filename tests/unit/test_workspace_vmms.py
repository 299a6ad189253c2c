"""Workspaces' VMMs: reconcile, stop, delete and crashes, found and ended by the identity
recorded at launch, for every kind of VMM (tests/fake_vmm: a fake Firecracker with the real
argv shape, launched through pyro's jailer code into the jailer's directory layout, or
directly; a fake QEMU with pyro's QEMU argv).

Firecracker's command line names neither the run directory nor the jail (``--id`` and
relative names only): nothing may judge it by its command line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.fake_vmm.harness import FakeHost, FakeHostFactory
from tests.leftovers import mounts_under, process_running, vm_cgroups

from pyro_mcp.errors import PyroError
from pyro_mcp.vmm.attach import AgentEndpoint, attach
from pyro_mcp.vmm.firecracker import jail_release
from pyro_mcp.workspace.lifecycle import Workspaces
from pyro_mcp.workspace.store import WorkspaceRecord

# How pyro runs the VMM. Jailed, the disks are hard-linked into the jail, or bind-mounted
# from another filesystem.
VMM_KINDS = {
    "firecracker-jailed": {"jailed": True},
    "firecracker-jailed-bind-mounts": {"jailed": True, "other_filesystem": True},
    "firecracker-direct": {"jailed": False},
    "qemu": {"backend": "qemu"},
}
EVERY_KIND = pytest.mark.parametrize("kind", list(VMM_KINDS))


def _wait_gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while process_running(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not process_running(pid)


def _running_workspace(
    fake_host: FakeHostFactory, kind: str
) -> tuple[FakeHost, Workspaces, WorkspaceRecord]:
    host = fake_host(**VMM_KINDS[kind])
    workspaces = host.open()
    return host, workspaces, workspaces.create("debian:12", disk_mib=16)


def _nothing_of_the_vm_left(host: FakeHost, workspaces: Workspaces, workspace_id: str) -> None:
    assert not (host.paths.run_root / workspace_id).exists()
    assert mounts_under([host.paths.run_root, host.state_dir]) == []
    assert vm_cgroups([workspace_id]) == []
    assert host.running_vmms() == []
    files = workspaces.layout.workspace(workspace_id)
    for disk in (files.workspace_disk, files.root_disk(host.backend)):
        if disk.exists():  # kept (stop, crash): given back whole
            assert disk.stat().st_uid == files.directory.stat().st_uid  # lent to the jail
            assert disk.stat().st_nlink == 1  # no hard link of the jail holds its space


@EVERY_KIND
def test_reconcile_keeps_a_running_workspace_running(fake_host: FakeHostFactory, kind: str) -> None:
    host, workspaces, record = _running_workspace(fake_host, kind)
    pid = host.vmm_pid(record.id)
    if host.backend == "firecracker":
        assert str(host.paths.run_root).encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()

    workspaces.reconcile()

    assert workspaces.store.get(record.id).state == "running"
    assert process_running(pid)
    with workspaces.agent(record.id, "exec") as client:  # its agent is still reachable
        assert client.exec(["echo", "still here"]).stdout == b"still here\n"
    assert host.running_vmms() == [pid]  # no second VMM was started


@EVERY_KIND
def test_stopping_a_workspace_leaves_no_vmm_jail_mount_or_cgroup(
    fake_host: FakeHostFactory, kind: str
) -> None:
    host, workspaces, record = _running_workspace(fake_host, kind)
    if host.jailed:
        assert host.jail_dir(record.id).is_dir() and vm_cgroups([record.id])
    if "bind-mounts" in kind:
        assert mounts_under([host.jail_dir(record.id)]), "the jail bind-mounts the disks"

    stopped = workspaces.stop(record.id)

    assert stopped.state == "stopped"
    _nothing_of_the_vm_left(host, workspaces, record.id)
    # The disks are kept, and it boots again (a jail left in place would refuse that).
    started = workspaces.start(record.id)
    assert started.state == "running" and len(host.running_vmms()) == 1


@EVERY_KIND
def test_deleting_a_running_workspace_ends_its_vmm_and_leaves_nothing(
    fake_host: FakeHostFactory, kind: str
) -> None:
    host, workspaces, record = _running_workspace(fake_host, kind)
    pid = host.vmm_pid(record.id)

    workspaces.delete(record.id)

    assert _wait_gone(pid, 0.5), "the VMM of a deleted workspace still runs"
    _nothing_of_the_vm_left(host, workspaces, record.id)
    assert not workspaces.layout.workspace(record.id).directory.exists()
    assert workspaces.store.list() == []


@EVERY_KIND
def test_reconcile_cleans_up_after_a_crash_and_the_workspace_boots_again(
    fake_host: FakeHostFactory, kind: str
) -> None:
    host, workspaces, record = _running_workspace(fake_host, kind)
    pid = host.vmm_pid(record.id)
    os.kill(pid, signal.SIGKILL)
    assert _wait_gone(pid)

    report = workspaces.reconcile()

    assert report["stopped"] == [record.id]
    assert workspaces.store.get(record.id).state == "stopped"
    _nothing_of_the_vm_left(host, workspaces, record.id)
    assert workspaces.layout.workspace(record.id).workspace_disk.exists()  # kept
    started = workspaces.start(record.id)
    assert started.state == "running"
    assert host.running_vmms() == [host.vmm_pid(record.id)]


def test_a_process_that_names_the_run_directory_is_not_taken_for_the_vmm(
    fake_host: FakeHostFactory,
) -> None:
    host, workspaces, record = _running_workspace(fake_host, "firecracker-direct")
    run_dir = host.paths.run_root / record.id
    pid = host.vmm_pid(record.id)
    # Someone else's process whose command line happens to name the run directory.
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", str(run_dir)],
        start_new_session=True,
    )
    try:
        os.kill(pid, signal.SIGKILL)  # the VMM crashes
        assert _wait_gone(pid)

        workspaces.reconcile()

        assert workspaces.store.get(record.id).state == "stopped"
        assert bystander.poll() is None, "reconcile killed a process that is not the VMM"
    finally:
        bystander.kill()
        bystander.wait()


@EVERY_KIND
def test_a_stopping_workspace_counts_as_active_in_the_orphan_sweep(
    fake_host: FakeHostFactory, kind: str
) -> None:
    host, workspaces, record = _running_workspace(fake_host, kind)
    pid = host.vmm_pid(record.id)
    run_dir = host.paths.run_root / record.id
    # Another process is stopping it (its guest is syncing), for longer than the grace.
    workspaces.store.transition(record.id, "stopping", expect={"running"})
    old = time.time() - 3600
    os.utime(run_dir, (old, old))

    report = workspaces.reconcile()

    assert report["orphans"] == []
    assert workspaces.store.get(record.id).state == "stopping"
    assert process_running(pid) and run_dir.is_dir()
    endpoint = workspaces.store.get(record.id).agent_endpoint
    assert endpoint is not None
    with attach(AgentEndpoint.from_str(endpoint), timeout_s=5) as client:  # it still answers
        assert client.exec(["true"]).exit_code == 0


def test_a_jail_that_cannot_be_cleaned_up_fails_its_workspace_and_reconcile_goes_on(
    fake_host: FakeHostFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = fake_host(**VMM_KINDS["firecracker-jailed-bind-mounts"])
    workspaces = host.open()
    stuck = workspaces.create("debian:12", disk_mib=16)
    other = workspaces.create("debian:12", disk_mib=16)
    for record in (stuck, other):
        os.kill(host.vmm_pid(record.id), signal.SIGKILL)
        assert _wait_gone(host.vmm_pid(record.id))
    real_run = jail_release.run

    def umount_fails_in_one_jail(argv: list[str], **kwargs: object) -> object:
        if argv[0] == "umount" and f"/{stuck.id}/root/" in argv[-1]:
            raise PyroError(f"umount: {argv[-1]}: target is busy")
        return real_run(argv, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(jail_release, "run", umount_fails_in_one_jail)

    report = workspaces.reconcile()

    assert report["failed"] == [stuck.id] and report["stopped"] == [other.id]
    failed = workspaces.store.get(stuck.id)
    assert failed.state == "failed" and "left in place" in (failed.error or "")
    assert mounts_under([host.jail_dir(stuck.id)]), "the jail was not removed through its mounts"
    assert (workspaces.layout.workspace(stuck.id).workspace_disk).stat().st_size > 0
    monkeypatch.setattr(jail_release, "run", real_run)
    workspaces.delete(stuck.id)  # once the mount can go, everything goes
    _nothing_of_the_vm_left(host, workspaces, stuck.id)
