"""Seeds: the host directory or tar archive a new workspace's ``/workspace`` starts from.

:func:`ingest_seed` copies a seed into a staging directory (what ``mke2fs -d`` packs into
the workspace disk), records its manifest (the workspace's baseline) and stores each
file's content in the blob store, all in one pass over the data.

A seed is untrusted, and so is an archive coming back from a guest (:mod:`exporting`
extracts those with the same :class:`TreeBuilder`). Refused, each error naming the entry:

- absolute names and ``..`` components (OutsideRoot);
- symlinks with an absolute target, or whose target resolves outside the tree once every
  symlink in the tree is followed (OutsideRoot); relative targets that stay inside are kept;
- an entry below a symlink or below a file (OutsideRoot / InvalidArgument), and the same
  name twice (InvalidArgument): nothing is ever written through a link;
- hardlinks to anything that is not a regular file already in the tree (OutsideRoot);
- device nodes, fifos and sockets (InvalidArgument);
- more than ``max_entries`` entries or ``max_bytes`` bytes of file content (TooLarge). The
  byte cap is checked against each entry's declared size before its data is read and
  again while it is read, so an archive bomb stops at the cap and never fills the disk.

Directories are walked without following symlinks; modes and mtimes are preserved. Runs
of zeros are written as holes, so sparse files stay sparse.
"""

from __future__ import annotations

import errno
import lzma
import os
import shutil
import stat
import tarfile
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from pyro_mcp.errors import InvalidArgument, NotFound, OutsideRoot, TooLarge
from pyro_mcp.workspace.blobs import CHUNK, BlobStore, BlobWriter, SparseWriter
from pyro_mcp.workspace.manifest import (
    DEFAULT_MAX_ENTRIES,
    Entry,
    check_manifest,
    check_relative_path,
    entry_type_of,
)

DEFAULT_MAX_BYTES = 2 << 30
MAX_SYMLINK_HOPS = 40  # what Linux allows when resolving a path
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)


def _damaged(exc: BaseException) -> bool:
    """True when ``exc`` says the archive data is bad, not that reading it failed.

    bz2 reports bad data as a plain OSError; its subclasses (a dropped connection, a
    missing file) are real I/O failures and keep their own type.
    """
    if isinstance(exc, OSError):
        return type(exc) is OSError
    return isinstance(exc, _ARCHIVE_ERRORS)


@dataclass(frozen=True)
class TreeStats:
    """How big a checked tree is."""

    entries: int
    bytes: int
    """Bytes of regular-file content (declared sizes)."""


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


class TreeBuilder:
    """Builds a tree under ``root`` from untrusted entries, never following a symlink.

    With ``root=None`` nothing is written: the entries are only checked (and counted).
    With a ``store``, every file's content goes to the blob store as it is written.
    ``strip_setid`` drops setuid/setgid bits (for trees landing on the host).
    Call :meth:`finish` once every entry is added: it checks the symlinks (a later entry
    can change where an earlier link leads) and sets directory modes and mtimes.
    """

    def __init__(
        self,
        root: Path | None,
        *,
        label: str,
        store: BlobStore | None = None,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        strip_setid: bool = False,
    ) -> None:
        self.root = root
        self.label = label
        self.store = store
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.mode_mask = 0o1777 if strip_setid else 0o7777
        self.entries: dict[str, Entry] = {}
        self.links: dict[str, str] = {}
        self.total_bytes = 0
        self._dir_times: dict[str, int] = {}

    # --- adding -------------------------------------------------------------------------

    def add_dir(self, path: str, mode: int, mtime_ns: int) -> None:
        existing = self.entries.get(path)
        if existing is not None and existing.type == "dir":
            # An explicit entry for a directory created implicitly, or named twice.
            self.entries[path] = Entry(path, "dir", mode & self.mode_mask, 0, mtime_ns)
            self._dir_times[path] = mtime_ns
            return
        self._claim(path)
        if self.root is not None:
            os.mkdir(self.root / path, 0o700)  # the real mode is set last, in finish()
        self.entries[path] = Entry(path, "dir", mode & self.mode_mask, 0, mtime_ns)
        self._dir_times[path] = mtime_ns

    def add_file(
        self, path: str, mode: int, mtime_ns: int, size: int, read: Callable[[int], bytes]
    ) -> None:
        """A regular file of ``size`` declared bytes, its data from ``read(n)``."""
        self._claim(path)
        if self.total_bytes + size > self.max_bytes:
            raise self._too_many_bytes(path, size)
        if self.root is None:
            self.total_bytes += size
            self.entries[path] = Entry(path, "file", mode & self.mode_mask, size, mtime_ns)
            return
        full = self.root / path
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(full, flags, 0o600), "wb") as handle:
            sparse = SparseWriter(handle)
            blob: BlobWriter | None = self.store.writer() if self.store else None
            try:
                while True:
                    chunk = read(CHUNK)
                    if not chunk:
                        break
                    if sparse.written + len(chunk) > size:
                        raise TooLarge(
                            f"{self.label}: {path!r} holds more data than the {size} bytes "
                            "it declares"
                        )
                    sparse.write(chunk)
                    if blob is not None:
                        blob.write(chunk)
                if sparse.written != size:
                    raise InvalidArgument(
                        f"{self.label}: {path!r} ends after {sparse.written} of {size} bytes"
                    )
                sparse.finish()
                os.fchmod(handle.fileno(), mode & self.mode_mask)
                sha = blob.commit() if blob is not None else None
            finally:
                if blob is not None:
                    blob.abort()
        os.utime(full, ns=(mtime_ns, mtime_ns))
        self.total_bytes += size
        self.entries[path] = Entry(path, "file", mode & self.mode_mask, size, mtime_ns, sha)

    def add_symlink(self, path: str, target: str, mtime_ns: int) -> None:
        if not target or "\x00" in target:
            raise InvalidArgument(f"{self.label}: symlink {path!r} has an empty target")
        if target.startswith("/"):
            raise OutsideRoot(
                f"{self.label}: symlink {path!r} points to the absolute path {target!r}; "
                "only relative targets inside the tree are allowed"
            )
        self._claim(path)
        if self.root is not None:
            os.symlink(target, self.root / path)
            os.utime(self.root / path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
        size = len(target.encode("utf-8", "surrogateescape"))
        self.entries[path] = Entry(path, "symlink", 0o777, size, mtime_ns, target=target)
        self.links[path] = target

    def add_hardlink(self, path: str, link_name: str) -> None:
        """A hardlink to ``link_name``, which must be a regular file already added."""
        try:
            source = member_path(link_name)
        except OutsideRoot as exc:
            raise OutsideRoot(
                f"{self.label}: hardlink {path!r} points outside the tree ({link_name!r})"
            ) from exc
        existing = self.entries.get(source) if source else None
        if existing is None or existing.type != "file":
            raise OutsideRoot(
                f"{self.label}: hardlink {path!r} points to {link_name!r}, which is not a "
                "file earlier in the archive"
            )
        self._claim(path)
        if self.root is not None:
            os.link(self.root / existing.path, self.root / path, follow_symlinks=False)
        self.entries[path] = Entry(
            path, "file", existing.mode, existing.size, existing.mtime_ns, existing.sha256
        )

    def refuse_special(self, path: str, kind: str) -> None:
        raise InvalidArgument(
            f"{self.label}: {path!r} is a {kind}; only files, directories and symlinks are allowed"
        )

    # --- checks -------------------------------------------------------------------------

    def _claim(self, path: str) -> None:
        """Make room for a new entry at ``path``: count it, refuse a repeat, and make sure
        every ancestor is a real directory (created here when the archive skipped it)."""
        if path in self.entries:
            raise InvalidArgument(f"{self.label}: {path!r} appears twice")
        ancestors = []
        parent = path.rpartition("/")[0]
        while parent:
            ancestors.append(parent)
            parent = parent.rpartition("/")[0]
        for ancestor in reversed(ancestors):
            kind = self.entries[ancestor].type if ancestor in self.entries else None
            if kind == "dir":
                continue
            if kind == "symlink":
                raise OutsideRoot(
                    f"{self.label}: {path!r} lies below the symlink {ancestor!r}; "
                    "entries are never written through links"
                )
            if kind is not None:
                raise InvalidArgument(f"{self.label}: {path!r} lies below the {kind} {ancestor!r}")
            self._count(ancestor)
            if self.root is not None:
                os.mkdir(self.root / ancestor, 0o700)
            self.entries[ancestor] = Entry(ancestor, "dir", 0o755, 0, 0)
        self._count(path)

    def _count(self, path: str) -> None:
        if len(self.entries) >= self.max_entries:
            raise TooLarge(
                f"{self.label}: more than {self.max_entries} entries (reached at {path!r})",
                hint="the entry limit guards against archive bombs; seed fewer files",
            )

    def _too_many_bytes(self, path: str, size: int) -> TooLarge:
        return TooLarge(
            f"{self.label}: {path!r} ({size} bytes) takes the content past the "
            f"{self.max_bytes}-byte limit ({self.total_bytes} bytes before it)",
            hint="the size limit guards against archive bombs; seed less data",
        )

    def _check_links(self) -> None:
        for path in sorted(self.links):
            if self._escapes(path):
                raise OutsideRoot(
                    f"{self.label}: symlink {path!r} -> {self.links[path]!r} resolves "
                    "outside the tree"
                )

    def _escapes(self, link: str) -> bool:
        """Resolve ``link`` as the kernel would, following the tree's own symlinks; True if
        the walk climbs above the root."""
        stack = link.split("/")[:-1]
        pending = deque(self.links[link].split("/"))
        hops = 1
        while pending:
            part = pending.popleft()
            if part in ("", "."):
                continue
            if part == "..":
                if not stack:
                    return True
                stack.pop()
                continue
            stack.append(part)
            target = self.links.get("/".join(stack))
            if target is None:
                continue
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise InvalidArgument(f"{self.label}: symlink {link!r} never resolves (a loop)")
            if target.startswith("/"):
                return True
            stack.pop()
            pending.extendleft(reversed(target.split("/")))
        return False

    # --- finishing ----------------------------------------------------------------------

    def finish(self) -> list[Entry]:
        """Check every symlink, set directory modes and mtimes (deepest first); the
        manifest, sorted by path."""
        self._check_links()
        if self.root is not None:
            for path in sorted(self._dirs(), key=lambda p: p.count("/"), reverse=True):
                entry = self.entries[path]
                full = self.root / path
                os.chmod(full, entry.mode)
                mtime = self._dir_times.get(path)
                if mtime is not None:
                    os.utime(full, ns=(mtime, mtime))
        return check_manifest(self.entries.values())

    def _dirs(self) -> list[str]:
        return [path for path, entry in self.entries.items() if entry.type == "dir"]

    def stats(self) -> TreeStats:
        return TreeStats(len(self.entries), self.total_bytes)


# --- tar archives -----------------------------------------------------------------------


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
        return archive.next()
    except _ARCHIVE_ERRORS as exc:
        if not _damaged(exc):
            raise
        raise CorruptArchive(f"{label}: not a readable tar archive ({exc})") from exc


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
    """A tar (plain, gzip, bzip2 or xz; detected from the data) opened for one pass."""
    try:
        return tarfile.open(fileobj=fileobj, mode="r|*")
    except _ARCHIVE_ERRORS as exc:
        if not _damaged(exc):
            raise
        raise CorruptArchive(f"{label} is not a tar archive ({exc})") from exc


# --- directories ------------------------------------------------------------------------


def add_directory(source: Path, tree: TreeBuilder) -> None:
    """Feed the contents of a host directory into ``tree``, never following a symlink."""
    pending: deque[str] = deque([""])
    while pending:
        relative = pending.popleft()
        with os.scandir(source / relative if relative else source) as listing:
            children = sorted(listing, key=lambda d: d.name)
        for child in children:
            path = check_relative_path(
                f"{relative}/{child.name}" if relative else child.name, what=tree.label
            )
            info = child.stat(follow_symlinks=False)
            kind = entry_type_of(info.st_mode)
            if kind == "dir":
                tree.add_dir(path, stat.S_IMODE(info.st_mode), info.st_mtime_ns)
                pending.append(path)
            elif kind == "file":
                _add_host_file(source / path, path, info, tree)
            elif kind == "symlink":
                tree.add_symlink(path, os.readlink(source / path), info.st_mtime_ns)
            else:
                tree.refuse_special(path, _special_name(info.st_mode))


def _special_name(st_mode: int) -> str:
    if stat.S_ISCHR(st_mode) or stat.S_ISBLK(st_mode):
        return "device node"
    if stat.S_ISFIFO(st_mode):
        return "fifo"
    if stat.S_ISSOCK(st_mode):
        return "socket"
    return "special file"


def _add_host_file(full: Path, path: str, info: os.stat_result, tree: TreeBuilder) -> None:
    mode = stat.S_IMODE(info.st_mode)
    if tree.root is None:
        tree.add_file(path, mode, info.st_mtime_ns, info.st_size, lambda _n: b"")
        return
    try:
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidArgument(f"{tree.label}: {path!r} changed while being read") from exc
        raise
    with os.fdopen(fd, "rb") as handle:
        now = os.fstat(handle.fileno())
        if not stat.S_ISREG(now.st_mode):
            raise InvalidArgument(f"{tree.label}: {path!r} changed while being read")
        # The size seen when walking is the declared size; a file that grows meanwhile is
        # refused rather than read past the cap.
        tree.add_file(path, mode, info.st_mtime_ns, now.st_size, handle.read)


# --- seeds ------------------------------------------------------------------------------


def _new_staging(staging_dir: Path) -> None:
    staging_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging_dir.mkdir(mode=0o700)  # private: setuid files may sit in it until packed
    except FileExistsError as exc:
        raise InvalidArgument(f"staging directory {staging_dir} already exists") from exc


def empty_seed(staging_dir: Path) -> list[Entry]:
    """An empty staging directory for a workspace without a seed; the empty manifest."""
    _new_staging(staging_dir)
    return []


def ingest_seed(
    source: Path,
    staging_dir: Path,
    store: BlobStore,
    *,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> list[Entry]:
    """Copy a seed (host directory, or tar / .tar.gz / .tgz / .tar.bz2 / .tar.xz) into
    ``staging_dir`` (created, mode 0700; must not exist) and its file contents into
    ``store``; returns the seed's manifest.

    Errors (see the module docstring) name the entry: OutsideRoot, InvalidArgument,
    TooLarge (``max_entries`` entries, ``max_bytes`` bytes of file content), NotFound
    when ``source`` does not exist. On error the staging directory is removed; blobs
    already stored stay until the next blob GC.
    """
    if not source.exists():
        raise NotFound(f"seed {source} does not exist")
    label = f"seed {source}"
    _new_staging(staging_dir)
    tree = TreeBuilder(
        staging_dir, label=label, store=store, max_entries=max_entries, max_bytes=max_bytes
    )
    try:
        if source.is_dir():
            add_directory(source, tree)
        elif source.is_file():
            with source.open("rb") as handle, open_tar_stream(handle, label) as archive:
                add_tar_members(archive, tree)
        else:
            raise InvalidArgument(f"{label} is neither a directory nor a tar archive")
        return tree.finish()
    except BaseException:
        remove_tree(staging_dir)
        raise


def check_directory(
    source: Path,
    *,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> TreeStats:
    """Check a host directory against the seed rules without copying anything.

    Same errors as :func:`ingest_seed`; returns how many entries and bytes it holds.
    """
    if not source.is_dir():
        raise NotFound(f"{source} is not a directory")
    tree = TreeBuilder(
        None, label=f"directory {source}", max_entries=max_entries, max_bytes=max_bytes
    )
    add_directory(source, tree)
    tree.finish()
    return tree.stats()


def remove_tree(path: Path) -> None:
    """Remove a tree we built, including directories whose mode forbids writing."""
    if not path.exists():
        return
    for directory, _dirs, _files in os.walk(path):
        os.chmod(directory, 0o700)
    shutil.rmtree(path, ignore_errors=True)
