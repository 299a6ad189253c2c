"""The "leaves nothing behind" checks (tests/leftovers.py) can fail: each kind of thing a VM
leaves, whichever its VMM, is named."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.leftovers import leftovers, mounts_under, vmm_processes

from pyro_mcp.vmm.firecracker.jail_release import JailState, release_jail


@pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts and cgroups need root")
def test_a_left_jail_its_mount_cgroup_and_run_directory_are_each_named(tmp_path: Path) -> None:
    vm_id = f"ul{os.getpid()}"
    run_root = tmp_path / "run"
    jail = run_root / vm_id / "jail" / "firecracker" / vm_id
    (jail / "root").mkdir(parents=True)
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"data")
    target = jail / "root" / "drive0"
    target.touch()
    subprocess.run(["mount", "--bind", str(disk), str(target)], check=True)
    cgroups = [group / "pyro-mcp" / vm_id for group in Path("/sys/fs/cgroup").glob("cpu")]
    for group in cgroups:
        group.mkdir(parents=True)
    JailState(cgroups=cgroups).save(jail)
    try:
        problems = "\n".join(leftovers(run_root, [vm_id]))

        assert f"run directories left behind: ['{vm_id}']" in problems
        assert f"mounts left behind: ['{target}']" in problems
        for group in cgroups:
            assert str(group) in problems
    finally:
        release_jail(jail)
    assert mounts_under([run_root]) == [] and not jail.exists()
    assert all(not group.exists() for group in cgroups)


def test_a_qemu_naming_the_run_root_is_a_left_vmm(tmp_path: Path) -> None:
    # What a leaked QEMU looks like to the check: its program name and its socket paths.
    fake_qemu = tmp_path / "qemu-system-x86_64"
    fake_qemu.symlink_to(sys.executable)
    qemu = subprocess.Popen(
        [str(fake_qemu), "-c", "import time; time.sleep(60)", f"unix:{tmp_path}/vm/qmp.sock"]
    )
    try:
        deadline = time.monotonic() + 5
        while not vmm_processes([tmp_path]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [line.split()[0] for line in vmm_processes([tmp_path])] == [str(qemu.pid)]
        assert vmm_processes([tmp_path / "elsewhere"]) == []
    finally:
        qemu.kill()
        qemu.wait()
    assert vmm_processes([tmp_path]) == []
