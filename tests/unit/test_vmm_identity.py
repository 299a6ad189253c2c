"""A VMM is known by the identity recorded at launch (pid + start time) and ended, with
everything its VM holds, by any process from its run directory (``vmm/recorded.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.fake_vmm.harness import FakeHostFactory
from tests.leftovers import leftovers, mounts_under, process_running, vm_cgroups

from pyro_mcp.vmm.identity import (
    RUN_DIR_MARKER,
    ProcessIdentity,
    VMMRecord,
    is_run_dir,
    mark_run_dir,
)
from pyro_mcp.vmm.qemu import confinement
from pyro_mcp.vmm.recorded import RecordedVMM


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True
    )
    yield process
    process.kill()
    process.wait()


def test_a_recorded_vmm_is_alive_until_killed_by_a_later_process(
    fake_host: FakeHostFactory,
) -> None:
    host = fake_host(jailed=False)
    started = host.in_child("launch")  # the launching process has exited
    vmm = RecordedVMM.load(Path(started["run_dir"]))
    assert vmm.pid == started["pid"] and vmm.record is not None
    assert vmm.record.backend == "firecracker"

    assert vmm.alive()
    vmm.kill()

    assert not vmm.alive() and not process_running(started["pid"])
    vmm.end()
    assert not Path(started["run_dir"]).exists()


def test_a_process_that_took_over_the_pid_is_not_the_vmm(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    run_dir = mark_run_dir(tmp_path / "vm1")
    now = ProcessIdentity.of(sleeper.pid)
    assert now is not None
    # The VMM had this pid once, and exited; another process got the pid since.
    VMMRecord("qemu", "vm1", ProcessIdentity(sleeper.pid, now.start - 1)).save(run_dir)
    vmm = RecordedVMM.load(run_dir)

    assert not vmm.alive()
    vmm.end()

    assert sleeper.poll() is None, "the process that reused the pid was killed"
    assert not run_dir.exists()


def test_a_vm_launched_by_another_process_is_ended_with_its_jail_mounts_and_cgroups(
    fake_host: FakeHostFactory,
) -> None:
    host = fake_host(jailed=True)
    # A writable disk on another filesystem than the jail: it is bind-mounted into it.
    shm = Path(tempfile.mkdtemp(prefix="pyro-u-", dir="/dev/shm"))
    try:
        disk = shm / "data.ext4"
        disk.write_bytes(b"the user's data\n" * 4096)
        owner = disk.stat().st_uid
        started = host.in_child("launch", extra_disks=[str(disk)])
        jail = Path(started["jail_dir"])
        assert mounts_under([jail]) and vm_cgroups([started["vm_id"]])
        assert disk.stat().st_uid != owner  # lent to the jail's user

        RecordedVMM.load(Path(started["run_dir"])).end()

        assert not process_running(started["pid"])
        assert not jail.exists() and not Path(started["run_dir"]).exists()
        assert leftovers(host.paths.run_root, [started["vm_id"]], extra_roots=[shm]) == []
        assert disk.read_bytes() == b"the user's data\n" * 4096  # through the mount, intact
        assert disk.stat().st_uid == owner
    finally:
        for mount in mounts_under([shm]):
            subprocess.run(["umount", "-l", str(mount)], check=False)
        subprocess.run(["rm", "-rf", str(shm)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root")
def test_a_qemu_vmm_is_ended_and_its_cgroups_released_through_the_same_interface(
    tmp_path: Path,
) -> None:
    vm_id = f"uq{os.getpid()}"
    made, _ = confinement._make_cgroups(vm_id, 256, 1)
    if not made:
        pytest.skip("this host offers no cgroup controller to confine with")
    qemu = subprocess.Popen(  # stands in for a confined QEMU, in its cgroups
        [sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True
    )
    try:
        for directory in made:
            (directory / "cgroup.procs").write_text(str(qemu.pid))
        run_dir = mark_run_dir(tmp_path / vm_id)
        VMMRecord("qemu", vm_id, ProcessIdentity.of(qemu.pid)).save(run_dir)

        RecordedVMM.load(run_dir).end()

        assert qemu.wait(timeout=5) == -9
        assert vm_cgroups([vm_id]) == [] and not run_dir.exists()
    finally:
        qemu.kill()
        qemu.wait()
        confinement.release(vm_id)


def test_a_run_directory_without_a_record_is_cleaned_up_as_either_backend_leaves_one(
    tmp_path: Path,
) -> None:
    run_dir = mark_run_dir(tmp_path / "vm2")  # its launch died before recording anything
    (run_dir / "console.log").write_text("booting\n")

    vmm = RecordedVMM.load(run_dir)
    assert vmm.record is None and not vmm.alive()
    vmm.end()

    assert not run_dir.exists()


def test_only_directories_pyro_marked_count_as_run_directories(tmp_path: Path) -> None:
    marked = mark_run_dir(tmp_path / "a" / "vm3")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "vmm.json").write_text('{"backend": "qemu", "vm_id": "plain"}')
    link = tmp_path / "link"
    link.symlink_to(marked)
    fake_marker = tmp_path / "fake"
    fake_marker.mkdir()
    (fake_marker / RUN_DIR_MARKER).symlink_to(marked / RUN_DIR_MARKER)

    assert is_run_dir(marked)
    assert not is_run_dir(plain) and not is_run_dir(link) and not is_run_dir(fake_marker)
    RecordedVMM.load(plain).end()  # not pyro's: nothing in it is touched
    RecordedVMM.load(link).end()
    assert (plain / "vmm.json").exists() and marked.is_dir()
