"""DNS messages (RFC 1035 wire format) for the guest's resolver: parse and build; no sockets.

The guest is hostile: every length, count, label and compression pointer of what it sends
is checked, a message that breaks a rule raises :class:`MalformedMessage` (its ``reason``
is a short fixed phrase, safe to count, never the guest's bytes), and nothing grows with
the input beyond the bounds below. Upstream answers go through the same parser.
What the resolver does with a query is :mod:`pyro_mcp.network.dns_policy`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from pyro_mcp.errors import InvalidArgument, ProtocolViolation

TYPE_A = 1
TYPE_CNAME = 5
TYPE_AAAA = 28
TYPE_OPT = 41
CLASS_IN = 1
OPCODE_QUERY = 0

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_REFUSED = 5
RCODE_BADVERS = 16  # extended (RFC 6891): its high bits travel in the OPT record

FLAG_QR = 0x8000
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080

HEADER_BYTES = 12
# A query holds one question (a name is at most 255 bytes) and at most an OPT record.
MAX_QUERY_BYTES = 512
MAX_MESSAGE_BYTES = 65535  # what a TCP length prefix can say
MAX_RECORDS = 512  # questions + records of one message, whatever its counts claim
MAX_NAME_BYTES = 255  # on the wire, the root label included
MAX_POINTER_HOPS = 127  # a name has at most 127 labels; each hop must move backwards
PLAIN_UDP_BYTES = 512  # RFC 1035 §4.2.1, without EDNS
EDNS_UDP_BYTES = 1232  # what we offer and accept at most over UDP (the DNS flag day value)

Name = tuple[bytes, ...]  # labels as they were on the wire, without the root label


class MalformedMessage(ProtocolViolation):
    """A DNS message broke the wire format or one of this module's bounds."""

    code = "malformed_dns"

    def __init__(self, reason: str) -> None:
        super().__init__(f"malformed DNS message: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class Question:
    name: Name
    qtype: int
    qclass: int = CLASS_IN


@dataclass(frozen=True)
class Record:
    name: Name
    rtype: int
    rclass: int
    ttl: int
    """Seconds; a TTL with the top bit set reads as 0 (RFC 2181 §8)."""
    rdata: bytes
    """The record data as on the wire (for a CNAME, see ``target``)."""
    target: Name | None = None
    """A CNAME's target, decoded (its wire form may point elsewhere in the message)."""


@dataclass(frozen=True)
class Edns:
    """The OPT pseudo-record (RFC 6891)."""

    udp_size: int
    version: int = 0
    extended_rcode: int = 0
    flags: int = 0
    options: bytes = b""


@dataclass(frozen=True)
class Message:
    id: int
    flags: int
    questions: tuple[Question, ...] = ()
    answers: tuple[Record, ...] = ()
    authority: tuple[Record, ...] = ()
    additional: tuple[Record, ...] = ()
    """The additional section without the OPT pseudo-record (that is ``edns``)."""
    edns: Edns | None = None

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_QR)

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def truncated(self) -> bool:
        return bool(self.flags & FLAG_TC)

    @property
    def rcode(self) -> int:
        extended = self.edns.extended_rcode if self.edns else 0
        return (extended << 4) | (self.flags & 0xF)


def name_key(name: Name) -> Name:
    """The form two names are compared in: DNS compares ASCII case-insensitively."""
    return tuple(label.lower() for label in name)


def name_from_text(text: str) -> Name:
    """``"www.example.com."`` (the trailing dot optional) as labels; ASCII only."""
    stripped = text.removesuffix(".")
    if not stripped:
        return ()
    labels = tuple(label.encode("ascii") for label in stripped.split("."))
    if any(not 1 <= len(label) <= 63 for label in labels):
        raise InvalidArgument(f"DNS name {text!r}: every label is 1 to 63 bytes")
    if sum(len(label) + 1 for label in labels) + 1 > MAX_NAME_BYTES:
        raise InvalidArgument(f"DNS name {text!r}: longer than {MAX_NAME_BYTES} bytes")
    return labels


# ---------------------------------------------------------------------------------------
# Parsing


def _read_name(data: bytes, start: int) -> tuple[Name, int]:
    """The name at ``start`` and the offset just after it (after its first pointer).

    Every pointer must point before the labels it was found among, so the walk only ever
    moves backwards and cannot loop; hops, label types and the name's length are bounded.
    """
    labels: list[bytes] = []
    wire_bytes = 1  # the root label
    pos = segment_start = start
    end: int | None = None
    hops = 0
    while True:
        if pos >= len(data):
            raise MalformedMessage("name runs past the end")
        length = data[pos]
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 1 >= len(data):
                raise MalformedMessage("truncated compression pointer")
            target = ((length & 0x3F) << 8) | data[pos + 1]
            if end is None:
                end = pos + 2
            if target >= segment_start:
                raise MalformedMessage("compression pointer does not point backwards")
            if target < HEADER_BYTES:
                raise MalformedMessage("compression pointer into the header")
            hops += 1
            if hops > MAX_POINTER_HOPS:
                raise MalformedMessage("too many compression pointers")
            pos = segment_start = target
            continue
        if kind != 0:
            raise MalformedMessage("reserved label type")
        if length == 0:
            return tuple(labels), end if end is not None else pos + 1
        if pos + 1 + length > len(data):
            raise MalformedMessage("label runs past the end")
        wire_bytes += 1 + length
        if wire_bytes > MAX_NAME_BYTES:
            raise MalformedMessage("name longer than 255 bytes")
        labels.append(data[pos + 1 : pos + 1 + length])
        pos += 1 + length


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, count: int) -> bytes:
        if self.pos + count > len(self.data):
            raise MalformedMessage("message ends inside a field")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def unpack(self, layout: struct.Struct) -> tuple[int, ...]:
        return layout.unpack(self.take(layout.size))

    def name(self) -> Name:
        name, self.pos = _read_name(self.data, self.pos)
        return name


_HEADER = struct.Struct("!6H")
_QUESTION_TAIL = struct.Struct("!2H")
_RECORD_TAIL = struct.Struct("!HHIH")


def _read_record(reader: _Reader) -> Record:
    name = reader.name()
    rtype, rclass, ttl, rdlength = reader.unpack(_RECORD_TAIL)
    rdata_start = reader.pos
    rdata = reader.take(rdlength)
    target = None
    if rtype == TYPE_CNAME:
        target, after = _read_name(reader.data, rdata_start)
        if after != rdata_start + rdlength:
            raise MalformedMessage("CNAME data is not exactly one name")
    elif rtype == TYPE_A and rclass == CLASS_IN and rdlength != 4:
        raise MalformedMessage("A record data is not 4 bytes")
    if rtype != TYPE_OPT and ttl & 0x80000000:
        ttl = 0
    return Record(name, rtype, rclass, ttl, rdata, target)


def _edns_from(record: Record) -> Edns:
    if record.name != ():
        raise MalformedMessage("OPT record not owned by the root")
    return Edns(
        udp_size=record.rclass,
        extended_rcode=record.ttl >> 24,
        version=(record.ttl >> 16) & 0xFF,
        flags=record.ttl & 0xFFFF,
        options=record.rdata,
    )


def parse_message(data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """One whole DNS message; raises :class:`MalformedMessage` on any violation, trailing
    bytes included."""
    if len(data) > max_bytes:
        raise MalformedMessage("message too large")
    if len(data) < HEADER_BYTES:
        raise MalformedMessage("shorter than a header")
    reader = _Reader(data)
    message_id, flags, qdcount, ancount, nscount, arcount = reader.unpack(_HEADER)
    if qdcount + ancount + nscount + arcount > MAX_RECORDS:
        raise MalformedMessage("too many records")
    questions = []
    for _ in range(qdcount):
        name = reader.name()
        qtype, qclass = reader.unpack(_QUESTION_TAIL)
        questions.append(Question(name, qtype, qclass))
    answers = tuple(_read_record(reader) for _ in range(ancount))
    authority = tuple(_read_record(reader) for _ in range(nscount))
    additional = []
    edns = None
    for _ in range(arcount):
        record = _read_record(reader)
        if record.rtype != TYPE_OPT:
            additional.append(record)
        elif edns is not None:
            raise MalformedMessage("more than one OPT record")
        else:
            edns = _edns_from(record)
    if any(r.rtype == TYPE_OPT for r in answers + authority):
        raise MalformedMessage("OPT record outside the additional section")
    if reader.pos != len(data):
        raise MalformedMessage("bytes after the last record")
    return Message(message_id, flags, tuple(questions), answers, authority, tuple(additional), edns)


def parse_query(data: bytes) -> Message:
    """A guest's query: at most :data:`MAX_QUERY_BYTES`, not a response, exactly one
    question, no records but an optional OPT."""
    message = parse_message(data, max_bytes=MAX_QUERY_BYTES)
    if message.is_response:
        raise MalformedMessage("a response where a query belongs")
    if len(message.questions) != 1:
        raise MalformedMessage("a query without exactly one question")
    if message.answers or message.authority or message.additional:
        raise MalformedMessage("a query carrying records")
    return message


# ---------------------------------------------------------------------------------------
# Building


class _Writer:
    """Message bytes with name compression (a suffix written once is pointed at after)."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.suffixes: dict[Name, int] = {}

    def name(self, name: Name) -> None:
        for index, label in enumerate(name):
            if not 1 <= len(label) <= 63:
                raise InvalidArgument("a DNS label is 1 to 63 bytes")
            offset = self.suffixes.get(name[index:])
            if offset is not None:
                self.out += struct.pack("!H", 0xC000 | offset)
                return
            if len(self.out) < 0x4000:
                self.suffixes[name[index:]] = len(self.out)
            self.out.append(len(label))
            self.out += label
        self.out.append(0)

    def record(self, record: Record) -> None:
        self.name(record.name)
        self.out += struct.pack("!HHI", record.rtype, record.rclass, record.ttl)
        length_at = len(self.out)
        self.out += b"\0\0"
        if record.target is not None:
            self.name(record.target)
        else:
            self.out += record.rdata
        struct.pack_into("!H", self.out, length_at, len(self.out) - length_at - 2)


def encode_message(message: Message) -> bytes:
    writer = _Writer()
    extra = 1 if message.edns else 0
    writer.out += _HEADER.pack(
        message.id,
        message.flags,
        len(message.questions),
        len(message.answers),
        len(message.authority),
        len(message.additional) + extra,
    )
    for question in message.questions:
        writer.name(question.name)
        writer.out += _QUESTION_TAIL.pack(question.qtype, question.qclass)
    for record in message.answers + message.authority + message.additional:
        writer.record(record)
    if message.edns:
        edns = message.edns
        ttl = (edns.extended_rcode << 24) | (edns.version << 16) | edns.flags
        writer.record(Record((), TYPE_OPT, edns.udp_size, ttl, edns.options))
    return bytes(writer.out)


def udp_limit(query: Message) -> int:
    """How large a UDP answer to ``query`` may be: 512 bytes, or what its EDNS record
    offers, never more than :data:`EDNS_UDP_BYTES`."""
    if query.edns is None:
        return PLAIN_UDP_BYTES
    return min(max(query.edns.udp_size, PLAIN_UDP_BYTES), EDNS_UDP_BYTES)


def encode_within(message: Message, limit: int) -> bytes:
    """The message, or when it is larger than ``limit`` its header and question with the
    TC bit set (RFC 1035 §4.1.1: the client asks again over TCP)."""
    data = encode_message(message)
    if len(data) <= limit:
        return data
    truncated = replace(
        message, flags=message.flags | FLAG_TC, answers=(), authority=(), additional=()
    )
    return encode_message(truncated)


def build_response(query: Message, rcode: int, answers: tuple[Record, ...] = ()) -> Message:
    """The answer to ``query``: its id, question and RD bit, recursion available, and an
    OPT record when the query had one (an extended rcode needs it)."""
    edns = None
    if query.edns is not None:
        edns = Edns(udp_size=EDNS_UDP_BYTES, extended_rcode=rcode >> 4)
    elif rcode > 0xF:
        raise InvalidArgument("an extended rcode needs an OPT record in the query")
    flags = FLAG_QR | (query.flags & FLAG_RD) | FLAG_RA | (rcode & 0xF)
    return Message(query.id, flags, query.questions, answers, edns=edns)


def build_upstream_query(question: Question, query_id: int) -> bytes:
    """The query the resolver sends upstream: built afresh (never the guest's bytes), its
    own id, recursion desired, EDNS offering :data:`EDNS_UDP_BYTES`."""
    message = Message(query_id, FLAG_RD, (question,), edns=Edns(udp_size=EDNS_UDP_BYTES))
    return encode_message(message)
