"""The host <-> guest agent wire protocol (stdlib only: it runs on both sides).

One long-lived byte stream per VM (a virtio-serial port under QEMU, a vsock connection
under Firecracker) carries frames. Every frame is::

    magic  b"PYRO"            4 bytes, lets a reader resynchronise after a torn frame
    header_len   u32 BE       length of the JSON header
    payload_len  u32 BE       length of the raw payload (may be 0)
    header       JSON object  UTF-8
    payload      bytes        raw, never base64

The header always has ``t`` (the frame type) and ``id`` (the call it belongs to). Many
calls are in flight at once; frames of different calls interleave freely.

Frame types (``t``):

========  ==============  ============================================================
type      direction       meaning
========  ==============  ============================================================
call      host -> guest   start a call: ``op``, ``args``; the payload is its input
data      both            a chunk of a stream: ``stream`` (stdout, stderr, stdin, file)
eof       both            end of one stream of a call: ``stream``
cancel    host -> guest   stop a call (the agent kills what it started)
result    guest -> host   the call finished: ``value``; the payload is its output
error     guest -> host   the call failed: ``code``, ``message``
========  ==============  ============================================================

The first call on a fresh connection is ``hello``; its result carries the agent's
``protocol`` version and ``capabilities``. A host refuses a major version it does not
know.

A guest agent that was restarted (it crashed, or was killed, and its init started it
again) sends one unsolicited ``error`` frame with id 0 and code ``agent_restarted``: the
calls the host still waits for died with the old agent.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

PROTOCOL_VERSION = 1
MAGIC = b"PYRO"
AGENT_PORT_NAME = "pyro.agent"  # virtio-serial port name
AGENT_VSOCK_PORT = 1024  # vsock port the agent listens on
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 8 << 20
CHUNK = 256 << 10  # the size streams are cut into

_PREFIX = struct.Struct(">4sII")
PREFIX_SIZE = _PREFIX.size

AGENT_RESTARTED = "agent_restarted"  # code of the unsolicited notice of a restarted agent

# Frame types
CALL = "call"
DATA = "data"
EOF = "eof"
CANCEL = "cancel"
RESULT = "result"
ERROR = "error"
FRAME_TYPES = frozenset({CALL, DATA, EOF, CANCEL, RESULT, ERROR})


class ProtocolError(Exception):
    """The byte stream does not follow the protocol (bad magic, oversize, bad JSON)."""


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
        return _PREFIX.pack(MAGIC, len(raw), len(self.payload)) + raw + self.payload


def decode_header(raw: bytes) -> tuple[str, int, dict[str, Any]]:
    try:
        head = json.loads(raw)
    except ValueError as exc:
        raise ProtocolError(f"frame header is not JSON: {exc}") from exc
    if not isinstance(head, dict):
        raise ProtocolError("frame header is not a JSON object")
    kind = head.pop("t", None)
    ident = head.pop("id", None)
    if kind not in FRAME_TYPES or not isinstance(ident, int):
        raise ProtocolError(f"frame header lacks a valid type or id: {kind!r} {ident!r}")
    return kind, ident, head


class FrameReader:
    """Reads frames from a blocking binary stream (or anything with ``read``)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.resyncs = 0  # how many times garbage was skipped to find a frame

    def _exact(self, size: int) -> bytes:
        chunks = []
        remaining = size
        while remaining:
            chunk = self._stream.read(remaining)
            if not chunk:
                raise ChannelClosed("stream closed")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def _prefix(self) -> tuple[int, int]:
        data = self._exact(PREFIX_SIZE)
        while data[:4] != MAGIC:
            # A torn frame (the other side restarted mid-write): slide to the next magic.
            self.resyncs += 1
            data = data[1:] + self._exact(1)
        _, header_len, payload_len = _PREFIX.unpack(data)
        if header_len > MAX_HEADER or payload_len > MAX_PAYLOAD:
            raise ProtocolError(f"oversized frame: header {header_len}, payload {payload_len}")
        return header_len, payload_len

    def read(self) -> Frame:
        header_len, payload_len = self._prefix()
        kind, ident, head = decode_header(self._exact(header_len))
        payload = self._exact(payload_len) if payload_len else b""
        return Frame(kind, ident, head, payload)


class FrameBuffer:
    """Incremental decoder for non-blocking readers (asyncio or select loops)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        while True:
            start = self._buffer.find(MAGIC)
            if start < 0:
                del self._buffer[: max(0, len(self._buffer) - 3)]
                return frames
            if start:
                del self._buffer[:start]
            if len(self._buffer) < PREFIX_SIZE:
                return frames
            _, header_len, payload_len = _PREFIX.unpack_from(self._buffer)
            if header_len > MAX_HEADER or payload_len > MAX_PAYLOAD:
                raise ProtocolError(f"oversized frame: header {header_len}, payload {payload_len}")
            end = PREFIX_SIZE + header_len + payload_len
            if len(self._buffer) < end:
                return frames
            raw = bytes(self._buffer[PREFIX_SIZE : PREFIX_SIZE + header_len])
            payload = bytes(self._buffer[PREFIX_SIZE + header_len : end])
            del self._buffer[:end]
            kind, ident, head = decode_header(raw)
            frames.append(Frame(kind, ident, head, payload))
