"""A Firecracker that dies under the VM is noticed, and cleanup still leaves nothing."""

from __future__ import annotations

import os
import signal

import pytest
from fc_support import TINY_MARKER, VMFactory, process_running, vmm_processes

from pyro_mcp.errors import VMError

pytestmark = pytest.mark.firecracker

MODES = [
    pytest.param(False, id="direct"),
    pytest.param(
        True,
        id="jailed",
        marks=pytest.mark.skipif(os.geteuid() != 0, reason="the jailer needs root"),
    ),
]


@pytest.mark.parametrize("jailed", MODES)
def test_a_killed_firecracker_is_detected_and_cleaned_up(make_vm: VMFactory, jailed: bool) -> None:
    vm = make_vm(jailed=jailed)
    vm.start()
    vm.wait_for_console(TINY_MARKER, timeout_s=10)
    pid = vm.pid
    assert pid is not None

    os.kill(pid, signal.SIGKILL)

    assert vm.wait(timeout_s=5)
    assert vm.status() == "exited"
    assert not vm.alive()
    if not jailed:
        assert vm.returncode == -signal.SIGKILL
    with pytest.raises(VMError, match="Firecracker exited"):
        vm.wait_for_console("never printed", timeout_s=5)
    with pytest.raises(VMError, match="Firecracker exited"):
        vm.pause()

    vm.kill()
    vm.kill()  # idempotent

    assert vm.status() == "exited"
    assert not process_running(pid)
    assert vmm_processes(vm.spec.vm_id) == []
    leftovers = sorted(p.name for p in vm.spec.run_dir.iterdir())
    # The logs stay, with pyro's marker and the record of which process the VMM was.
    assert leftovers == [".pyro-run-dir", "console.log", "vmm.json", "vmm.log"]


def test_stop_without_an_agent_kills_the_vm(make_vm: VMFactory) -> None:
    vm = make_vm()
    vm.start()
    vm.wait_for_console(TINY_MARKER, timeout_s=10)

    vm.stop(timeout_s=0.1)

    assert vm.status() == "exited"
    assert vmm_processes(vm.spec.vm_id) == []


def test_a_vm_object_is_used_once(make_vm: VMFactory) -> None:
    vm = make_vm()
    vm.start()
    vm.kill()

    with pytest.raises(VMError, match="already launched"):
        vm.start()
