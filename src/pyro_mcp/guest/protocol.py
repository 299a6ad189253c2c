"""The host <-> guest agent wire protocol (stdlib only: it runs on both sides).

One long-lived byte stream per VM (a virtio-serial port under QEMU, a vsock connection
under Firecracker) carries frames. Every frame is::

    magic        b"PYRO"          4 bytes, lets a reader resynchronise
    header_len   u32 BE           length of the JSON header
    payload_len  u32 BE           length of the raw payload (may be 0)
    header_crc   u32 BE           CRC-32 of the 12 bytes above and the header
    payload_crc  u32 BE           CRC-32 of the payload
    header       JSON object      UTF-8
    payload      bytes            raw, never base64

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
looks for the next magic. A frame whose header is sound but whose payload CRC fails was
torn (its sender died mid-write, or the link lost bytes): the reader reports it as
:class:`Damaged` for that call id and rescans from just after its header, so the frames
that followed are found and only the torn frame's call fails. A torn frame that declared
more payload than will ever come would hold back every later frame; when the link has
been idle for a moment, :meth:`FrameDecoder.stalled` gives it up if a complete, sound frame
starts later in what was received.

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
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 2
MAGIC = b"PYRO"
AGENT_PORT_NAME = "pyro.agent"  # virtio-serial port name
AGENT_VSOCK_PORT = 1024  # vsock port the agent listens on
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 8 << 20
CHUNK = 256 << 10  # the size streams are cut into

_PREFIX = struct.Struct(">4sIIII")
_LENGTHS = struct.Struct(">4sII")  # what the header CRC covers before the header itself
PREFIX_SIZE = _PREFIX.size

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


class ProtocolError(Exception):
    """A frame that cannot be encoded (oversize) or a header that is not a frame header."""


class ChannelClosed(Exception):
    """The other end went away."""


@dataclass
class Frame:
    t: str
    id: int
    header: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""

    def encode(self) -> bytes:
        head = dict(self.header, t=self.t, id=self.id)
        raw = json.dumps(head, separators=(",", ":")).encode()
        if len(raw) > MAX_HEADER:
            raise ProtocolError(f"header of {len(raw)} bytes exceeds {MAX_HEADER}")
        if len(self.payload) > MAX_PAYLOAD:
            raise ProtocolError(f"payload of {len(self.payload)} bytes exceeds {MAX_PAYLOAD}")
        lengths = _LENGTHS.pack(MAGIC, len(raw), len(self.payload))
        header_crc = zlib.crc32(raw, zlib.crc32(lengths))
        prefix = lengths + struct.pack(">II", header_crc, zlib.crc32(self.payload))
        return prefix + raw + self.payload


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


class FrameDecoder:
    """Incremental decoder for both ends: ``feed`` bytes, get whole frames (or damage).

    Memory is bounded by one frame (header and payload limits) plus what one ``feed``
    brings. Counters: ``resyncs`` (bytes skipped looking for a frame), ``damaged``.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.resyncs = 0
        self.damaged = 0

    @property
    def pending(self) -> bool:
        """Bytes of an incomplete frame are waiting for the rest."""
        return bool(self._buffer)

    def feed(self, data: bytes) -> list[Decoded]:
        self._buffer += data
        return self._drain()

    def _drain(self) -> list[Decoded]:
        out: list[Decoded] = []
        while True:
            start = self._buffer.find(MAGIC)
            if start < 0:
                self.resyncs += max(0, len(self._buffer) - 3)
                del self._buffer[: max(0, len(self._buffer) - 3)]
                return out
            if start:
                self.resyncs += start
                del self._buffer[:start]
            step = self._parse_at(0)
            if step is None:
                return out  # incomplete: wait for more
            consumed, item = step
            if item is None:
                self.resyncs += consumed
            else:
                self.damaged += isinstance(item, Damaged)
                out.append(item)
            del self._buffer[:consumed]

    def _parse_at(self, at: int) -> tuple[int, Decoded | None] | None:
        """Decode the frame starting at ``at`` (which holds the magic).

        None: incomplete. Otherwise (bytes to drop, what was found): a bad header drops
        one byte (it was no frame); a torn payload drops only the prefix and header (the
        next frame may start inside the declared payload).
        """
        buffer = self._buffer
        if len(buffer) - at < PREFIX_SIZE:
            return None
        _, header_len, payload_len, header_crc, payload_crc = _PREFIX.unpack_from(buffer, at)
        if header_len > MAX_HEADER or payload_len > MAX_PAYLOAD:
            return 1, None
        head_end = at + PREFIX_SIZE + header_len
        if len(buffer) < head_end:
            return None
        raw = bytes(buffer[at + PREFIX_SIZE : head_end])
        if zlib.crc32(raw, zlib.crc32(buffer[at : at + 12])) != header_crc:
            return 1, None
        try:
            kind, ident, head = decode_header(raw)
        except ProtocolError:
            return PREFIX_SIZE + header_len, None  # sound bytes, but no frame header
        end = head_end + payload_len
        if len(buffer) < end:
            return None
        payload = bytes(buffer[head_end:end])
        if zlib.crc32(payload) != payload_crc:
            return PREFIX_SIZE + header_len, Damaged(kind, ident, "its payload was torn")
        return end - at, Frame(kind, ident, head, payload)

    def stalled(self) -> list[Decoded]:
        """The link has been idle with an incomplete frame at the head: if a complete,
        sound frame starts later in the buffer, the head frame was torn. Give it up
        (reported as damage when its header was sound) and decode what follows."""
        buffer = self._buffer
        if not buffer.startswith(MAGIC):
            return []
        at = buffer.find(MAGIC, 1)
        while at >= 0:
            step = self._parse_at(at)
            if step is not None and isinstance(step[1], Frame):
                head = self._torn_head()
                del buffer[:at]
                self.resyncs += at
                if head is not None:
                    self.damaged += 1
                return ([head] if head else []) + self._drain()
            at = buffer.find(MAGIC, at + 1)
        return []

    def _torn_head(self) -> Damaged | None:
        buffer = self._buffer
        if len(buffer) < PREFIX_SIZE:
            return None
        _, header_len, _, header_crc, _ = _PREFIX.unpack_from(buffer, 0)
        raw = bytes(buffer[PREFIX_SIZE : PREFIX_SIZE + header_len])
        if len(raw) != header_len or zlib.crc32(raw, zlib.crc32(buffer[:12])) != header_crc:
            return None
        try:
            kind, ident, _ = decode_header(raw)
        except ProtocolError:
            return None
        return Damaged(kind, ident, "it was cut short (the sender stopped mid-frame)")
