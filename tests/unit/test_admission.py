"""Admission counts what each VM really costs the host, and old shared blob stores are
split into each workspace's own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyro_mcp.errors import TooLarge
from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.vmm.launch import BackendChoice, overhead_mib
from pyro_mcp.workspace.admission import Limits
from pyro_mcp.workspace.blobs import BlobStore
from pyro_mcp.workspace.lifecycle import Workspaces
from pyro_mcp.workspace.manifest import Entry

TCG = BackendChoice("qemu", "tcg", "test")


@pytest.fixture
def workspaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workspaces:
    monkeypatch.setattr(Limits, "for_host", classmethod(lambda cls: cls(100, 2048)))
    paths = RuntimePaths(tmp_path / "cache", tmp_path / "run")
    return Workspaces(paths, tmp_path / "state")


def _live(workspaces: Workspaces, state: str, mem_mib: int) -> None:
    record = workspaces.store.create(
        environment="debian:12", vcpu_count=1, mem_mib=mem_mib, disk_mib=64
    )
    workspaces.store.set_fields(record.id, backend=TCG.label)
    steps = {"running": ["running"], "stopping": ["running", "stopping"]}[state]
    for step in steps:
        workspaces.store.transition(record.id, step)


def test_admission_counts_each_vmms_overhead_not_only_guest_ram(workspaces: Workspaces) -> None:
    assert overhead_mib("qemu-tcg") >= 64 + 128  # the translation cache and emulation state
    _live(workspaces, "running", 512)
    _live(workspaces, "stopping", 512)  # still holds its memory until it has exited
    # Guest RAM alone would be 1536 of 2048 MiB; with each QEMU's overhead it is not.
    with pytest.raises(TooLarge, match=r"512 MiB workspace \(\d+ MiB with its VMM\)"):
        _create(workspaces, 512)
    _create(workspaces, 128)  # what still fits is admitted


def _create(workspaces: Workspaces, mem_mib: int) -> None:
    workspaces.store.create(
        environment="debian:12",
        vcpu_count=1,
        mem_mib=mem_mib,
        disk_mib=64,
        admit=workspaces._admission(mem_mib, TCG),
    )


def test_a_shared_blob_store_of_an_earlier_version_is_split_per_workspace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    paths = RuntimePaths(tmp_path / "cache", tmp_path / "run")
    first = Workspaces(paths, state)
    shared = BlobStore(state / "blobs")
    kept = shared.put_bytes(b"mine\n")
    other = shared.put_bytes(b"someone else's\n")
    entry = Entry("a.txt", "file", 0o644, 5, 0, kept)
    record = first.store.create(environment="debian:12", vcpu_count=1, mem_mib=256, disk_mib=64)
    first.store.add_baseline(
        record.id, manifest=shared.put_manifest([entry]), file_count=1, total_bytes=5
    )
    first.close()
    upgraded = Workspaces(paths, state)  # opening the state dir splits the store
    own = upgraded.blobs(record.id)
    assert own.get_bytes(kept) == b"mine\n"
    assert not own.has(other) and not (state / "blobs").exists()
    assert os.stat(own.path(kept)).st_nlink == 1
    upgraded.close()


def test_collection_waits_for_writers_and_finishes_what_an_interrupted_one_left(
    tmp_path: Path,
) -> None:
    store = BlobStore(tmp_path / "blobs")
    with store.writing(may_leave_garbage=True):
        orphan = store.put_bytes(b"fetched before the crash\n")
        assert store.gc(set()) == (0, 0)  # a writer holds the store: nothing is collected
        assert store.needs_collection
    assert not store.needs_collection  # it finished cleanly
    try:
        with store.writing(may_leave_garbage=True):
            store.put_bytes(b"another\n")
            raise OSError("the VMM died")
    except OSError:
        pass
    assert store.needs_collection
    assert store.gc(set())[0] == 2 and not store.has(orphan)
    assert not store.needs_collection
