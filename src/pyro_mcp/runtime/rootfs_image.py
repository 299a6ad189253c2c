"""Steps 2 and 3 of a root filesystem build: the guest files, and the ext4 image.

- the guest files pyro adds to every image (:func:`guest_files`), and :func:`stage_root`,
  which writes them onto a hard-link copy of the cached tree;
- the image: sized from the staged root (:func:`measure`, :func:`image_size_for`), packed
  with ``mke2fs -d`` (:func:`pack_ext4`), checked with ``e2fsck -fn`` (:func:`check_ext4`),
  and its free space read back with ``dumpe2fs`` (:func:`free_bytes`).

The overview and step 1 (the cached debootstrap tree) are in :mod:`pyro_mcp.runtime.rootfs`,
which re-exports the names here.
"""

from __future__ import annotations

import importlib.util
import os
import py_compile
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyro_mcp.errors import BuildError, HostToolMissing, ToolFailed
from pyro_mcp.runtime import host_tools
from pyro_mcp.runtime.digests import sha256_bytes, sha256_json
from pyro_mcp.runtime.rootfs_disk import MIB, out_of_space

# Bump when packing changes (mke2fs options, guest file layout): images are repacked.
IMAGE_REVISION = "1"
LABEL = "pyro-root"
GUEST_ROOT = "opt/pyro"
INIT_PATH = "sbin/pyro-init"
# Fixed mtime for the guest files (the same in every image).
GUEST_MTIME = 1_704_067_200

_INIT_STUB = """#!/usr/bin/python3 -IS
# pyro-init: PID 1. The code is /opt/pyro/pyro_mcp/guest_agent/init.py, imported from
# its precompiled .pyc (a script would be compiled again on every boot). An import
# failure exits, so the kernel panics and the VM stops at once (panic=1).
import sys
sys.path.insert(0, "/opt/pyro")
from pyro_mcp.guest_agent.init import main
main()
"""
# The modules of pyro_mcp.guest the host and the agent both use (standard library only).
SHARED_WITH_THE_GUEST = ("protocol.py", "extents.py")
_PACKAGE_INIT = '"""pyro guest code (copied into the image by pyro_mcp.runtime.rootfs)."""\n'


# --- guest files ----------------------------------------------------------------------


@dataclass(frozen=True)
class GuestFile:
    path: str  # relative to the guest's /
    data: bytes
    mode: int = 0o644


def guest_files() -> list[GuestFile]:
    """The files pyro adds to every image: the init stub and the guest packages."""
    package_root = Path(__file__).resolve().parent.parent  # .../pyro_mcp
    files = [
        GuestFile(INIT_PATH, _INIT_STUB.encode(), 0o755),
        GuestFile(f"{GUEST_ROOT}/pyro_mcp/__init__.py", _PACKAGE_INIT.encode()),
    ]
    agent_dir = package_root / "guest_agent"
    for source in sorted(agent_dir.rglob("*")):
        relative = source.relative_to(agent_dir)
        if not source.is_file() or "__pycache__" in relative.parts:
            continue
        if source.suffix in (".pyc", ".pyo"):
            continue
        dest = f"{GUEST_ROOT}/pyro_mcp/guest_agent/{relative.as_posix()}"
        files.append(GuestFile(dest, source.read_bytes()))
    files.append(GuestFile(f"{GUEST_ROOT}/pyro_mcp/guest/__init__.py", _PACKAGE_INIT.encode()))
    for name in SHARED_WITH_THE_GUEST:
        source = package_root / "guest" / name
        files.append(GuestFile(f"{GUEST_ROOT}/pyro_mcp/guest/{name}", source.read_bytes()))
    return files


def guest_files_digest(files: Sequence[GuestFile]) -> str:
    return sha256_json(sorted([f.path, f.mode, sha256_bytes(f.data)] for f in files))


def guest_python(root: Path) -> str | None:
    """``python3.11`` if the guest's /usr/bin/python3 points there, else None."""
    try:
        target = os.readlink(root / "usr/bin/python3")
    except OSError:
        return None
    name = os.path.basename(target)
    return name if name.startswith("python3.") else None


def stage_root(tree: Path, root: Path, files: Sequence[GuestFile]) -> None:
    """A hard-link copy of ``tree`` at ``root`` with the guest files added."""
    host_tools.run(["cp", "-al", "--", str(tree), str(root)], what="copy the rootfs tree")
    add_guest_files(root, files)


def add_guest_files(root: Path, files: Sequence[GuestFile]) -> None:
    """Write the guest files into ``root`` (existing entries are replaced, never written
    through, so a hard link into a cached tree stays untouched), precompiled when the
    guest's Python has this Python's bytecode format."""
    touched: dict[Path, tuple[int, int]] = {}
    written: list[Path] = []
    for item in files:
        target = _resolve_in(root, item.path)
        for parent in reversed(target.parents):
            if parent == root or not parent.is_relative_to(root):
                continue
            if parent.exists():
                stat = parent.stat()
                touched.setdefault(parent, (stat.st_atime_ns, stat.st_mtime_ns))
            else:
                parent.mkdir(mode=0o755)
                touched[parent] = (GUEST_MTIME * 10**9, GUEST_MTIME * 10**9)
        if target.exists() or target.is_symlink():
            target.unlink()  # never write through a hard link into the cached tree
        target.write_bytes(item.data)
        target.chmod(item.mode)
        written.append(target)
    py_tag = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if guest_python(root) == py_tag:  # same bytecode format: precompile for fast imports
        for target in written:
            if target.suffix == ".py":
                cfile = Path(importlib.util.cache_from_source(str(target)))
                if not cfile.parent.exists():
                    cfile.parent.mkdir(mode=0o755)
                    touched[cfile.parent] = (GUEST_MTIME * 10**9, GUEST_MTIME * 10**9)
                py_compile.compile(
                    str(target),
                    cfile=str(cfile),
                    dfile="/" + target.relative_to(root).as_posix(),
                    doraise=True,
                    invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
                )
                written.append(cfile)
    for target in written:
        os.utime(target, (GUEST_MTIME, GUEST_MTIME), follow_symlinks=False)
    for directory, (atime, mtime) in touched.items():
        os.utime(directory, ns=(atime, mtime))


def _resolve_in(root: Path, relative: str) -> Path:
    """``root/relative`` with symlinks in the parents resolved as if ``root`` were /."""
    current = root
    parts = [p for p in relative.split("/") if p]
    for depth, part in enumerate(parts[:-1]):
        candidate = current / part
        for _ in range(40):
            if not candidate.is_symlink():
                break
            link = os.readlink(candidate)
            candidate = root / link.lstrip("/") if link.startswith("/") else candidate.parent / link
            candidate = Path(os.path.normpath(candidate))
        if not candidate.is_relative_to(root):
            raise BuildError(f"guest path {relative!r} leaves the image at part {depth}")
        current = candidate
    return current / parts[-1]


# --- the ext4 image -------------------------------------------------------------------


@dataclass
class TreeSize:
    data_bytes: int = 0
    inodes: int = 0
    seen: set[tuple[int, int]] = field(default_factory=set, repr=False)


def measure(root: Path, block: int = 4096) -> TreeSize:
    """Bytes (in whole blocks) and inodes the tree needs in an ext4 file system."""
    size = TreeSize()
    stack = [root]
    while stack:
        directory = stack.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                stat = entry.stat(follow_symlinks=False)
                if (stat.st_dev, stat.st_ino) in size.seen:
                    continue
                size.seen.add((stat.st_dev, stat.st_ino))
                size.inodes += 1
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                    size.data_bytes += block
                elif entry.is_file(follow_symlinks=False):
                    size.data_bytes += -(-stat.st_size // block) * block
                elif entry.is_symlink() and stat.st_size > 59:  # longer ones need a block
                    size.data_bytes += block
    return size


def image_size_for(tree_size: TreeSize) -> int:
    """Tree + 30% + 64 MiB, plus ext4's own metadata (inode tables, journal), in MiB."""
    raw = tree_size.data_bytes * 13 // 10 + 64 * MIB
    raw = raw * 100 // 94 + 32 * MIB  # ~3% inode tables (-i 8192), bitmaps, journal
    return -(-raw // (16 * MIB)) * (16 * MIB)


def mke2fs_options(seed: str) -> list[str]:
    """The options pyro packs images with (see pack_ext4 for why)."""
    fs_uuid = str(uuid.UUID(hex=seed[:32]))
    hash_seed = str(uuid.UUID(hex=seed[32:64]))
    return [
        "-t", "ext4",
        "-b", "4096",
        "-I", "256",
        "-i", "8192",
        "-m", "0",
        "-L", LABEL,
        "-U", fs_uuid,
        "-E", f"root_owner=0:0,lazy_itable_init=0,lazy_journal_init=1,hash_seed={hash_seed}",
    ]  # fmt: skip


def pack_ext4(root: Path, image: Path, *, size: int, seed: str) -> list[str]:
    """Pack ``root`` into a new sparse ext4 image of ``size`` bytes; returns the options.

    - ``-b 4096 -I 256``: without them mke2fs picks 1 KiB blocks and 128-byte inodes for
      images under 512 MiB (its "small" type); 256-byte inodes keep nanosecond times.
    - ``-i 8192``: one inode per 8 KiB; the image can take as many small files again.
    - ``-m 0``: everything in the guest runs as root; a reserve only wastes 5%.
    - the journal stays: workspace root disks are written and can be killed mid-write.
    - ``lazy_itable_init=0``: inode tables are marked zeroed now (they stay holes in the
      sparse file), so the guest kernel starts no ext4lazyinit thread writing at boot.
    - ``lazy_journal_init=1``: the file is new and sparse, so the journal already reads
      as zeros; writing them would only allocate 16-32 MiB of real zeros on the host.
    - ``-U`` and ``hash_seed`` derive from ``seed`` (tree key + guest files), so the file
      system UUID names its inputs. The bytes are not reproducible all the same: mke2fs
      copies each file's ctime and atime, which the hard-link staging changes.
    """
    options = mke2fs_options(seed)
    with open(image, "wb") as handle:
        handle.truncate(size)
    argv = ["mke2fs", "-q", "-F", *options, "-d", str(root), str(image)]
    try:
        host_tools.run(argv, what="pack the ext4 image", timeout_s=1800.0)
    except ToolFailed as exc:
        if "No space left on device" in exc.stderr_tail:
            raise out_of_space("pack the ext4 image", image.parent, size) from exc
        raise
    return options


def image_too_small(exc: ToolFailed) -> bool:
    return "Could not allocate" in exc.stderr_tail


def check_ext4(image: Path) -> None:
    """``e2fsck -fn``: ToolFailed unless the file system is clean."""
    host_tools.run(["e2fsck", "-fn", str(image)], what=f"check {image.name}", timeout_s=600.0)


def free_bytes(image: Path) -> int | None:
    """Free space inside the image's file system (from dumpe2fs -h), if readable."""
    try:
        result = host_tools.run(["dumpe2fs", "-h", str(image)], what="read the superblock")
    except (ToolFailed, HostToolMissing):
        return None
    fields = {}
    for line in result.stdout.decode(errors="replace").splitlines():
        name, _, value = line.partition(":")
        fields[name.strip()] = value.strip()
    try:
        return int(fields["Free blocks"]) * int(fields["Block size"])
    except (KeyError, ValueError):
        return None
