"""Disk housekeeping for root filesystem builds: space, removal, fsync, hashing.

- :func:`out_of_space` and :func:`check_space`: the error for a full disk, saying how much a
  step needs and what is free.
- :func:`remove_path`: delete a file or a tree, counting what that frees; a tree left by a
  killed debootstrap has its stray mounts (/proc, /sys, the host's /dev) detached first
  (:func:`mounts_under`, :func:`detach_mounts`), never deleted through.
- :func:`fsync_dir` and :func:`file_sha256_and_sync`, for installing a finished image.

Used by :mod:`pyro_mcp.runtime.rootfs` (which re-exports these names) and
:mod:`pyro_mcp.runtime.rootfs_image`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from pathlib import Path
from stat import S_ISDIR

from pyro_mcp.errors import BuildError, ToolFailed
from pyro_mcp.runtime import host_tools

MIB = 1 << 20


def out_of_space(step: str, where: Path, needed: int | None) -> BuildError:
    """The error for a full disk: how much the step needs, where, and what is free."""
    details = []
    if needed:
        details.append(f"needs about {needed // MIB} MiB")
    try:
        free = shutil.disk_usage(where if where.exists() else where.parent).free
        details.append(f"{free // MIB} MiB free")
    except OSError:
        pass
    extra = f" ({', '.join(details)})" if details else ""
    return BuildError(
        f"{step}: no space left on device in {where}{extra}",
        hint="free disk space there or point PYRO_CACHE_DIR at a larger disk",
    )


def check_space(step: str, where: Path, needed: int) -> None:
    if shutil.disk_usage(where).free < needed:
        raise out_of_space(step, where, needed)


def remove_path(path: Path) -> int:
    """Remove a file or a tree; returns the bytes it held on disk (hard links counted once).

    A tree left by a killed debootstrap may still have /proc, /sys or a bind mount of the
    host's /dev inside it: those are detached first, never deleted through.
    """
    if not path.exists() and not path.is_symlink():
        return 0
    if path.is_dir() and not path.is_symlink():
        detach_mounts(path)
        freed = du(path)
        shutil.rmtree(path)
        return freed
    freed = path.lstat().st_blocks * 512 if path.lstat().st_nlink == 1 else 0
    path.unlink()
    return freed


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    base = os.path.realpath(path)
    found = []
    try:
        with open("/proc/self/mountinfo") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        if point == base or point.startswith(base + "/"):
            found.append(point)
    return sorted(found, key=len, reverse=True)


def detach_mounts(path: Path) -> None:
    """Lazily unmount everything mounted below ``path``; BuildError if that fails."""
    for point in mounts_under(path):
        with contextlib.suppress(ToolFailed):
            host_tools.run(["umount", "-l", point], what=f"unmount {point}")
    left = mounts_under(path)
    if left:
        raise BuildError(
            f"{path} still has file systems mounted in it ({', '.join(left)}); not deleting it",
            hint=f"unmount them (umount -l {left[0]}) and run `pyro env prune`",
        )


def du(path: Path) -> int:
    """Allocated bytes under ``path`` that removing it frees (files linked outside it
    are not counted)."""
    total = 0
    seen: dict[tuple[int, int], int] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            stat = os.lstat(os.path.join(dirpath, name))
            if S_ISDIR(stat.st_mode):
                total += stat.st_blocks * 512
                continue
            key = (stat.st_dev, stat.st_ino)
            seen[key] = seen.get(key, 0) + 1
            if seen[key] == stat.st_nlink:
                total += stat.st_blocks * 512
    return total


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256_and_sync(path: Path) -> str:
    """sha256 of ``path``, fsyncing it on the way (one pass over the data)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
        os.fsync(handle.fileno())
    return digest.hexdigest()
