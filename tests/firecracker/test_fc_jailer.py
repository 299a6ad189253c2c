"""Launching through the jailer (root only): chroot, dropped ids, PID namespace, cleanup."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fc_support import TINY_MARKER, VMFactory, proc_status, process_running, vmm_processes

from pyro_mcp.errors import VMError
from pyro_mcp.runtime.binaries import BinarySet
from pyro_mcp.vmm.base import Disk, VMSpec
from pyro_mcp.vmm.firecracker import FirecrackerVM, JailerConfig
from pyro_mcp.vmm.firecracker.jailer import JAIL_GID, JAIL_UID_BASE, JailRoot

pytestmark = [
    pytest.mark.firecracker,
    pytest.mark.skipif(os.geteuid() != 0, reason="the jailer needs root"),
]


def jailed_vm(make_vm: VMFactory) -> tuple[FirecrackerVM, JailRoot, JailerConfig]:
    vm = make_vm(jailed=True)
    vm.start()
    vm.wait_for_console(TINY_MARKER, timeout_s=10)
    assert isinstance(vm.root, JailRoot) and vm.jailer is not None
    return vm, vm.root, vm.jailer


def test_firecracker_runs_chrooted_as_the_jail_user_in_its_own_pid_namespace(
    make_vm: VMFactory, tiny_disk: Path
) -> None:
    vm, jail, config = jailed_vm(make_vm)
    pid = vm.pid
    assert pid is not None
    status = proc_status(pid)

    assert vm.jailed and vm.process is not None and vm.process.returncode == 0  # jailer left
    assert status["Uid"].split() == [str(config.uid)] * 4
    assert status["Gid"].split() == [str(config.gid)] * 4
    assert status["NSpid"].split() == [str(pid), "1"]  # PID 1 of a new namespace
    # Its "/" is the jail (pivot_root in its own mount namespace).
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    seen_root = os.stat(f"/proc/{pid}/root/{vm.api_socket.name}")
    assert (seen_root.st_dev, seen_root.st_ino) == (
        vm.api_socket.stat().st_dev,
        vm.api_socket.stat().st_ino,
    )
    assert jail.root == vm.spec.run_dir / "jail" / "firecracker" / vm.spec.vm_id / "root"
    assert (jail.root / "firecracker.pid").read_text().strip() == str(pid)
    assert vm.api_socket.is_socket() and vm.api_socket.parent == jail.root
    # The writable root disk is the caller's file, lent to the jail user while it runs.
    assert tiny_disk.stat().st_uid == config.uid
    assert (jail.root / "drive0").stat().st_ino == tiny_disk.stat().st_ino


def test_the_jail_puts_firecracker_in_its_cgroup(make_vm: VMFactory) -> None:
    vm, jail, config = jailed_vm(make_vm)
    cgroups = jail.cgroup_dirs()

    assert cgroups, "the jailer made no cgroup"
    for directory in cgroups:
        assert directory.name == vm.spec.vm_id and directory.parent.name == config.parent_cgroup
        assert str(vm.pid) in (directory / "cgroup.procs").read_text().split()
    if config.resolved_cgroup_version() == 1:
        assert (cgroups[0] / "cpu.shares").read_text().strip() == "512"


def test_sigterm_does_not_stop_a_jailed_firecracker_but_kill_does(make_vm: VMFactory) -> None:
    vm, _, _ = jailed_vm(make_vm)
    pid = vm.pid
    assert pid is not None

    os.kill(pid, signal.SIGTERM)
    time.sleep(0.2)
    assert vm.status() == "running"  # PID 1 of its namespace: SIGTERM has no default action

    vm.kill()
    assert not process_running(pid)


def test_killing_a_jailed_vm_leaves_nothing_behind(make_vm: VMFactory, tiny_disk: Path) -> None:
    owner = tiny_disk.stat().st_uid
    vm, jail, _ = jailed_vm(make_vm)
    pid = vm.pid
    assert pid is not None
    cgroups = jail.cgroup_dirs()

    vm.kill()

    assert vm.status() == "exited"
    assert not process_running(pid)
    assert not jail.jail_dir.exists() and not (vm.spec.run_dir / "jail").exists()
    assert not [p for p in vm.spec.run_dir.rglob("*") if p.is_socket()]
    assert not any(directory.exists() for directory in cgroups)
    assert tiny_disk.stat().st_uid == owner  # the disk is given back
    assert TINY_MARKER in vm.spec.console_log.read_text()  # the logs stay
    # Firecracker was the host init's child: it reaps the exited process, no orphan stays.
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists()


def test_a_jailed_snapshot_restores_in_another_jail_and_without_one(
    make_vm: VMFactory, tmp_path: Path
) -> None:
    source, _, _ = jailed_vm(make_vm)
    snapshot = source.create_snapshot(tmp_path / "snap")
    memory = snapshot.memory_path.stat()
    assert (memory.st_uid, memory.st_gid, memory.st_mode & 0o777) == (0, JAIL_GID, 0o640)
    source.kill()

    for jailed in (True, False):
        restored = make_vm(jailed=jailed)
        restored.restore(snapshot)
        offset = restored.console_size()
        restored.write_serial(b"restored\n")
        restored.wait_for_console(b"restored\n", timeout_s=5, since=offset)
        if jailed:
            # Shared read-only through the common jail group: linked, not copied.
            assert (restored.root.root / "snapshot.mem").stat().st_ino == memory.st_ino


def test_a_jailer_failure_is_reported_and_leaves_nothing(make_vm: VMFactory) -> None:
    config = JailerConfig(uid=JailerConfig.for_vm("x").uid, cgroups=("cpu.no_such_knob=1",))
    vm = make_vm(jailer=config)
    assert isinstance(vm.root, JailRoot)

    with pytest.raises(VMError, match="the jailer failed") as caught:
        vm.start()

    assert "no_such_knob" in str(caught.value)  # the jailer's own words, from its log
    assert vm.status() == "exited"
    assert vmm_processes(vm.spec.vm_id) == []
    assert not vm.root.jail_dir.exists()
    assert not any(directory.exists() for directory in vm.root.cgroup_dirs())


@pytest.fixture
def shm_disk() -> Iterator[Path]:
    """A raw disk on /dev/shm: another filesystem than the jail's."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    fd, name = tempfile.mkstemp(prefix="pyro-fc-", suffix=".raw", dir="/dev/shm")
    os.write(fd, b"keep me")
    os.ftruncate(fd, 1 << 20)
    os.close(fd)
    yield Path(name)
    Path(name).unlink(missing_ok=True)


def test_a_disk_on_another_filesystem_is_bind_mounted_then_unmounted(
    make_vm: VMFactory, shm_disk: Path
) -> None:
    if os.stat("/dev/shm").st_dev == os.stat("/tmp").st_dev:
        pytest.skip("/dev/shm and /tmp are the same filesystem here")
    vm = make_vm(jailed=True, disk=shm_disk)
    vm.start()
    vm.wait_for_console(TINY_MARKER, timeout_s=10)
    drive = vm.root.host_path("drive0")

    assert drive.stat().st_ino == shm_disk.stat().st_ino
    assert str(drive) in Path("/proc/self/mountinfo").read_text()

    vm.kill()

    assert str(drive) not in Path("/proc/self/mountinfo").read_text()
    assert shm_disk.read_bytes()[:7] == b"keep me"
    assert shm_disk.stat().st_uid == os.geteuid()


def test_a_kernel_the_jail_user_cannot_read_is_copied_not_chowned(
    make_vm: VMFactory, tiny_kernel: Path, tmp_path: Path
) -> None:
    private = tmp_path / "vmlinux"
    shutil.copyfile(tiny_kernel, private)
    private.chmod(0o600)
    vm = make_vm(jailed=True, kernel=private)

    vm.start()
    vm.wait_for_console(TINY_MARKER, timeout_s=10)

    assert vm.root.host_path("vmlinux").stat().st_ino != private.stat().st_ino
    assert (private.stat().st_uid, private.stat().st_mode & 0o777) == (os.geteuid(), 0o600)


def test_as_root_the_jailer_is_the_default(
    fc_binaries: BinarySet, tiny_kernel: Path, tiny_disk: Path, short_dir: Path
) -> None:
    spec = VMSpec(
        vm_id="defaults",
        run_dir=short_dir / "defaults",
        kernel=tiny_kernel,
        root_disk=Disk(tiny_disk),
    )

    vm = FirecrackerVM(spec, fc_binaries)

    assert vm.jailer is not None and vm.jailer.uid >= JAIL_UID_BASE
    assert vm.jailer == JailerConfig.for_vm("defaults")  # stable for a given VM id
    assert vm.root.root == spec.run_dir / "jail" / "firecracker" / "defaults" / "root"
