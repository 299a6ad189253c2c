"""The DNS wire format of the guest's resolver (strict, bounded parsing; building), its
name policy, how an upstream answer is reduced, and the allow-set ledger."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest

from pyro_mcp.errors import InvalidArgument
from pyro_mcp.network.dns import (
    CLASS_IN,
    EDNS_UDP_BYTES,
    FLAG_QR,
    FLAG_RD,
    FLAG_TC,
    MAX_QUERY_BYTES,
    RCODE_BADVERS,
    RCODE_NOERROR,
    RCODE_NXDOMAIN,
    RCODE_SERVFAIL,
    TYPE_A,
    TYPE_AAAA,
    TYPE_CNAME,
    Edns,
    MalformedMessage,
    Message,
    Question,
    Record,
    build_response,
    build_upstream_query,
    encode_message,
    encode_within,
    name_from_text,
    parse_message,
    parse_query,
    udp_limit,
)
from pyro_mcp.network.dns_policy import (
    AllowSetLedger,
    Policy,
    Verdict,
    parse_allow_host,
    resolve_from_answer,
)

# Wire bytes written by hand here, independently of the module's own encoder.


def header(
    qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0, *, ident: int = 0x1234, flags: int = 0
) -> bytes:
    return struct.pack("!6H", ident, flags, qd, an, ns, ar)


def wire_name(text: str) -> bytes:
    out = b""
    for label in text.split(".") if text else []:
        out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def question(text: str, qtype: int = TYPE_A, qclass: int = CLASS_IN) -> bytes:
    return wire_name(text) + struct.pack("!HH", qtype, qclass)


def record_tail(rtype: int, ttl: int, rdata: bytes, rclass: int = CLASS_IN) -> bytes:
    return struct.pack("!HHIH", rtype, rclass, ttl, len(rdata)) + rdata


OPT = b"\0" + struct.pack("!HHIH", 41, 1232, 0, 0)


def reason(data: bytes, *, query: bool = False) -> str:
    with pytest.raises(MalformedMessage) as caught:
        (parse_query if query else parse_message)(data)
    return caught.value.reason


# ---------------------------------------------------------------------------------------
# Parsing


def test_a_plain_query_parses_to_its_question() -> None:
    message = parse_query(header(flags=FLAG_RD) + question("Allowed.Test"))
    assert message.id == 0x1234
    assert message.questions == (Question((b"Allowed", b"Test"), TYPE_A, CLASS_IN),)
    assert message.edns is None
    assert not message.is_response


def test_an_edns_query_carries_its_udp_size() -> None:
    message = parse_query(header(ar=1) + question("a.test") + OPT)
    assert message.edns == Edns(udp_size=1232)
    assert udp_limit(message) == 1232


def test_a_response_with_compression_decodes_names_and_cname_targets() -> None:
    # question at offset 12; the CNAME owner points at it, its target "cdn" + pointer to
    # "test" inside the question; the A record's owner points at the target.
    data = (
        header(an=2, flags=FLAG_QR)
        + question("allowed.test")
        + b"\xc0\x0c"
        + record_tail(TYPE_CNAME, 60, b"\x03cdn\xc0\x14")
        + b"\xc0\x2a"
        + record_tail(TYPE_A, 300, bytes([203, 0, 113, 10]))
    )
    message = parse_message(data)
    cname, a_record = message.answers
    assert cname.name == (b"allowed", b"test")
    assert cname.target == (b"cdn", b"test")
    assert a_record.name == (b"cdn", b"test")
    assert (a_record.ttl, a_record.rdata) == (300, bytes([203, 0, 113, 10]))


def test_a_ttl_with_the_top_bit_set_reads_as_zero() -> None:
    data = header(an=1, flags=FLAG_QR) + question("a.test") + b"\xc0\x0c"
    data += record_tail(TYPE_A, 0x80000001, b"\1\2\3\4")
    assert parse_message(data).answers[0].ttl == 0


@pytest.mark.parametrize("cut", [0, 5, 11, 12, 14, 17, 20])
def test_every_truncation_of_a_query_is_refused(cut: int) -> None:
    data = header(ar=1) + question("a.test") + OPT
    assert cut < len(data)
    with pytest.raises(MalformedMessage):
        parse_message(data[:cut])


def test_truncations_say_what_ran_short() -> None:
    assert reason(b"\0" * 11) == "shorter than a header"
    assert reason(header() + b"\x05ab") == "label runs past the end"
    assert reason(header() + b"\x01a") == "name runs past the end"
    assert reason(header() + wire_name("a") + b"\0") == "message ends inside a field"
    assert reason(header() + b"\xc0") == "truncated compression pointer"


def test_a_pointer_to_itself_is_refused() -> None:
    assert reason(header() + b"\xc0\x0c" + b"\0\1\0\1") == (
        "compression pointer does not point backwards"
    )


def test_a_loop_through_a_label_is_refused() -> None:
    # offset 12: label "a", then a pointer back to 12: a.a.a.a... without the rule
    assert reason(header() + b"\x01a\xc0\x0c" + b"\0\1\0\1") == (
        "compression pointer does not point backwards"
    )


def test_a_loop_between_two_names_is_refused() -> None:
    # the question's name points forward into the answer, whose owner points back
    data = header(an=1) + b"\xc0\x12" + b"\0\1\0\1" + b"\xc0\x0c" + record_tail(TYPE_A, 1, b"1234")
    assert reason(data) == "compression pointer does not point backwards"


def test_a_pointer_into_the_header_is_refused() -> None:
    assert reason(header() + b"\xc0\x02" + b"\0\1\0\1") == "compression pointer into the header"


def test_reserved_label_types_are_refused() -> None:
    assert reason(header() + b"\x41a\0\0\1\0\1") == "reserved label type"
    assert reason(header() + b"\x81a\0\0\1\0\1") == "reserved label type"


def test_a_name_of_255_bytes_parses_and_one_byte_more_does_not() -> None:
    labels = ["a" * 63, "b" * 63, "c" * 63, "d" * 61]  # 64*3 + 62 + 1 = 255 on the wire
    longest = ".".join(labels)
    assert len(parse_message(header() + question(longest)).questions[0].name) == 4
    too_long = ".".join([*labels[:3], "d" * 62])
    assert reason(header() + question(too_long)) == "name longer than 255 bytes"


def test_a_long_name_built_by_pointer_chains_is_still_bounded() -> None:
    # each name = 63-byte label + pointer to the previous name: the fifth reaches 256+
    data = bytearray(header(qd=5))
    previous = None
    for index in range(5):
        start = len(data)
        data += bytes([63]) + bytes([97 + index]) * 63
        data += struct.pack("!H", 0xC000 | previous) if previous is not None else b"\0"
        data += b"\0\1\0\1"
        previous = start
    assert reason(bytes(data)) == "name longer than 255 bytes"


def test_counts_beyond_the_record_bound_are_refused_before_reading() -> None:
    assert reason(header(qd=1, an=0xFFFF)) == "too many records"


def test_counts_larger_than_the_data_are_refused() -> None:
    assert reason(header(qd=1, an=3) + question("a.test")) == "name runs past the end"


def test_trailing_bytes_are_refused() -> None:
    assert reason(header() + question("a.test") + b"\0") == "bytes after the last record"


def test_oversize_messages_are_refused() -> None:
    assert reason(b"\0" * 65536) == "message too large"
    query = header(ar=1) + question("a.test") + b"\0" + record_tail(41, 0, b"\0" * 500, 1232)
    assert len(query) > MAX_QUERY_BYTES
    assert reason(query, query=True) == "message too large"


def test_record_data_must_match_its_type() -> None:
    base = header(an=1, flags=FLAG_QR) + question("a.test") + b"\xc0\x0c"
    assert reason(base + record_tail(TYPE_A, 1, b"\1\2\3")) == "A record data is not 4 bytes"
    cname = record_tail(TYPE_CNAME, 1, b"\x01b\0\0")
    assert reason(base + cname) == "CNAME data is not exactly one name"
    beyond = struct.pack("!HHIH", TYPE_A, 1, 1, 9) + b"\1\2\3\4"
    assert reason(base + beyond) == "message ends inside a field"


def test_opt_records_are_checked() -> None:
    assert reason(header(ar=2) + question("a.test") + OPT + OPT) == "more than one OPT record"
    named = wire_name("x") + OPT[1:]
    assert reason(header(ar=1) + question("a.test") + named) == "OPT record not owned by the root"
    assert reason(header(an=1) + question("a.test") + OPT) == (
        "OPT record outside the additional section"
    )


def test_queries_are_one_question_and_nothing_else() -> None:
    assert reason(header(qd=0), query=True) == "a query without exactly one question"
    two = header(qd=2) + question("a.test") + question("b.test")
    assert reason(two, query=True) == "a query without exactly one question"
    answer = header(an=1) + question("a.test") + b"\xc0\x0c" + record_tail(TYPE_A, 1, b"1234")
    assert reason(answer, query=True) == "a query carrying records"
    response = header(flags=FLAG_QR) + question("a.test")
    assert reason(response, query=True) == "a response where a query belongs"


# ---------------------------------------------------------------------------------------
# Building


def test_a_built_response_parses_back_to_itself() -> None:
    query = parse_query(header(flags=FLAG_RD, ar=1) + question("Allowed.test") + OPT)
    chain = Record(
        name_from_text("Allowed.test"), TYPE_CNAME, 1, 60, b"", name_from_text("cdn.test")
    )
    a_record = Record(name_from_text("cdn.test"), TYPE_A, 1, 60, bytes([203, 0, 113, 10]))
    response = build_response(query, RCODE_NOERROR, (chain, a_record))
    parsed = parse_message(encode_message(response))
    assert parsed.id == query.id
    assert parsed.flags == FLAG_QR | FLAG_RD | 0x0080
    assert parsed.questions == query.questions
    assert [(r.name, r.rtype, r.ttl, r.target) for r in parsed.answers] == [
        ((b"Allowed", b"test"), TYPE_CNAME, 60, (b"cdn", b"test")),
        ((b"cdn", b"test"), TYPE_A, 60, None),
    ]
    assert parsed.answers[1].rdata == bytes([203, 0, 113, 10])
    assert parsed.edns == Edns(udp_size=EDNS_UDP_BYTES)


def test_the_builder_compresses_repeated_names() -> None:
    query = parse_query(header() + question("cdn.example.test"))
    records = tuple(
        Record(name_from_text("cdn.example.test"), TYPE_A, 1, 5, bytes([10, 0, 0, i]))
        for i in range(3)
    )
    data = encode_message(build_response(query, RCODE_NOERROR, records))
    # header + question (18 + 4) + 3 records of pointer (2) + 10 + 4
    assert len(data) == 12 + 22 + 3 * 16
    assert parse_message(data).answers == records


def test_an_extended_rcode_travels_in_the_opt_record() -> None:
    query = parse_query(header(ar=1) + question("a.test") + OPT)
    parsed = parse_message(encode_message(build_response(query, RCODE_BADVERS)))
    assert parsed.rcode == RCODE_BADVERS
    assert parsed.flags & 0xF == 0
    plain = parse_query(header() + question("a.test"))
    with pytest.raises(InvalidArgument):
        build_response(plain, RCODE_BADVERS)


def test_an_answer_larger_than_the_limit_is_truncated_with_tc() -> None:
    query = parse_query(header() + question("big.test"))
    records = tuple(
        Record(name_from_text("big.test"), TYPE_A, 1, 5, bytes([10, 0, i // 256, i % 256]))
        for i in range(40)
    )
    response = build_response(query, RCODE_NOERROR, records)
    assert len(encode_message(response)) > 512
    truncated = parse_message(encode_within(response, udp_limit(query)))
    assert truncated.flags & FLAG_TC
    assert truncated.answers == ()
    assert truncated.questions == query.questions
    assert parse_message(encode_within(response, 65535)).answers == records


def test_the_udp_limit_follows_edns_within_bounds() -> None:
    def limit(size: int) -> int:
        opt = b"\0" + struct.pack("!HHIH", 41, size, 0, 0)
        return udp_limit(parse_query(header(ar=1) + question("a.test") + opt))

    assert limit(100) == 512
    assert limit(1000) == 1000
    assert limit(65000) == 1232


def test_the_upstream_query_is_built_afresh() -> None:
    guest = parse_query(header(ident=7) + question("a.test"))
    data = build_upstream_query(guest.questions[0], 0xBEEF)
    parsed = parse_message(data)
    assert (parsed.id, parsed.flags, parsed.questions) == (0xBEEF, FLAG_RD, guest.questions)
    assert parsed.edns == Edns(udp_size=EDNS_UDP_BYTES)


def test_names_from_text_are_checked() -> None:
    assert name_from_text("a.test.") == (b"a", b"test")
    assert name_from_text(".") == ()
    with pytest.raises(InvalidArgument):
        name_from_text("a..test")
    with pytest.raises(InvalidArgument):
        name_from_text("x" * 64 + ".test")


# ---------------------------------------------------------------------------------------
# Policy


def query_for(text: str, qtype: int = TYPE_A, qclass: int = CLASS_IN) -> Message:
    return parse_query(header() + question(text, qtype, qclass))


def test_exact_entries_match_case_insensitively_and_ignore_the_trailing_dot() -> None:
    policy = Policy(("Example.COM.",))
    assert policy.allows(name_from_text("example.com"))
    assert policy.allows(name_from_text("EXAMPLE.com."))
    assert not policy.allows(name_from_text("www.example.com"))
    assert not policy.allows(name_from_text("example.com.evil.test"))
    assert not policy.allows(name_from_text("badexample.com"))


def test_a_wildcard_matches_subdomains_only_at_any_depth() -> None:
    policy = Policy(("*.example.com",))
    assert policy.allows(name_from_text("www.example.com"))
    assert policy.allows(name_from_text("a.b.example.com"))
    assert not policy.allows(name_from_text("example.com"))
    assert not policy.allows(name_from_text("wwwexample.com"))


def test_a_label_holding_a_dot_is_not_the_name_it_spells() -> None:
    policy = Policy(("allowed.test",))
    assert not policy.allows((b"allowed.test",))
    assert not policy.allows((b"allowed", b"test\0"))
    assert not policy.allows((b"allowed", b"t\xe9st"))


def test_no_allowlist_allows_every_name_and_an_empty_one_none() -> None:
    assert Policy(None).allows((b"anything", b"\xff"))
    assert not Policy(()).allows(name_from_text("example.com"))


@pytest.mark.parametrize(
    "entry", ["", "*", "*.", "1.2.3.4", "a..b", "-x.com", "a.*.com", "ex ample.com", "bücher.de"]
)
def test_entries_that_are_not_domains_are_refused(entry: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_allow_host(entry)


def test_entries_are_normalized() -> None:
    assert parse_allow_host(" *.Example.com. ") == "*.example.com"
    assert parse_allow_host("_dmarc.example.com") == "_dmarc.example.com"


def test_verdicts_follow_name_class_and_type() -> None:
    policy = Policy(("allowed.test",))
    assert policy.decide(query_for("allowed.test")) is Verdict.RESOLVE
    assert policy.decide(query_for("allowed.test", TYPE_AAAA)) is Verdict.EMPTY
    assert policy.decide(query_for("allowed.test", 16)) is Verdict.NOT_IMPLEMENTED
    assert policy.decide(query_for("other.test")) is Verdict.REFUSE
    assert policy.decide(query_for("other.test", TYPE_AAAA)) is Verdict.REFUSE
    assert policy.decide(query_for("allowed.test", TYPE_A, 3)) is Verdict.REFUSE
    notify = parse_query(header(flags=4 << 11) + question("allowed.test"))
    assert policy.decide(notify) is Verdict.NOT_IMPLEMENTED
    version1 = b"\0" + struct.pack("!HHIH", 41, 1232, 1 << 16, 0)
    edns1 = parse_query(header(ar=1) + question("allowed.test") + version1)
    assert policy.decide(edns1) is Verdict.BAD_VERSION


# ---------------------------------------------------------------------------------------
# Upstream answers


def upstream(rcode: int = 0, *records: bytes, qname: str = "allowed.test") -> Message:
    data = header(an=len(records), flags=FLAG_QR | rcode) + question(qname) + b"".join(records)
    return parse_message(data)


def rr(owner: str, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return wire_name(owner) + record_tail(rtype, ttl, rdata)


ALLOWED = Question(name_from_text("allowed.test"), TYPE_A)


def test_the_cname_chain_and_its_a_records_are_kept_and_the_rest_dropped() -> None:
    response = upstream(
        0,
        rr("allowed.test", TYPE_CNAME, 120, wire_name("cdn.test")),
        rr("other.test", TYPE_A, 900, bytes([198, 51, 100, 1])),  # not on the chain
        rr("allowed.test", TYPE_A, 900, bytes([198, 51, 100, 2])),  # beside a CNAME
        rr("cdn.test", TYPE_A, 300, bytes([203, 0, 113, 10])),
        rr("cdn.test", TYPE_A, 60, bytes([203, 0, 113, 11])),
        rr("cdn.test", TYPE_A, 60, bytes([203, 0, 113, 11])),
    )
    resolution = resolve_from_answer(ALLOWED, response)
    assert resolution.rcode == RCODE_NOERROR
    assert resolution.addresses == (IPv4Address("203.0.113.10"), IPv4Address("203.0.113.11"))
    assert resolution.ttl_s == 60
    assert [r.rtype for r in resolution.records] == [TYPE_CNAME, TYPE_A, TYPE_A, TYPE_A]


def test_an_answer_to_another_question_is_refused() -> None:
    with pytest.raises(MalformedMessage) as caught:
        resolve_from_answer(ALLOWED, upstream(0, qname="other.test"))
    assert caught.value.reason == "upstream answered another question"


def test_cname_loops_forks_and_long_chains_are_refused() -> None:
    loop = upstream(
        0,
        rr("allowed.test", TYPE_CNAME, 1, wire_name("b.test")),
        rr("b.test", TYPE_CNAME, 1, wire_name("allowed.test")),
    )
    fork = upstream(
        0,
        rr("allowed.test", TYPE_CNAME, 1, wire_name("b.test")),
        rr("allowed.test", TYPE_CNAME, 1, wire_name("c.test")),
    )
    links = [rr("allowed.test", TYPE_CNAME, 1, wire_name("c0.test"))]
    links += [rr(f"c{i}.test", TYPE_CNAME, 1, wire_name(f"c{i + 1}.test")) for i in range(8)]
    reasons = []
    for response in (loop, fork, upstream(0, *links)):
        with pytest.raises(MalformedMessage) as caught:
            resolve_from_answer(ALLOWED, response)
        reasons.append(caught.value.reason)
    assert reasons == ["CNAME loop", "two CNAME records for one name", "CNAME chain too long"]


def test_nxdomain_passes_and_other_failures_become_servfail() -> None:
    assert resolve_from_answer(ALLOWED, upstream(RCODE_NXDOMAIN)).rcode == RCODE_NXDOMAIN
    failed = resolve_from_answer(ALLOWED, upstream(5, rr("allowed.test", TYPE_A, 1, b"1234")))
    assert (failed.rcode, failed.addresses) == (RCODE_SERVFAIL, ())


# ---------------------------------------------------------------------------------------
# The allow set


A1, A2 = IPv4Address("203.0.113.10"), IPv4Address("203.0.113.11")


def test_timeouts_are_the_ttl_within_the_floor_and_the_cap() -> None:
    ledger = AllowSetLedger(floor_s=30, cap_s=86400, max_elements=10)
    short = ledger.plan((A1,), 5, now=0)
    assert short is not None
    assert (short.new, short.timeout_s, short.answer_ttl_s) == ((A1,), 30, 5)
    long = ledger.plan((A2,), 10**6, now=0)
    assert long is not None
    assert (long.timeout_s, long.answer_ttl_s) == (86400, 86400)


def test_an_address_in_the_set_is_not_re_added_and_caps_the_answer_ttl() -> None:
    ledger = AllowSetLedger(floor_s=30, cap_s=86400, max_elements=10)
    first = ledger.plan((A1,), 300, now=100)
    assert first is not None
    ledger.record(first, started=100)
    again = ledger.plan((A1, A2), 300, now=350)
    assert again is not None
    assert (again.new, again.answer_ttl_s) == ((A2,), 50)
    ledger.record(again, started=350)
    in_grace = ledger.plan((A1,), 300, now=400.5)
    assert in_grace is not None
    assert (in_grace.new, in_grace.answer_ttl_s) == ((), 0)
    expired = ledger.plan((A1,), 300, now=401.5)
    assert expired is not None
    assert expired.new == (A1,)


def test_a_full_ledger_refuses_new_addresses() -> None:
    ledger = AllowSetLedger(floor_s=30, cap_s=60, max_elements=1)
    first = ledger.plan((A1,), 30, now=0)
    assert first is not None
    ledger.record(first, started=0)
    assert ledger.plan((A2,), 30, now=1) is None
    assert ledger.plan((A1,), 30, now=1) is not None
    assert ledger.plan((A2,), 30, now=32) is not None  # A1 has expired and left
