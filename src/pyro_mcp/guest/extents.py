"""Where a file holds data: its extents, found with ``SEEK_DATA``/``SEEK_HOLE``.

Shared by the host and the guest agent (copied into the image beside protocol.py), so it
imports nothing but the standard library. A file may change while it is walked (a guest
command rewriting it as a checkpoint reads it): a file that shrank ends the walk where it
now ends, never with an error; the caller's own size check notices the change.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

_NO_HOLE_SUPPORT = (errno.EINVAL, errno.EOPNOTSUPP)


def data_extents(fd: int, end: int, start: int = 0) -> Iterator[tuple[int, int]]:
    """The ``[data_at, hole_at)`` ranges of data in ``[start, end)`` of ``fd``, in order;
    holes are skipped. A file system without hole support yields the whole range."""
    position = start
    while position < end:
        try:
            data_at = os.lseek(fd, position, os.SEEK_DATA)
            hole_at = os.lseek(fd, data_at, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return  # only a hole is left, or the file shrank below ``position``
            if exc.errno in _NO_HOLE_SUPPORT:
                yield position, end
                return
            raise
        if data_at >= end:
            return
        hole_at = min(hole_at, end)
        yield data_at, hole_at
        position = hole_at
