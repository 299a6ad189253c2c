"""data_extents: where a file holds data, even while the file changes under the walk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyro_mcp.guest.extents import data_extents

MIB = 1 << 20


def _sparse(path: Path) -> int:
    with open(path, "wb") as handle:
        handle.write(b"a" * 4096)
        handle.seek(MIB)
        handle.write(b"b" * 4096)
        handle.truncate(2 * MIB)
    return os.open(path, os.O_RDONLY)


def test_the_data_of_a_sparse_file_and_only_its_data(tmp_path: Path) -> None:
    fd = _sparse(tmp_path / "f")
    try:
        assert list(data_extents(fd, 2 * MIB)) == [(0, 4096), (MIB, MIB + 4096)]
        assert list(data_extents(fd, 2048)) == [(0, 2048)]  # clipped to the end asked
        assert list(data_extents(fd, 2 * MIB, start=8192)) == [(MIB, MIB + 4096)]
    finally:
        os.close(fd)


@pytest.fixture
def shrinks_after_finding_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A sparse file that a "guest command" truncates just after its second data extent
    was found: the real SEEK_HOLE that follows fails with ENXIO."""
    path = tmp_path / "f"
    os.close(_sparse(path))
    real_lseek = os.lseek

    def lseek_then_truncate(fd: int, position: int, how: int) -> int:
        found = real_lseek(fd, position, how)
        if how == os.SEEK_DATA and found == MIB:
            os.truncate(path, 8192)  # now shorter than the data just found
        return found

    monkeypatch.setattr(os, "lseek", lseek_then_truncate)
    return path


def test_a_file_that_shrinks_between_finding_data_and_its_end_ends_the_walk(
    shrinks_after_finding_data: Path,
) -> None:
    fd = os.open(shrinks_after_finding_data, os.O_RDONLY)
    try:
        assert list(data_extents(fd, 2 * MIB)) == [(0, 4096)]
    finally:
        os.close(fd)


def test_a_checkpoint_digest_of_a_file_that_shrinks_meanwhile_is_no_error(
    shrinks_after_finding_data: Path,
) -> None:
    from pyro_mcp.guest_agent.ops_tree import _Hasher

    path = str(shrinks_after_finding_data)
    digest = _Hasher().digest(path, os.stat(path))
    assert digest is not None
    assert digest[1].st_size == 8192  # the stat after: the caller sees the change


def test_a_sparse_get_of_a_file_that_shrinks_meanwhile_sends_what_is_left(
    shrinks_after_finding_data: Path,
) -> None:
    from pyro_mcp.guest import protocol as p
    from pyro_mcp.guest_agent.calls import Call
    from pyro_mcp.guest_agent.ops_files import get_file

    sent: list[p.Frame] = []
    path = str(shrinks_after_finding_data)
    call = Call(sent.append, 1, "get_file", {"path": path, "sparse": True}, b"")
    value, _ = get_file(call)
    assert value["size"] == 2 * MIB and value["truncated"] is True
    assert [(f.header["offset"], len(f.payload)) for f in sent] == [(0, 4096)]


def test_a_sparse_get_of_a_file_emptied_after_it_was_read_covers_what_was_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rewrite truncates the file just after its data was read: what was sent still
    stands (the host refuses an account shorter than the data it got)."""
    from pyro_mcp.guest import protocol as p
    from pyro_mcp.guest_agent import ops_files
    from pyro_mcp.guest_agent.calls import Call

    path = tmp_path / "f"
    path.write_bytes(b"1234\n")
    real_pread = os.pread

    def pread_then_truncate(fd: int, size: int, offset: int) -> bytes:
        data = real_pread(fd, size, offset)
        os.truncate(path, 0)
        return data

    monkeypatch.setattr(ops_files.os, "pread", pread_then_truncate)
    sent: list[p.Frame] = []
    call = Call(sent.append, 1, "get_file", {"path": str(path), "sparse": True}, b"")
    value, _ = ops_files.get_file(call)
    assert [f.payload for f in sent] == [b"1234\n"]
    assert value["sent"] == 5
