"""The cgroups that confine a QEMU go with it, however slowly its process ends."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from pyro_mcp.vmm.qemu import confinement

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root")


def test_release_removes_the_cgroups_even_while_the_vmm_is_still_ending() -> None:
    vm_id = f"test-{uuid.uuid4().hex[:8]}"
    made, _ = confinement._make_cgroups(vm_id, mem_mib=64, vcpus=1)
    assert made, "this host offers no cgroup controller pyro uses"
    # A process still in the VM's cgroups when release runs: a VMM that was killed but
    # has not finished exiting (freeing guest RAM takes a while), or a stray child.
    straggler = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        for directory in made:
            (directory / "cgroup.procs").write_text(str(straggler.pid))
        confinement.release(vm_id)
        assert [d for d in made if d.exists()] == []
        assert straggler.wait(timeout=5) == -9
    finally:
        straggler.kill()
        straggler.wait()
        for directory in made:
            if directory.exists():
                directory.rmdir()
