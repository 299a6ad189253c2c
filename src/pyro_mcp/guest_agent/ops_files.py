"""File operations: ``put_file`` and ``get_file``, binary-safe and streamed.

Both take ``path`` (absolute, in the guest) and an optional ``root``: when given, the
path and everything it resolves through (symlinks included) must stay inside ``root``.
That check runs here, in the guest, because only the guest sees its symlinks.

``put_file``: the content is the call's payload, or (``streamed``: true) the ``data``
frames the host sends after the call, ended by ``eof``. Written to a temporary file in the
same directory and renamed into place, so a reader never sees half a file. ``mode``
(int), ``mkdirs`` (bool), ``max_bytes`` (int cap), ``size`` (a sparse file: every streamed
chunk carries its ``offset``, the gaps stay holes), ``sync`` (default true: the file,
once in place it is fsynced before the answer (on ext4 that one commit carries the data
and the rename), so what is acknowledged survives the VMM being killed; a caller writing
many files passes false and ends with ``fs_sync``).

``get_file``: streams the content as ``data`` frames (``stream`` file); ``max_bytes`` caps
what is sent (the result says ``truncated``); ``sparse``: only the data extents are read
and sent, each frame with its ``offset``. A FIFO or device is refused, never opened for
a blocking read.

``fs_sync`` {root}: flushes the filesystem holding ``root`` (syncfs): the end of a series
of unsynced writes.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from typing import Any

from pyro_mcp.guest import protocol as p
from pyro_mcp.guest.extents import data_extents
from pyro_mcp.guest_agent import boot_state
from pyro_mcp.guest_agent.calls import Call, CallError

HARD_MAX_BYTES = 1 << 44  # ext4's largest file; callers always pass their own cap
READ_CHUNK = 256 << 10


def confined_path(path: Any, root: Any) -> str:
    """The absolute path, refused if it escapes ``root`` (after resolving symlinks)."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise CallError("invalid_argument", f"path must be absolute, got {path!r}")
    if "\x00" in path:
        raise CallError("invalid_argument", "path contains a NUL byte")
    normal = os.path.normpath(path)
    if root is None:
        return normal
    if not isinstance(root, str) or not root.startswith("/"):
        raise CallError("invalid_argument", "root must be an absolute path")
    real_root = os.path.realpath(root)
    boot_state.require_mounted(real_root)
    if not _inside(normal, os.path.normpath(root)):
        raise CallError("outside_root", f"{path} is outside {root}")
    resolved = os.path.realpath(normal)
    if not _inside(resolved, real_root):
        raise CallError("outside_root", f"{path} resolves to {resolved}, outside {root}")
    return normal


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _cap(value: Any) -> int:
    if value is None:
        return HARD_MAX_BYTES
    if not isinstance(value, int) or value < 0:
        raise CallError("invalid_argument", "max_bytes must be a non-negative integer")
    return min(value, HARD_MAX_BYTES)


def put_file(call: Call) -> tuple[dict[str, Any], bytes]:
    args = call.args
    path = confined_path(args.get("path"), args.get("root"))
    mode = args.get("mode", 0o644)
    if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise CallError("invalid_argument", "mode must be an integer permission value")
    limit = _cap(args.get("max_bytes"))
    sync = _bool(args, "sync", True)
    size = args.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise CallError("invalid_argument", "size must be a non-negative integer")
    if size is not None and size > limit:
        raise CallError("too_large", f"content exceeds the limit of {limit} bytes")
    parent = os.path.dirname(path)
    if args.get("mkdirs"):
        os.makedirs(parent, exist_ok=True)
    if not os.path.isdir(parent):
        raise CallError("not_found", f"directory {parent} does not exist")
    if os.path.isdir(path) and not os.path.islink(path):
        raise CallError("is_a_directory", f"{path} is a directory")
    tmp = os.path.join(parent, call.temp_name("put"))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    placed = False
    try:
        written = _write_input(call, fd, limit, size)
        os.fchmod(fd, mode)
        os.replace(tmp, path)
        placed = True
        if sync:
            # The rename changed this inode too, so on ext4 (every workspace disk) its
            # fsync commits the data and the rename in one journal transaction.
            os.fsync(fd)
    except BaseException:
        if not placed:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    return {"path": path, "size": written, "mode": mode}, b""


def _write_input(call: Call, fd: int, limit: int, size: int | None) -> int:
    """Write the call's content to ``fd``; the file's final length.

    Without ``size`` the content is the payload or the streamed chunks, in order. With
    ``size`` (a sparse file) every streamed chunk carries its offset, increasing; the gaps
    stay holes and the file is cut to ``size``.
    """
    if size is None and not call.args.get("streamed"):
        chunks: Any = [(None, call.payload)]
    else:
        chunks = _extents(call)
    position = 0
    for offset, chunk in chunks:
        if size is not None:
            if offset is None or offset < position or offset + len(chunk) > size:
                raise CallError(
                    "invalid_argument", "a sparse file's chunks need increasing offsets"
                )
            position = offset
        if position + len(chunk) > limit:
            raise CallError("too_large", f"content exceeds the limit of {limit} bytes")
        view = memoryview(chunk)
        while view:
            done = os.pwrite(fd, view, position)
            position += done
            view = view[done:]
    if size is None:
        return position
    os.ftruncate(fd, size)
    return size


def _extents(call: Call) -> Any:
    while (extent := call.read_extent()) is not None:
        yield extent


def _bool(args: dict[str, Any], name: str, default: bool) -> bool:
    value = args.get(name, default)
    if not isinstance(value, bool):
        raise CallError("invalid_argument", f"{name} must be true or false")
    return value


_libc_syncfs: Any = None


def sync_filesystem(path: str) -> None:
    """Flush the whole filesystem holding ``path`` to its disk (syncfs(2)): what every
    call that changed several paths does once before it answers."""
    global _libc_syncfs
    if _libc_syncfs is None:
        import ctypes  # lazily: the agent starts at every boot

        libc = ctypes.CDLL(None, use_errno=True)
        _libc_syncfs = getattr(libc, "syncfs", False)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if not _libc_syncfs:
            os.sync()
        elif _libc_syncfs(fd) != 0:
            import ctypes

            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


def fs_sync(call: Call) -> tuple[dict[str, Any], bytes]:
    root = call.args.get("root")
    if not isinstance(root, str) or not root.startswith("/") or "\x00" in root:
        raise CallError("invalid_argument", "root must be an absolute path")
    started = time.monotonic()
    sync_filesystem(root)
    return {"root": root, "duration_ms": round((time.monotonic() - started) * 1000, 3)}, b""


def get_file(call: Call) -> tuple[dict[str, Any], bytes]:
    args = call.args
    path = confined_path(args.get("path"), args.get("root"))
    limit = _cap(args.get("max_bytes"))
    sparse = _bool(args, "sparse", False)
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if args.get("root"):
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as exc:
        raise CallError("not_found", f"{path} does not exist") from exc
    except OSError as exc:
        raise CallError("io_error", f"{path}: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CallError("not_a_file", f"{path} is not a regular file")
        os.set_blocking(fd, True)
        if sparse:
            sent = _send_sparse(call, fd, min(limit, info.st_size))
        else:
            sent = _send_all(call, fd, limit)
    finally:
        os.close(fd)
    return {
        "path": path,
        "size": info.st_size,
        "sent": sent,
        "truncated": sent < info.st_size,
        "mode": stat.S_IMODE(info.st_mode),
    }, b""


def _send_all(call: Call, fd: int, limit: int) -> int:
    sent = 0
    while sent < limit:
        chunk = os.read(fd, min(READ_CHUNK, limit - sent))
        if not chunk:
            break
        call.send_data("file", chunk)
        sent += len(chunk)
    return sent


def _send_sparse(call: Call, fd: int, end: int) -> int:
    """Send the data extents of the first ``end`` bytes, each chunk with its offset;
    holes are never read. Returns the logical bytes covered: ``end``, or less if the file
    shrank while it was read (never less than the data sent)."""
    sent_to = 0  # the end of the data sent
    for data_at, hole_at in data_extents(fd, end):
        position = data_at
        while position < hole_at:
            if call.cancelled.is_set():
                raise CallError("cancelled", "call cancelled")
            chunk = os.pread(fd, min(READ_CHUNK, hole_at - position), position)
            if not chunk:
                return position  # shrank while we read
            call.send(p.Frame(p.DATA, call.id, {"stream": "file", "offset": position}, chunk))
            position += len(chunk)
            sent_to = position
    # A walk cut short by a shrink covers what was sent, and the holes up to the new end.
    return max(sent_to, min(end, os.fstat(fd).st_size))
