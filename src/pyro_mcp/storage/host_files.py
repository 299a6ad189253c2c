"""Host files pyro reads and writes for a caller, reached without a second lookup by name.

Every host path a caller names (a seed, a sync source, an export output, a text or patch
file) arrives as a :class:`HostPath` and is opened through directory file descriptors, so
what was checked is what is used:

- **Confined** (``root`` set: what an MCP client gets). The root is opened, then every
  component below it with ``O_NOFOLLOW``; a symlink anywhere below the root, there before
  the call or swapped in during it, is refused (OutsideRoot) and never followed.
- **Unconfined** (``root`` None: a person at the CLI, an SDK program). The path is the
  caller's own and its symlinks are meant: the parent is resolved once, when it is opened,
  and everything after happens relative to that descriptor.

Trees below an opened directory are walked the same way (:func:`walk_tree`): each
directory is reopened with ``O_NOFOLLOW`` and must still be the one that was listed.

Destinations (:func:`open_destination`, :class:`Destination`):

- ``/``, an empty name and an allowed root itself are never destinations (InvalidArgument);
- what exists there is replaced only with ``force``, and only a regular file by a file or
  a directory by a directory; never a symlink, device node, fifo or socket, never a mount
  point (Conflict, saying what is there);
- new content is built in a temporary sibling with a random name, created exclusively next
  to the destination (so inside the root), and moved in with one ``renameat2``
  (:mod:`~pyro_mcp.storage.renameat2`): ``RENAME_NOREPLACE`` when nothing is there,
  ``RENAME_EXCHANGE`` over what force replaces, which must be the very entry that was
  inspected. The caller removes its temporary, and with it anything replaced; on any
  failure nothing is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from pyro_mcp.errors import Conflict, InvalidArgument, NotFound, OutsideRoot, PyroError, TooLarge
from pyro_mcp.guest.extents import data_extents
from pyro_mcp.storage.renameat2 import RENAME_EXCHANGE, RENAME_NOREPLACE, rename

Kind = Literal["file", "dir"]
MAX_READ_BYTES = 64 << 20  # text and patch files
CHUNK = 1 << 20
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a fifo met where a file was expected must not block the open.
READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass(frozen=True)
class HostPath:
    """A host path a caller named, and the root it must stay under.

    ``path`` is absolute and lexically normal; ``root`` None means unconfined. There is
    deliberately no ``__fspath__``: a HostPath is opened with this module, never by name.
    """

    path: Path
    root: Path | None = None

    @classmethod
    def of(cls, value: Path | HostPath) -> HostPath:
        """``value`` itself, or a plain path as an unconfined HostPath."""
        if isinstance(value, HostPath):
            return value
        return cls(Path(os.path.abspath(value)))

    def __str__(self) -> str:
        return str(self.path)

    def below_root(self) -> str:
        """The path relative to the root ("" for the root itself); confined paths only."""
        if self.root is None or not self.path.is_relative_to(self.root):
            raise OutsideRoot(f"{self.path} is outside the allowed host root {self.root}")
        relative = self.path.relative_to(self.root)
        return "" if relative == Path() else relative.as_posix()


def locate(value: str) -> Path:
    """``value`` as an absolute path whose parent is resolved (symlinks followed) and whose
    last component is kept as named, so a symlink there is seen rather than followed."""
    absolute = Path(os.path.join(os.getcwd(), value))
    if absolute.name in ("", ".."):
        return Path(os.path.realpath(absolute))
    return Path(os.path.realpath(absolute.parent)) / absolute.name


def describe(mode: int) -> str:
    """What a file of ``st_mode`` is, with its article: ``a fifo``, ``a directory``..."""
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISFIFO, "a fifo"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a device node"),
        (stat.S_ISBLK, "a device node"),
    ):
        if test(mode):
            return name
    return "a special file"


# --- opening ------------------------------------------------------------------------------


def _open_at(dir_fd: int, name: str, flags: int, shown: str, what: str) -> int:
    """``os.open(name, flags, dir_fd=dir_fd)``, its failures as errors naming ``shown``."""
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        error = _open_error(exc, dir_fd, name, shown, what)
        if error is exc:
            raise
        raise error from exc


def _open_error(exc: OSError, dir_fd: int, name: str, shown: str, what: str) -> Exception:
    """The error to raise for a failed open of ``name`` in ``dir_fd``."""
    if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and _is_link(dir_fd, name)):
        return OutsideRoot(
            f"{what}: {shown!r} is a symlink; links below an allowed root or inside a "
            "tree are never followed",
            hint="name the path the link leads to",
        )
    if exc.errno == errno.ENOENT:
        return NotFound(f"{what}: {shown!r} does not exist")
    if exc.errno == errno.ENOTDIR:
        return InvalidArgument(f"{what}: {shown!r} is not a directory")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return InvalidArgument(f"{what}: permission denied at {shown!r}")
    return exc


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def open_below(dir_fd: int, relative: str, what: str) -> int:
    """A new descriptor of the directory ``relative`` below ``dir_fd`` ("" for ``dir_fd``
    itself), opened one component at a time without following a symlink.

    OutsideRoot names the component that is a symlink; NotFound one that is missing.
    """
    fd = os.dup(dir_fd)
    done: list[str] = []
    try:
        for part in relative.split("/") if relative else []:
            done.append(part)
            inner = _open_at(fd, part, DIR_FLAGS, "/".join(done), what)
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_directory(path: Path, what: str) -> int:
    """A directory opened by name: an allowed root, or an unconfined path's parent."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NotFound(f"{what} directory {path} does not exist") from exc
    except NotADirectoryError as exc:
        raise InvalidArgument(f"{what} directory {path} is not a directory") from exc
    except PermissionError as exc:
        raise InvalidArgument(f"{what} directory {path}: permission denied") from exc


def _open_parent(target: HostPath, what: str) -> tuple[int, str]:
    """A descriptor of ``target``'s parent directory, and ``target``'s name in it."""
    if target.root is None:
        return _open_directory(target.path.parent, what), target.path.name
    parent, _, name = target.below_root().rpartition("/")
    root_fd = _open_directory(target.root, "allowed root")
    try:
        return open_below(root_fd, parent, f"{what} {target}"), name
    finally:
        os.close(root_fd)


def open_source(target: HostPath, what: str) -> int:
    """``target`` opened read-only (a file or a directory; the caller checks which).

    Confined, the last component is not followed either; never blocks on a fifo.
    NotFound when it does not exist, OutsideRoot for a symlink under a root.
    """
    if target.root is None:
        try:
            return os.open(target.path, READ_FLAGS)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise NotFound(f"{what} {target} does not exist") from exc
        except PermissionError as exc:
            raise InvalidArgument(f"{what} {target}: permission denied") from exc
    if not target.below_root():
        return _open_directory(target.root, "allowed root")
    parent_fd, name = _open_parent(target, what)
    try:
        return os.open(name, READ_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
    except FileNotFoundError as exc:
        raise NotFound(f"{what} {target} does not exist") from exc
    except OSError as exc:
        error = _open_error(exc, parent_fd, name, name, f"{what} {target}")
        if error is exc:
            raise
        raise error from exc
    finally:
        os.close(parent_fd)


def read_file(target: HostPath, what: str, max_bytes: int = MAX_READ_BYTES) -> bytes:
    """The content of the regular file ``target``, at most ``max_bytes`` of it.

    InvalidArgument when it is not a regular file (a fifo is refused, never read),
    TooLarge past ``max_bytes``, plus the errors of :func:`open_source`.
    """
    fd = open_source(target, what)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidArgument(f"{what} {target} is {describe(info.st_mode)}, not a file")
        if info.st_size > max_bytes:
            raise TooLarge(
                f"{what} {target} is {info.st_size} bytes, more than the {max_bytes}-byte limit"
            )
        parts: list[bytes] = []
        total = 0
        while total <= max_bytes and (data := os.read(fd, min(CHUNK, max_bytes + 1 - total))):
            parts.append(data)
            total += len(data)
        if total > max_bytes:
            raise TooLarge(f"{what} {target} grew past the {max_bytes}-byte limit while read")
        return b"".join(parts)
    finally:
        os.close(fd)


# --- walking a tree -----------------------------------------------------------------------


@dataclass(frozen=True)
class TreeItem:
    """One entry met by :func:`walk_tree`."""

    path: str
    """Relative to the walked directory."""
    info: os.stat_result
    """Its ``lstat``."""
    dir_fd: int
    """The open directory holding it; valid until the walk moves on."""
    name: str
    """Its name in ``dir_fd``."""


def walk_tree(top_fd: int, what: str) -> Iterator[TreeItem]:
    """Every entry below the directory ``top_fd``, breadth first, names sorted, never
    following a link: each directory is reopened below ``top_fd`` with ``O_NOFOLLOW`` and
    must still be the directory that was listed (InvalidArgument otherwise)."""
    pending: deque[tuple[str, tuple[int, int] | None]] = deque([("", None)])
    while pending:
        relative, identity = pending.popleft()
        fd = open_below(top_fd, relative, what)
        try:
            now = os.fstat(fd)
            if identity is not None and (now.st_dev, now.st_ino) != identity:
                raise InvalidArgument(f"{what}: {relative!r} changed while being read")
            for name in sorted(os.listdir(fd)):
                path = f"{relative}/{name}" if relative else name
                try:
                    info = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError as exc:
                    raise InvalidArgument(f"{what}: {path!r} changed while being read") from exc
                yield TreeItem(path, info, fd, name)
                if stat.S_ISDIR(info.st_mode):
                    pending.append((path, (info.st_dev, info.st_ino)))
        finally:
            os.close(fd)


def open_item(item: TreeItem, what: str) -> int:
    """The regular file ``item`` opened read-only; InvalidArgument if it is no longer the
    file that was listed (replaced by a link, a fifo or another file)."""
    try:
        fd = os.open(item.name, READ_FLAGS | os.O_NOFOLLOW, dir_fd=item.dir_fd)
    except OSError as exc:
        raise InvalidArgument(f"{what}: {item.path!r} changed while being read") from exc
    now = os.fstat(fd)
    if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (
        item.info.st_dev,
        item.info.st_ino,
    ):
        os.close(fd)
        raise InvalidArgument(f"{what}: {item.path!r} changed while being read")
    return fd


def remove_at(dir_fd: int, name: str) -> None:
    """Remove ``name`` in ``dir_fd`` and everything below it without following a link or
    entering another filesystem; directories whose mode forbids writing are made writable
    first. Nothing to do when it is missing."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    frames: list[tuple[int, str, int, Iterator[str]]] = []  # (parent fd, name, fd, names)
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
        os.fchmod(fd, 0o700)
        frames.append((dir_fd, name, fd, iter(os.listdir(fd))))
        while frames:
            parent, own, fd, names = frames[-1]
            child = next(names, None)
            if child is None:
                frames.pop()
                os.close(fd)
                os.rmdir(own, dir_fd=parent)
                continue
            child_info = os.stat(child, dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISDIR(child_info.st_mode):
                os.unlink(child, dir_fd=fd)
            elif child_info.st_dev == info.st_dev:
                child_fd = os.open(child, DIR_FLAGS, dir_fd=fd)
                os.fchmod(child_fd, 0o700)
                frames.append((fd, child, child_fd, iter(os.listdir(child_fd))))
    finally:
        for _parent, _own, fd, _names in frames:
            os.close(fd)


# --- destinations -------------------------------------------------------------------------


def open_destination(target: HostPath, what: str) -> Destination:
    """Where ``target`` will be written: its parent directory opened (see the module
    docstring). InvalidArgument for ``/`` and for an allowed root itself, NotFound when
    the parent directory is missing, OutsideRoot for a symlink below the root."""
    if not target.path.name:
        raise InvalidArgument(f"{what} {target} is the filesystem root; name a path below it")
    if target.root is not None and not target.below_root():
        raise InvalidArgument(
            f"{what} {target} is an allowed host root itself; name a path inside it"
        )
    parent_fd, name = _open_parent(target, what)
    return Destination(target, what, parent_fd, name)


class Destination:
    """An output's parent directory, open, and the name to give the output there."""

    def __init__(self, target: HostPath, what: str, parent_fd: int, name: str) -> None:
        self.target = target
        self.what = what
        self.fd = parent_fd
        self.name = name

    @property
    def shown(self) -> str:
        return f"{self.what} {self.target}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Destination:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def existing(self) -> os.stat_result | None:
        """The ``lstat`` of what is at the destination now; None when nothing is."""
        try:
            return os.stat(self.name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def check(self, kind: Kind | None, force: bool) -> os.stat_result | None:
        """What is at the destination, once the replacement rules allow replacing it
        (None: nothing is there). ``kind`` None checks what holds for either kind."""
        found = self.existing()
        if found is None:
            return None
        mode = found.st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise Conflict(
                f"{self.shown} is {describe(mode)}; pyro never replaces symlinks, device "
                "nodes, fifos or sockets",
                hint="choose another output path",
            )
        if stat.S_ISDIR(mode) and found.st_dev != os.fstat(self.fd).st_dev:
            raise self._mount_point()
        if kind == "file" and not stat.S_ISREG(mode):
            raise Conflict(
                f"{self.shown} is {describe(mode)}, and force replaces only a regular file "
                "with a file",
                hint="remove it first, or choose another output path",
            )
        if kind == "dir" and not stat.S_ISDIR(mode):
            raise Conflict(
                f"{self.shown} is {describe(mode)}, and force replaces only a directory "
                "with a directory",
                hint="remove it first, or choose another output path",
            )
        if not force:
            raise Conflict(f"{self.shown} already exists", hint="pass force to replace it")
        return found

    def _mount_point(self) -> Conflict:
        return Conflict(
            f"{self.shown} is a mount point; pyro never replaces a mount point",
            hint="name a path inside it, or choose another output path",
        )

    def _temp_name(self, tag: str) -> str:
        return f".{self.name[:200]}.{tag}-{secrets.token_hex(6)}"

    def make_temp_dir(self, tag: str) -> tuple[str, int]:
        """A new private (0700) directory next to the destination: its name and an fd."""
        name = self._temp_name(tag)
        with self.translating():
            os.mkdir(name, 0o700, dir_fd=self.fd)
        try:
            return name, os.open(name, DIR_FLAGS, dir_fd=self.fd)
        except BaseException:
            self.discard(name)
            raise

    def make_temp_file(self, tag: str) -> tuple[str, int]:
        """A new private (0600) file next to the destination: its name and an fd open for
        writing (created with O_EXCL and O_NOFOLLOW)."""
        name = self._temp_name(tag)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with self.translating():
            return name, os.open(name, flags, 0o600, dir_fd=self.fd)

    def discard(self, name: str) -> None:
        """Remove a temporary (and whatever it holds), as well as can be done."""
        with contextlib.suppress(OSError):
            remove_at(self.fd, name)

    def place(self, src_fd: int, src_name: str, kind: Kind, force: bool) -> None:
        """Move ``src_name`` (in the directory ``src_fd``, on the same filesystem) to the
        destination, under the rules of :meth:`check` checked again now.

        What force replaces ends up at ``src_name``, for the caller to remove with its
        temporary. Conflict, with the destination left as it is, when something appears,
        disappears or changes there meanwhile.
        """
        found = self.check(kind, force)
        try:
            flags = RENAME_NOREPLACE if found is None else RENAME_EXCHANGE
            rename(src_fd, src_name, self.fd, self.name, flags)
        except FileExistsError as exc:
            raise Conflict(
                f"{self.shown} appeared while pyro was writing it; it was left as it is",
                hint="pass force to replace it",
            ) from exc
        except FileNotFoundError as exc:
            raise Conflict(f"{self.shown} disappeared while pyro was replacing it") from exc
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise self._mount_point() from exc
            raise
        if found is None:
            return
        replaced = os.stat(src_name, dir_fd=src_fd, follow_symlinks=False)
        if (replaced.st_dev, replaced.st_ino) != (found.st_dev, found.st_ino):
            rename(src_fd, src_name, self.fd, self.name, RENAME_EXCHANGE)  # put it back
            raise Conflict(f"{self.shown} changed while pyro was replacing it; it was left as is")

    def sync(self) -> None:
        """Flush the directory entry of what was placed to disk."""
        os.fsync(self.fd)

    @contextlib.contextmanager
    def translating(self) -> Iterator[None]:
        """OSErrors from writing next to the destination as errors that say what to do."""
        try:
            yield
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise InvalidArgument(
                    f"{self.shown}: cannot write in its directory ({exc.strerror})"
                ) from exc
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TooLarge(f"{self.shown}: no space left on its filesystem") from exc
            raise


# --- copying ------------------------------------------------------------------------------


def copy_sparse(src_fd: int, dst_fd: int) -> int:
    """Copy the whole of ``src_fd`` into the empty file ``dst_fd``, keeping holes as holes
    (``SEEK_DATA``/``SEEK_HOLE``; ``copy_file_range``, which may share blocks, where the
    filesystem has it). Returns the size copied."""
    size = os.fstat(src_fd).st_size
    for start, end in data_extents(src_fd, size):
        _copy_range(src_fd, dst_fd, start, end)
    os.ftruncate(dst_fd, size)
    return size


def _copy_range(src_fd: int, dst_fd: int, start: int, end: int) -> None:
    position = start
    while position < end:
        try:
            done = os.copy_file_range(src_fd, dst_fd, end - position, position, position)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            _copy_by_reading(src_fd, dst_fd, position, end)
            return
        if done == 0:
            raise PyroError(f"the source shrank while being copied (at byte {position})")
        position += done


def _copy_by_reading(src_fd: int, dst_fd: int, position: int, end: int) -> None:
    while position < end:
        data = os.pread(src_fd, min(CHUNK, end - position), position)
        if not data:
            raise PyroError(f"the source shrank while being copied (at byte {position})")
        if data.count(0) != len(data):  # a chunk of zeros stays a hole
            view = memoryview(data)
            written = 0
            while written < len(view):
                written += os.pwrite(dst_fd, view[written:], position + written)
        position += len(data)
