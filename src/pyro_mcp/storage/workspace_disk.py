"""The workspace disk: an ext4 image mounted at ``/workspace`` in the guest.

:func:`create_workspace_disk` makes it (sparse) from a staging directory with ``mke2fs -d``.
The offline readers (:func:`disk_stat`, :func:`disk_list`, :func:`disk_read`) look into
a STOPPED workspace's disk with ``debugfs`` opened read-only: the image is never mounted
on the host, so a hostile filesystem never meets the host kernel. Paths are taken inside
the disk (``/`` is the disk's root, which the guest sees as ``/workspace``); a path that
climbs above it is refused.
"""

from __future__ import annotations

import math
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

from pyro_mcp.errors import (
    Conflict,
    InvalidArgument,
    NotFound,
    OutsideRoot,
    TooLarge,
    ToolFailed,
)
from pyro_mcp.runtime.host_tools import require, run

BLOCK_SIZE = 4096
INODE_SIZE = 256
MIN_DISK_MIB = 8
MAX_DISK_MIB = 16 << 20  # 16 TiB, ext4's limit with 4 KiB blocks
DEFAULT_LIST_MAX_ENTRIES = 10_000
FAST_SYMLINK_MAX = 59  # longer targets take a data block
_MIB = 1 << 20

_STAT = re.compile(r"Inode: (\d+)\s+Type: ([a-zA-Z ]+?)\s+Mode:\s+(\d+)")
_SIZE = re.compile(r"\bSize: (\d+)")
_MTIME = re.compile(r"^\s*mtime: 0x([0-9a-f]+)(?::([0-9a-f]+))?", re.MULTILINE)
_LS_LINE = re.compile(r"^/(\d+)/(\d+)/(\d+)/(\d+)/(.*)/(\d*)/$")
_TYPES = {"regular": "file", "directory": "dir", "symlink": "symlink"}
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


# --- creating ---------------------------------------------------------------------------


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


# --- reading offline --------------------------------------------------------------------


def disk_path(path: str) -> str:
    """``path`` as an absolute path inside the disk (``src/x`` -> ``/src/x``).

    OutsideRoot if it climbs above the disk's root; InvalidArgument for NUL bytes or line
    ends, which debugfs commands cannot carry.
    """
    if not isinstance(path, str):
        raise InvalidArgument(f"path must be a string, got {path!r}")
    if any(ch in path for ch in "\x00\n\r"):
        raise InvalidArgument(f"path {path!r} contains a NUL byte or a line end")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise OutsideRoot(f"path {path!r} climbs above the root of the workspace disk")
            parts.pop()
            continue
        parts.append(part)
    return "/" + "/".join(parts)


def _quote(path: str) -> str:
    # debugfs reads a doubled quote inside quotes as one quote.
    return '"' + path.replace('"', '""') + '"'


def _debugfs(image: Path, commands: list[str]) -> tuple[bytes, str]:
    """Run debugfs read-only over ``image`` with ``commands``; (stdout, stderr).

    debugfs exits 0 even when a command fails, so callers read errors from stderr.
    """
    if not image.is_file():
        raise NotFound(f"workspace disk {image} does not exist")
    script = "".join(command + "\n" for command in commands).encode("utf-8")
    env = dict(os.environ, DEBUGFS_PAGER="__none__", PAGER="__none__")
    result = run(
        ["debugfs", "-f", "-", str(image)],
        what="read the workspace disk",
        env=env,
        input_bytes=script,
    )
    errors = result.stderr.decode("utf-8", "replace")
    if "while trying to open" in errors or "Filesystem not open" in errors:
        raise ToolFailed(
            f"debugfs cannot open {image} as an ext4 filesystem",
            stderr_tail=errors.strip()[-2000:],
        )
    return result.stdout, errors


def _sections(out: bytes, commands: list[str]) -> list[bytes]:
    """Each command's output: debugfs echoes ``debugfs: <command>`` before each one."""
    found = []
    position = 0
    marks = [f"debugfs: {command}\n".encode() for command in commands]
    for index, mark in enumerate(marks):
        start = out.find(mark, position)
        if start < 0:
            raise ToolFailed(f"debugfs output has no section for {commands[index]!r}")
        start += len(mark)
        end = out.find(marks[index + 1], start) if index + 1 < len(marks) else len(out)
        found.append(out[start : end if end >= 0 else len(out)])
        position = start
    return found


def _decode_mtime(seconds_hex: str, extra_hex: str | None) -> int:
    seconds = int(seconds_hex, 16)
    if seconds >= 1 << 31:
        seconds -= 1 << 32
    extra = int(extra_hex, 16) if extra_hex else 0
    seconds += (extra & 3) << 32
    return seconds * 1_000_000_000 + (extra >> 2)


def _parse_stat(text: str, path: str) -> dict[str, Any]:
    head = _STAT.search(text)
    size = _SIZE.search(text)
    if head is None or size is None:
        raise ToolFailed(f"cannot read debugfs's report on {path}", stderr_tail=text[-2000:])
    mtime = _MTIME.search(text)
    kind = _TYPES.get(head.group(2).strip(), "other")
    info: dict[str, Any] = {
        "path": path,
        "type": kind,
        "mode": int(head.group(3), 8) & 0o7777,
        "size": int(size.group(1)),
        "mtime_ns": _decode_mtime(mtime.group(1), mtime.group(2)) if mtime else None,
        "inode": int(head.group(1)),
    }
    return info


def _not_found(errors: str) -> bool:
    return "File not found" in errors or "not found by ext2_lookup" in errors


def disk_stat(image: Path, path: str) -> dict[str, Any]:
    """``{"path", "type", "mode", "size", "mtime_ns", "inode"}`` (and ``"target"`` for a
    symlink) of one path on the disk; NotFound if it does not exist."""
    where = disk_path(path)
    out, errors = _debugfs(image, [f"stat {_quote(where)}"])
    if _not_found(errors) or not out.strip():
        raise NotFound(f"{where} does not exist on the workspace disk")
    info = _parse_stat(out.decode("utf-8", "replace"), where)
    if info["type"] == "symlink":
        info["target"] = _link_targets(image, [(info["inode"], info["size"])])[info["inode"]]
    return info


def _link_targets(image: Path, links: list[tuple[int, int]]) -> dict[int, str]:
    """Targets of symlinks given as ``(inode, size)``: short ones are in the inode (stat
    shows them), long ones in a data block (cat prints them)."""
    if not links:
        return {}
    commands = [f"stat <{ino}>" for ino, _ in links]
    sections = _sections(_debugfs(image, commands)[0], commands)
    targets: dict[int, str] = {}
    slow = []
    marker = b'Fast link dest: "'
    for (ino, size), section in zip(links, sections, strict=True):
        at = section.find(marker)
        if at < 0:
            slow.append((ino, size))
            continue
        start = at + len(marker)
        targets[ino] = section[start : start + size].decode("utf-8", "replace")
    if slow:
        # cat prints exactly the target's bytes, so walk the output by the known sizes.
        out = _debugfs(image, [f"cat <{ino}>" for ino, _ in slow])[0]
        position = 0
        for ino, size in slow:
            mark = f"debugfs: cat <{ino}>\n".encode()
            start = out.find(mark, position)
            if start < 0:
                raise ToolFailed(f"debugfs output has no section for inode {ino}")
            position = start + len(mark) + size
            targets[ino] = out[start + len(mark) : position].decode("utf-8", "replace")
    return targets


def disk_list(
    image: Path,
    path: str = "/",
    recursive: bool = False,
    *,
    max_entries: int = DEFAULT_LIST_MAX_ENTRIES,
) -> list[dict[str, Any]]:
    """The entries of a directory on the disk (all below it when ``recursive``), sorted by
    path; a file's listing is the file itself.

    Each entry is ``{"path", "name", "type", "mode", "size", "inode"}``, with ``"target"``
    for symlinks; ``path`` is absolute inside the disk. NotFound for a missing path,
    TooLarge past ``max_entries`` (list a subdirectory, or without ``recursive``).
    """
    top = disk_stat(image, path)
    if top["type"] != "dir":
        name = top["path"].rsplit("/", 1)[-1]
        return [{k: v for k, v in top.items() if k != "mtime_ns"} | {"name": name}]
    entries: list[dict[str, Any]] = []
    level = [(top["inode"], top["path"])]
    while level:
        commands = [f"ls -l -p <{ino}>" for ino, _ in level]
        sections = _sections(_debugfs(image, commands)[0], commands)
        next_level = []
        for (_, parent), section in zip(level, sections, strict=True):
            for entry in _parse_listing(section, parent):
                entries.append(entry)
                if len(entries) > max_entries:
                    raise TooLarge(
                        f"{top['path']} holds more than {max_entries} entries",
                        hint="list a subdirectory, or list without recursive",
                    )
                if recursive and entry["type"] == "dir":
                    next_level.append((entry["inode"], entry["path"]))
        level = next_level
    links = [(e["inode"], e["size"]) for e in entries if e["type"] == "symlink"]
    targets = _link_targets(image, links)
    for entry in entries:
        if entry["type"] == "symlink":
            entry["target"] = targets.get(entry["inode"])
    return sorted(entries, key=lambda e: e["path"])


def _parse_listing(section: bytes, parent: str) -> list[dict[str, Any]]:
    found = []
    for raw in section.decode("utf-8", "replace").split("\n"):
        match = _LS_LINE.match(raw)
        if match is None:
            continue  # blank lines (and names holding a line end, which -p cannot show)
        ino, mode, _uid, _gid, name, size = match.groups()
        if name in ("", ".", "..") or ino == "0":
            continue  # unused directory slots (lost+found keeps some) show as inode 0
        full_mode = int(mode, 8)
        found.append(
            {
                "path": f"{parent.rstrip('/')}/{name}",
                "name": name,
                "type": _kind_of(full_mode),
                "mode": full_mode & 0o7777,
                "size": int(size) if size else 0,
                "inode": int(ino),
            }
        )
    return found


def _kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def disk_read(image: Path, path: str, max_bytes: int) -> bytes:
    """Up to ``max_bytes`` bytes from the start of a regular file on the disk.

    NotFound for a missing path; InvalidArgument for a directory, a symlink (the message
    names its target) or a special file, and for ``max_bytes`` < 1. Only what is returned
    is read: debugfs is stopped once ``max_bytes`` arrived.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise InvalidArgument(f"max_bytes must be a positive integer, got {max_bytes!r}")
    info = disk_stat(image, path)
    if info["type"] == "dir":
        raise InvalidArgument(f"{info['path']} is a directory: list it instead")
    if info["type"] == "symlink":
        raise InvalidArgument(
            f"{info['path']} is a symbolic link to {info['target']!r}: read its target instead"
        )
    if info["type"] != "file":
        raise InvalidArgument(f"{info['path']} is not a regular file")
    want = min(info["size"], max_bytes)
    if want == 0:
        return b""
    argv = [require("debugfs"), "-R", f"cat <{info['inode']}>", str(image)]
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
    ) as process:
        assert process.stdout is not None  # stdout=PIPE
        data = process.stdout.read(want)
        process.kill()  # the rest is not wanted; no need to let debugfs write it
    if len(data) != want:
        raise ToolFailed(f"debugfs returned {len(data)} of {want} bytes of {info['path']}")
    return data
