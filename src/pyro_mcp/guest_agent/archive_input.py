"""The input of ``archive_put``: the streamed archive, decompressed, as a file for tarfile.

``Input`` reads the call's payload and then its ``data`` frames, recognises gzip, bzip2
and xz by their first bytes (``MAGICS``) and decompresses here, so every limit counts the
uncompressed bytes tarfile sees. Reading past the budget the extractor grants (the
current member plus ``HEADER_SLACK``) or past the overall ceiling is ``too_large``; a
corrupt compressed stream is ``invalid_archive``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from pyro_mcp.guest import protocol as p
from pyro_mcp.guest_agent.calls import Call, CallError

HEADER_SLACK = 1 << 20  # tar bytes allowed between the data of one member and the next
MAGICS = {"gz": b"\x1f\x8b", "bz2": b"BZh", "xz": b"\xfd7zXZ\x00"}


if TYPE_CHECKING:  # a Protocol class costs import time, and the agent starts at every boot

    class _Decompressor(Protocol):
        def decompress(self, data: p.Bytes, max_length: int = -1) -> bytes: ...

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

    def decompress(self, data: p.Bytes, max_length: int = -1) -> bytes:
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


class Input:
    """The archive streamed by the host as a read-only file object for tarfile.

    Decompressed here, so the limits count the bytes tarfile sees. ``allowed`` (raised by
    the extractor as each member is accepted) and ``ceiling`` bound how far tarfile may
    read: a giant pax header is refused before it is held in memory.
    """

    def __init__(self, call: Call, streamed: bool, ceiling: int) -> None:
        self._call = call
        self._streamed = streamed
        self._raw: list[p.Bytes] = [call.payload] if call.payload else []
        self._raw_done = not streamed
        self._decoder: _Decompressor | None = None
        self._ready = bytearray()
        self._eof = False
        self.kind: str | None = None
        self.position = 0
        self.allowed = HEADER_SLACK
        self.ceiling = ceiling

    def _next_raw(self) -> p.Bytes | None:
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
            rest: p.Bytes | None = decoder.unused_data or self._next_raw()
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
