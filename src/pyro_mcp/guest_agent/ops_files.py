"""File operations: ``put_file`` and ``get_file``, binary-safe and streamed.

Both take ``path`` (absolute, in the guest) and an optional ``root``: when given, the
path and everything it resolves through (symlinks included) must stay inside ``root``.
That check runs here, in the guest, because only the guest sees its symlinks.

``put_file``: the content is the call's payload, or (``streamed``: true) the ``data``
frames the host sends after the call, ended by ``eof``. Written to a temporary file in the
same directory and renamed into place, so a reader never sees half a file. ``mode``
(int), ``mkdirs`` (bool), ``max_bytes`` (int cap).

``get_file``: streams the content as ``data`` frames (``stream`` file); ``max_bytes`` caps
what is sent (the result says ``truncated``).
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import Any

from pyro_mcp.guest_agent.calls import Call, CallError

HARD_MAX_BYTES = 4 << 30
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
    parent = os.path.dirname(path)
    if args.get("mkdirs"):
        os.makedirs(parent, exist_ok=True)
    if not os.path.isdir(parent):
        raise CallError("not_found", f"directory {parent} does not exist")
    if os.path.isdir(path) and not os.path.islink(path):
        raise CallError("is_a_directory", f"{path} is a directory")
    tmp = os.path.join(parent, f".pyro-put-{os.getpid()}-{call.id}")
    written = 0
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        chunks = [call.payload] if not args.get("streamed") else _stream(call)
        for chunk in chunks:
            written += len(chunk)
            if written > limit:
                raise CallError("too_large", f"content exceeds the limit of {limit} bytes")
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return {"path": path, "size": written, "mode": mode}, b""


def _stream(call: Call) -> Any:
    while (chunk := call.read_input()) is not None:
        yield chunk


def get_file(call: Call) -> tuple[dict[str, Any], bytes]:
    args = call.args
    path = confined_path(args.get("path"), args.get("root"))
    limit = _cap(args.get("max_bytes"))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW if args.get("root") else os.O_RDONLY)
    except FileNotFoundError as exc:
        raise CallError("not_found", f"{path} does not exist") from exc
    except OSError as exc:
        raise CallError("io_error", f"{path}: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CallError("not_a_file", f"{path} is not a regular file")
        sent = 0
        while sent < limit:
            chunk = os.read(fd, min(READ_CHUNK, limit - sent))
            if not chunk:
                break
            call.send_data("file", chunk)
            sent += len(chunk)
    finally:
        os.close(fd)
    return {
        "path": path,
        "size": info.st_size,
        "sent": sent,
        "truncated": sent < info.st_size,
        "mode": stat.S_IMODE(info.st_mode),
    }, b""
