"""Tar archives read in: untrusted, in one pass, their metadata bounded.

:func:`open_tar_stream` opens a tar (plain, gzip, bzip2 or xz) for one pass and
:func:`add_tar_members` feeds its members into a :class:`~pyro_mcp.workspace.seeds.TreeBuilder`,
which applies the seed rules; both serve seeds (:func:`~pyro_mcp.workspace.seeds.ingest_seed`)
and archives coming back from a guest (:mod:`~pyro_mcp.workspace.exporting`). Member names
are cleaned by :func:`member_path`; an archive that cannot be read is a
:class:`CorruptArchive`, while a failure to read its source keeps its own type.

Tar metadata is bounded before tarfile reads it (:class:`BoundedTarInfo`): the GNU long
names and links, pax headers and sparse maps before one entry take at most
``MAX_METADATA_BYTES`` (1 MiB) in at most ``MAX_EXTENSION_HEADERS`` headers, global pax
headers at most ``MAX_METADATA_BYTES`` in all, and no entry is kept once it is read, so a
small compressed archive declaring a gigabyte of header never makes the host allocate it.
"""

from __future__ import annotations

import lzma
import tarfile
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, BinaryIO

from pyro_mcp.errors import InvalidArgument, OutsideRoot, TooLarge
from pyro_mcp.workspace.manifest import check_relative_path

if TYPE_CHECKING:  # seeds imports this module; the tree is only a parameter here
    from pyro_mcp.workspace.seeds import TreeBuilder

MAX_METADATA_BYTES = 1 << 20  # long names, pax headers, sparse maps: before one entry
MAX_EXTENSION_HEADERS = 16  # GNU tar and pax writers use one to three
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)


def _damaged(exc: BaseException) -> bool:
    """True when ``exc`` says the archive data is bad, not that reading it failed.

    bz2 reports bad data as a plain OSError; its subclasses (a dropped connection, a
    missing file) are real I/O failures and keep their own type.
    """
    if isinstance(exc, OSError):
        return type(exc) is OSError
    return isinstance(exc, _ARCHIVE_ERRORS)


class CorruptArchive(InvalidArgument):
    """An archive could not be read (truncated, bad compression, bad headers)."""


def member_path(name: str) -> str | None:
    """A tar member name as a clean relative path; None for the root (``.``, ``./``).

    OutsideRoot for absolute names and ``..``; ``./`` prefixes, ``//`` and trailing
    slashes are tidied as tar itself does.
    """
    if name.startswith("/"):
        raise OutsideRoot(f"archive entry {name!r} has an absolute name")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise OutsideRoot(f"archive entry {name!r} contains '..'")
    if not parts:
        return None
    return check_relative_path("/".join(parts), what="archive entry")


@dataclass(frozen=True)
class RootInfo:
    """The archive's own entry for its root (``.``), when it has one."""

    mode: int
    mtime_ns: int


def add_tar_members(archive: tarfile.TarFile, tree: TreeBuilder) -> RootInfo | None:
    """Feed every member of a tar opened in stream mode into ``tree``.

    Returns the mode and mtime of the archive's ``.`` entry, if any. CorruptArchive when
    the archive cannot be read.
    """
    root: RootInfo | None = None
    while (member := _next_member(archive, tree.label)) is not None:
        mtime_ns = round(float(member.mtime) * 1_000_000_000)
        path = member_path(member.name)
        if path is None:
            if not member.isdir():
                raise InvalidArgument(f"{tree.label}: the archive root is not a directory")
            root = RootInfo(member.mode & tree.mode_mask, mtime_ns)
        elif member.isreg():
            handle = archive.extractfile(member)
            if handle is None:
                raise CorruptArchive(f"{tree.label}: cannot read {path!r}")
            with handle:
                tree.add_file(path, member.mode, mtime_ns, member.size, _guarded(handle))
        elif member.isdir():
            tree.add_dir(path, member.mode, mtime_ns)
        elif member.issym():
            tree.add_symlink(path, member.linkname, mtime_ns)
        elif member.islnk():
            tree.add_hardlink(path, member.linkname)
        elif member.ischr() or member.isblk():
            tree.refuse_special(path, "device node")
        elif member.isfifo():
            tree.refuse_special(path, "fifo")
        else:
            tree.refuse_special(path, f"tar entry of type {member.type!r}")
    return root


def _next_member(archive: tarfile.TarFile, label: str) -> tarfile.TarInfo | None:
    try:
        member = archive.next()
    except _MetadataTooLarge as exc:
        raise TooLarge(f"{label}: {exc.message}", hint=exc.hint) from None
    except _ARCHIVE_ERRORS as exc:
        if not _damaged(exc):
            raise
        raise CorruptArchive(f"{label}: not a readable tar archive ({exc})") from exc
    # One pass: tarfile would keep every member read (and its pax headers) in memory.
    archive.members.clear()  # type: ignore[attr-defined]
    return member


def _guarded(handle: IO[bytes]) -> Callable[[int], bytes]:
    """``handle.read`` whose decompression and format errors say the archive is corrupt."""

    def read(size: int) -> bytes:
        try:
            return handle.read(size)
        except _ARCHIVE_ERRORS as exc:
            if not _damaged(exc):
                raise
            raise CorruptArchive(f"the archive is corrupt ({exc})") from exc

    return read


def open_tar_stream(fileobj: BinaryIO, label: str) -> tarfile.TarFile:
    """A tar (plain, gzip, bzip2 or xz; detected from the data) opened for one pass, its
    metadata bounded (:class:`BoundedTarInfo`)."""
    try:
        return tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=BoundedTarInfo)
    except _MetadataTooLarge as exc:
        raise TooLarge(f"{label}: {exc.message}", hint=exc.hint) from None
    except _ARCHIVE_ERRORS as exc:
        if not _damaged(exc):
            raise
        raise CorruptArchive(f"{label} is not a tar archive ({exc})") from exc


class _MetadataTooLarge(TooLarge):
    """Raised inside tarfile; re-raised as TooLarge naming the archive."""


_BOUND_HINT = "tar metadata is bounded to guard against archive bombs"
_METADATA_TYPES = {
    tarfile.GNUTYPE_LONGNAME: "GNU long name",
    tarfile.GNUTYPE_LONGLINK: "GNU long link",
    tarfile.XHDTYPE: "pax extended header",
    tarfile.SOLARIS_XHDTYPE: "Solaris extended header",
    tarfile.XGLTYPE: "pax global header",
}
# tarfile reads more before these entries: GNU sparse extension blocks.
_BUDGETED_TYPES = {*_METADATA_TYPES, tarfile.GNUTYPE_SPARSE}
_GLOBAL_HEADER_BYTES: weakref.WeakKeyDictionary[tarfile.TarFile, int] = weakref.WeakKeyDictionary()


class _MetadataBudget:
    """The archive's file object while the headers of one entry are read: it counts what
    tarfile reads and refuses a read past the bound before anything is allocated."""

    def __init__(self, inner: tarfile._Fileobj) -> None:
        self.inner = inner
        self.remaining = MAX_METADATA_BYTES + (MAX_EXTENSION_HEADERS + 2) * tarfile.BLOCKSIZE
        self.headers = 0

    def read(self, size: int, /) -> bytes:
        if size > self.remaining:
            raise _MetadataTooLarge(
                f"the names and extended headers before one entry take more than the "
                f"{MAX_METADATA_BYTES}-byte limit",
                hint=_BOUND_HINT,
            )
        self.remaining -= size
        return self.inner.read(size)

    def write(self, data: bytes, /) -> object:
        return self.inner.write(data)

    def tell(self) -> int:
        return self.inner.tell()

    def seek(self, position: int, /) -> object:
        return self.inner.seek(position)

    def close(self) -> object:
        return self.inner.close()


class BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that bounds the metadata before an entry before tarfile reads it.

    A GNU long name or link (``L``/``K``) or pax header (``x``/``g``) declaring more than
    ``MAX_METADATA_BYTES``, more than ``MAX_EXTENSION_HEADERS`` of them before one entry,
    or global headers past ``MAX_METADATA_BYTES`` in all, is TooLarge naming the limit.
    Works in every mode, the ``r|*`` stream mode (gzip, bzip2, xz) included: the checks
    run on each header tarfile has just parsed, before it reads what the header declares.
    """

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        budget = archive.fileobj
        if isinstance(budget, _MetadataBudget):  # a later header of the same entry
            if self.type in _METADATA_TYPES:
                self._count(archive, budget)
            return super()._proc_member(archive)  # type: ignore[misc,no-any-return]
        if self.type not in _BUDGETED_TYPES:
            return super()._proc_member(archive)  # type: ignore[misc,no-any-return]
        budget = _MetadataBudget(archive.fileobj)
        archive.fileobj = budget
        try:
            if self.type in _METADATA_TYPES:
                self._count(archive, budget)
            return super()._proc_member(archive)  # type: ignore[misc,no-any-return]
        finally:
            archive.fileobj = budget.inner

    def _count(self, archive: tarfile.TarFile, budget: _MetadataBudget) -> None:
        what = _METADATA_TYPES[self.type]
        budget.headers += 1
        if budget.headers > MAX_EXTENSION_HEADERS:
            raise _MetadataTooLarge(
                f"more than {MAX_EXTENSION_HEADERS} extended headers before one entry",
                hint=_BOUND_HINT,
            )
        if self.size > MAX_METADATA_BYTES:
            raise _MetadataTooLarge(
                f"a tar metadata header ({what}) declares {self.size} bytes, more than "
                f"the {MAX_METADATA_BYTES}-byte limit",
                hint=_BOUND_HINT,
            )
        if self.type == tarfile.XGLTYPE:
            total = _GLOBAL_HEADER_BYTES.get(archive, 0) + self.size
            if total > MAX_METADATA_BYTES:
                raise _MetadataTooLarge(
                    f"global pax headers take {total} bytes, more than the "
                    f"{MAX_METADATA_BYTES}-byte limit",
                    hint=_BOUND_HINT,
                )
            _GLOBAL_HEADER_BYTES[archive] = total
