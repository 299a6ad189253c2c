"""Making the workspace disk: a sparse ext4 image, mounted at ``/workspace`` in the guest,
made from a staging directory with ``mke2fs -d`` (ownership, modes, mtimes, symlinks and
holes kept), sized for what it must hold. Reading one offline is
:mod:`pyro_mcp.storage.workspace_disk`'s.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

from pyro_mcp.errors import Conflict, InvalidArgument, NotFound, TooLarge, ToolFailed
from pyro_mcp.runtime.host_tools import run

BLOCK_SIZE = 4096
INODE_SIZE = 256
MIN_DISK_MIB = 8
MAX_DISK_MIB = 16 << 20  # 16 TiB, ext4's limit with 4 KiB blocks
FAST_SYMLINK_MAX = 59  # longer targets take a data block
_MIB = 1 << 20

# (filesystem blocks below which, journal blocks): e2fsprogs' ext2fs_default_journal_size.
_JOURNAL_STEPS = (
    (32768, 1024),
    (256 << 10, 4096),
    (512 << 10, 8192),
    (4096 << 10, 16384),
    (8192 << 10, 32768),
    (16384 << 10, 65536),
    (32768 << 10, 131072),
)


def _journal_blocks(blocks: int) -> int:
    """The journal mke2fs gives a filesystem of ``blocks`` 4 KiB blocks."""
    for limit, journal in _JOURNAL_STEPS:
        if blocks < limit:
            return journal
    return 262144


def _default_inodes(size_bytes: int) -> int:
    # mke2fs.conf: "small" filesystems (under 512 MiB) get an inode per 4 KiB, others per 16.
    return size_bytes // (4096 if size_bytes < 512 * _MIB else 16384)


def seed_footprint(staging_dir: Path | None) -> tuple[int, int]:
    """``(entries, data blocks)`` a staging tree needs on ext4 with 4 KiB blocks."""
    if staging_dir is None:
        return 0, 0
    entries = blocks = 0
    for directory, dirs, files in os.walk(staging_dir):
        for name in dirs + files:
            info = os.lstat(os.path.join(directory, name))
            entries += 1
            if stat.S_ISREG(info.st_mode):
                allocated = min(info.st_size, info.st_blocks * 512)
                blocks += math.ceil(allocated / BLOCK_SIZE)
            elif stat.S_ISDIR(info.st_mode) or info.st_size > FAST_SYMLINK_MAX:
                blocks += 1  # a directory's first block, or a long symlink's target
        blocks += max(0, math.ceil(len(dirs + files) * 32 / BLOCK_SIZE) - 1)  # big dirs
    return entries, blocks


def needed_mib(entries: int, data_blocks: int) -> int:
    """About how many MiB an ext4 disk must have to hold a tree of this footprint."""
    size = (data_blocks + 64) * BLOCK_SIZE
    for _ in range(4):  # metadata grows with the disk: settle the estimate
        inodes = max(_default_inodes(size), entries + 64)
        table = inodes * INODE_SIZE
        journal = _journal_blocks(size // BLOCK_SIZE) * BLOCK_SIZE
        bitmaps = 2 * BLOCK_SIZE * math.ceil(size / (BLOCK_SIZE * 8 * BLOCK_SIZE))
        size = (data_blocks + 64) * BLOCK_SIZE + table + journal + bitmaps
        size = int(size * 1.03)  # group descriptors, reserved GDT blocks, extent blocks
    return max(MIN_DISK_MIB, math.ceil(size / _MIB))


def create_workspace_disk(path: Path, size_mib: int, staging_dir: Path | None = None) -> Path:
    """A sparse ext4 image of ``size_mib`` MiB at ``path``, labelled ``workspace``, holding
    the tree in ``staging_dir`` (empty when None), its root owned by root.

    Ownership, modes, mtimes, symlinks and holes of the staging tree are kept. Raises
    InvalidArgument for a size outside [8 MiB, 16 TiB], Conflict if ``path`` exists,
    TooLarge (saying how many MiB the seed needs) when the tree does not fit, ToolFailed
    when mke2fs fails otherwise. Nothing is left at ``path`` on failure.
    """
    if isinstance(size_mib, bool) or not isinstance(size_mib, int):
        raise InvalidArgument(f"size_mib must be an integer, got {size_mib!r}")
    if not MIN_DISK_MIB <= size_mib <= MAX_DISK_MIB:
        raise InvalidArgument(
            f"size_mib must be between {MIN_DISK_MIB} and {MAX_DISK_MIB}, got {size_mib}"
        )
    if os.path.lexists(path):
        raise Conflict(f"workspace disk {path} already exists")
    if staging_dir is not None and not staging_dir.is_dir():
        raise NotFound(f"staging directory {staging_dir} does not exist")
    entries, data_blocks = seed_footprint(staging_dir)
    need = needed_mib(entries, data_blocks)
    if data_blocks * BLOCK_SIZE > size_mib * _MIB:
        raise _does_not_fit(size_mib, need, entries, data_blocks)
    argv = ["mke2fs", "-q", "-F", "-t", "ext4", "-b", str(BLOCK_SIZE), "-I", str(INODE_SIZE)]
    argv += ["-L", "workspace", "-m", "0", "-E", "root_owner=0:0"]
    if entries + 64 > _default_inodes(size_mib * _MIB):
        argv += ["-N", str(entries + 64 + entries // 8)]
    if staging_dir is not None:
        argv += ["-d", str(staging_dir)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as handle:
            handle.truncate(size_mib * _MIB)
        tmp.chmod(0o600)
        try:
            run([*argv, str(tmp), f"{size_mib}M"], what="create the workspace disk")
        except ToolFailed as exc:
            if "Could not allocate" in exc.stderr_tail or "No space left" in exc.stderr_tail:
                raise _does_not_fit(
                    size_mib, max(need, size_mib + 1), entries, data_blocks
                ) from exc
            raise
        # mke2fs makes lost+found; in /workspace it would show in every listing, diff and
        # export as if the user had made it. e2fsck recreates it if it ever needs one.
        if not (staging_dir and (Path(staging_dir) / "lost+found").exists()):
            run(["debugfs", "-w", "-R", "rmdir /lost+found", str(tmp)], what="drop lost+found")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _does_not_fit(size_mib: int, need: int, entries: int, data_blocks: int) -> TooLarge:
    return TooLarge(
        f"the seed does not fit in a {size_mib} MiB workspace disk: it needs about {need} MiB "
        f"({entries} entries, {data_blocks * BLOCK_SIZE // _MIB} MiB of data)",
        hint=f"ask for a disk of at least {need} MiB",
    )
