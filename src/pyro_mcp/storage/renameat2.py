"""``renameat2`` for Python, which has none: a rename relative to directory descriptors
with ``RENAME_NOREPLACE`` (fail if the destination exists) or ``RENAME_EXCHANGE`` (swap
two entries), called through libc (glibc and musl export it).

On a filesystem or kernel that refuses these flags, :func:`rename` emulates them with
plain renames: the same outcome, but not atomically.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import secrets
from collections.abc import Callable

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_NO_RENAME_FLAGS = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


@functools.cache
def _libc_renameat2() -> Callable[..., int] | None:
    # Python has no renameat2; glibc and musl export it.
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    function.argtypes += [ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _renameat2(src_fd: int, src: str, dst_fd: int, dst: str, flags: int) -> None:
    function = _libc_renameat2()
    if function is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", dst)
    if function(src_fd, os.fsencode(src), dst_fd, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), dst)


def rename(src_fd: int, src: str, dst_fd: int, dst: str, flags: int) -> None:
    """``renameat2`` with ``flags``; emulated (not atomically) on filesystems without it."""
    try:
        _renameat2(src_fd, src, dst_fd, dst, flags)
        return
    except OSError as exc:
        if exc.errno not in _NO_RENAME_FLAGS:
            raise
    if flags == RENAME_NOREPLACE:
        if _exists(dst_fd, dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
        os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        return
    # Exchange: move the old entry aside, the new one in, then the old one to src.
    aside = f".{src[:200]}.aside-{secrets.token_hex(6)}"
    os.rename(dst, aside, src_dir_fd=dst_fd, dst_dir_fd=src_fd)
    try:
        os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
    except BaseException:
        os.rename(aside, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        raise
    os.rename(aside, src, src_dir_fd=src_fd, dst_dir_fd=src_fd)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True
