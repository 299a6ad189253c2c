"""Booting the tiny guest: through the API, from a config file, and talking to its serial."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from fc_support import TINY_MARKER, VMFactory, build_tiny_guest

from pyro_mcp.errors import BootTimeout, VMError
from pyro_mcp.runtime.binaries import BinarySet
from pyro_mcp.vmm.firecracker import FirecrackerVM, vm_config

pytestmark = pytest.mark.firecracker


@pytest.mark.parametrize("config_file", [False, True], ids=["api", "config-file"])
def test_tiny_guest_boots_and_prints_its_marker(make_vm: VMFactory, config_file: bool) -> None:
    vm = make_vm()
    vm.start(config_file=config_file)

    boot_ms = vm.wait_for_console(TINY_MARKER, timeout_s=10)

    assert vm.status() == "running"
    assert 0 < boot_ms == vm.timings["console_marker_ms"]
    assert TINY_MARKER in vm.spec.console_log.read_text()
    if not config_file:
        assert vm.timings["api_ready_ms"] <= vm.timings["instance_started_ms"] <= boot_ms
    # Firecracker's own log is kept apart from the guest's console.
    assert "Running Firecracker v1.12.1" in vm.spec.vmm_log.read_text()
    assert "Running Firecracker" not in vm.spec.console_log.read_text()


def test_serial_input_is_echoed_by_the_guest(make_vm: VMFactory) -> None:
    vm = make_vm()
    vm.start()
    vm.wait_for_console(TINY_MARKER, timeout_s=10)
    offset = vm.console_size()

    vm.write_serial(b"hello, tiny guest\n")

    vm.wait_for_console(b"hello, tiny guest\n", timeout_s=5, since=offset)


def test_serial_input_needs_to_be_asked_for(make_vm: VMFactory) -> None:
    vm = make_vm(serial_input=False)
    vm.start()
    vm.wait_for_console(TINY_MARKER, timeout_s=10)

    with pytest.raises(VMError, match="serial_input=True"):
        vm.write_serial(b"x")


def test_wait_ready_without_an_agent_times_out_with_the_console_tail(
    make_vm: VMFactory,
) -> None:
    vm = make_vm()
    vm.start()
    vm.wait_for_console(TINY_MARKER, timeout_s=10)

    with pytest.raises(BootTimeout) as caught:
        vm.wait_ready(timeout_s=0.5)

    assert "guest agent never accepted a connection" in str(caught.value)
    assert TINY_MARKER in caught.value.console_tail
    assert vm.status() == "running"  # a failed wait does not harm the VM


def test_boot_arguments_select_the_vsock_channel(make_vm: VMFactory) -> None:
    vm = make_vm()

    config = vm_config(vm.spec)

    args = config["boot-source"]["boot_args"].split()
    for expected in ("pyro.channel=vsock", "console=ttyS0", "root=/dev/vda", "rw"):
        assert expected in args
    assert f"pyro.hostname={vm.spec.hostname}" in args
    assert config["vsock"]["uds_path"] == "v.sock"
    assert config["drives"][0]["is_root_device"] is True
    # A balloon the host can inflate to take memory back; it yields when the guest is short.
    assert config["balloon"] == {
        "amount_mib": 0,
        "deflate_on_oom": True,
        "stats_polling_interval_s": 0,
    }


def test_a_qcow2_root_disk_is_refused_before_anything_starts(make_vm: VMFactory) -> None:
    vm = make_vm(disk_format="qcow2")

    with pytest.raises(VMError, match="Firecracker needs raw disk images"):
        vm.start()

    assert vm.pid is None
    assert vm.status() == "created"


def test_a_new_run_in_the_same_run_dir_ignores_the_old_console(
    make_vm: VMFactory, fc_binaries: BinarySet, tmp_path: Path
) -> None:
    first = make_vm()
    first.start()
    first.wait_for_console(TINY_MARKER, timeout_s=10)
    first.kill()
    broken = dataclasses.replace(
        first.spec, kernel=build_tiny_guest(tmp_path, load_address=0x10000)
    )

    with FirecrackerVM(broken, fc_binaries, jailer=None) as second:
        second.start(config_file=True)
        with pytest.raises(VMError, match="Firecracker exited"):
            second.wait_for_console(TINY_MARKER, timeout_s=10)

    assert TINY_MARKER in first.spec.console_log.read_text()  # the old output is kept
