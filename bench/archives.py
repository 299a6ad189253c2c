"""Archive bombs, built in memory: for the host-side rows and the unit tests that refuse them."""

from __future__ import annotations

import struct
import tarfile
import zlib

MIB = 1 << 20


def metadata_header(kind: bytes, size: int) -> bytes:
    """One 512-byte tar header of type ``kind`` (``L``, ``K``, ``x``, ``g``) declaring
    ``size`` bytes of metadata to follow."""
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = kind, size
    return info.tobuf(tarfile.GNU_FORMAT)


def gzip_bomb(header: bytes, zero_mib: int, trailer: bytes = bytes(1024)) -> bytes:
    """``header``, then ``zero_mib`` MiB of NULs, then ``trailer``, as a gzip file of about
    1 KiB per MiB. After a full flush deflate starts afresh, so one compressed MiB of
    zeros is valid at every position: it is compressed once and repeated."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = comp.compress(header) + comp.flush(zlib.Z_FULL_FLUSH)
    mib = bytes(MIB)
    piece = comp.compress(mib) + comp.flush(zlib.Z_FULL_FLUSH)
    end = comp.compress(trailer) + comp.flush()
    crc = zlib.crc32(header)
    for _ in range(zero_mib):
        crc = zlib.crc32(mib, crc)
    crc = zlib.crc32(trailer, crc)
    size = len(header) + zero_mib * MIB + len(trailer)
    gzip_header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\x03"
    return gzip_header + start + piece * zero_mib + end + struct.pack("<II", crc, size % 2**32)
