"""The orphan sweeps (one-shot VMs whose owner died; VMMs no workspace owns) end what pyro
started and touch nothing else, whatever ``PYRO_RUN_DIR`` holds besides pyro's run
directories and whatever other processes' command lines say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.fake_vmm.harness import FakeHostFactory
from tests.leftovers import mounts_under, process_running, vm_cgroups

from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.vmm import ownership
from pyro_mcp.workspace.lifecycle import Workspaces

VMM_KINDS = {
    "firecracker-jailed": {"jailed": True},
    "firecracker-direct": {"jailed": False},
    "qemu": {"backend": "qemu"},
}
EVERY_KIND = pytest.mark.parametrize("kind", list(VMM_KINDS))


def _age(path: Path, seconds: float = 3600) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    return int(done.stdout)


def test_sweeps_touch_neither_unrelated_directories_nor_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"  # a PYRO_RUN_DIR like /tmp: other programs' things in it
    project = shared / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    hexlike = shared / "0123456789ab"  # named like a VM id
    hexlike.mkdir()
    (hexlike / "notes.txt").write_text("mine\n")
    lookalike = shared / "build-cache"  # another program's owner.json, its owner gone
    lookalike.mkdir()
    (lookalike / "owner.json").write_text(json.dumps({"owner_pid": _dead_pid(), "vmm_pid": 1}))
    for path in (project, hexlike, lookalike, shared):
        _age(path)
    # Unrelated processes whose command lines name that directory and its subdirectories.
    bystanders = [
        subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(120)", str(where)],
            start_new_session=True,
        )
        for where in (shared, project, hexlike)
    ]
    monkeypatch.setenv("PYRO_RUN_DIR", str(shared))
    paths = RuntimePaths(cache_dir=tmp_path / "cache")
    assert paths.run_root == shared
    workspaces = Workspaces(paths, tmp_path / "state")
    try:
        report = workspaces.reconcile()
        swept = ownership.sweep_orphans(paths.run_root)

        assert report["orphans"] == [] and swept == []
        assert [p.poll() for p in bystanders] == [None, None, None]
        assert (project / "src" / "main.c").read_text().startswith("int main")
        assert (hexlike / "notes.txt").read_text() == "mine\n"
        assert (lookalike / "owner.json").exists()
        assert sorted(p.name for p in shared.iterdir()) == [
            "0123456789ab", "build-cache", "project",
        ]  # fmt: skip
    finally:
        workspaces.close()
        for process in bystanders:
            process.kill()
            process.wait()


@EVERY_KIND
def test_the_one_shot_sweep_ends_a_vm_whose_owner_was_killed(
    fake_host: FakeHostFactory, kind: str
) -> None:
    host = fake_host(**VMM_KINDS[kind])
    started = host.in_child("one-shot")  # `pyro run` killed with SIGKILL mid-run
    assert started["returncode"] == -9
    vm_id, pid = started["vm_id"], started["pid"]
    assert process_running(pid), "the VM outlived its owner"

    swept = ownership.sweep_orphans(host.paths.run_root)

    assert swept == [vm_id]
    assert not process_running(pid)
    assert not Path(started["run_dir"]).exists()
    assert mounts_under([host.paths.run_root]) == [] and vm_cgroups([vm_id]) == []


@EVERY_KIND
def test_the_workspace_sweep_ends_a_vmm_no_workspace_owns(
    fake_host: FakeHostFactory, kind: str
) -> None:
    host = fake_host(**VMM_KINDS[kind])
    started = host.in_child("launch")  # booted by a process that died before its record
    vm_id, pid = started["vm_id"], started["pid"]
    run_dir = Path(started["run_dir"])
    _age(run_dir)
    workspaces = host.open()

    report = workspaces.reconcile()

    assert report["orphans"] == [vm_id]
    assert not process_running(pid)
    assert not run_dir.exists()
    assert mounts_under([host.paths.run_root]) == [] and vm_cgroups([vm_id]) == []


def test_a_young_run_directory_is_left_to_the_vm_being_set_up(fake_host: FakeHostFactory) -> None:
    host = fake_host(jailed=False)
    started = host.in_child("launch")
    workspaces = host.open()

    assert workspaces.reconcile()["orphans"] == []
    assert process_running(started["pid"])

    _age(Path(started["run_dir"]))  # a minute later it is an orphan
    assert workspaces.reconcile()["orphans"] == [started["vm_id"]]
    assert not process_running(started["pid"])
