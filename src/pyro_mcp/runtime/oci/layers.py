"""Apply OCI layers, lowest first, onto an empty directory: the image's root file system.

The layers are hostile input. Each is decompressed by its magic bytes (gzip, zstd or a
plain tar, whatever the media type says) and read as a tar stream; no entry is ever
extracted by tarfile itself. Every file operation is made relative to a directory file
descriptor opened component by component with ``O_NOFOLLOW``, so

- a name that is absolute, holds ``..``, a NUL or nothing at all is refused;
- a name whose parent path goes through a symlink (planted by this layer or a lower one)
  is refused, never followed: nothing outside the tree can be written;
- a hard link must name an existing non-directory inside the tree, reached the same way.

Whiteouts: ``dir/.wh.name`` removes ``dir/name`` of lower layers; ``dir/.wh..wh..opq``
empties ``dir`` of what lower layers put there (this layer's entries stay, before or after
the marker). Kept: regular files (written sparse: zero blocks are seeked over), directories,
symlinks (stored, never followed), hard links, devices and fifos, owners, modes with
setuid/setgid/sticky, mtimes, and xattrs (``user.*``, ``trusted.*``, ``system.*`` and
``security.capability``; other ``security.*`` labels mean nothing in a guest).

Sizes come from the tar header before any data is read (a sparse file counts its apparent
size): :class:`Limits` bound each file, the total and the entry count.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import zstandard

from pyro_mcp.errors import IntegrityError, InvalidArgument, TooLarge
from pyro_mcp.runtime.oci.layout import Layer

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
CHUNK = 64 << 10
_ZEROS = bytes(CHUNK)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
GIB = 1 << 30


@dataclass(frozen=True)
class Limits:
    max_file_bytes: int = 4 << 30
    max_total_bytes: int = 16 << 30
    max_entries: int = 1_000_000


@dataclass
class _Totals:
    entries: int = 0
    bytes: int = 0


@dataclass
class _LayerState:
    index: int
    digest: str
    created: set[tuple[str, ...]] = field(default_factory=set)
    dir_times: list[tuple[tuple[str, ...], float]] = field(default_factory=list)

    def where(self, name: str) -> str:
        return f"layer {self.index} ({self.digest[:19]}): {name!r}"


def apply_layers(
    layers: Sequence[Layer],
    root: os.PathLike[str] | str,
    *,
    limits: Limits | None = None,
    progress: Callable[[str], None] = lambda _m: None,
) -> None:
    limits = limits or Limits()
    totals = _Totals()
    root_fd = os.open(root, _DIR_FLAGS)
    try:
        for index, layer in enumerate(layers, 1):
            progress(f"layer {index}/{len(layers)} ({layer.size / (1 << 20):.1f} MiB)")
            _apply(root_fd, _LayerState(index, layer.digest), layer, limits, totals)
    finally:
        os.close(root_fd)


@contextlib.contextmanager
def _tar_stream(layer: Layer) -> Iterator[IO[bytes] | Any]:
    with open(layer.path, "rb") as raw:
        head = raw.read(4)
        raw.seek(0)
        if head[:2] == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=raw) as stream:
                yield stream
        elif head == b"\x28\xb5\x2f\xfd":
            with zstandard.ZstdDecompressor().stream_reader(raw) as zstream:
                yield zstream
        else:
            yield raw


def _apply(root_fd: int, state: _LayerState, layer: Layer, limits: Limits, totals: _Totals) -> None:
    try:
        with _tar_stream(layer) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                totals.entries += 1
                if totals.entries > limits.max_entries:
                    raise TooLarge(f"the image has more than {limits.max_entries} entries")
                try:
                    _entry(root_fd, state, tar, member, limits, totals)
                except OSError as exc:
                    if exc.errno == errno.ENOSPC or isinstance(exc, gzip.BadGzipFile):
                        raise
                    raise InvalidArgument(
                        f"{state.where(member.name)} cannot be applied: {exc.strerror or exc}"
                    ) from exc
        for parts, mtime in state.dir_times:
            with _parent(root_fd, parts, state, create=False) as fd:
                os.utime(parts[-1], (mtime, mtime), dir_fd=fd, follow_symlinks=False)
    except (tarfile.TarError, EOFError, zstandard.ZstdError, zlib.error) as exc:
        raise _corrupt(state, exc) from exc
    except OSError as exc:
        if isinstance(exc, gzip.BadGzipFile):
            raise _corrupt(state, exc) from exc
        raise


def _corrupt(state: _LayerState, exc: BaseException) -> IntegrityError:
    return IntegrityError(
        f"layer {state.index} ({state.digest[:19]}) is truncated or corrupt: {exc or type(exc)}"
    )


def split_name(name: str, where: str) -> tuple[str, ...]:
    """The components of a tar entry's name; InvalidArgument for one that could leave."""
    if "\0" in name:
        raise InvalidArgument(f"{where} holds a NUL byte; refused")
    if name.startswith("/"):
        raise InvalidArgument(f"{where} is an absolute path; refused")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise InvalidArgument(f"{where} has a '..' component; refused")
    return parts


@contextlib.contextmanager
def _parent(
    root_fd: int, parts: tuple[str, ...], state: _LayerState, *, create: bool
) -> Iterator[int]:
    """A descriptor of the directory holding ``parts[-1]``, reached without following any
    symlink; missing directories are made (0755) when ``create``."""
    fd = os.dup(root_fd)
    try:
        for depth, part in enumerate(parts[:-1]):
            try:
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                state.created.add(parts[: depth + 1])
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                through = "/".join(parts[: depth + 1])
                kind = "symlink" if _is_link(fd, part) else "non-directory"
                raise InvalidArgument(
                    f"{state.where('/'.join(parts))} goes through the {kind} {through!r}; "
                    "refused (nothing is written through a link)"
                ) from exc
            os.close(fd)
            fd = next_fd
        yield fd
    finally:
        os.close(fd)


def _is_link(fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _remove(fd: int, name: str) -> None:
    """Remove ``name`` in directory ``fd`` if present: a file, a link or a whole tree."""
    try:
        mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(name, dir_fd=fd)
    else:
        os.unlink(name, dir_fd=fd)


def _entry(
    root_fd: int,
    state: _LayerState,
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    limits: Limits,
    totals: _Totals,
) -> None:
    where = state.where(member.name)
    parts = split_name(member.name, where)
    if not parts:
        return  # the root itself: its owner and mode stay ours
    base = parts[-1]
    if base == OPAQUE:
        with _parent(root_fd, parts, state, create=True) as fd:
            _opaque(fd, parts[:-1], state)
        return
    if base.startswith(WHITEOUT):
        hidden = base[len(WHITEOUT) :]
        if not hidden or hidden in (".", ".."):
            raise InvalidArgument(f"{where} is a whiteout of nothing; refused")
        try:
            with _parent(root_fd, parts, state, create=False) as fd:
                _remove(fd, hidden)
        except FileNotFoundError:
            pass  # its directory is not there either: nothing to hide
        return
    if member.isreg():
        if member.size > limits.max_file_bytes:
            raise TooLarge(
                f"{where} is {member.size / GIB:.1f} GiB, more than the "
                f"{limits.max_file_bytes / GIB:.1f} GiB a file in an imported image may be"
            )
        totals.bytes += member.size
        if totals.bytes > limits.max_total_bytes:
            raise TooLarge(
                f"the image's files add up to more than {limits.max_total_bytes / GIB:.1f} GiB"
            )
    with _parent(root_fd, parts, state, create=True) as fd:
        if member.isdir():
            try:
                mode = os.stat(base, dir_fd=fd, follow_symlinks=False).st_mode
            except FileNotFoundError:
                mode = 0
            if not stat.S_ISDIR(mode):
                _remove(fd, base)
                os.mkdir(base, 0o700, dir_fd=fd)
            state.dir_times.append((parts, member.mtime))
        elif member.islnk():
            _hard_link(root_fd, fd, state, member, where)
        else:
            _remove(fd, base)
            if member.isreg():
                _write(fd, base, tar, member)
            elif member.issym():
                os.symlink(member.linkname, base, dir_fd=fd)
            elif member.ischr() or member.isblk() or member.isfifo():
                kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
                kind = stat.S_IFIFO if member.isfifo() else kind
                device = os.makedev(member.devmajor, member.devminor)
                os.mknod(base, 0o600 | kind, device, dir_fd=fd)
            else:
                raise InvalidArgument(f"{where} is a tar entry of unknown type; refused")
        state.created.add(parts)
        if member.islnk():
            return  # a hard link shares its target's inode and metadata
        os.chown(base, member.uid, member.gid, dir_fd=fd, follow_symlinks=False)
        if not member.issym():
            os.chmod(base, member.mode & 0o7777, dir_fd=fd)
            _xattrs(fd, base, member)
        if not member.isdir():
            os.utime(base, (member.mtime, member.mtime), dir_fd=fd, follow_symlinks=False)


def _opaque(fd: int, directory: tuple[str, ...], state: _LayerState) -> None:
    """Empty a directory of what lower layers put there (this layer's entries stay)."""
    with os.scandir(fd) as entries:
        names = [entry.name for entry in entries]
    for name in names:
        if (*directory, name) not in state.created:
            _remove(fd, name)


def _hard_link(
    root_fd: int, fd: int, state: _LayerState, member: tarfile.TarInfo, where: str
) -> None:
    target = split_name(member.linkname, f"{where} (link target)")
    if not target:
        raise InvalidArgument(f"{where} is a hard link to the root; refused")
    try:
        with _parent(root_fd, target, state, create=False) as source_fd:
            mode = os.stat(target[-1], dir_fd=source_fd, follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):
                raise InvalidArgument(f"{where} is a hard link to a directory; refused")
            base = member.name.rstrip("/").rsplit("/", 1)[-1]
            _remove(fd, base)
            os.link(target[-1], base, src_dir_fd=source_fd, dst_dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError as exc:
        raise InvalidArgument(
            f"{where} is a hard link to {member.linkname!r}, which is not in the image; refused"
        ) from exc


def _write(fd: int, name: str, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
    source = tar.extractfile(member)
    assert source is not None
    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=fd)
    try:
        written = 0
        while True:
            block = source.read(CHUNK)
            if not block:
                break
            written += len(block)
            if block == _ZEROS[: len(block)]:
                os.lseek(out, len(block), os.SEEK_CUR)
            else:
                view = memoryview(block)
                while view:
                    view = view[os.write(out, view) :]
        os.ftruncate(out, written)
    finally:
        os.close(out)


def _xattrs(fd: int, name: str, member: tarfile.TarInfo) -> None:
    for key, value in member.pax_headers.items():
        if not key.startswith("SCHILY.xattr."):
            continue
        attr = key[len("SCHILY.xattr.") :]
        if attr.startswith("security.") and attr != "security.capability":
            continue
        if not attr.startswith(("user.", "trusted.", "system.", "security.")):
            continue
        data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        os.setxattr(f"/proc/self/fd/{fd}/{name}", attr, data, follow_symlinks=False)
