"""Configuration mistakes come back as VMErrors carrying Firecracker's own fault message."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fc_support import TINY_MARKER, VMFactory, build_tiny_guest, process_running, vmm_processes

from pyro_mcp.errors import VMError
from pyro_mcp.vmm.firecracker import FirecrackerAPIError

pytestmark = pytest.mark.firecracker


def test_zero_vcpus_is_refused_with_firecrackers_fault_message(make_vm: VMFactory) -> None:
    vm = make_vm()
    vm.launch()

    with pytest.raises(FirecrackerAPIError) as caught:
        vm.api.machine_config.put(vcpu_count=0, mem_size_mib=128)

    assert caught.value.status == 400
    assert "The number of vCPUs must be greater than 0" in caught.value.fault_message
    assert "PUT /machine-config" in str(caught.value)
    assert vm.status() == "created"  # a refused request leaves the VM usable


def test_unknown_fields_are_refused_and_none_fields_dropped(make_vm: VMFactory) -> None:
    vm = make_vm()
    vm.launch()

    vm.api.machine_config.put(vcpu_count=2, mem_size_mib=256, smt=None)
    with pytest.raises(FirecrackerAPIError, match="unknown field `bogus`"):
        vm.api.machine_config.put(vcpu_count=1, mem_size_mib=128, bogus=1)

    assert vm.api.machine_config.get() == {
        "vcpu_count": 2,
        "mem_size_mib": 256,
        "smt": False,
        "track_dirty_pages": False,
        "huge_pages": "None",
    }


def test_a_missing_kernel_fails_start_and_leaves_nothing_running(
    make_vm: VMFactory, tmp_path: Path
) -> None:
    vm = make_vm(kernel=tmp_path / "no-such-vmlinux")

    with pytest.raises(VMError, match="No such file or directory") as caught:
        vm.start()

    assert isinstance(caught.value, FirecrackerAPIError)
    assert "kernel file cannot be opened" in caught.value.fault_message
    assert vm.status() == "exited"
    assert vmm_processes(vm.spec.vm_id) == []
    assert not (vm.spec.run_dir / "root").exists()
    # The logs are kept for whoever investigates.
    assert "kernel file cannot be opened" in vm.spec.vmm_log.read_text()


def test_a_kernel_below_one_mib_is_refused_at_instance_start(
    make_vm: VMFactory, tmp_path: Path
) -> None:
    low_kernel = build_tiny_guest(tmp_path, load_address=0x10000)
    vm = make_vm(kernel=low_kernel)

    with pytest.raises(FirecrackerAPIError, match="Invalid entry address") as caught:
        vm.start()

    assert "PUT /actions" in str(caught.value)
    assert vm.pid is None


def test_kill_ends_a_vm_whose_configuration_was_refused(make_vm: VMFactory, tmp_path: Path) -> None:
    vm = make_vm(kernel=tmp_path / "missing")
    vm.launch()
    pid = vm.pid
    assert pid is not None and process_running(pid)

    with pytest.raises(FirecrackerAPIError):
        vm.configure()
    vm.kill()

    assert not process_running(pid)
    assert vm.status() == "exited"


@pytest.mark.parametrize(
    "jailed",
    [
        pytest.param(False, id="direct"),
        pytest.param(
            True,
            id="jailed",
            marks=pytest.mark.skipif(os.geteuid() != 0, reason="the jailer needs root"),
        ),
    ],
)
def test_a_config_file_boot_failure_is_explained_by_the_wait(
    make_vm: VMFactory, tmp_path: Path, jailed: bool
) -> None:
    vm = make_vm(jailed=jailed, kernel=build_tiny_guest(tmp_path, load_address=0x10000))
    vm.start(config_file=True)  # Firecracker applies the file itself, after we return

    with pytest.raises(VMError, match="Firecracker exited") as caught:
        vm.wait_for_console(TINY_MARKER, timeout_s=10)

    assert "Invalid entry address" in str(caught.value)
    assert vm.status() == "exited"
    vm.kill()
    assert vmm_processes(vm.spec.vm_id) == []
