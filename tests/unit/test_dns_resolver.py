"""The guest's DNS resolver as the real process, on 127.0.0.1, in front of a fake upstream
this test serves on 127.0.0.1 (no packet leaves the machine), with a recorder in place of
nft; and its config, upstream discovery and nft call."""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from pyro_mcp.errors import InvalidArgument, NotFound, ToolFailed
from pyro_mcp.network.dns import Message, parse_message
from pyro_mcp.network.nft_elements import add_set_elements, element_argv
from pyro_mcp.network.resolver_config import ResolverConfig, host_upstreams

LOOPBACK = "127.0.0.1"
NOERROR, SERVFAIL, NXDOMAIN, REFUSED = 0, 2, 3, 5
A, CNAME, AAAA = 1, 5, 28

# ---------------------------------------------------------------------------------------
# The fake upstream: a small zone, written by hand (not with the module under test)


def _name(text: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in text.split(".")) + b"\0"


def _rr(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return owner + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


BIG = [IPv4Address(f"198.51.100.{i}") for i in range(1, 41)]


def _zone(qname: str) -> tuple[int, list[bytes]] | None:
    """(rcode, answer records) for an A query; None: never answer."""
    at_question = b"\xc0\x0c"
    if qname == "allowed.test":
        return NOERROR, [
            _rr(at_question, CNAME, 120, _name("cdn.test")),
            _rr(_name("cdn.test"), A, 300, bytes([203, 0, 113, 10])),
        ]
    if qname == "other.test":
        return NOERROR, [_rr(at_question, A, 5, bytes([203, 0, 113, 20]))]
    if qname == "big.test":
        return NOERROR, [_rr(at_question, A, 600, a.packed) for a in BIG]
    if qname == "slow.test":
        return None
    return NXDOMAIN, []


@dataclass
class FakeUpstream:
    udp: socket.socket
    tcp: socket.socket
    seen: list[tuple[str, str, int]] = field(default_factory=list)  # (transport, name, type)

    @property
    def endpoint(self) -> list[Any]:
        return [LOOPBACK, self.udp.getsockname()[1]]

    def respond(self, query: bytes, transport: str) -> bytes | None:
        ident, flags = struct.unpack("!HH", query[:4])
        pos, labels = 12, []
        while query[pos]:
            labels.append(query[pos + 1 : pos + 1 + query[pos]].decode())
            pos += 1 + query[pos]
        qtype = struct.unpack("!H", query[pos + 1 : pos + 3])[0]
        qname = ".".join(labels).lower()
        self.seen.append((transport, qname, qtype))
        found = _zone(qname)
        if found is None:
            return None
        rcode, records = found
        flags = 0x8180 | rcode
        if transport == "udp" and len(records) > 20:
            return struct.pack("!6H", ident, flags | 0x0200, 1, 0, 0, 0) + query[12 : pos + 5]
        head = struct.pack("!6H", ident, flags, 1, len(records), 0, 0)
        return head + query[12 : pos + 5] + b"".join(records)

    def serve_udp(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                data, peer = self.udp.recvfrom(4096)
                reply = self.respond(data, "udp")
                if reply is not None:
                    self.udp.sendto(reply, peer)

    def serve_tcp(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.tcp.accept()
                with conn:
                    length = struct.unpack("!H", _recv_exactly(conn, 2))[0]
                    reply = self.respond(_recv_exactly(conn, length), "tcp")
                    if reply is not None:
                        conn.sendall(struct.pack("!H", len(reply)) + reply)


def _recv_exactly(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


def _udp_and_tcp_on_one_port() -> tuple[socket.socket, socket.socket]:
    while True:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((LOOPBACK, 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.bind((LOOPBACK, udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        return udp, tcp


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    udp, tcp = _udp_and_tcp_on_one_port()
    tcp.listen(8)
    fake = FakeUpstream(udp, tcp)
    for target in (fake.serve_udp, fake.serve_tcp):
        threading.Thread(target=target, daemon=True).start()
    yield fake
    udp.close()
    tcp.shutdown(socket.SHUT_RDWR)
    tcp.close()


# ---------------------------------------------------------------------------------------
# The resolver process

RECORDER = """import json, os, sys
with open(sys.argv[1], "a") as log:
    log.write(json.dumps(sys.argv[2:]) + "\\n")
sys.exit(int(os.environ.get("FAKE_NFT_EXIT", "0")))
"""


def _query(name: str, qtype: int = A, *, ident: int = 0x4242, edns: bool = False) -> bytes:
    opt = b"\0" + struct.pack("!HHIH", 41, 1232, 0, 0) if edns else b""
    head = struct.pack("!6H", ident, 0x0100, 1, 0, 0, 1 if edns else 0)
    return head + _name(name) + struct.pack("!HH", qtype, 1) + opt


class RunningResolver:
    def __init__(self, tmp_path: Path, config: dict[str, Any], env: dict[str, str]) -> None:
        self.set_log = tmp_path / "nft.jsonl"
        recorder = tmp_path / "fake_nft.py"
        recorder.write_text(RECORDER)
        config.setdefault("nft_command", [sys.executable, str(recorder), str(self.set_log)])
        udp, tcp = _udp_and_tcp_on_one_port()
        self.port = udp.getsockname()[1]
        udp.close()
        tcp.close()
        config["listen"] = [LOOPBACK, self.port]
        path = tmp_path / "resolver.json"
        path.write_text(json.dumps(config))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pyro_mcp.network.resolver", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **env},
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 20)
        line = self.process.stdout.readline() if ready else b""
        if line != b"ready\n":
            self.process.kill()
            _, err = self.process.communicate()
            raise AssertionError(f"resolver not ready ({line!r}): {err.decode()}")

    def udp(self, data: bytes, *, timeout: float = 5.0) -> Message:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.sendto(data, (LOOPBACK, self.port))
            return parse_message(sock.recv(65535))

    def tcp(self, *queries: bytes) -> list[Message]:
        with socket.create_connection((LOOPBACK, self.port), timeout=5) as sock:
            sock.sendall(b"".join(struct.pack("!H", len(q)) + q for q in queries))
            answers = []
            for _ in queries:
                length = struct.unpack("!H", _recv_exactly(sock, 2))[0]
                answers.append(parse_message(_recv_exactly(sock, length)))
            return answers

    def set_calls(self) -> list[list[str]]:
        if not self.set_log.exists():
            return []
        return [json.loads(line) for line in self.set_log.read_text().splitlines()]

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self) -> dict[str, int]:
        """SIGTERM; the counts it logs on the way out (it must exit 0)."""
        if self.process.poll() is None:
            self.process.terminate()
        _, err = self.process.communicate(timeout=20)
        assert self.process.returncode == 0, err.decode()
        last = err.decode().strip().splitlines()[-1]
        assert last.startswith("pyro-dns: stopped "), err.decode()
        counts: dict[str, int] = json.loads(last.removeprefix("pyro-dns: stopped "))
        return counts


@pytest.fixture
def start(tmp_path: Path, upstream: FakeUpstream) -> Iterator[Any]:
    started: list[RunningResolver] = []

    def start(env: dict[str, str] | None = None, **config: Any) -> RunningResolver:
        config.setdefault("upstreams", [upstream.endpoint])
        resolver = RunningResolver(tmp_path, config, env or {})
        started.append(resolver)
        return resolver

    yield start
    for resolver in started:
        if resolver.process.poll() is None:
            resolver.process.kill()
            resolver.process.communicate()


SET = ["inet", "pyro", "vm1_hosts"]


def _answers(message: Message) -> list[tuple[str, int, int, str]]:
    """(owner, type, ttl, address or CNAME target) of each answer record."""
    out = []
    for r in message.answers:
        value = b".".join(r.target).decode() if r.target is not None else str(IPv4Address(r.rdata))
        out.append((b".".join(r.name).decode(), r.rtype, r.ttl, value))
    return out


# ---------------------------------------------------------------------------------------
# Allowed names


def test_an_allowed_name_resolves_and_its_addresses_reach_the_set_first(
    start: Any, upstream: FakeUpstream
) -> None:
    resolver = start(allow_hosts=["Allowed.Test"], nft_set=SET)
    answer = resolver.udp(_query("allowed.test"))
    assert (answer.id, answer.rcode, answer.truncated) == (0x4242, NOERROR, False)
    assert _answers(answer) == [
        ("allowed.test", CNAME, 120, "cdn.test"),
        ("cdn.test", A, 120, "203.0.113.10"),
    ]
    # the recorder ran before the answer came: the element is there when the guest connects
    assert resolver.set_calls() == [
        ["add", "element", "inet", "pyro", "vm1_hosts", "{ 203.0.113.10 timeout 120s }"]
    ]
    again = resolver.udp(_query("ALLOWED.test"))
    assert [ttl for _, _, ttl, _ in _answers(again)] in ([120, 120], [119, 119])
    assert len(resolver.set_calls()) == 1  # already in the set: its timeout runs on
    counts = resolver.stop()
    assert (counts["resolved"], counts["set_added"], counts["refused"]) == (2, 1, 0)
    assert upstream.seen == [("udp", "allowed.test", A)] * 2


def test_a_short_ttl_gets_the_floor_in_the_set_but_not_in_the_answer(start: Any) -> None:
    resolver = start(allow_hosts=["*.test"], nft_set=SET, ttl_floor_s=30)
    assert _answers(resolver.udp(_query("other.test"))) == [("other.test", A, 5, "203.0.113.20")]
    assert resolver.set_calls()[0][-1] == "{ 203.0.113.20 timeout 30s }"
    resolver.stop()


def test_a_name_not_allowed_is_refused_and_upstream_never_asked(
    start: Any, upstream: FakeUpstream
) -> None:
    resolver = start(allow_hosts=["allowed.test", "*.allowed.test"], nft_set=SET)
    for name, qtype in [("other.test", A), ("other.test", AAAA), ("test", A), ("cdn.test", A)]:
        answer = resolver.udp(_query(name, qtype))
        assert (answer.rcode, answer.answers) == (REFUSED, ())
    aaaa = resolver.udp(_query("allowed.test", AAAA))
    assert (aaaa.rcode, aaaa.answers) == (NOERROR, ())
    mx = resolver.udp(_query("allowed.test", 15))
    assert mx.rcode == 4  # NOTIMP
    assert upstream.seen == []
    assert resolver.set_calls() == []
    counts = resolver.stop()
    assert (counts["refused"], counts["not_implemented"], counts["resolved"]) == (4, 1, 0)


def test_without_an_allowlist_every_name_is_answered_and_nothing_added(
    start: Any, upstream: FakeUpstream
) -> None:
    resolver = start()  # allow_hosts and nft_set null
    assert _answers(resolver.udp(_query("other.test"))) == [("other.test", A, 5, "203.0.113.20")]
    missing = resolver.udp(_query("nowhere.example"))
    assert (missing.rcode, missing.answers) == (NXDOMAIN, ())
    assert resolver.set_calls() == []
    assert [name for _, name, _ in upstream.seen] == ["other.test", "nowhere.example"]
    resolver.stop()


def test_an_upstream_that_never_answers_gets_servfail(start: Any) -> None:
    resolver = start(upstream_timeout_s=0.3, upstream_attempts=2)
    answer = resolver.udp(_query("slow.test"))
    assert (answer.rcode, answer.answers) == (SERVFAIL, ())
    assert resolver.stop()["upstream_failures"] == 1


def test_a_failing_set_hook_fails_the_answer(start: Any) -> None:
    resolver = start(env={"FAKE_NFT_EXIT": "1"}, allow_hosts=["allowed.test"], nft_set=SET)
    answer = resolver.udp(_query("allowed.test"))
    assert (answer.rcode, answer.answers) == (SERVFAIL, ())
    assert len(resolver.set_calls()) == 1
    retry = resolver.udp(_query("allowed.test"))  # not taken for being in the set
    assert retry.rcode == SERVFAIL
    assert len(resolver.set_calls()) == 2
    counts = resolver.stop()
    assert (counts["set_failures"], counts["set_added"]) == (2, 0)


# ---------------------------------------------------------------------------------------
# TCP and sizes


def test_tcp_answers_in_full_what_udp_truncates(start: Any, upstream: FakeUpstream) -> None:
    resolver = start(allow_hosts=["big.test"], nft_set=SET)
    plain = resolver.udp(_query("big.test"))
    assert (plain.rcode, plain.truncated, plain.answers) == (NOERROR, True, ())
    # the upstream's UDP answer was truncated too: the resolver asked it again over TCP
    assert upstream.seen[:2] == [("udp", "big.test", A), ("tcp", "big.test", A)]
    with_edns = resolver.udp(_query("big.test", edns=True))
    assert [value for *_, value in _answers(with_edns)] == [str(a) for a in BIG]
    first, second = resolver.tcp(_query("big.test", ident=1), _query("other.test", ident=2))
    assert (first.id, first.truncated, len(first.answers)) == (1, False, 40)
    assert (second.id, second.rcode) == (2, REFUSED)
    elements = ", ".join(f"{a} timeout 600s" for a in BIG)
    assert resolver.set_calls() == [["add", "element", *SET, "{ " + elements + " }"]]
    counts = resolver.stop()
    assert (counts["udp_queries"], counts["tcp_queries"]) == (2, 2)


def test_tcp_connections_are_bounded_in_number_and_idle_time(start: Any) -> None:
    resolver = start(max_tcp_connections=2, tcp_idle_timeout_s=1.0)
    held = [socket.create_connection((LOOPBACK, resolver.port), timeout=5) for _ in range(2)]
    time.sleep(0.2)
    with socket.create_connection((LOOPBACK, resolver.port), timeout=5) as extra:
        assert extra.recv(1) == b""  # closed at once
    started = time.monotonic()
    for sock in held:
        assert sock.recv(1) == b""  # closed for idling
        sock.close()
    assert time.monotonic() - started < 4
    assert resolver.stop()["tcp_refused"] == 1


# ---------------------------------------------------------------------------------------
# Hostile input


def _garbage() -> list[bytes]:
    head = struct.pack("!6H", 1, 0, 1, 0, 0, 0)
    return [
        b"",
        b"\xff" * 11,
        head + b"\xc0\x0c\0\1\0\1",  # a pointer to itself
        head + b"\x01a\xc0\x0c\0\1\0\1",  # a loop through a label
        head + b"\x3fabc",  # a label past the end
        head[:4] + b"\xff\xff" * 4 + _name("a.test"),  # counts far beyond the data
        _query("a.test") + b"\0",  # a trailing byte
        _query("a.test")[:-1],  # a truncated question
        struct.pack("!6H", 1, 0x8000, 1, 0, 0, 0) + _name("a.test") + b"\0\1\0\1",  # a response
        head + b"\x3f" + b"a" * 63 + b"\0\0\1\0\1" + b"\0" * 600,  # oversize
        os.urandom(300),
    ]


def test_malformed_input_is_counted_and_dropped_and_the_resolver_carries_on(
    start: Any, upstream: FakeUpstream
) -> None:
    resolver = start(allow_hosts=["allowed.test"], nft_set=SET)
    garbage = _garbage() * 20
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        for data in garbage:
            sock.sendto(data, (LOOPBACK, resolver.port))
        with pytest.raises(TimeoutError):
            sock.recv(65535)  # nothing is answered
    with socket.create_connection((LOOPBACK, resolver.port), timeout=5) as sock:
        sock.sendall(struct.pack("!H", 0xFFFF) + b"x" * 100)  # a length beyond any query
        assert sock.recv(1) == b""
    with socket.create_connection((LOOPBACK, resolver.port), timeout=5) as sock:
        bad = _garbage()[3]
        sock.sendall(struct.pack("!H", len(bad)) + bad)
        assert sock.recv(1) == b""
    assert resolver.udp(_query("allowed.test")).rcode == NOERROR
    counts = resolver.stop()
    # the one urandom datagram in each round may, by chance, be well formed: at most 20
    assert len(garbage) - 20 + 2 <= counts["malformed"] <= len(garbage) + 2
    assert counts["internal_errors"] == 0
    assert upstream.seen == [("udp", "allowed.test", A)]


def test_queries_beyond_the_rate_are_dropped(start: Any) -> None:
    resolver = start(rate_per_s=10, rate_burst=20)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        started = time.monotonic()
        for ident in range(200):
            sock.sendto(_query("other.test", ident=ident), (LOOPBACK, resolver.port))
        elapsed = time.monotonic() - started
        sock.settimeout(1.0)
        answered = 0
        with contextlib.suppress(TimeoutError):
            while True:
                sock.recv(65535)
                answered += 1
    counts = resolver.stop()
    assert counts["udp_queries"] == 200
    assert answered == 200 - counts["dropped_rate"]
    assert 20 <= answered <= 20 + 10 * elapsed + 1


def test_queries_beyond_the_in_flight_bound_are_dropped_and_memory_stays_bounded(
    start: Any,
) -> None:
    resolver = start(upstream_timeout_s=30, upstream_attempts=1, rate_per_s=100000)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for ident in range(100):
            sock.sendto(_query("slow.test", ident=ident), (LOOPBACK, resolver.port))
        time.sleep(0.5)
        before = resolver.rss_kib()
        for _ in range(20):
            for ident in range(500):
                data = _query("slow.test", ident=ident) if ident % 2 else os.urandom(512)
                sock.sendto(data, (LOOPBACK, resolver.port))
            time.sleep(0.01)
    time.sleep(0.5)
    assert resolver.rss_kib() - before < 8 * 1024
    counts = resolver.stop()  # ends the 64 queries still waiting upstream, too
    # exactly the bound got in (the kernel may drop some of the flood before it is read)
    assert counts["udp_queries"] - counts["dropped_busy"] == 64
    assert counts["dropped_busy"] >= 36
    assert (counts["dropped_rate"], counts["malformed"], counts["resolved"]) == (0, 0, 0)


def test_sigterm_ends_it_while_queries_wait_upstream(start: Any) -> None:
    resolver = start(upstream_timeout_s=30)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(_query("slow.test"), (LOOPBACK, resolver.port))
    time.sleep(0.3)
    started = time.monotonic()
    assert resolver.stop()["udp_queries"] == 1
    assert time.monotonic() - started < 5


def test_a_bad_config_exits_2_before_binding(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"listen": [LOOPBACK, 53], "upstreams": [], "surprise": 1}))
    done = subprocess.run(
        [sys.executable, "-m", "pyro_mcp.network.resolver", str(path)],
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert (done.returncode, done.stdout) == (2, b"")
    assert b"unknown keys ['surprise']" in done.stderr


# ---------------------------------------------------------------------------------------
# Config, upstreams, the nft call


def test_the_config_reads_back_what_it_writes() -> None:
    config = ResolverConfig(
        listen=("10.0.0.1", 53),
        upstreams=(("192.0.2.53", 53),),
        allow_hosts=("*.example.com",),
        nft_set=("inet", "pyro", "vm1_hosts"),
    )
    assert ResolverConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"listen": ["10.0.0.1"]}, "listen must be [address, port]"),
        ({"listen": ["nowhere", 53]}, "'nowhere' is not an IP address"),
        ({"upstreams": [["10.0.0.1", 70000]]}, "port 70000 is not 1 to 65535"),
        ({"allow_hosts": ["1.2.3.4"]}, "is an address"),
        ({"nft_set": ["inet", "pyro"]}, "nft_set must be null or [family, table, set]"),
        ({"nft_set": ["inet", "pyro", "x; flush ruleset"]}, "is not a plain identifier"),
        ({"max_in_flight": True}, "max_in_flight must be a whole number"),
        ({"rate_per_s": 0}, "rate_per_s must be positive"),
        ({"ttl_cap_s": 10}, "ttl_cap_s is below ttl_floor_s"),
    ],
)
def test_a_wrong_config_value_is_named(change: dict[str, Any], message: str) -> None:
    data = {"listen": ["10.0.0.1", 53], "upstreams": [["192.0.2.53", 53]], **change}
    with pytest.raises(InvalidArgument) as caught:
        ResolverConfig.from_json(data)
    assert message in str(caught.value)


def test_host_upstreams_reads_the_nameservers_in_order(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text(
        "# generated\nsearch example.com\nnameserver 127.0.0.53\n"
        "nameserver not-an-address\n;nameserver 10.9.9.9\nnameserver fe80::1%eth0\n"
    )
    assert host_upstreams(path) == [("127.0.0.53", 53), ("fe80::1%eth0", 53)]
    path.write_text("search example.com\n")
    with pytest.raises(NotFound):
        host_upstreams(path)
    with pytest.raises(NotFound):
        host_upstreams(tmp_path / "missing")


def test_set_elements_go_to_nft_as_one_argv(tmp_path: Path) -> None:
    log = tmp_path / "nft.jsonl"
    recorder = tmp_path / "fake_nft.py"
    recorder.write_text(RECORDER)
    nft = (sys.executable, str(recorder), str(log))
    addresses = [IPv4Address("203.0.113.10"), IPv4Address("203.0.113.11")]
    add_set_elements("inet", "pyro", "vm1_hosts", addresses, 300, nft=nft)
    add_set_elements("inet", "pyro", "vm1_hosts", [], 300, nft=nft)  # nothing to add: no call
    assert [json.loads(line) for line in log.read_text().splitlines()] == [
        [
            "add",
            "element",
            "inet",
            "pyro",
            "vm1_hosts",
            "{ 203.0.113.10 timeout 300s, 203.0.113.11 timeout 300s }",
        ]
    ]
    with pytest.raises(InvalidArgument):
        element_argv("inet", "pyro", "vm1_hosts", addresses, 0)
    with pytest.raises(InvalidArgument):
        element_argv("inet", "pyro }", "vm1_hosts", addresses, 30)
    failing = (sys.executable, "-c", "import sys; sys.stderr.write('no such set'); sys.exit(1)")
    with pytest.raises(ToolFailed) as caught:
        add_set_elements("inet", "pyro", "vm1_hosts", addresses, 30, nft=failing)
    assert caught.value.stderr_tail == "no such set"
