"""Tree operations on the workspace: the path rules, manifest and listing.

Every operation takes ``root`` (absolute, normally ``/workspace``) and refuses anything
that escapes it; symlinks are resolved here, in the guest, because only the guest sees
them. A path argument is absolute (inside ``root``) or relative to ``root``. Paths in
results are relative to the root's real path: "/"-separated, no leading "./", "" for the
root itself. Names are bytes on Linux: they travel as Python strings decoded with
``surrogateescape`` (JSON escapes the surrogates), so no name is ever lost or refused.
Entries never follow symlinks::

    {"path", "type": "file"|"dir"|"symlink"|"fifo"|"socket"|"chardev"|"blockdev",
     "mode" (permission bits), "size" (bytes; 0 but for files and symlinks), "mtime_ns",
     "sha256" (files, when hashing), "target" (symlinks), "rdev" ([major, minor]: devices)}

``tree_manifest`` {root, path?, hash=true}
    Streams the entries of ``path`` (itself, unless it is the root) and everything under
    it as JSON lines in ``data`` frames (stream ``manifest``; every frame holds whole
    lines), in tree order: a directory, then everything under it, then its next sibling;
    siblings sorted by name (code-point order). That is the order of the paths' component
    lists, so a reader can check a manifest and compare two of them as they stream, in
    constant memory. The walk streams as it goes: nothing holds the whole tree. File
    digests are cached for the life of
    the VM, keyed by (st_dev, st_ino, size, mtime_ns, ctime_ns), so a manifest of an
    unchanged tree reads no file. A file whose ctime is within ``RACY_NS`` of the start of
    the manifest is hashed but not cached: a write in the same clock tick could leave
    every key field unchanged. Result: ``entries``, ``files``, ``dirs``, ``symlinks``,
    ``other``, ``bytes`` (sum of file sizes), ``hashed``, ``cached``, ``hashed_bytes``,
    ``vanished`` (gone while walking), ``errors`` (unreadable directories or files),
    ``duration_ms``.

``list_dir`` {root, path?, recursive=false, max_entries=10000}
    The entries (no digests) under ``path`` (a directory, symlinks followed), in the
    result value: ``{"path", "entries", "count", "truncated"}``. Truncated at
    ``max_entries`` or when the value would approach the frame header limit.

``remove_paths`` and ``apply_tree`` are in :mod:`ops_tree_changes`.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from json.encoder import encode_basestring_ascii as _quote  # C: quotes, escapes
from typing import Any

from pyro_mcp.guest import protocol as p
from pyro_mcp.guest.extents import data_extents
from pyro_mcp.guest_agent import boot_state
from pyro_mcp.guest_agent.calls import Call, CallError

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
RACY_NS = 100_000_000  # 10x the coarsest kernel clock tick (HZ=100)
CACHE_MAX = 131_072  # entries (~190 bytes each)
READ_CHUNK = 1 << 20
LIST_MAX_ENTRIES = 10_000
LIST_HARD_MAX = 100_000
LIST_MAX_VALUE_BYTES = 768 << 10  # the result travels in a frame header (1 MiB max)

# Per VM, not per connection: every agent channel of the VM shares it.
_digests: dict[tuple[int, int, int, int, int], bytes] = {}
_digests_lock = threading.Lock()

Scanned = tuple[str, str, os.stat_result]  # (relative path, absolute path, lstat)


# --- paths ---------------------------------------------------------------------------


def workspace_root(root: Any) -> str:
    """The real path of ``root``, which must be an existing directory (and, for
    /workspace, the mounted workspace disk)."""
    if not isinstance(root, str) or not root.startswith("/") or "\x00" in root:
        raise CallError("invalid_argument", f"root must be an absolute path, got {root!r}")
    real = os.path.realpath(root)
    boot_state.require_mounted(real)
    try:
        info = os.stat(real)
    except FileNotFoundError as exc:
        raise CallError("not_found", f"root {root} does not exist") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise CallError("not_a_directory", f"root {root} is not a directory")
    return real


def inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def parse_path(value: Any, root: str, real_root: str, name: str = "path") -> str:
    """``value`` as a normalised path relative to the root ("" is the root), lexically."""
    if not isinstance(value, str) or not value or "\x00" in value:
        raise CallError("invalid_argument", f"{name} must be a non-empty path, got {value!r}")
    normal = os.path.normpath(value)
    if value.startswith("/"):
        for prefix in (os.path.normpath(root), real_root):
            if inside(normal, prefix):
                return normal[len(prefix.rstrip("/")) + 1 :] if normal != prefix else ""
        raise CallError("outside_root", f"{value} is outside {root}")
    if normal == ".":
        return ""
    if normal == ".." or normal.startswith("../"):
        raise CallError("outside_root", f"{value} is outside {root}")
    return normal


def relative(real_root: str, path: str) -> str:
    return "" if path == real_root else path[len(real_root.rstrip("/")) + 1 :]


def resolve_inside(real_root: str, rel: str) -> str:
    """The real path of root/rel, every symlink followed; it must stay inside the root."""
    real = os.path.realpath(os.path.join(real_root, rel)) if rel else real_root
    if not inside(real, real_root):
        raise CallError("outside_root", f"{rel} resolves to {real}, outside the root")
    return real


def entry_inside(real_root: str, rel: str) -> str:
    """root/rel with the symlinks of its parents resolved, but not of its last component."""
    if not rel:
        return real_root
    parent, name = os.path.split(os.path.join(real_root, rel))
    real_parent = os.path.realpath(parent)
    if not inside(real_parent, real_root):
        raise CallError("outside_root", f"{rel} lies under {real_parent}, outside the root")
    return os.path.join(real_parent, name)


def _flag(args: dict[str, Any], name: str, default: bool) -> bool:
    value = args.get(name, default)
    if not isinstance(value, bool):
        raise CallError("invalid_argument", f"{name} must be true or false")
    return value


def _mode(value: Any, name: str = "mode") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0o7777:
        raise CallError("invalid_argument", f"{name} must be an integer permission value")
    return value


def _list(args: dict[str, Any], name: str) -> list[Any]:
    value = args.get(name) or []
    if not isinstance(value, list):
        raise CallError("invalid_argument", f"{name} must be a list")
    return value


# --- walking -------------------------------------------------------------------------


def kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "chardev"
    return "blockdev"


SPECIAL_TYPES = ("fifo", "socket", "chardev", "blockdev")


def scan(top: str, top_rel: str, recursive: bool, errors: list[str]) -> Iterator[Scanned]:
    """Everything in the directory ``top`` (not itself; all below it when ``recursive``,
    in tree order), symlinks never followed."""
    return walk(top, top_rel, errors) if recursive else _children(top, top_rel, errors)


def entry(rel: str, path: str, info: os.stat_result) -> dict[str, Any]:
    """The manifest entry of one path (no digest); raises FileNotFoundError if it vanished."""
    kind = kind_of(info.st_mode)
    item: dict[str, Any] = {
        "path": rel,
        "type": kind,
        "mode": stat.S_IMODE(info.st_mode),
        "size": info.st_size if kind in ("file", "symlink") else 0,
        "mtime_ns": info.st_mtime_ns,
    }
    if kind == "symlink":
        item["target"] = os.readlink(path)
    elif kind in ("chardev", "blockdev"):
        item["rdev"] = [os.major(info.st_rdev), os.minor(info.st_rdev)]
    return item


def walk(top: str, top_rel: str, errors: list[str]) -> Iterator[Scanned]:
    """Everything under the directory ``top`` (not itself) in tree order: each entry,
    then (for a directory) everything under it, siblings sorted by name. Holds one
    directory listing per level, never the tree; symlinks are never followed."""
    stack: list[Iterator[Scanned]] = [_children(top, top_rel, errors)]
    while stack:
        child = next(stack[-1], None)
        if child is None:
            stack.pop()
            continue
        yield child
        rel, path, info = child
        if stat.S_ISDIR(info.st_mode):
            stack.append(_children(path, rel, errors))


def _children(directory: str, dir_rel: str, errors: list[str]) -> Iterator[Scanned]:
    try:
        with os.scandir(directory) as found:
            children = sorted(found, key=lambda child: child.name)
    except FileNotFoundError:
        return  # removed while we walked
    except OSError as exc:
        errors.append(f"{dir_rel or '.'}: {exc.strerror}")
        return
    prefix = dir_rel + "/" if dir_rel else ""
    for child in children:
        try:
            info = child.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError as exc:
            errors.append(f"{prefix}{child.name}: {exc.strerror}")
            continue
        yield prefix + child.name, child.path, info


def _top(args: dict[str, Any], required: bool = False) -> tuple[str, str, str]:
    """(real root, real path of ``path``, its relative path) for a read-only walk."""
    root = args.get("root")
    real_root = workspace_root(root)
    value = args.get("path")
    if value is None and not required:
        return real_root, real_root, ""
    top = resolve_inside(real_root, parse_path(value, str(root), real_root))
    return real_root, top, relative(real_root, top)


# --- manifest ------------------------------------------------------------------------


def entry_line(item: dict[str, Any]) -> bytes:
    """A manifest entry as one line of compact JSON (what json.dumps gives, built directly:
    under emulation the generic encoder was most of a manifest's cost)."""
    parts = [
        '{"path":',
        _quote(item["path"]),
        ',"type":"',
        item["type"],
        '","mode":',
        str(item["mode"]),
        ',"size":',
        str(item["size"]),
        ',"mtime_ns":',
        str(item["mtime_ns"]),
    ]
    sha = item.get("sha256")
    if sha is not None:
        parts += (',"sha256":"', sha, '"')
    target = item.get("target")
    if target is not None:
        parts += (',"target":', _quote(target))
    rdev = item.get("rdev")
    if rdev is not None:
        parts.append(f',"rdev":[{rdev[0]},{rdev[1]}]')
    parts.append("}\n")
    return "".join(parts).encode("ascii")


class _Lines:
    """JSON lines cut into data frames of whole lines, each at most one protocol chunk."""

    def __init__(self, call: Call, stream: str) -> None:
        self.call, self.stream = call, stream
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, item: dict[str, Any]) -> None:
        line = entry_line(item)
        if self._size + len(line) > p.CHUNK:
            self.flush()
        self._parts.append(line)
        self._size += len(line)

    def flush(self) -> None:
        if self._parts:
            self.call.send_data(self.stream, b"".join(self._parts))
            self._parts, self._size = [], 0


def _key(info: os.stat_result) -> tuple[int, int, int, int, int]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


class _Hasher:
    def __init__(self) -> None:
        import hashlib  # lazily: the agent starts at every boot

        self._sha256 = hashlib.sha256
        self.started_ns = time.time_ns()
        self.hashed = self.cached = self.hashed_bytes = 0

    def digest(self, path: str, info: os.stat_result) -> tuple[str, os.stat_result] | None:
        """The sha256 of a regular file and its stat; None if it is no longer one."""
        if info.st_size == 0:
            return EMPTY_SHA256, info  # as its stat says: nothing to open or read
        with _digests_lock:
            known = _digests.get(_key(info))
        if known is not None:
            self.cached += 1
            return known.hex(), info
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # it became a symlink
                return None
            raise
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                return None
            sha = self._sha256()
            self._hash_extents(fd, before.st_size, sha)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        self.hashed += 1
        value = sha.digest()
        key = _key(after)
        if _key(before) == key and self.started_ns - after.st_ctime_ns > RACY_NS:
            _remember(key, value)
        return value.hex(), after

    def _hash_extents(self, fd: int, size: int, sha: Any) -> None:
        """Hash ``size`` bytes of the file: data extents are read, holes hashed as the
        zeros they hold without reading them (a sparse file costs no disk reads). A file
        that shrinks meanwhile is hashed short: the stat check after notices."""
        position = 0
        for data_at, hole_at in data_extents(fd, size):
            self._hash_zeros(data_at - position, sha)
            position = data_at
            while position < hole_at:
                chunk = os.pread(fd, min(READ_CHUNK, hole_at - position), position)
                if not chunk:
                    return
                sha.update(chunk)
                self.hashed_bytes += len(chunk)
                position += len(chunk)
        self._hash_zeros(size - position, sha)

    @staticmethod
    def _hash_zeros(count: int, sha: Any) -> None:
        while count > 0:
            step = min(READ_CHUNK, count)
            sha.update(_zeros(step))
            count -= step


_ZEROS = bytes(READ_CHUNK)


def _zeros(size: int) -> bytes | memoryview:
    return _ZEROS if size == READ_CHUNK else memoryview(_ZEROS)[:size]


def _remember(key: tuple[int, int, int, int, int], value: bytes) -> None:
    with _digests_lock:
        _digests[key] = value
        if len(_digests) > CACHE_MAX:
            # Drop the oldest eighth: digests of files that changed are never hit again.
            stale = []
            for old in _digests:
                stale.append(old)
                if len(stale) >= CACHE_MAX // 8:
                    break
            for old in stale:
                del _digests[old]


def clear_digest_cache() -> None:
    """Forget every cached digest (tests; a guest restored from a snapshot keeps them)."""
    with _digests_lock:
        _digests.clear()


def tree_manifest(call: Call) -> tuple[dict[str, Any], bytes]:
    started = time.monotonic()
    real_root, top, top_rel = _top(call.args)
    hashing = _flag(call.args, "hash", True)
    try:
        top_info = os.lstat(top)
    except FileNotFoundError as exc:
        raise CallError("not_found", f"{top_rel or '.'} does not exist") from exc
    errors: list[str] = []
    found: Iterator[Scanned] = iter([(top_rel, top, top_info)] if top_rel else [])
    if stat.S_ISDIR(top_info.st_mode):
        found = itertools.chain(found, walk(top, top_rel, errors))
    hasher = _Hasher() if hashing else None
    out = _Lines(call, "manifest")
    counts = dict.fromkeys(("file", "dir", "symlink", *SPECIAL_TYPES), 0)
    total_bytes = vanished = 0
    for index, (rel, path, info) in enumerate(found):
        if index & 255 == 0 and call.cancelled.is_set():
            raise CallError("cancelled", "call cancelled")
        try:
            item = entry(rel, path, info)
            if hasher is not None and item["type"] == "file":
                hashed = hasher.digest(path, info)
                if hashed is None:
                    vanished += 1
                    continue
                item["sha256"], now = hashed
                item["size"], item["mtime_ns"] = now.st_size, now.st_mtime_ns
                item["mode"] = stat.S_IMODE(now.st_mode)
        except FileNotFoundError:
            vanished += 1
            continue
        except OSError as exc:
            errors.append(f"{rel}: {exc.strerror}")
            continue
        counts[item["type"]] += 1
        if item["type"] == "file":
            total_bytes += item["size"]
        out.add(item)
    out.flush()
    return {
        "root": real_root,
        "path": top_rel,
        "entries": sum(counts.values()),
        "files": counts["file"],
        "dirs": counts["dir"],
        "symlinks": counts["symlink"],
        "other": sum(counts[kind] for kind in SPECIAL_TYPES),
        "bytes": total_bytes,
        "hashed": hasher.hashed if hasher else 0,
        "cached": hasher.cached if hasher else 0,
        "hashed_bytes": hasher.hashed_bytes if hasher else 0,
        "vanished": vanished,
        "errors": errors[:100],
        "duration_ms": round((time.monotonic() - started) * 1000, 3),
    }, b""


# --- list_dir ------------------------------------------------------------------------


def list_dir(call: Call) -> tuple[dict[str, Any], bytes]:
    args = call.args
    _, top, top_rel = _top(args)
    recursive = _flag(args, "recursive", False)
    limit = args.get("max_entries", LIST_MAX_ENTRIES)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= LIST_HARD_MAX:
        raise CallError("invalid_argument", f"max_entries must be 1..{LIST_HARD_MAX}")
    try:
        if not stat.S_ISDIR(os.stat(top).st_mode):
            raise CallError("not_a_directory", f"{top_rel} is not a directory")
    except FileNotFoundError as exc:
        raise CallError("not_found", f"{top_rel or '.'} does not exist") from exc
    entries: list[dict[str, Any]] = []
    size = 0
    truncated = False
    errors: list[str] = []
    encode = json.JSONEncoder(separators=(",", ":")).encode
    for rel, path, info in scan(top, top_rel, recursive, errors):
        if len(entries) >= limit:
            truncated = True
            break
        try:
            item = entry(rel, path, info)
        except OSError:
            continue
        size += len(encode(item)) + 1
        if size > LIST_MAX_VALUE_BYTES:
            truncated = True
            break
        entries.append(item)
    entries.sort(key=lambda item: str(item["path"]))
    value = {"path": top_rel, "entries": entries, "count": len(entries), "truncated": truncated}
    if errors:
        value["errors"] = errors[:20]
    return value, b""
