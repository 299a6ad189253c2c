"""Archives: stream a tar of a workspace path out, extract a tar into one safely.

``archive_get`` {root, path?}
    Streams a POSIX (pax) tar of ``path`` (default: the root) as ``data`` frames, stream
    ``tar``. A directory's contents are named relative to it (the directory itself is not
    an entry: its mode is in the result); a file is named by its base name. Symlinks stay
    symlinks (never followed), hard links within the archive stay hard links; modes,
    mtimes (whole seconds) and numeric owners are kept, owner names dropped; devices,
    fifos and sockets are skipped. Result: ``type``, ``mode``, ``files``, ``dirs``,
    ``symlinks``, ``hardlinks``, ``skipped``, ``content_bytes``, ``bytes`` (of tar).

``archive_put`` {root, dest, max_bytes, max_entries, streamed=true}
    Extracts the tar streamed as input (``data`` frames then ``eof``; the call's payload,
    if any, comes first) into ``dest`` (inside the root, symlinks followed; created with
    its parents if missing). Plain, gzip, bzip2 and xz tars are accepted; decompression
    happens here so every limit counts uncompressed bytes. Refused, with nothing of the
    archive left behind:

    - ``outside_root``: absolute names, ``..`` components, a member under a symlink or a
      file of the archive, a symlink whose target resolves outside the root (resolved
      against the tree as it will be), a hard link to an absolute or ``..`` name;
    - ``unsupported_member``: devices, fifos, unknown entry types, hard links to anything
      but a regular file of the archive;
    - ``too_large``: more than ``max_entries`` entries, more than ``max_bytes`` of file
      content, or headers out of proportion (checked as each header arrives: a bomb stops
      at the limit, nothing is written past it);
    - ``invalid_archive``: a corrupt or truncated tar or compressed stream;
    - ``exists``: merging would put a directory where a file is, or the reverse.

    Extraction goes to a hidden staging directory on the same filesystem (inside ``dest``
    when it exists, beside it otherwise), is checked, then moved into place: a new
    ``dest`` by one rename; an existing one by merging (files and symlinks replace files
    and symlinks, directories merge). Directory modes and mtimes are set last. Result:
    ``dest`` (relative), ``created``, ``entries``, ``files``, ``dirs``, ``symlinks``,
    ``hardlinks``, ``bytes`` (content written), ``compression``, ``replaced`` (relative
    paths, first 1000) and ``replaced_count``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import TYPE_CHECKING, Any, Protocol, cast

from pyro_mcp.guest import protocol as p
from pyro_mcp.guest_agent import ops_tree as tree
from pyro_mcp.guest_agent.calls import Call, CallError

DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_MAX_ENTRIES = 100_000
HARD_MAX_BYTES = 1 << 40
HARD_MAX_ENTRIES = 10_000_000
HEADER_SLACK = 1 << 20  # tar bytes allowed between the data of one member and the next
ENTRY_OVERHEAD = 16 << 10  # header bytes budgeted per entry in the overall ceiling
COPY_CHUNK = 1 << 20
MAX_LINK_HOPS = 40
REPLACED_LISTED = 1000
MAGICS = {"gz": b"\x1f\x8b", "bz2": b"BZh", "xz": b"\xfd7zXZ\x00"}


# --- archive_get ---------------------------------------------------------------------


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


def archive_get(call: Call) -> tuple[dict[str, Any], bytes]:
    args = call.args
    real_root = tree.workspace_root(args.get("root"))
    value = args.get("path")
    rel = "" if value is None else tree.parse_path(value, str(args.get("root")), real_root)
    top = tree.resolve_inside(real_root, rel)
    try:
        top_info = os.lstat(top)
    except FileNotFoundError as exc:
        raise CallError("not_found", f"{rel or '.'} does not exist") from exc
    import tarfile  # lazily: the agent starts at every boot

    errors: list[str] = []
    if stat.S_ISDIR(top_info.st_mode):
        members = sorted(tree.scan(top, "", True, errors), key=lambda item: item[0])
    else:
        members = [(os.path.basename(top), top, top_info)]
    counts = {"files": 0, "dirs": 0, "symlinks": 0, "hardlinks": 0, "skipped": 0}
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
                    counts["skipped"] += 1
            except (FileNotFoundError, _Changed):
                counts["skipped"] += 1  # gone or replaced while we read
    out.flush()
    return {
        "type": tree.kind_of(top_info.st_mode),
        "mode": stat.S_IMODE(top_info.st_mode),
        **counts,
        "content_bytes": content,
        "bytes": out.bytes,
        "errors": errors[:100],
    }, b""


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


# --- archive_put: input --------------------------------------------------------------


if TYPE_CHECKING:  # a Protocol class costs import time, and the agent starts at every boot

    class _Decompressor(Protocol):
        def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...

        @property
        def eof(self) -> bool: ...

        @property
        def needs_input(self) -> bool: ...

        @property
        def unused_data(self) -> bytes: ...


class _Gzip:
    """zlib's gzip decoder with the interface of bz2's and lzma's."""

    def __init__(self) -> None:
        import zlib

        self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._tail = b""
        self._full = False

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        out = self._zlib.decompress(self._tail + data, max(max_length, 0))
        self._tail = self._zlib.unconsumed_tail
        self._full = 0 < max_length <= len(out)
        return out

    @property
    def eof(self) -> bool:
        return self._zlib.eof

    @property
    def needs_input(self) -> bool:
        return not self._tail and not self._full

    @property
    def unused_data(self) -> bytes:
        return self._zlib.unused_data


def _decompressor(kind: str) -> _Decompressor:
    if kind == "gz":
        return _Gzip()
    if kind == "bz2":
        import bz2

        return bz2.BZ2Decompressor()
    import lzma

    return lzma.LZMADecompressor()


class _Input:
    """The archive streamed by the host as a read-only file object for tarfile.

    Decompressed here, so the limits count the bytes tarfile sees. ``allowed`` (raised by
    the extractor as each member is accepted) and ``ceiling`` bound how far tarfile may
    read: a giant pax header is refused before it is held in memory.
    """

    def __init__(self, call: Call, streamed: bool, ceiling: int) -> None:
        self._call = call
        self._streamed = streamed
        self._raw: list[bytes] = [call.payload] if call.payload else []
        self._raw_done = not streamed
        self._decoder: _Decompressor | None = None
        self._ready = bytearray()
        self._eof = False
        self.kind: str | None = None
        self.position = 0
        self.allowed = HEADER_SLACK
        self.ceiling = ceiling

    def _next_raw(self) -> bytes | None:
        while self._raw:
            chunk = self._raw.pop(0)
            if chunk:
                return chunk
        while not self._raw_done:
            streamed = self._call.read_input()
            if streamed is None:
                self._raw_done = True
            elif streamed:
                return streamed
        return None

    def _start(self) -> None:
        head = b""
        while len(head) < 6 and (chunk := self._next_raw()) is not None:
            head += chunk
        if head:
            self._raw.insert(0, head)
        self.kind = next((k for k, magic in MAGICS.items() if head.startswith(magic)), "tar")
        if self.kind != "tar":
            self._decoder = _decompressor(self.kind)

    def _fill(self, want: int) -> None:
        if self.kind is None:
            self._start()
        decoder = self._decoder
        if decoder is None:
            chunk = self._next_raw()
            if chunk is None:
                self._eof = True
            else:
                self._ready += chunk
            return
        if decoder.eof:  # concatenated streams continue; anything else after is ignored
            rest: bytes | None = decoder.unused_data or self._next_raw()
            if not rest or self.kind is None or not rest.startswith(MAGICS[self.kind][:2]):
                self._eof = True
                return
            self._raw.insert(0, rest)
            self._decoder = _decompressor(self.kind)
            return
        if decoder.needs_input:
            chunk = self._next_raw()
            if chunk is None:
                self._eof = True  # truncated: tarfile reports it
                return
        else:
            chunk = b""
        self._ready += decoder.decompress(chunk, max(want, 64 << 10))

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = p.CHUNK
        try:
            while len(self._ready) < size and not self._eof:
                self._fill(size - len(self._ready))
        except CallError:
            raise  # cancelled, or no input in time
        except Exception as exc:  # zlib.error, lzma.LZMAError, OSError from bz2, EOFError
            raise CallError("invalid_archive", f"bad {self.kind} stream: {exc}") from exc
        data = bytes(self._ready[:size])
        del self._ready[:size]
        self.position += len(data)
        if self.position > min(self.allowed, self.ceiling):
            raise CallError(
                "too_large",
                "the archive holds more data than its max_bytes and max_entries allow "
                f"(stopped after {self.position} uncompressed bytes)",
            )
        return data


# --- archive_put: extraction ---------------------------------------------------------


class _Extracted:
    """What the archive put into the staging directory."""

    def __init__(self) -> None:
        self.entries = self.files = self.dirs = self.symlinks = self.hardlinks = self.bytes = 0
        self.dir_meta: dict[str, tuple[int, int]] = {}  # rel -> (mode, mtime_ns), explicit
        self.known_dirs: set[str] = {""}  # every directory in staging, explicit or implied
        self.links: list[tuple[str, str]] = []  # symlinks: (rel, target)


def _member_name(name: str, what: str = "name") -> str:
    """A member name as a clean relative path ("" for the top); refused if it escapes."""
    if name.startswith("/"):
        raise CallError("outside_root", f"archive entry {what} {name!r} is absolute")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise CallError("outside_root", f"archive entry {what} {name!r} has a '..' component")
    return "/".join(parts)


def _ns(mtime: float) -> int:
    return mtime * 1_000_000_000 if isinstance(mtime, int) else round(mtime * 1e9)


def _limit(args: dict[str, Any], name: str, default: int, hard: int) -> int:
    value = args.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CallError("invalid_argument", f"{name} must be a non-negative integer")
    return min(value, hard)


def _under_dirs(staging: str, rel: str, done: _Extracted, create: bool) -> str:
    """staging/rel once every parent is a directory the archive made (never a link)."""
    parts = rel.split("/")
    for depth in range(1, len(parts)):
        prefix = "/".join(parts[:depth])
        if prefix in done.known_dirs:
            continue
        path = os.path.join(staging, prefix)
        if create and not os.path.lexists(path):
            os.mkdir(path, 0o700)
            done.known_dirs.add(prefix)
            continue
        raise CallError(
            "outside_root",
            f"archive entry {rel} lies under {prefix}, which is not a directory of the "
            "archive (entries are never extracted through a link)",
        )
    return os.path.join(staging, rel)


def _make_room(path: str, rel: str, done: _Extracted, for_dir: bool) -> bool:
    """Clear the way for an entry; True if the directory it wants is already there."""
    if rel in done.known_dirs:
        if for_dir:
            return True
        raise CallError("exists", f"archive entry {rel} would replace a directory")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # an earlier entry of the same name: the later one wins
    return False


def _write(tar: Any, member: Any, path: str, mode: int, mtime_ns: int) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    written = 0
    try:
        reader = tar.extractfile(member)
        while reader is not None and (chunk := reader.read(COPY_CHUNK)):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            written += len(chunk)
        os.fchmod(fd, mode)
        os.utime(fd, ns=(mtime_ns, mtime_ns))
    finally:
        os.close(fd)
    return written


def _type_name(member: Any) -> str:
    if member.ischr() or member.isblk():
        return "device node"
    if member.isfifo():
        return "fifo"
    return f"entry of type {member.type!r}"


def _extract(
    call: Call, tarfile: Any, source: _Input, staging: str, max_bytes: int, max_entries: int
) -> _Extracted:
    done = _Extracted()
    with tarfile.open(fileobj=source, mode="r|") as tar:
        while (member := tar.next()) is not None:
            done.entries += 1
            if done.entries > max_entries:
                raise CallError("too_large", f"the archive has more than {max_entries} entries")
            if call.cancelled.is_set():
                raise CallError("cancelled", "call cancelled")
            rel = _member_name(member.name)
            if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
                raise CallError(
                    "unsupported_member",
                    f"archive entry {member.name} is a {_type_name(member)}; only files, "
                    "directories and links are extracted",
                )
            size = member.size if member.isreg() else 0
            if done.bytes + size > max_bytes:
                raise CallError(
                    "too_large",
                    f"the archive's content exceeds max_bytes={max_bytes} (at {member.name}, "
                    f"{size} bytes)",
                )
            source.allowed = member.offset_data + size + 512 + HEADER_SLACK
            mode, mtime = member.mode & 0o7777, _ns(member.mtime)
            if not rel:
                if not member.isdir():
                    raise CallError("invalid_archive", f"archive entry {member.name!r} has no name")
                done.dir_meta[""] = (mode, mtime)
                continue
            path = _under_dirs(staging, rel, done, create=True)
            if member.isdir():
                if not _make_room(path, rel, done, for_dir=True):
                    os.mkdir(path, 0o700)
                    done.known_dirs.add(rel)
                done.dir_meta[rel] = (mode, mtime)
                done.dirs += 1
            elif member.isreg():
                _make_room(path, rel, done, for_dir=False)
                done.bytes += _write(tar, member, path, mode, mtime)
                done.files += 1
            elif member.issym():
                if not member.linkname or "\x00" in member.linkname:
                    raise CallError("invalid_archive", f"symlink {member.name} has no target")
                _make_room(path, rel, done, for_dir=False)
                os.symlink(member.linkname, path)
                os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
                done.links.append((rel, member.linkname))
                done.symlinks += 1
            else:
                _hard_link(staging, rel, path, member.linkname, done)
    return done


def _hard_link(staging: str, rel: str, path: str, linkname: str, done: _Extracted) -> None:
    source_rel = _member_name(linkname, "link target")
    if not source_rel or source_rel == rel:
        raise CallError("invalid_archive", f"hard link {rel} points to {linkname!r}")
    source = _under_dirs(staging, source_rel, done, create=False)
    try:
        info = os.lstat(source)
    except FileNotFoundError:
        raise CallError(
            "invalid_archive", f"hard link {rel} points to {linkname}, not in the archive"
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise CallError(
            "unsupported_member", f"hard link {rel} points to {linkname}, not a regular file"
        )
    _make_room(path, rel, done, for_dir=False)
    os.link(source, path, follow_symlinks=False)
    done.hardlinks += 1


# --- archive_put: checking and placing ------------------------------------------------


def _resolve(path: str, dest: str, staging: str) -> str | None:
    """Where ``path`` leads once staging is merged into dest (None: a symlink loop)."""
    pending = path.split("/")
    pending.reverse()
    resolved = "/"
    hops = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            resolved = os.path.dirname(resolved)
            continue
        candidate = resolved.rstrip("/") + "/" + part
        physical = candidate
        if tree.inside(candidate, dest):
            staged = os.path.join(staging, tree.relative(dest, candidate))
            if os.path.lexists(staged):
                physical = staged
        try:
            target = os.readlink(physical)
        except OSError:  # not a link, or missing: the path goes on as written
            resolved = candidate
            continue
        hops += 1
        if hops > MAX_LINK_HOPS:
            return None
        if target.startswith("/"):
            resolved = "/"
        pending.extend(reversed(target.split("/")))
    return resolved


def _check_link(rel: str, target: str, dest: str, staging: str, real_root: str) -> None:
    base = os.path.dirname(os.path.join(dest, rel))
    resolved = _resolve(target if target.startswith("/") else f"{base}/{target}", dest, staging)
    if resolved is not None and not tree.inside(resolved, real_root):
        raise CallError(
            "outside_root", f"symlink {rel} -> {target} resolves to {resolved}, outside the root"
        )


def _merge(staging: str, dest: str) -> tuple[list[str], set[str]]:
    """Move staging's entries into the existing dest; (replaced paths, merged dirs)."""
    moves: list[tuple[str, bool]] = []
    merged = {""}
    stack = [""]
    while stack:  # plan everything first: a conflict refuses before anything moves
        rel = stack.pop()
        with os.scandir(os.path.join(staging, rel)) as found:
            names = sorted(child.name for child in found)
        for name in names:
            child = f"{rel}/{name}" if rel else name
            staged_dir = stat.S_ISDIR(os.lstat(os.path.join(staging, child)).st_mode)
            try:
                existing = os.lstat(os.path.join(dest, child))
            except FileNotFoundError:
                moves.append((child, False))
                continue
            existing_dir = stat.S_ISDIR(existing.st_mode)
            if staged_dir and existing_dir:
                merged.add(child)
                stack.append(child)
            elif not staged_dir and not existing_dir:
                moves.append((child, True))
            else:
                there = "a directory" if existing_dir else f"a {tree.kind_of(existing.st_mode)}"
                raise CallError("exists", f"{child} is {there} in the destination")
    replaced = []
    for child, replaces in moves:
        os.replace(os.path.join(staging, child), os.path.join(dest, child))
        if replaces:
            replaced.append(child)
    return replaced, merged


def _finish_dirs(dest: str, done: _Extracted, merged: set[str]) -> None:
    """Directory modes and mtimes, deepest first, once their contents are in place."""
    for rel in sorted(done.known_dirs, key=lambda r: (-r.count("/") - bool(r), r)):
        meta = done.dir_meta.get(rel)
        if meta is None:
            if rel in merged:
                continue  # an existing directory the archive only passes through
            meta = (0o755, -1)
        path = os.path.join(dest, rel) if rel else dest
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                continue
        except FileNotFoundError:
            continue
        os.chmod(path, meta[0])
        if meta[1] >= 0:
            os.utime(path, ns=(meta[1], meta[1]), follow_symlinks=False)


def _make_parents(path: str, created: list[str]) -> None:
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise CallError("not_a_directory", f"{path} is not a directory")
    for directory in reversed(missing):
        os.mkdir(directory, 0o755)
        created.append(directory)


def archive_put(call: Call) -> tuple[dict[str, Any], bytes]:
    args = call.args
    root = args.get("root")
    real_root = tree.workspace_root(root)
    dest = tree.resolve_inside(
        real_root, tree.parse_path(args.get("dest"), str(root), real_root, "dest")
    )
    max_bytes = _limit(args, "max_bytes", DEFAULT_MAX_BYTES, HARD_MAX_BYTES)
    max_entries = _limit(args, "max_entries", DEFAULT_MAX_ENTRIES, HARD_MAX_ENTRIES)
    streamed = args.get("streamed", True)
    if not isinstance(streamed, bool):
        raise CallError("invalid_argument", "streamed must be true or false")
    existed = os.path.lexists(dest)
    if existed and not os.path.isdir(dest):
        raise CallError("not_a_directory", f"{tree.relative(real_root, dest)} is not a directory")
    import shutil  # lazily: the agent starts at every boot
    import tarfile

    created: list[str] = []
    staging = ""
    try:
        parent = dest if existed else os.path.dirname(dest)
        if not existed:
            _make_parents(parent, created)
        token = f"{os.getpid()}-{call.id}-{os.urandom(4).hex()}"
        staging = os.path.join(parent, f".pyro-extract-{token}")
        os.mkdir(staging, 0o700)
        ceiling = max_bytes + (max_entries + 1) * ENTRY_OVERHEAD + HEADER_SLACK
        source = _Input(call, streamed, ceiling)
        try:
            done = _extract(call, tarfile, source, staging, max_bytes, max_entries)
        except tarfile.TarError as exc:
            raise CallError("invalid_archive", f"not a valid tar archive: {exc}") from exc
        for rel, target in done.links:
            _check_link(rel, target, dest, staging, real_root)
        if existed:
            replaced, merged = _merge(staging, dest)
            shutil.rmtree(staging)
        else:
            os.rename(staging, dest)
            replaced, merged = [], set()
        staging = ""
        _finish_dirs(dest, done, merged)
    except BaseException:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise
    return {
        "dest": tree.relative(real_root, dest),
        "created": not existed,
        "entries": done.entries,
        "files": done.files,
        "dirs": done.dirs,
        "symlinks": done.symlinks,
        "hardlinks": done.hardlinks,
        "bytes": done.bytes,
        "compression": source.kind or "tar",
        "replaced": replaced[:REPLACED_LISTED],
        "replaced_count": len(replaced),
    }, b""
