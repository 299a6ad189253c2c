"""Export: extract a tar stream from a guest to a host path, safely and all at once.

The guest sends a tar (plain or compressed) of a file or a directory, as byte chunks. A
directory export names its members relative to the exported directory (``archive_get``
does; a ``.`` entry, if present, gives the directory its mode); a file export holds that
one file. Pass ``kind`` (the guest's answer says which it sent): with ``"auto"`` an archive
holding a single regular file and no ``.`` entry is taken for a file export, which cannot
be told apart from a directory holding just that file.

The archive is untrusted: the seed rules apply (:class:`~pyro_mcp.workspace.seeds.TreeBuilder`:
no absolute names, no ``..``, no symlink leading out, no hardlink out of the tree, no
devices, entry and byte caps, bounded tar metadata), and setuid/setgid bits are dropped
since the files land on the host.

The output is a plain path (the caller's own) or a
:class:`~pyro_mcp.storage.host_files.HostPath` confined to a root, and is reached through
directory descriptors (:func:`~pyro_mcp.storage.host_files.open_destination`): a link
swapped in after the check is refused, not followed. Everything is extracted into a
private temporary directory next to the output (so inside the root) and moved into place
at the end, so a failed export leaves nothing behind and never half-replaces an existing
output. ``force`` replaces only a regular file with a file export and only a directory
with a directory export; never an allowed root, ``/``, a mount point, a symlink, a device
node, a fifo or a socket.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pyro_mcp.errors import InvalidArgument
from pyro_mcp.storage.host_files import DIR_FLAGS, HostPath, open_destination
from pyro_mcp.workspace.manifest import DEFAULT_MAX_ENTRIES, Entry
from pyro_mcp.workspace.seeds import DEFAULT_MAX_BYTES, TreeBuilder
from pyro_mcp.workspace.tar_input import add_tar_members, open_tar_stream

ExportKind = Literal["auto", "file", "dir"]


class ChunkReader(io.RawIOBase):
    """A read-only binary stream over an iterable of byte chunks."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = bytes(chunk)
        view = memoryview(buffer).cast("B")
        size = min(len(view), len(self._pending))
        view[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def extract_export(
    chunks: Iterable[bytes],
    output: Path | HostPath,
    *,
    force: bool = False,
    kind: ExportKind = "auto",
    max_entries: int = DEFAULT_MAX_ENTRIES,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> dict[str, Any]:
    """Extract the tar in ``chunks`` to ``output`` (a file, or a directory tree).

    ``kind`` ``"auto"`` tells a file export from a directory export by the archive's shape
    (see the module docstring); ``"file"``/``"dir"`` insist on one. Returns ``{"output",
    "type": "file"|"dir", "entries", "files", "bytes"}``.

    Raises Conflict (naming the path and what is there) when ``output`` exists and
    ``force`` is false or may not replace it, InvalidArgument for ``/`` or an allowed root
    itself, NotFound when its parent directory does not exist, OutsideRoot for a symlink
    below the root, and the seed errors (OutsideRoot, InvalidArgument, TooLarge, each
    naming the entry) for an unsafe archive. On any error the host is unchanged.
    """
    target = HostPath.of(output)
    with open_destination(target, "export output") as dest:
        dest.check(None if kind == "auto" else kind, force)  # before any data is read
        work, work_fd = dest.make_temp_dir("export")
        try:
            with dest.translating():
                os.mkdir("tree", 0o700, dir_fd=work_fd)
                tree_fd = os.open("tree", DIR_FLAGS, dir_fd=work_fd)
                try:
                    entries, result_type, name = _extract(
                        chunks, tree_fd, target, kind, max_entries, max_bytes
                    )
                    source_fd = work_fd if result_type == "dir" else tree_fd
                    dest.place(source_fd, name, result_type, force)
                finally:
                    os.close(tree_fd)
        finally:
            os.close(work_fd)
            dest.discard(work)  # the temporary, and whatever force replaced
    files = [e for e in entries if e.type == "file"]
    return {
        "output": str(target),
        "type": result_type,
        "entries": len(entries),
        "files": len(files),
        "bytes": sum(e.size for e in files),
    }


def _extract(
    chunks: Iterable[bytes],
    tree_fd: int,
    target: HostPath,
    kind: ExportKind,
    max_entries: int,
    max_bytes: int,
) -> tuple[list[Entry], Literal["file", "dir"], str]:
    """Build the exported tree in ``tree_fd``: its manifest, whether it is a file or a
    directory export, and the name (in ``tree_fd``'s parent or in it) to move in."""
    with TreeBuilder(
        tree_fd,
        label=f"export to {target}",
        max_entries=max_entries,
        max_bytes=max_bytes,
        strip_setid=True,
    ) as tree:
        stream = io.BufferedReader(ChunkReader(chunks), buffer_size=1 << 20)
        with open_tar_stream(stream, tree.label) as archive:
            root = add_tar_members(archive, tree)
        entries = tree.finish()
    single = len(entries) == 1 and entries[0].type == "file" and root is None
    if kind == "file" and not single:
        raise InvalidArgument("a file export must hold exactly one regular file")
    if kind == "file" or (kind == "auto" and single):
        return entries, "file", entries[0].path
    if not entries and root is None and kind == "auto":
        raise InvalidArgument("the exported archive is empty")  # no telling what it was
    mode, mtime_ns = (root.mode, root.mtime_ns) if root else (0o755, None)
    os.fchmod(tree_fd, mode)
    if mtime_ns is not None:
        os.utime(tree_fd, ns=(mtime_ns, mtime_ns))
    return entries, "dir", "tree"
