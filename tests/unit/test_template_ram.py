"""The sealed template RAM: its digest, its seals, and who the holder answers."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyro_mcp.errors import IntegrityError
from pyro_mcp.vmm.qemu import ram_holder, template_ram

MIB = 1 << 20


def _digest(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return ram_holder.ram_digest(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _ram(path: Path, blocks: dict[int, bytes], size_mib: int = 16) -> Path:
    with path.open("wb") as handle:
        handle.truncate(size_mib * MIB)
        for offset, data in blocks.items():
            handle.seek(offset)
            handle.write(data)
    return path


def test_the_ram_digest_is_about_content_not_how_sparse_the_file_is(tmp_path: Path) -> None:
    sparse = _ram(tmp_path / "sparse", {3 * MIB + 5: b"guest", 9 * MIB: b"x" * 4096})
    dense = tmp_path / "dense"
    dense.write_bytes(sparse.read_bytes())  # every zero block written out
    assert _digest(sparse) == _digest(dense)
    changed = _ram(tmp_path / "changed", {3 * MIB + 5: b"guesT", 9 * MIB: b"x" * 4096})
    assert _digest(changed) != _digest(sparse)
    moved = _ram(tmp_path / "moved", {4 * MIB + 5: b"guest", 9 * MIB: b"x" * 4096})
    assert _digest(moved) != _digest(sparse)


@pytest.fixture
def holder_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="holders-", dir="/tmp"))  # short: a socket path
    monkeypatch.setattr(template_ram, "holder_dir", lambda: directory)
    yield directory
    for sock in directory.glob("*.sock"):  # end the holders this test started
        subprocess.run(["fuser", "-k", str(sock)], capture_output=True, check=False)
    shutil.rmtree(directory, ignore_errors=True)


def test_a_clone_gets_a_sealed_copy_that_nothing_can_change(
    tmp_path: Path, holder_dir: Path
) -> None:
    ram = _ram(tmp_path / "ram", {MIB: b"template bytes"})
    fd = template_ram.sealed_ram(ram, _digest(ram))
    try:
        assert os.pread(fd, 14, MIB) == b"template bytes"
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"evil", MIB)
        reopened = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)  # as a VMM opens it
        with pytest.raises(PermissionError):
            os.pwrite(reopened, b"evil", MIB)
        with pytest.raises(PermissionError):
            os.ftruncate(reopened, 0)
        import mmap

        private = mmap.mmap(reopened, 2 * MIB, flags=mmap.MAP_PRIVATE)
        private[MIB : MIB + 4] = b"mine"  # a clone's own writes stay its own
        os.close(reopened)
        again = template_ram.sealed_ram(ram, _digest(ram))  # the same holder answers
        assert os.pread(again, 14, MIB) == b"template bytes"
        assert os.fstat(again).st_ino == os.fstat(fd).st_ino
        os.close(again)
        private.close()
    finally:
        os.close(fd)


def test_ram_that_does_not_match_its_digest_is_refused(tmp_path: Path, holder_dir: Path) -> None:
    ram = _ram(tmp_path / "ram", {MIB: b"template bytes"})
    digest = _digest(ram)
    _ram(ram, {MIB: b"Template bytes"})
    with pytest.raises(IntegrityError, match="does not match its manifest"):
        template_ram.sealed_ram(ram, digest)
    assert list(holder_dir.glob("*.sock")) == []


def test_the_holder_answers_no_other_user(tmp_path: Path, holder_dir: Path) -> None:
    ram = _ram(tmp_path / "ram", {MIB: b"template bytes"})
    digest = _digest(ram)
    os.close(template_ram.sealed_ram(ram, digest))
    sock = holder_dir / f"{digest[:40]}.sock"
    assert oct(sock.stat().st_mode & 0o777) == "0o600"
    holder_dir.chmod(0o755)
    sock.chmod(0o666)  # even reachable, another uid gets nothing
    probe = (
        "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
        "m, fds, f, a = socket.recv_fds(s, 16, 1); print(len(fds))"
    )
    result = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            probe,
            str(sock),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "0"
