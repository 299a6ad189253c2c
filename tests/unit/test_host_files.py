"""Host files written and read for callers stay under their roots, and ``force`` replaces
only what it may.

Each test plays the user's (or an attacker's) part for real: outputs that already exist as
fifos, devices, sockets, symlinks, directories or mount points (the mount lives in a private
mount namespace); a directory swapped for a symlink between the check and the use, or in
the middle of a walk; tar archives whose metadata headers declare a gigabyte, unpacked in a
child process whose peak memory is measured.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import io
import lzma
import os
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bench.archives import gzip_bomb, metadata_header

from pyro_mcp.api.context import Context, HostPathPolicy
from pyro_mcp.api.operations import workspace_content
from pyro_mcp.errors import Conflict, InvalidArgument, NotFound, OutsideRoot, PyroError, TooLarge
from pyro_mcp.storage import disk_export
from pyro_mcp.workspace import exporting, seeds, tar_output
from pyro_mcp.workspace.blobs import BlobStore

is_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (device nodes, mounts)")
MIB = 1 << 20
PEAK_RSS_LIMIT = 150 * MIB  # measured: about 22 MiB; tarfile alone allocated 2.1 GB before
# A bomb is refused once its first header is read: within the first chunks of a ~1 MB
# archive (measured: 4 KiB for a seed, one 64 KiB chunk for an export). How long that
# takes is a row of `make bench`.
HEAD_BYTES = 256 << 10


# --- helpers ----------------------------------------------------------------------------


def tar_of(members: dict[str, bytes | None], mode: str = "w") -> bytes:
    """A PAX archive of ``members``: ``bytes`` for a regular file, None for a directory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode, format=tarfile.PAX_FORMAT) as archive:  # type: ignore[call-overload]
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                archive.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def confined(root: Path) -> HostPathPolicy:
    return HostPathPolicy.confined_to([root])


FILE_TAR = tar_of({"report.txt": b"new\n"})
DIR_TAR = tar_of({".": None, "new.txt": b"new\n"})


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gz":
        return _gzip(data)
    if compression == "bz2":
        return bz2.compress(data)
    if compression == "xz":
        return lzma.compress(data)
    return data


def _gzip(data: bytes) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0) as handle:
        handle.write(data)
    return out.getvalue()


MEASURED = r"""
import resource, sys
# A bound on the address space keeps an unbounded allocation from hurting the host: it
# fails with MemoryError instead. The peak RSS is what the test asserts.
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
import bz2, gzip, lzma, tarfile, zlib  # imported now: their files are not counted as read
from pathlib import Path
from pyro_mcp.errors import PyroError
from pyro_mcp.workspace import exporting, seeds
from pyro_mcp.workspace.blobs import BlobStore


def bytes_read():
    with open("/proc/self/io") as io:
        return int(next(line.split()[1] for line in io if line.startswith("rchar:")))


operation, archive, work = sys.argv[1:4]
before = bytes_read()
try:
    if operation == "seed":
        seeds.ingest_seed(Path(archive), Path(work) / "staging", BlobStore(Path(work) / "blobs"))
    else:
        with open(archive, "rb") as handle:
            chunks = iter(lambda: handle.read(64 << 10), b"")
            exporting.extract_export(chunks, Path(work) / "out")
    outcome = "ok"
except PyroError as exc:
    outcome = f"{type(exc).__name__}: {exc}"
except MemoryError:
    outcome = "MemoryError"
print(outcome)
print(bytes_read() - before)
# VmHWM: the peak RSS of this process's own address space. (ru_maxrss would also count
# the address space it was spawned from, here pytest's, which exec replaced.)
with open("/proc/self/status") as status:
    print(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
"""


def run_measured(operation: str, archive: Path, work: Path) -> tuple[str, int, int]:
    """Ingest (``seed``) or export (``export``) ``archive`` in a child process; its outcome
    (``ok`` or ``ErrorType: message``), the bytes it read meanwhile (the archive, mostly),
    and its peak RSS in bytes."""
    work.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", MEASURED, operation, str(archive), str(work)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    outcome, read, peak_kib = done.stdout.strip().splitlines()[-3:]
    return outcome, int(read), int(peak_kib) * 1024


# --- force: what an export may replace ----------------------------------------------------


@pytest.mark.parametrize("spelling", ["{root}", "{root}/", ".", "{root}/sub/..", "{root}/."])
def test_force_never_replaces_an_allowed_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spelling: str
) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "precious.txt").write_text("keep")
    monkeypatch.chdir(root)
    target = confined(root).check(spelling.format(root=root), "export output")
    with pytest.raises(InvalidArgument, match=rf"{root} is an allowed host root itself"):
        exporting.extract_export([DIR_TAR], target, force=True, kind="dir")
    assert listing(root) == ["precious.txt", "sub"]
    assert listing(tmp_path) == ["root"]  # no temporary left beside the root either


def test_an_empty_output_path_is_refused(tmp_path: Path) -> None:
    for policy in (confined(tmp_path), HostPathPolicy()):
        with pytest.raises(InvalidArgument, match="export output path is empty"):
            policy.check("", "export output")


def test_the_filesystem_root_is_never_an_output(tmp_path: Path) -> None:
    from pyro_mcp.storage.host_files import HostPath, open_destination

    # Refused before anything is created: nothing ever touches the real /.
    with pytest.raises(InvalidArgument, match="export output / is the filesystem root"):
        open_destination(HostPath(Path("/"), None), "export output")
    with pytest.raises(InvalidArgument, match="disk export output / is the filesystem root"):
        disk_export.disk_export(make_image(tmp_path), Path("/"), force=True)


def make_special(path: Path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device node":
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.close()
    elif kind == "symlink":
        path.symlink_to(path.parent / "target.txt")
        (path.parent / "target.txt").write_text("the link's target")
    elif kind == "directory":
        path.mkdir()
        (path / "inside.txt").write_text("kept")
    else:
        path.write_text("old")


def kind_of(path: Path) -> str:
    mode = path.lstat().st_mode
    for test, name in [
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISCHR, "device node"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISDIR, "directory"),
    ]:
        if test(mode):
            return name
    return "regular file"


UNREPLACEABLE = ["fifo", "device node", "socket", "symlink"]


@is_root
@pytest.mark.parametrize("kind", [*UNREPLACEABLE, "directory"])
def test_a_file_export_with_force_replaces_only_a_regular_file(tmp_path: Path, kind: str) -> None:
    out = tmp_path / "out"
    make_special(out, kind)
    before = listing(tmp_path)
    with pytest.raises(Conflict, match=rf"export output {out} is a {kind}") as caught:
        exporting.extract_export([FILE_TAR], out, force=True, kind="file")
    words = "never replaces" if kind != "directory" else "replaces only a regular file"
    assert words in str(caught.value)
    assert kind_of(out) == kind and listing(tmp_path) == before
    if kind == "symlink":
        assert (tmp_path / "target.txt").read_text() == "the link's target"
    if kind == "directory":
        assert listing(out) == ["inside.txt"]


@is_root
@pytest.mark.parametrize("kind", [*UNREPLACEABLE, "regular file"])
def test_a_directory_export_with_force_replaces_only_a_directory(tmp_path: Path, kind: str) -> None:
    out = tmp_path / "out"
    make_special(out, kind)
    before = listing(tmp_path)
    with pytest.raises(Conflict, match=rf"export output {out} is a {kind}"):
        exporting.extract_export([DIR_TAR], out, force=True, kind="dir")
    assert kind_of(out) == kind and listing(tmp_path) == before


@pytest.mark.parametrize("rename", ["renameat2", "emulated"])
def test_force_replaces_a_file_with_a_file_and_a_directory_with_a_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rename: str
) -> None:
    if rename == "emulated":  # a filesystem without RENAME_NOREPLACE / RENAME_EXCHANGE
        from pyro_mcp.storage import renameat2

        def unsupported(*_args: object) -> None:
            raise OSError(errno.EINVAL, "Invalid argument")

        monkeypatch.setattr(renameat2, "_renameat2", unsupported)
    exporting.extract_export([FILE_TAR], tmp_path / "new", kind="file")
    assert (tmp_path / "new").read_text() == "new\n"
    (tmp_path / "file").write_text("old")
    exporting.extract_export([FILE_TAR], tmp_path / "file", force=True, kind="file")
    assert (tmp_path / "file").read_text() == "new\n"
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "old.txt").write_text("old")
    (tmp_path / "dir" / "sub").mkdir(mode=0o500)  # a read-only directory in the old output
    exporting.extract_export([DIR_TAR], tmp_path / "dir", force=True, kind="dir")
    assert listing(tmp_path / "dir") == ["new.txt"]
    assert listing(tmp_path) == ["dir", "file", "new"]
    with pytest.raises(Conflict, match="already exists"):
        exporting.extract_export([FILE_TAR], tmp_path / "new", kind="file")
    assert listing(tmp_path) == ["dir", "file", "new"]


def test_without_force_an_existing_output_is_a_conflict_that_says_what_to_do(
    tmp_path: Path,
) -> None:
    (tmp_path / "out").write_text("old")
    with pytest.raises(Conflict, match="already exists") as caught:
        exporting.extract_export([FILE_TAR], tmp_path / "out")
    assert caught.value.hint == "pass force to replace it"
    assert (tmp_path / "out").read_text() == "old"


@is_root
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_force_never_replaces_a_mount_point(tmp_path: Path) -> None:
    # The tmpfs is mounted in a private mount namespace: only the child process sees it.
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    archive = tmp_path / "export.tar"
    archive.write_bytes(DIR_TAR)
    script = (
        "import subprocess, sys\n"
        "from pathlib import Path\n"
        "from pyro_mcp.errors import PyroError\n"
        "from pyro_mcp.workspace import exporting\n"
        "subprocess.run(['mount', '-t', 'tmpfs', 'tmpfs', sys.argv[1]], check=True)\n"
        "Path(sys.argv[1], 'mounted.txt').write_text('on the tmpfs')\n"
        "try:\n"
        "    exporting.extract_export([Path(sys.argv[2]).read_bytes()], Path(sys.argv[1]),\n"
        "                             force=True, kind='dir')\n"
        "    print('replaced')\n"
        "except PyroError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
        "print(sorted(p.name for p in Path(sys.argv[1]).iterdir()))\n"
        "print(sorted(p.name for p in Path(sys.argv[1]).parent.iterdir()))\n"
    )
    done = subprocess.run(
        [
            *("unshare", "-m", "--propagation", "private"),
            *(sys.executable, "-c", script, str(mount_point), str(archive)),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"Conflict export output {mount_point} is a mount point")
    assert lines[1:] == ["['mounted.txt']", "['export.tar', 'mnt']"]


def make_image(tmp_path: Path) -> Path:
    image = tmp_path / "workspace.ext4"
    with image.open("wb") as handle:
        handle.write(b"superblock")
        handle.seek(8 * MIB)
        handle.write(b"tail")
    return image


@is_root
@pytest.mark.parametrize("kind", [*UNREPLACEABLE, "directory"])
def test_disk_export_with_force_replaces_only_a_regular_file(tmp_path: Path, kind: str) -> None:
    image = make_image(tmp_path)
    out = tmp_path / "null"  # what `--output /dev/null --force` met on the host
    make_special(out, kind)
    before = listing(tmp_path)
    with pytest.raises(Conflict, match=rf"disk export output {out} is a {kind}"):
        disk_export.disk_export(image, out, force=True)
    assert kind_of(out) == kind and listing(tmp_path) == before


def test_disk_export_copies_sparsely_through_a_private_temporary(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    out = tmp_path / "copy.ext4"
    out.write_text("stale")
    assert disk_export.disk_export(image, out, force=True) == out
    assert out.read_bytes() == image.read_bytes()
    assert out.stat().st_blocks * 512 < MIB  # the 8 MiB hole stayed a hole
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert listing(tmp_path) == ["copy.ext4", "workspace.ext4"]


# --- check, then use: nothing is looked up by name again -----------------------------------


def swap_for_symlink(directory: Path, link_target: Path) -> None:
    """What a hostile client with write access under the root does mid-call."""
    directory.rename(directory.with_name(directory.name + "-moved"))
    directory.symlink_to(link_target, target_is_directory=True)


def test_an_export_does_not_follow_a_directory_swapped_for_a_symlink_after_the_check(
    tmp_path: Path,
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    target = confined(root).check(str(root / "sub" / "out"), "export output")
    swap_for_symlink(root / "sub", outside)
    with pytest.raises(OutsideRoot, match=r"'sub' is a symlink"):
        exporting.extract_export([FILE_TAR], target)
    assert listing(outside) == [] and listing(root / "sub-moved") == []


def test_a_disk_export_does_not_follow_a_directory_swapped_after_the_check(
    tmp_path: Path,
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    image = make_image(tmp_path)
    target = confined(root).check(str(root / "sub" / "disk.ext4"), "disk export output")
    swap_for_symlink(root / "sub", outside)
    with pytest.raises(OutsideRoot, match=r"'sub' is a symlink"):
        disk_export.disk_export(image, target)
    assert listing(outside) == [] and listing(root / "sub-moved") == []


def test_a_directory_swapped_inside_an_export_while_it_is_written_is_not_followed(
    tmp_path: Path,
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "keep.txt").write_text("not pyro's")
    data = tar_of({"sub": None, "sub/a": os.urandom(200_000), "sub/b": b"b", "sub/c": b"c"})

    def stream() -> Iterator[bytes]:
        swapped = False
        for start in range(0, len(data), 512):
            if not swapped:
                written = list(root.glob(".out.export-*/tree/sub/a"))
                if written:  # sub/a is being written: swap sub for a link to outside
                    sub = written[0].parent
                    sub.rename(root / "moved")
                    sub.symlink_to(outside, target_is_directory=True)
                    swapped = True
            yield data[start : start + 512]
        assert swapped

    target = confined(root).check(str(root / "out"), "export output")
    with pytest.raises(OutsideRoot, match=r"'sub' is a symlink"):
        exporting.extract_export(stream(), target, kind="dir")
    assert listing(outside) == ["keep.txt"]  # nothing written there, nothing removed
    assert (outside / "keep.txt").read_text() == "not pyro's"
    assert listing(root) == ["moved"]  # the attacker's own move; pyro left nothing


SWAPPER = r"""
import os, sys
sub, real, outside, stop = sys.argv[1:5]
print("swapping", flush=True)
while not os.path.exists(stop):
    os.rename(sub, real)
    os.symlink(outside, sub)
    os.unlink(sub)
    os.rename(real, sub)
"""


def test_exports_racing_a_symlink_swap_never_write_outside_the_root(tmp_path: Path) -> None:
    # The swapper is another process, so it runs truly alongside on a second core.
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    policy = confined(root)
    stop = tmp_path / "stop"
    argv = [sys.executable, "-c", SWAPPER, str(root / "sub"), str(root / "sub.real")]
    swapper = subprocess.Popen([*argv, str(outside), str(stop)], stdout=subprocess.PIPE)
    refused = 0
    try:
        assert swapper.stdout is not None and swapper.stdout.readline() == b"swapping\n"
        for i in range(10_000):
            try:
                target = policy.check(str(root / "sub" / f"out{i}"), "export output")
                exporting.extract_export([FILE_TAR], target)
            except (PyroError, OSError):
                refused += 1
    finally:
        stop.touch()
        swapper.wait(timeout=30)
    assert listing(outside) == []
    assert 0 < refused < 10_000  # the race was really run: some exports met the link


def add_dir_then(monkeypatch: pytest.MonkeyPatch, name: str, action: Any) -> None:
    """Run ``action`` right after the walk records the directory ``name`` (before it is
    opened to be listed)."""
    original = seeds.TreeBuilder.add_dir

    def add_dir(self: seeds.TreeBuilder, path: str, mode: int, mtime_ns: int) -> None:
        original(self, path, mode, mtime_ns)
        if path == name:
            action()

    monkeypatch.setattr(seeds.TreeBuilder, "add_dir", add_dir)


def seed_with_a_secret_outside(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    (root / "project" / "sub").mkdir(parents=True)
    (root / "project" / "a.txt").write_text("mine")
    (root / "project" / "sub" / "b.txt").write_text("mine too")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("SECRET")
    return root, outside


def test_a_seed_directory_swapped_for_a_symlink_mid_walk_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, outside = seed_with_a_secret_outside(tmp_path)
    project = root / "project"
    add_dir_then(monkeypatch, "sub", lambda: swap_for_symlink(project / "sub", outside))
    store = BlobStore(tmp_path / "blobs")
    staging = tmp_path / "staging"
    with pytest.raises(OutsideRoot, match=r"seed .*project: 'sub' is a symlink"):
        seeds.ingest_seed(confined(root).check(str(project), "seed"), staging, store)
    assert not staging.exists()
    assert all(store.get_bytes(sha) != b"SECRET" for sha in store)


def test_directory_tar_does_not_read_a_directory_swapped_mid_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, outside = seed_with_a_secret_outside(tmp_path)
    project = root / "project"
    add_dir_then(monkeypatch, "sub", lambda: swap_for_symlink(project / "sub", outside))
    sent = bytearray()
    with pytest.raises(OutsideRoot, match=r"'sub' is a symlink"):
        for chunk in tar_output.directory_tar(confined(root).check(str(project), "sync source")):
            sent += chunk
    assert b"SECRET" not in sent


def api_context(tmp_path: Path, root: Path) -> Context:
    return Context(host_paths=confined(root), state_dir=tmp_path / "state")


def no_workspaces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Host-file refusals must come before any workspace is touched."""

    def refuse(_ctx: Context) -> None:
        raise AssertionError("the host file was accepted and a workspace was opened")

    monkeypatch.setattr(workspace_content, "open_workspaces", refuse)


@pytest.mark.parametrize("source", ["text_file", "patch_file"])
def test_a_text_file_whose_directory_is_swapped_after_the_check_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    root, outside = seed_with_a_secret_outside(tmp_path)
    (root / "project" / "sub" / "secret").write_text("fine")
    original = HostPathPolicy.check

    def check_then_swap(self: HostPathPolicy, value: str, purpose: str) -> Any:
        checked = original(self, value, purpose)
        swap_for_symlink(root / "project" / "sub", outside)
        return checked

    monkeypatch.setattr(HostPathPolicy, "check", check_then_swap)
    no_workspaces(monkeypatch)
    ctx = api_context(tmp_path, root)
    path = str(root / "project" / "sub" / "secret")
    with pytest.raises(
        OutsideRoot, match=r"file .*/root/project/sub/secret: 'project/sub' is a symlink"
    ):
        if source == "text_file":
            workspace_content.workspace_file_write(ctx, "ws", "notes.txt", text_file=path)
        else:
            workspace_content.workspace_patch_apply(ctx, "ws", patch_file=path)


def test_a_text_file_over_64_mib_is_refused_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    big = root / "big.txt"
    with big.open("wb") as handle:
        handle.truncate((64 << 20) + 1)
    no_workspaces(monkeypatch)
    with pytest.raises(TooLarge, match=rf"text file {big} is 67108865 bytes.*67108864-byte"):
        workspace_content.workspace_file_write(
            api_context(tmp_path, root), "ws", "big.txt", text_file=str(big)
        )


def test_read_file_reads_only_regular_files_under_the_root(tmp_path: Path) -> None:
    from pyro_mcp.storage.host_files import read_file

    root = tmp_path / "root"
    root.mkdir()
    (root / "notes.txt").write_text("hello")
    (root / "link.txt").symlink_to(root / "notes.txt")
    os.mkfifo(root / "pipe")
    policy = confined(root)
    assert read_file(policy.check(str(root / "notes.txt"), "text file"), "text file") == b"hello"
    with pytest.raises(OutsideRoot, match=r"'link.txt' is a symlink"):
        read_file(policy.check(str(root / "link.txt"), "text file"), "text file")
    with pytest.raises(InvalidArgument, match=rf"text file {root}/pipe is a fifo"):
        read_file(policy.check(str(root / "pipe"), "text file"), "text file")  # never blocks
    with pytest.raises(NotFound, match=rf"text file {root}/missing does not exist"):
        read_file(policy.check(str(root / "missing"), "text file"), "text file")
    with pytest.raises(TooLarge, match="3-byte limit"):
        read_file(policy.check(str(root / "notes.txt"), "text file"), "text file", max_bytes=3)


# --- directory_tar: a host directory as a tar stream, under the seed rules -----------------


def test_directory_tar_packs_a_directory_as_pax_chunks_of_about_a_mib(tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "bin").mkdir(parents=True)
    (source / "bin" / "tool").write_bytes(b"#!/bin/sh\n")
    (source / "bin" / "tool").chmod(0o750)
    (source / "big.bin").write_bytes(os.urandom(3 * MIB))
    (source / "alias").symlink_to("bin/tool")
    os.utime(source / "bin" / "tool", ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
    chunks = list(tar_output.directory_tar(source))
    assert len(chunks) >= 3 and max(len(c) for c in chunks) <= MIB + 64 * 1024
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks)), mode="r:") as archive:
        members = {m.name: m for m in archive.getmembers()}
        assert sorted(members) == ["alias", "big.bin", "bin", "bin/tool"]
        assert members["bin"].isdir() and members["alias"].linkname == "bin/tool"
        assert members["bin/tool"].mode == 0o750 and members["bin/tool"].mtime == 1_600_000_000
        tool = archive.extractfile(members["bin/tool"])
        big = archive.extractfile(members["big.bin"])
        assert tool is not None and tool.read() == b"#!/bin/sh\n"
        assert big is not None and big.read() == (source / "big.bin").read_bytes()
    assert b"".join(chunks)[:512].find(b"ustar") > 0


def test_directory_tar_refuses_what_a_seed_refuses_before_the_archive_is_complete(
    tmp_path: Path,
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "ok.txt").write_text("ok")
    (source / "up").symlink_to("../../elsewhere")
    sent = bytearray()
    with pytest.raises(OutsideRoot, match=r"symlink 'up' -> '../../elsewhere'"):
        for chunk in tar_output.directory_tar(source):
            sent += chunk
    assert not sent.endswith(bytes(1024))  # the end-of-archive marker never went out
    (source / "up").unlink()
    os.mkfifo(source / "pipe")
    with pytest.raises(InvalidArgument, match="'pipe' is a fifo"):
        list(tar_output.directory_tar(source))
    (source / "pipe").unlink()
    (source / "two.txt").write_text("two")
    with pytest.raises(TooLarge, match=r"more than 1 entries \(reached at 'two.txt'\)"):
        list(tar_output.directory_tar(source, max_entries=1))
    with pytest.raises(TooLarge, match="4-byte limit"):
        list(tar_output.directory_tar(source, max_bytes=4))
    with pytest.raises(NotFound):
        list(tar_output.directory_tar(tmp_path / "missing"))


# --- tar metadata headers are bounded before tarfile reads them ---------------------------


@pytest.mark.parametrize("compression", ["tar", "gz", "bz2", "xz"])
@pytest.mark.parametrize("kind", ["L", "K", "x", "g"])
def test_a_metadata_header_declaring_a_gigabyte_is_refused_at_once(
    tmp_path: Path, compression: str, kind: str
) -> None:
    archive = tmp_path / "seed.tar"
    archive.write_bytes(
        compress(metadata_header(kind.encode(), 1 << 30) + bytes(2 * MIB), compression)
    )
    staging = tmp_path / "staging"
    with pytest.raises(TooLarge, match=r"declares 1073741824 bytes.*1048576-byte limit"):
        seeds.ingest_seed(archive, staging, BlobStore(tmp_path / "blobs"))
    assert not staging.exists()


def test_a_gnu_longname_bomb_seed_is_refused_at_its_start_in_bounded_memory(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.tar.gz"
    archive.write_bytes(gzip_bomb(metadata_header(b"L", 1 << 30), 1024))
    assert archive.stat().st_size > 1_000_000  # "a 1 MB .tar.gz"
    outcome, read, peak = run_measured("seed", archive, tmp_path / "work")
    assert outcome.startswith("TooLarge: seed ") and "declares 1073741824 bytes" in outcome
    assert "1048576-byte limit" in outcome
    assert read < HEAD_BYTES and peak < PEAK_RSS_LIMIT, (read, peak)  # refused at its start
    print(f"peak RSS {peak / MIB:.1f} MiB, {read} bytes read")


def test_a_pax_header_bomb_from_a_guest_export_is_refused_at_its_start_in_bounded_memory(
    tmp_path: Path,
) -> None:
    archive = tmp_path / "export.tar.gz"
    archive.write_bytes(gzip_bomb(metadata_header(b"x", 1 << 30), 1024))
    assert archive.stat().st_size > 1_000_000
    outcome, read, peak = run_measured("export", archive, tmp_path / "work")
    assert outcome.startswith("TooLarge: export to ") and "declares 1073741824 bytes" in outcome
    assert read < HEAD_BYTES and peak < PEAK_RSS_LIMIT, (read, peak)  # refused at its start
    assert listing(tmp_path / "work") == []
    print(f"peak RSS {peak / MIB:.1f} MiB, {read} bytes read")


def test_many_entries_with_large_pax_headers_stay_in_bounded_memory(tmp_path: Path) -> None:
    # Each header is under the bound; tarfile would keep all 250 of them (250 MB).
    comment = "a" * 1_000_000
    raw = io.BytesIO()
    for i in range(250):
        info = tarfile.TarInfo(f"f{i:03}")
        info.size, info.pax_headers = 1, {"comment": comment}
        raw.write(info.tobuf(tarfile.PAX_FORMAT) + b"x" + bytes(511))
    raw.write(bytes(1024))
    archive = tmp_path / "wide.tar.gz"
    comp = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    archive.write_bytes(comp.compress(raw.getvalue()) + comp.flush())
    del raw
    outcome, _read, peak = run_measured("seed", archive, tmp_path / "work")
    assert outcome == "ok" and peak < PEAK_RSS_LIMIT, (outcome, peak)


def test_a_chain_of_extended_headers_is_refused(tmp_path: Path) -> None:
    record = b"12 comment=\n"
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, len(record)
    link = pax.tobuf(tarfile.USTAR_FORMAT) + record.ljust(512, b"\0")
    archive = tmp_path / "chain.tar"
    archive.write_bytes(link * 5000 + tar_of({"f": b"1"}))
    with pytest.raises(TooLarge, match="more than 16 extended headers before one entry"):
        seeds.ingest_seed(archive, tmp_path / "staging", BlobStore(tmp_path / "blobs"))


def pax_record(key: str, value: str) -> bytes:
    """One ``"<length> key=value\\n"`` record, its length counting its own digits."""
    rest = f" {key}={value}\n".encode()
    length = len(rest) + 1
    while len(str(length)) + len(rest) != length:
        length += 1
    return str(length).encode() + rest


def test_global_pax_headers_are_bounded_in_total(tmp_path: Path) -> None:
    raw = b""
    for i in range(3):
        glob = tarfile.TarInfo("././@PaxHeader")
        glob.type = tarfile.XGLTYPE
        body = pax_record(f"key{i}", "v" * 600_000)
        glob.size = len(body)
        raw += glob.tobuf(tarfile.USTAR_FORMAT) + body + bytes(-len(body) % 512)
    archive = tmp_path / "global.tar"
    archive.write_bytes(raw + tar_of({"f": b"1"}))
    with pytest.raises(TooLarge, match=r"global pax headers.*1048576-byte limit"):
        seeds.ingest_seed(archive, tmp_path / "staging", BlobStore(tmp_path / "blobs"))


@pytest.mark.parametrize("compression", ["tar", "gz", "bz2", "xz"])
def test_long_names_and_pax_headers_of_real_archives_still_work(
    tmp_path: Path, compression: str
) -> None:
    long_name = "d/" + "n" * 240
    buffer = io.BytesIO()
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=fmt) as built:
            info = tarfile.TarInfo(long_name)
            info.size = 2
            built.addfile(info, io.BytesIO(b"hi"))
            link = tarfile.TarInfo("d/link")
            link.type, link.linkname = tarfile.SYMTYPE, "n" * 240
            built.addfile(link)
        archive = tmp_path / f"seed-{fmt}.tar"
        archive.write_bytes(compress(buffer.getvalue(), compression))
        staging = tmp_path / f"staging-{fmt}"
        entries = seeds.ingest_seed(archive, staging, BlobStore(tmp_path / "blobs"))
        assert [e.path for e in entries] == ["d", "d/link", long_name]
        assert (staging / long_name).read_bytes() == b"hi"
