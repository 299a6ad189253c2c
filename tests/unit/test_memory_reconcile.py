"""A pause or resume whose process died is repaired by reconcile (no VM: store and files)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.workspace.lifecycle import Workspaces
from pyro_mcp.workspace.memory import STATE_FILE

DEAD_OWNER = "999999999:1"  # no such process


@pytest.fixture
def workspaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Workspaces]:
    monkeypatch.setenv("PYRO_KEY_DIR", str(tmp_path / "keys"))
    opened = Workspaces(RuntimePaths(tmp_path / "cache", tmp_path / "run"), tmp_path / "state")
    yield opened
    opened.close()


def _in(workspaces: Workspaces, *steps: str) -> str:
    record = workspaces.store.create(
        environment="debian:12", vcpu_count=1, mem_mib=256, disk_mib=64
    )
    for step in steps:
        workspaces.store.transition(record.id, step, owner=DEAD_OWNER)
    return record.id


@pytest.mark.parametrize("died_while", ["pausing", "resuming"])
def test_a_whole_saved_state_makes_a_dead_change_paused(
    workspaces: Workspaces, died_while: str
) -> None:
    steps = ["running", "pausing"] + (["paused", "resuming"] if died_while == "resuming" else [])
    wid = _in(workspaces, *steps)
    directory = workspaces.layout.workspace(wid).directory
    directory.mkdir(parents=True)
    (directory / STATE_FILE).write_bytes(b"saved")
    workspaces.reconcile_one(wid)
    record = workspaces.store.get(wid)
    assert record.state == "paused" and record.owner is None
    assert record.state_note == f"the process {died_while} it went away"


def test_a_pause_that_died_before_saving_and_lost_its_vm_is_stopped(
    workspaces: Workspaces,
) -> None:
    wid = _in(workspaces, "running", "pausing")
    workspaces.reconcile_one(wid)
    record = workspaces.store.get(wid)
    assert record.state == "stopped" and record.vmm_pid is None
