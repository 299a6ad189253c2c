"""Pause/resume, full snapshots, and restoring them into new Firecracker processes."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
from fc_support import TINY_MARKER, VMFactory

from pyro_mcp.errors import NotFound, VMError
from pyro_mcp.vmm.firecracker import FirecrackerVM, Snapshot

pytestmark = pytest.mark.firecracker


def booted(make_vm: VMFactory, *, jailed: bool = False) -> FirecrackerVM:
    vm = make_vm(jailed=jailed)
    vm.start()
    vm.wait_for_console(TINY_MARKER, timeout_s=10)
    return vm


def assert_echoes(vm: FirecrackerVM, text: bytes) -> None:
    offset = vm.console_size()
    vm.write_serial(text)
    vm.wait_for_console(text, timeout_s=5, since=offset)


def test_a_paused_guest_does_not_run_until_resumed(make_vm: VMFactory) -> None:
    vm = booted(make_vm)
    offset = vm.console_size()

    vm.pause()
    vm.write_serial(b"typed while paused\n")
    time.sleep(0.3)

    assert vm.status() == "paused"
    assert vm.console_size() == offset  # no echo: the vCPU is stopped
    vm.resume()
    assert vm.status() == "running"
    vm.wait_for_console(b"typed while paused\n", timeout_s=5, since=offset)


def test_a_snapshot_restores_into_a_new_process_with_its_vcpu_state(
    make_vm: VMFactory, tmp_path: Path
) -> None:
    source = booted(make_vm)
    assert_echoes(source, b"before the snapshot\n")

    snapshot = source.create_snapshot(tmp_path / "snap")

    assert source.status() == "paused"
    assert snapshot.state_path.is_file()
    assert snapshot.memory_path.stat().st_size == 128 << 20
    assert snapshot.created_ms == source.timings["snapshot_create_ms"] > 0
    assert Snapshot.load(tmp_path / "snap") == snapshot

    restored = make_vm()
    restored.restore(snapshot)

    assert restored.pid != source.pid
    assert restored.status() == "running"
    assert restored.timings["snapshot_load_ms"] > 0
    assert_echoes(restored, b"after the restore\n")
    # It resumed inside the echo loop: the guest did not boot again.
    assert TINY_MARKER not in restored.spec.console_log.read_text()


def test_one_snapshot_restores_many_times_and_the_source_goes_on(
    make_vm: VMFactory, tmp_path: Path
) -> None:
    source = booted(make_vm)
    snapshot = source.create_snapshot(tmp_path / "snap", resume=True)
    assert source.status() == "running"
    assert_echoes(source, b"source still runs\n")

    clones = [make_vm() for _ in range(2)]
    for clone in clones:
        clone.restore(snapshot)
    for index, clone in enumerate(clones):
        assert_echoes(clone, f"clone {index}\n".encode())


def test_restore_can_leave_the_vm_paused(make_vm: VMFactory, tmp_path: Path) -> None:
    snapshot = booted(make_vm).create_snapshot(tmp_path / "snap")
    restored = make_vm()

    restored.restore(snapshot, resume=False)

    assert restored.status() == "paused"
    restored.resume()
    assert_echoes(restored, b"resumed later\n")


def test_a_snapshot_from_another_firecracker_release_is_refused(
    make_vm: VMFactory, tmp_path: Path
) -> None:
    snapshot = booted(make_vm).create_snapshot(tmp_path / "snap")
    foreign = dataclasses.replace(snapshot, firecracker_version="v0.0.1")
    restored = make_vm()

    with pytest.raises(VMError, match=r"written by Firecracker v0\.0\.1"):
        restored.restore(foreign)

    assert restored.pid is None
    assert restored.status() == "created"


def test_a_snapshot_without_its_memory_file_is_not_found(
    make_vm: VMFactory, tmp_path: Path
) -> None:
    snapshot = booted(make_vm).create_snapshot(tmp_path / "snap")
    snapshot.memory_path.unlink()

    with pytest.raises(NotFound, match=r"lacks vm\.mem"):
        Snapshot.load(snapshot.directory)
