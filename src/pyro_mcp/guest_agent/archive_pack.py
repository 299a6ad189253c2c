"""The tar producer behind ``archive_get``: a workspace path as a pax tar in data frames.

``write_tar`` walks the path (symlinks are never followed) and writes each entry through
tarfile's stream mode, which ``_Output`` forwards as ``data`` frames as it fills; what is
kept and what is skipped is described in :mod:`ops_archive`. A file that vanishes or
stops being a regular file while it is read is skipped; one that shrinks is padded with
zeros (``_Content``) so the tar stays well formed.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any, cast

from pyro_mcp.guest import protocol as p
from pyro_mcp.guest_agent import ops_tree as tree
from pyro_mcp.guest_agent.calls import Call, CallError

SKIPPED_NAMES = 100  # the result names at most this many skipped entries


class _Output:
    """A write-only file object that forwards what tarfile writes as data frames."""

    def __init__(self, call: Call, stream: str) -> None:
        self.call, self.stream = call, stream
        self.bytes = 0
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        if self.call.cancelled.is_set():
            raise CallError("cancelled", "call cancelled")
        self._buffer += data
        self.bytes += len(data)
        if len(self._buffer) >= p.CHUNK:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self._buffer:
            self.call.send_data(self.stream, bytes(self._buffer))
            self._buffer.clear()


class _Content:
    """Exactly ``size`` bytes of an open file: zeros stand in if it shrank meanwhile."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.left = fd, size

    def read(self, size: int = -1) -> bytes:
        want = self.left if size < 0 else min(size, self.left)
        parts = []
        got = 0
        while got < want:
            chunk = os.read(self.fd, want - got)
            if not chunk:
                parts.append(bytes(want - got))
                break
            parts.append(chunk)
            got += len(chunk)
        self.left -= want
        return b"".join(parts)


def write_tar(call: Call, top: str, top_info: os.stat_result) -> dict[str, Any]:
    """Stream ``top`` (``top_info``: its lstat) as a tar; the result of ``archive_get``."""
    import tarfile  # lazily: the agent starts at every boot

    errors: list[str] = []
    if stat.S_ISDIR(top_info.st_mode):
        members = sorted(tree.scan(top, "", True, errors), key=lambda item: item[0])
    else:
        members = [(os.path.basename(top), top, top_info)]
    counts = {"files": 0, "dirs": 0, "symlinks": 0, "hardlinks": 0, "skipped": 0}
    skipped: list[str] = []  # the first SKIPPED_NAMES of them, by name

    def skip(name: str) -> None:
        counts["skipped"] += 1
        if len(skipped) < SKIPPED_NAMES:
            skipped.append(name)

    content = 0
    first_names: dict[tuple[int, int], str] = {}
    out = _Output(call, "tar")
    # Stream mode ("w|") only ever calls write on its file object.
    with tarfile.open(fileobj=cast(Any, out), mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, path, info in members:
            member = tarfile.TarInfo(name)
            member.mode = stat.S_IMODE(info.st_mode)
            member.mtime = info.st_mtime_ns // 1_000_000_000
            member.uid, member.gid = info.st_uid, info.st_gid
            member.uname = member.gname = ""
            kind = tree.kind_of(info.st_mode)
            try:
                if kind == "dir":
                    member.type = tarfile.DIRTYPE
                    tar.addfile(member)
                    counts["dirs"] += 1
                elif kind == "symlink":
                    member.type = tarfile.SYMTYPE
                    member.linkname = os.readlink(path)
                    tar.addfile(member)
                    counts["symlinks"] += 1
                elif kind == "file":
                    inode = (info.st_dev, info.st_ino)
                    if info.st_nlink > 1 and inode in first_names:
                        member.type = tarfile.LNKTYPE
                        member.linkname = first_names[inode]
                        tar.addfile(member)
                        counts["hardlinks"] += 1
                        continue
                    content += _add_file(tar, member, path)
                    counts["files"] += 1
                    if info.st_nlink > 1:
                        first_names[inode] = name
                else:
                    skip(name)  # a device node, fifo or socket
            except (FileNotFoundError, _Changed):
                skip(name)  # gone or replaced while we read
    out.flush()
    return {
        "type": tree.kind_of(top_info.st_mode),
        "mode": stat.S_IMODE(top_info.st_mode),
        **counts,
        "skipped_paths": skipped,
        "content_bytes": content,
        "bytes": out.bytes,
        "errors": errors[:100],
    }


class _Changed(Exception):
    """A file stopped being a regular file between the walk and the read."""


def _add_file(tar: Any, member: Any, path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # it became a symlink
            raise _Changed(path) from exc
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _Changed(path)
        member.size = info.st_size
        tar.addfile(member, _Content(fd, info.st_size))
    finally:
        os.close(fd)
    return int(info.st_size)
