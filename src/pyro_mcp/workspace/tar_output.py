"""Tar archives sent out: :func:`directory_tar` packs a host directory as a tar stream, read
as it is sent, under the seed rules (:mod:`~pyro_mcp.workspace.seeds`)."""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

from pyro_mcp.errors import InvalidArgument
from pyro_mcp.storage.host_files import HostPath, TreeItem, open_item, walk_tree
from pyro_mcp.workspace.blobs import CHUNK
from pyro_mcp.workspace.manifest import DEFAULT_MAX_ENTRIES, check_relative_path, entry_type_of
from pyro_mcp.workspace.seeds import (
    DEFAULT_MAX_BYTES,
    TreeBuilder,
    open_checked_directory,
    special_file_kind,
)


def directory_tar(
    source: Path | HostPath,
    *,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Iterator[bytes]:
    """A host directory packed as a tar stream (PAX format), in chunks of about 1 MiB,
    read as it is sent.

    Walked like a seed (directory descriptors, ``O_NOFOLLOW``) and under the same rules: no
    links leading out, no devices, fifos or sockets, at most ``max_entries`` entries and
    ``max_bytes`` bytes of content (the errors of
    :func:`~pyro_mcp.workspace.seeds.ingest_seed`). The end-of-archive marker goes out only
    once every check has passed, so a refused tree never reaches the receiver as a complete
    archive. NotFound when ``source`` is not a directory.
    """
    fd, tree = open_checked_directory(source, max_entries=max_entries, max_bytes=max_bytes)
    try:
        pending = bytearray()
        sent = 0
        for item in walk_tree(fd, tree.label):
            for piece in _tar_entry(item, tree, pending):
                sent += len(piece)
                yield piece
        tree.finish()  # symlinks leading out are found only once the whole tree is seen
        pending += bytes(2 * tarfile.BLOCKSIZE)
        pending += bytes(-(sent + len(pending)) % tarfile.RECORDSIZE)
        yield bytes(pending)
    finally:
        os.close(fd)


def _tar_entry(item: TreeItem, tree: TreeBuilder, pending: bytearray) -> Iterator[bytes]:
    """Add ``item`` to ``pending`` as tar entry, yielding (and emptying) it whenever it
    holds a chunk's worth."""
    path = check_relative_path(item.path, what=tree.label)
    info = item.info
    header = tarfile.TarInfo(path)
    header.mode, header.mtime = stat.S_IMODE(info.st_mode), info.st_mtime
    header.uid, header.gid = info.st_uid, info.st_gid
    kind = entry_type_of(info.st_mode)
    if kind == "dir":
        tree.add_dir(path, header.mode, info.st_mtime_ns)
        header.type = tarfile.DIRTYPE
    elif kind == "symlink":
        header.linkname = os.readlink(item.name, dir_fd=item.dir_fd)
        tree.add_symlink(path, header.linkname, info.st_mtime_ns)
        header.type = tarfile.SYMTYPE
    elif kind != "file":
        tree.refuse_special(path, special_file_kind(info.st_mode))
    if kind != "file":
        pending += header.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    else:
        fd = open_item(item, tree.label)
        try:
            header.size = left = os.fstat(fd).st_size
            tree.add_file(path, header.mode, info.st_mtime_ns, header.size, lambda _n: b"")
            pending += header.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
            while left:
                if len(pending) >= CHUNK:
                    yield bytes(pending)
                    pending.clear()
                data = os.read(fd, min(left, CHUNK - len(pending)))
                if not data:
                    raise InvalidArgument(f"{tree.label}: {path!r} shrank while being read")
                pending += data
                left -= len(data)
        finally:
            os.close(fd)
        pending += bytes(-header.size % tarfile.BLOCKSIZE)
    if len(pending) >= CHUNK:
        yield bytes(pending)
        pending.clear()
