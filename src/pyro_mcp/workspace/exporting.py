"""Export: extract a tar stream from a guest to a host path, safely and all at once.

The guest sends a tar (plain or compressed) of a file or a directory, as byte chunks. A
directory export names its members relative to the exported directory (``archive_get``
does; a ``.`` entry, if present, gives the directory its mode); a file export holds that
one file. Pass ``kind`` (the guest's answer says which it sent): with ``"auto"`` an archive
holding a single regular file and no ``.`` entry is taken for a file export, which cannot
be told apart from a directory holding just that file.

The archive is untrusted: the seed rules apply (:class:`~pyro_mcp.workspace.seeds.TreeBuilder`:
no absolute names, no ``..``, no symlink leading out, no hardlink out of the tree, no
devices, entry and byte caps), and setuid/setgid bits are dropped since the files land on
the host. Everything is extracted into a temporary directory next to the output and renamed
into place at the end, so a failed export leaves nothing behind and never half-replaces an
existing output.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pyro_mcp.errors import Conflict, InvalidArgument, NotFound
from pyro_mcp.workspace.manifest import DEFAULT_MAX_ENTRIES
from pyro_mcp.workspace.seeds import (
    DEFAULT_MAX_BYTES,
    TreeBuilder,
    add_tar_members,
    open_tar_stream,
    remove_tree,
)

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
    output: Path,
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

    Raises Conflict (naming the path) when ``output`` exists and ``force`` is false (with
    ``force`` it is replaced whole, once the new one is complete), NotFound when its parent
    directory does not exist, and the seed errors (OutsideRoot, InvalidArgument, TooLarge,
    each naming the entry) for an unsafe archive. On any error the host is unchanged.
    """
    output = Path(os.path.abspath(output))
    parent = output.parent
    if not parent.is_dir():
        raise NotFound(f"export destination directory {parent} does not exist")
    _refuse_existing(output, force)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.export-", dir=parent))
    try:
        tree_dir = work / "tree"
        tree_dir.mkdir(mode=0o700)
        tree = TreeBuilder(
            tree_dir,
            label=f"export to {output}",
            max_entries=max_entries,
            max_bytes=max_bytes,
            strip_setid=True,
        )
        stream = io.BufferedReader(ChunkReader(chunks), buffer_size=1 << 20)
        with open_tar_stream(stream, "the exported archive") as archive:
            root = add_tar_members(archive, tree)
        entries = tree.finish()
        single = len(entries) == 1 and entries[0].type == "file" and root is None
        if kind == "file" and not single:
            raise InvalidArgument("a file export must hold exactly one regular file")
        if kind == "dir" or (kind == "auto" and not single):
            if not entries and root is None:
                raise InvalidArgument("the exported archive is empty")
            mode, mtime_ns = (root.mode, root.mtime_ns) if root else (0o755, None)
            tree_dir.chmod(mode)
            if mtime_ns is not None:
                os.utime(tree_dir, ns=(mtime_ns, mtime_ns))
            result_type, source = "dir", tree_dir
        else:
            result_type, source = "file", tree_dir / entries[0].path
        _move_into_place(source, output, work, force)
    finally:
        remove_tree(work)
    files = [e for e in entries if e.type == "file"]
    return {
        "output": str(output),
        "type": result_type,
        "entries": len(entries),
        "files": len(files),
        "bytes": sum(e.size for e in files),
    }


def _refuse_existing(output: Path, force: bool) -> None:
    if os.path.lexists(output) and not force:
        raise Conflict(f"export output {output} already exists", hint="pass force to replace it")


def _move_into_place(source: Path, output: Path, work: Path, force: bool) -> None:
    """Rename ``source`` to ``output``; an existing output is moved aside first and put
    back if the rename fails."""
    _refuse_existing(output, force)
    aside = work / "replaced"
    had_old = os.path.lexists(output)
    if had_old:
        os.rename(output, aside)
    try:
        os.rename(source, output)
    except BaseException:
        if had_old:
            os.rename(aside, output)
        raise
