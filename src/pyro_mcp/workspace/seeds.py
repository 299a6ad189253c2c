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

Directories are walked through directory file descriptors without following symlinks
(:func:`~pyro_mcp.storage.host_files.walk_tree`): a directory swapped for a link mid-walk
is refused, never read through. Trees are built the same way, every entry created relative
to its parent's descriptor. Modes and mtimes are preserved; runs of zeros are written as
holes, so sparse files stay sparse.

Tar archives are read by :mod:`~pyro_mcp.workspace.tar_input` (which bounds their
metadata) and a directory is packed as a tar, under the same rules, by
:mod:`~pyro_mcp.workspace.tar_output`.
"""

from __future__ import annotations

import os
import stat
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pyro_mcp.errors import InvalidArgument, NotFound, OutsideRoot, TooLarge
from pyro_mcp.storage.host_files import (
    DIR_FLAGS,
    HostPath,
    TreeItem,
    open_below,
    open_item,
    open_source,
    remove_at,
    walk_tree,
)
from pyro_mcp.workspace.blobs import CHUNK, BlobStore, BlobWriter, SparseWriter
from pyro_mcp.workspace.manifest import (
    DEFAULT_MAX_ENTRIES,
    Entry,
    check_manifest,
    check_relative_path,
    entry_type_of,
)

# Re-exported: ingest_seed raises it for a seed archive that cannot be read.
from pyro_mcp.workspace.tar_input import CorruptArchive as CorruptArchive
from pyro_mcp.workspace.tar_input import add_tar_members, member_path, open_tar_stream

DEFAULT_MAX_BYTES = 2 << 30
MAX_SYMLINK_HOPS = 40  # what Linux allows when resolving a path


@dataclass(frozen=True)
class TreeStats:
    """How big a checked tree is."""

    entries: int
    bytes: int
    """Bytes of regular-file content (declared sizes)."""


class TreeBuilder:
    """Builds a tree under ``root`` from untrusted entries, never following a symlink.

    ``root`` is an open directory descriptor (the caller's to close) or a directory path,
    opened once here; every entry is created relative to its parent's descriptor, reached
    from the root with ``O_NOFOLLOW``, so nothing is ever looked up through a link, not
    even one swapped into the tree while it is built. With ``root=None`` nothing is
    written: the entries are only checked (and counted). With a ``store``, every file's
    content goes to the blob store as it is written. ``strip_setid`` drops setuid/setgid
    bits (for trees landing on the host). Call :meth:`finish` once every entry is added: it
    checks the symlinks (a later entry can change where an earlier link leads) and sets
    directory modes and mtimes; :meth:`close` (or ``with``) releases the descriptors.
    """

    def __init__(
        self,
        root: Path | int | None,
        *,
        label: str,
        store: BlobStore | None = None,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        strip_setid: bool = False,
    ) -> None:
        self.writes = root is not None
        self._owns_fd = isinstance(root, Path)
        if isinstance(root, Path):
            self._fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        else:
            self._fd = -1 if root is None else root
        self._parent: tuple[str, int] | None = None  # the last parent opened, still open
        self.label = label
        self.store = store
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.mode_mask = 0o1777 if strip_setid else 0o7777
        self.entries: dict[str, Entry] = {}
        self.links: dict[str, str] = {}
        self.total_bytes = 0
        self._dir_times: dict[str, int] = {}

    def close(self) -> None:
        self._forget_parent()
        if self._owns_fd and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> TreeBuilder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _at(self, path: str) -> tuple[int, str]:
        """The open directory holding ``path`` and its name there."""
        parent, _, name = path.rpartition("/")
        if not parent:
            return self._fd, name
        if self._parent is None or self._parent[0] != parent:
            fd = open_below(self._fd, parent, self.label)
            self._forget_parent()
            self._parent = (parent, fd)
        return self._parent[1], name

    def _forget_parent(self) -> None:
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None

    # --- adding -------------------------------------------------------------------------

    def add_dir(self, path: str, mode: int, mtime_ns: int) -> None:
        existing = self.entries.get(path)
        if existing is not None and existing.type == "dir":
            # An explicit entry for a directory created implicitly, or named twice.
            self.entries[path] = Entry(path, "dir", mode & self.mode_mask, 0, mtime_ns)
            self._dir_times[path] = mtime_ns
            return
        self._claim(path)
        if self.writes:
            parent_fd, name = self._at(path)
            os.mkdir(name, 0o700, dir_fd=parent_fd)  # the real mode is set last, in finish()
        self.entries[path] = Entry(path, "dir", mode & self.mode_mask, 0, mtime_ns)
        self._dir_times[path] = mtime_ns

    def add_file(
        self, path: str, mode: int, mtime_ns: int, size: int, read: Callable[[int], bytes]
    ) -> None:
        """A regular file of ``size`` declared bytes, its data from ``read(n)``."""
        self._claim(path)
        if self.total_bytes + size > self.max_bytes:
            raise self._too_many_bytes(path, size)
        if not self.writes:
            self.total_bytes += size
            self.entries[path] = Entry(path, "file", mode & self.mode_mask, size, mtime_ns)
            return
        parent_fd, name = self._at(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(name, flags, 0o600, dir_fd=parent_fd), "wb") as handle:
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
                os.utime(handle.fileno(), ns=(mtime_ns, mtime_ns))
                sha = blob.commit() if blob is not None else None
            finally:
                if blob is not None:
                    blob.abort()
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
        if self.writes:
            parent_fd, name = self._at(path)
            os.symlink(target, name, dir_fd=parent_fd)
            os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=parent_fd, follow_symlinks=False)
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
        if self.writes:
            source_parent, _, source_name = existing.path.rpartition("/")
            source_fd = open_below(self._fd, source_parent, self.label)
            try:
                parent_fd, name = self._at(path)
                os.link(
                    source_name,
                    name,
                    src_dir_fd=source_fd,
                    dst_dir_fd=parent_fd,
                    follow_symlinks=False,
                )
            finally:
                os.close(source_fd)
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
            if self.writes:
                parent_fd, name = self._at(ancestor)
                os.mkdir(name, 0o700, dir_fd=parent_fd)
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
        if self.writes:
            self._forget_parent()
            for path in sorted(self._dirs(), key=lambda p: p.count("/"), reverse=True):
                fd = open_below(self._fd, path, self.label)
                try:
                    os.fchmod(fd, self.entries[path].mode)
                    mtime = self._dir_times.get(path)
                    if mtime is not None:
                        os.utime(fd, ns=(mtime, mtime))
                finally:
                    os.close(fd)
        return check_manifest(self.entries.values())

    def _dirs(self) -> list[str]:
        return [path for path, entry in self.entries.items() if entry.type == "dir"]

    def stats(self) -> TreeStats:
        return TreeStats(len(self.entries), self.total_bytes)


# --- directories ------------------------------------------------------------------------


def add_directory(source_fd: int, tree: TreeBuilder) -> None:
    """Feed the contents of the open host directory ``source_fd`` into ``tree``, walked
    through directory descriptors, never following a symlink."""
    for item in walk_tree(source_fd, tree.label):
        path = check_relative_path(item.path, what=tree.label)
        info = item.info
        kind = entry_type_of(info.st_mode)
        if kind == "dir":
            tree.add_dir(path, stat.S_IMODE(info.st_mode), info.st_mtime_ns)
        elif kind == "file":
            _add_host_file(item, path, tree)
        elif kind == "symlink":
            target = os.readlink(item.name, dir_fd=item.dir_fd)
            tree.add_symlink(path, target, info.st_mtime_ns)
        else:
            tree.refuse_special(path, special_file_kind(info.st_mode))


def special_file_kind(st_mode: int) -> str:
    """What a refused entry of ``st_mode`` is called in errors ("fifo", "device node"...)."""
    if stat.S_ISCHR(st_mode) or stat.S_ISBLK(st_mode):
        return "device node"
    if stat.S_ISFIFO(st_mode):
        return "fifo"
    if stat.S_ISSOCK(st_mode):
        return "socket"
    return "special file"


def _add_host_file(item: TreeItem, path: str, tree: TreeBuilder) -> None:
    mode = stat.S_IMODE(item.info.st_mode)
    if not tree.writes:
        tree.add_file(path, mode, item.info.st_mtime_ns, item.info.st_size, lambda _n: b"")
        return
    with os.fdopen(open_item(item, tree.label), "rb") as handle:
        # The size when opened is the declared size; a file that grows meanwhile is
        # refused rather than read past the cap.
        size = os.fstat(handle.fileno()).st_size
        tree.add_file(path, mode, item.info.st_mtime_ns, size, handle.read)


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
    source: Path | HostPath,
    staging_dir: Path,
    store: BlobStore,
    *,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> list[Entry]:
    """Copy a seed (host directory, or tar / .tar.gz / .tgz / .tar.bz2 / .tar.xz) into
    ``staging_dir`` (created, mode 0700; must not exist) and its file contents into
    ``store``; returns the seed's manifest.

    ``source`` is a plain path (the caller's own) or a HostPath confined to a root. Errors
    (see the module docstring) name the entry: OutsideRoot, InvalidArgument, TooLarge
    (``max_entries`` entries, ``max_bytes`` bytes of file content, oversized tar
    metadata), NotFound when ``source`` does not exist. On error the staging directory is
    removed; blobs already stored stay until the next blob GC.
    """
    seed = HostPath.of(source)
    label = f"seed {seed}"
    fd = open_source(seed, "seed")
    try:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        if not is_dir and not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidArgument(f"{label} is neither a directory nor a tar archive")
        _new_staging(staging_dir)
        try:
            with TreeBuilder(
                staging_dir, label=label, store=store, max_entries=max_entries, max_bytes=max_bytes
            ) as tree:
                if is_dir:
                    add_directory(fd, tree)
                else:
                    with (
                        open(fd, "rb", closefd=False) as handle,
                        open_tar_stream(handle, label) as archive,
                    ):
                        add_tar_members(archive, tree)
                return tree.finish()
        except BaseException:
            remove_tree(staging_dir)
            raise
    finally:
        os.close(fd)


def open_checked_directory(
    source: Path | HostPath, *, max_entries: int, max_bytes: int
) -> tuple[int, TreeBuilder]:
    """A host directory opened for a walk under the seed rules: (its descriptor, a
    :class:`TreeBuilder` that only checks). NotFound when it is not a directory; the
    caller closes the descriptor."""
    target = HostPath.of(source)
    fd = open_source(target, "directory")
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise NotFound(f"{target} is not a directory")
    except BaseException:
        os.close(fd)
        raise
    label = f"directory {target}"
    return fd, TreeBuilder(None, label=label, max_entries=max_entries, max_bytes=max_bytes)


def check_directory(
    source: Path | HostPath,
    *,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> TreeStats:
    """Check a host directory against the seed rules without copying anything.

    Same errors as :func:`ingest_seed`; returns how many entries and bytes it holds.
    """
    fd, tree = open_checked_directory(source, max_entries=max_entries, max_bytes=max_bytes)
    try:
        add_directory(fd, tree)
        tree.finish()
        return tree.stats()
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Remove a tree we built, including directories whose mode forbids writing, through
    descriptors: nothing below ``path`` is followed, even if replaced by a link."""
    try:
        parent = os.open(path.parent, DIR_FLAGS & ~os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        remove_at(parent, path.name)
    finally:
        os.close(parent)
