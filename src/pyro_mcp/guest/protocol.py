"""The host <-> guest agent wire protocol (stdlib only: it runs on both sides).

One long-lived byte stream per VM (a virtio-serial port under QEMU, a vsock connection
under Firecracker) carries frames. Every frame is::

    magic        b"PYRO"          4 bytes, lets a reader resynchronise
    header_len   u32 BE           length of the JSON header
    payload_len  u32 BE           length of the raw payload (may be 0)
    header_crc   u32 BE           CRC-32 of the 12 bytes above and the header
    header       JSON object      UTF-8
    payload      bytes            raw, never base64
    trailer      u32 BE           header_crc again: where the frame must end

The header always has ``t`` (the frame type) and ``id`` (the call it belongs to); frames
the agent sends also carry ``s``, the session they belong to (see below). Many calls are in
flight at once; frames of different calls interleave freely.

Frame types (``t``):

========  ==============  ============================================================
type      direction       meaning
========  ==============  ============================================================
call      host -> guest   start a call: ``op``, ``args``; the payload is its input
data      both            a chunk of a stream: ``stream`` (stdout, stderr, file, ...);
                          ``offset`` when the stream is sparse (the chunk's position);
                          stream ``beat`` is a keepalive of a long call (no content)
eof       both            end of one stream of a call: ``stream``
cancel    host -> guest   stop a call (the agent kills what it started)
result    guest -> host   the call finished: ``value``; the payload is its output
error     guest -> host   the call failed: ``code``, ``message``
========  ==============  ============================================================

**Damage.** A frame whose header CRC fails is not a frame: the reader skips one byte and
looks for the next magic. A frame whose header is sound but whose trailer is not where
its lengths say was torn (its sender died mid-write, and the next frame began inside the
space the torn one declared): the reader reports it as :class:`Damaged` for that call id
and rescans from just after its header, so the frames that followed are found and only
the torn frame's call fails. (A stream socket neither flips bits nor loses bytes in the
middle, so payloads are not hashed: a guest under emulation would pay for every byte.)
A torn frame that declared more payload than will ever come would hold back every later
frame; when the link has been idle for a moment, :meth:`FrameDecoder.stalled` gives it up
if a complete, sound frame starts later in what was received.

**Sessions.** The first call on a connection is ``hello``; its ``session`` argument is a
random token of the host. The agent tags every frame it sends with the session of the call
it answers, and a new session on a channel cancels the calls of the one before (their host
is gone: a virtio-serial port is reused by the next host process). A host drops frames of
any other session, so a dead client's late result can never complete a new client's call.
The result of ``hello`` carries the agent's ``protocol`` version and ``capabilities``; a
host refuses a major version it does not know.

A guest agent that was restarted (it crashed, or was killed, and its init started it
again) sends one unsolicited ``error`` frame with id 0 and code ``agent_restarted``: the
calls the host still waits for died with the old agent.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 2
MAGIC = b"PYRO"
AGENT_PORT_NAME = "pyro.agent"  # virtio-serial port name
AGENT_VSOCK_PORT = 1024  # vsock port the agent listens on
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 8 << 20
CHUNK = 256 << 10  # the size streams are cut into
COMPACT_AT = 4 << 20  # a decoder drops consumed bytes once this many have piled up
DIRECT_MIN = 64 << 10  # a frame with this much payload still to come is read in place

_PREFIX = struct.Struct(">4sIII")
_LENGTHS = struct.Struct(">4sII")  # what the header CRC covers before the header itself
_TRAILER = struct.Struct(">I")
PREFIX_SIZE = _PREFIX.size
TRAILER_SIZE = _TRAILER.size

AGENT_RESTARTED = "agent_restarted"  # code of the unsolicited notice of a restarted agent
BEAT = "beat"  # data stream of keepalives

# Frame types
CALL = "call"
DATA = "data"
EOF = "eof"
CANCEL = "cancel"
RESULT = "result"
ERROR = "error"
FRAME_TYPES = frozenset({CALL, DATA, EOF, CANCEL, RESULT, ERROR})


Bytes = bytes | bytearray  # a payload: large ones read in place are bytearrays


class ProtocolError(Exception):
    """A frame that cannot be encoded (oversize) or a header that is not a frame header."""


class ChannelClosed(Exception):
    """The other end went away."""


@dataclass
class Frame:
    t: str
    id: int
    header: dict[str, Any] = field(default_factory=dict)
    payload: Bytes = b""  # a large payload read in place is a bytearray

    def encode(self) -> bytes:
        head = dict(self.header, t=self.t, id=self.id)
        raw = json.dumps(head, separators=(",", ":")).encode()
        if len(raw) > MAX_HEADER:
            raise ProtocolError(f"header of {len(raw)} bytes exceeds {MAX_HEADER}")
        if len(self.payload) > MAX_PAYLOAD:
            raise ProtocolError(f"payload of {len(self.payload)} bytes exceeds {MAX_PAYLOAD}")
        lengths = _LENGTHS.pack(MAGIC, len(raw), len(self.payload))
        crc = _TRAILER.pack(zlib.crc32(raw, zlib.crc32(lengths)))
        return b"".join((lengths, crc, raw, self.payload, crc))


@dataclass(frozen=True)
class Damaged:
    """A frame whose header was sound but whose payload did not arrive intact."""

    t: str
    id: int
    reason: str


def decode_header(raw: bytes) -> tuple[str, int, dict[str, Any]]:
    try:
        head = json.loads(raw)
    except ValueError as exc:
        raise ProtocolError(f"frame header is not JSON: {exc}") from exc
    if not isinstance(head, dict):
        raise ProtocolError("frame header is not a JSON object")
    kind = head.pop("t", None)
    ident = head.pop("id", None)
    if kind not in FRAME_TYPES or not isinstance(ident, int) or isinstance(ident, bool):
        raise ProtocolError(f"frame header lacks a valid type or id: {kind!r} {ident!r}")
    return kind, ident, head


Decoded = Frame | Damaged


class _Direct:
    """A large frame whose header is in and whose payload is read straight into place."""

    def __init__(
        self,
        prefix: bytes,
        kind: str,
        ident: int,
        head: dict[str, Any],
        header_crc: int,
        payload_len: int,
    ) -> None:
        self.prefix = prefix  # its magic, lengths, CRC and header: kept for a rescan
        self.kind, self.ident, self.head, self.header_crc = kind, ident, head, header_crc
        self.data = bytearray(payload_len + TRAILER_SIZE)
        self.view: memoryview | None = None  # while a reader reads into it
        self.filled = 0


class FrameDecoder:
    """Incremental decoder for both ends: ``feed`` bytes, get whole frames (or damage).

    Memory is bounded by one frame (header and payload limits) plus what one ``feed``
    brings. Counters: ``resyncs`` (bytes skipped looking for a frame), ``damaged``. Whole
    frames are decoded straight from what was fed (each payload is copied once); only an
    incomplete tail is kept, in a buffer consumed by moving an offset. Once the header of a
    large frame is in, :meth:`target` offers the place its payload goes, so a reader reads
    it there with no copy at all (emulated guests pay for every one).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._at = 0  # where the undecoded bytes of the buffer start
        self._need = 0  # the buffer length before which the head frame cannot be complete
        self._direct: _Direct | None = None
        self.resyncs = 0
        self.damaged = 0

    @property
    def pending(self) -> bool:
        """Bytes of an incomplete frame are waiting for the rest."""
        return self._direct is not None or len(self._buffer) > self._at

    def target(self) -> memoryview | None:
        """Where the next bytes should be read to (the rest of a large frame), or None
        (read into your own buffer and :meth:`feed`). Release the view (``with``) before
        calling :meth:`filled`."""
        direct = self._direct
        return None if direct is None else memoryview(direct.data)[direct.filled :]

    @property
    def filling(self) -> bool:
        """A large frame is being read in place: read with :meth:`fill`."""
        return self._direct is not None

    def fill(self, read: Callable[[memoryview], int]) -> tuple[int, list[Decoded]]:
        """Read more of the large frame straight into place: ``read(view)`` fills the start
        of ``view`` and returns how much. Returns (bytes read, what completed); 0 bytes
        read means the channel ended. The cheapest way in: one call per read."""
        direct = self._direct
        assert direct is not None, "fill() while no large frame is being read"
        if direct.view is None:
            direct.view = memoryview(direct.data)
        size = read(direct.view[direct.filled :])
        if not size:
            return 0, []
        direct.filled += size
        if direct.filled < len(direct.data):
            return size, []
        direct.view.release()
        direct.view = None
        return size, self.filled(0)

    def filled(self, size: int) -> list[Decoded]:
        """``size`` bytes were read into the last :meth:`target`."""
        direct = self._direct
        assert direct is not None, "filled() without a target()"
        direct.filled += size
        if direct.filled < len(direct.data):
            return []
        if direct.view is not None:
            direct.view.release()
            direct.view = None
        self._direct = None
        trailer = _TRAILER.unpack_from(direct.data, len(direct.data) - TRAILER_SIZE)[0]
        if trailer != direct.header_crc:  # torn: what it swallowed are the frames after it
            self.damaged += 1
            out: list[Decoded] = [Damaged(direct.kind, direct.ident, "its payload was torn")]
            return out + self.feed(direct.data)
        del direct.data[-TRAILER_SIZE:]  # the payload is the buffer itself: no copy
        return [Frame(direct.kind, direct.ident, direct.head, direct.data)]

    def feed(self, data: bytes | bytearray | memoryview) -> list[Decoded]:
        out: list[Decoded] = []
        if self._direct is not None:
            return self._feed_direct(memoryview(data))
        if not self.pending:
            self._buffer.clear()
            self._at = 0
            view = memoryview(data)
            self._need = 0
            used = self._drain(view, 0, out)  # the common case: no copy of what is fed
            if self._direct is None:
                self._buffer += view[used:]
                self._need -= used  # the tail now starts the buffer
            return out
        if self._at > COMPACT_AT:
            del self._buffer[: self._at]
            self._need -= self._at
            self._at = 0
        self._buffer += data
        if len(self._buffer) < self._need:
            return out  # a large frame arriving piece by piece: nothing to parse yet
        with memoryview(self._buffer) as view:
            at = self._drain(view, self._at, out)
        self._at = at
        if self._direct is not None:
            self._buffer.clear()
            self._at = 0
        return out

    def _feed_direct(self, data: memoryview) -> list[Decoded]:
        """Bytes fed while a large frame is being filled: as much as it takes, then on."""
        direct = self._direct
        assert direct is not None
        take = min(len(data), len(direct.data) - direct.filled)
        direct.data[direct.filled : direct.filled + take] = data[:take]
        out = self.filled(take)
        return out + (self.feed(data[take:]) if take < len(data) else [])

    def _drain(self, buffer: memoryview, at: int, out: list[Decoded]) -> int:
        """Decode whole frames from ``buffer`` at ``at``; where the undecoded part starts.
        A large frame that is not complete becomes the direct target (what of it was in
        ``buffer`` is copied there, and everything up to the end of ``buffer`` is used)."""
        while True:
            start = _find(buffer, at)
            if start < 0:
                keep = max(at, len(buffer) - 3)  # a magic may be split across feeds
                self.resyncs += keep - at
                return keep
            self.resyncs += start - at
            step = _parse(buffer, start)
            if isinstance(step, int):
                if step - (len(buffer) - start) >= DIRECT_MIN and self._go_direct(buffer, start):
                    return len(buffer)
                self._need = start + step  # incomplete: wait for that much
                return start
            consumed, item = step
            if item is None:
                self.resyncs += consumed
            else:
                self.damaged += isinstance(item, Damaged)
                out.append(item)
            at = start + consumed

    def _go_direct(self, buffer: memoryview, at: int) -> bool:
        """Start filling the large frame at ``at`` in place (False: its header is not in)."""
        try:
            found = _header(buffer, at)
            if isinstance(found, int):
                return False
            header_len, payload_len, header_crc, raw = found
            kind, ident, head = decode_header(raw)
        except (_NotAFrame, ProtocolError):
            return False
        head_end = at + PREFIX_SIZE + header_len
        direct = _Direct(bytes(buffer[at:head_end]), kind, ident, head, header_crc, payload_len)
        have = len(buffer) - head_end
        direct.data[:have] = buffer[head_end:]
        direct.filled = have
        self._direct = direct
        return True

    def stalled(self) -> list[Decoded]:
        """The link has been idle with an incomplete frame at the head: if a complete,
        sound frame starts later in the buffer, the head frame was torn. Give it up
        (reported as damage when its header was sound) and decode what follows."""
        direct = self._direct
        if direct is not None:  # back into the buffer, to be searched like any other
            if direct.view is not None:
                direct.view.release()
                direct.view = None
            self._direct = None
            self._buffer = bytearray(direct.prefix) + direct.data[: direct.filled]
            self._at = 0
        out: list[Decoded] = []
        head = self._at
        flat = bytes(self._buffer)  # one copy for the whole search
        if flat.find(MAGIC, head, head + len(MAGIC)) != head:
            return out
        with memoryview(self._buffer) as buffer:
            at = flat.find(MAGIC, head + 1)
            while at >= 0:
                step = _parse(buffer, at)
                if not isinstance(step, int) and isinstance(step[1], Frame):
                    torn = _torn(buffer, head)
                    if torn is not None:
                        self.damaged += 1
                        out.append(torn)
                    self.resyncs += at - head
                    self._at = self._drain(buffer, at, out)
                    return out
                at = flat.find(MAGIC, at + 1)
        if self._direct is None and direct is not None:
            self._direct = direct  # nothing after it yet: keep filling it
            self._buffer.clear()
            self._at = 0
        return out


def _find(buffer: memoryview, start: int) -> int:
    """Where the next magic is at or after ``start`` (-1: none). Frames follow each other,
    so it is almost always right there; only after garbage is the rest searched."""
    if buffer[start : start + len(MAGIC)] == MAGIC:
        return start
    found = buffer[start:].tobytes().find(MAGIC)
    return found + start if found >= 0 else -1


def _header(buffer: memoryview, at: int) -> tuple[int, int, int, bytes] | int:
    """(header length, payload length, header CRC, header bytes) of a frame at ``at``
    whose prefix and header are sound; when incomplete, how many bytes from ``at`` it
    takes to know; raises _NotAFrame."""
    if len(buffer) - at < PREFIX_SIZE:
        return PREFIX_SIZE
    _, header_len, payload_len, header_crc = _PREFIX.unpack_from(buffer, at)
    if header_len > MAX_HEADER or payload_len > MAX_PAYLOAD:
        raise _NotAFrame
    head_end = at + PREFIX_SIZE + header_len
    if len(buffer) < head_end:
        return int(PREFIX_SIZE + header_len)
    raw = bytes(buffer[at + PREFIX_SIZE : head_end])
    if zlib.crc32(raw, zlib.crc32(buffer[at : at + 12])) != header_crc:
        raise _NotAFrame
    return int(header_len), int(payload_len), int(header_crc), raw


class _NotAFrame(Exception):
    """The magic at this place starts no frame (a bad length or header CRC)."""


def _parse(buffer: memoryview, at: int) -> tuple[int, Decoded | None] | int:
    """Decode the frame starting at ``at`` (which holds the magic).

    An int: incomplete, and how many bytes from ``at`` are needed before it can be known.
    Otherwise (bytes to drop, what was found): a bad header drops one byte (it was no
    frame); a torn frame drops only its prefix and header (the next frame may start inside
    the payload it declared).
    """
    try:
        found = _header(buffer, at)
    except _NotAFrame:
        return 1, None
    if isinstance(found, int):
        return found
    header_len, payload_len, header_crc, raw = found
    try:
        kind, ident, head = decode_header(raw)
    except ProtocolError:
        return PREFIX_SIZE + header_len, None  # sound bytes, but no frame header
    head_end = at + PREFIX_SIZE + header_len
    end = head_end + payload_len
    if len(buffer) < end + TRAILER_SIZE:
        return end + TRAILER_SIZE - at
    if _TRAILER.unpack_from(buffer, end)[0] != header_crc:
        return PREFIX_SIZE + header_len, Damaged(kind, ident, "its payload was torn")
    payload = bytes(buffer[head_end:end]) if payload_len else b""
    return end + TRAILER_SIZE - at, Frame(kind, ident, head, payload)


def _torn(buffer: memoryview, at: int) -> Damaged | None:
    """The damage to report for a frame at ``at`` cut short, if its header is sound."""
    try:
        found = _header(buffer, at)
        if isinstance(found, int):
            return None
        kind, ident, _ = decode_header(found[3])
    except (_NotAFrame, ProtocolError):
        return None
    return Damaged(kind, ident, "it was cut short (the sender stopped mid-frame)")
