"""Guest networking on real guests, inside a private network (tests/net_topology.py).

pyro's host side runs in a namespace whose only uplink is a fake internet; no packet can
leave the machine. Each probe runs in the guest and says what became of one connection:
``ok <body>``, ``refused``, ``timeout``, ``unreachable`` or ``no-name``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests import net_topology as net

from pyro_mcp.api import Context
from pyro_mcp.api.operations import services as sv
from pyro_mcp.api.operations import vm as vm_ops
from pyro_mcp.api.operations import workspace_content as wc
from pyro_mcp.api.operations import workspaces as ws
from pyro_mcp.errors import InvalidArgument
from pyro_mcp.network import leases, nft
from pyro_mcp.network.addresses import Link
from pyro_mcp.vmm.identity import ProcessIdentity

PROBE = r"""
import socket, sys
def probe(host, port):
    try:
        address = socket.gethostbyname(host)
    except OSError:
        return "no-name"
    try:
        conn = socket.create_connection((address, port), timeout=3)
    except socket.timeout:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return "unreachable" if exc.errno in (101, 113) else f"error {exc.errno}"
    with conn:
        conn.settimeout(5)
        conn.sendall(b"GET / HTTP/1.0\r\nHost: " + host.encode() + b"\r\n\r\n")
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
    return "ok " + data.split(b"\r\n\r\n", 1)[-1].decode().strip()
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    print(target, probe(host, int(port)))
"""


@pytest.fixture(scope="module")
def private_network() -> Iterator[net.Topology]:
    with net.topology() as topo, pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYRO_NET_NAMESPACE", topo.host)
        patch.setenv("PYRO_DNS_UPSTREAMS", net.WEB_IP)
        yield topo
    assert net.namespaces_left(topo.prefix) == []


def _probe(ctx: Context, wid: str, *targets: str) -> dict[str, str]:
    result = wc.workspace_exec(ctx, wid, ["python3", "-c", PROBE, *targets], timeout_seconds=60)
    assert result["exit_code"] == 0, result
    return dict(line.split(" ", 1) for line in result["stdout"].splitlines())


def _in_host_ns(topo: net.Topology, *argv: str) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", topo.host, *argv], capture_output=True, text=True, check=False
    )
    return done.stdout + done.stderr


def test_with_the_policy_off_a_guest_has_no_route_anywhere(
    ctx: Context, private_network: net.Topology
) -> None:
    result = vm_ops.vm_run(ctx, "debian:12", ["python3", "-c", PROBE, f"{net.WEB_IP}:80"])
    assert result["stdout"] == f"{net.WEB_IP}:80 unreachable\n"
    assert result["network"]["policy"] == "off" and result["network"]["guest_ip"] is None


def test_a_one_shot_run_with_network_fetches_a_page_by_name(
    ctx: Context, private_network: net.Topology
) -> None:
    result = vm_ops.vm_run(ctx, "debian:12", ["python3", "-c", PROBE, "web.test:80"], network=True)
    assert result["stdout"] == "web.test:80 ok hello from internet\n", result
    assert result["network"]["policy"] == "egress"
    assert leases.held() == []  # its link went with it


def test_egress_reaches_the_internet_and_nothing_else(
    ws_ctx: Context, private_network: net.Topology
) -> None:
    other = ws.workspace_create(ws_ctx, "debian:12", network_policy="egress")
    wid = ws.workspace_create(ws_ctx, "debian:12", network_policy="egress")["id"]
    gateway = wid_gateway(ws_ctx, wid)
    other_ip = other["network"]["guest_ip"]
    sv.service_start(
        ws_ctx, other["id"], "web", "python3 -m http.server 8080", ready_tcp="127.0.0.1:8080"
    )
    seen = _probe(
        ws_ctx,
        wid,
        "web.test:80",
        f"{net.PRIVATE_IP}:80",
        f"{net.METADATA_IP}:80",
        f"{gateway}:{net.HOST_SERVICE_PORT}",
        f"{net.HOST_UPLINK_IP}:{net.HOST_SERVICE_PORT}",
        f"{other_ip}:8080",
    )
    assert seen == {
        "web.test:80": "ok hello from internet",
        f"{net.PRIVATE_IP}:80": "timeout",
        f"{net.METADATA_IP}:80": "timeout",
        f"{gateway}:{net.HOST_SERVICE_PORT}": "timeout",
        f"{net.HOST_UPLINK_IP}:{net.HOST_SERVICE_PORT}": "timeout",
        f"{other_ip}:8080": "timeout",
    }
    # The host itself can reach them all (the blocks are the guest's, not the network's).
    assert "hello from private" in _in_host_ns(
        private_network, "python3", "-c", PROBE, f"{net.PRIVATE_IP}:80"
    )


def wid_gateway(ctx: Context, wid: str) -> str:
    info = ws.workspace_network(ctx, wid)
    assert info["policy"] == "egress" and info["guest_ip"], info
    return str(info["gateway"])


def test_an_allowed_host_is_all_a_guest_can_reach(
    ws_ctx: Context, private_network: net.Topology
) -> None:
    wid = ws.workspace_create(
        ws_ctx, "debian:12", network_policy="egress", allow_host=["web.test"]
    )["id"]
    seen = _probe(ws_ctx, wid, "web.test:80", "other.test:80", f"{net.OTHER_IP}:80")
    assert seen == {
        "web.test:80": "ok hello from internet",
        "other.test:80": "no-name",  # the resolver answers only allowed names
        f"{net.OTHER_IP}:80": "timeout",  # and the address itself is not open
    }


def test_an_allowed_cidr_opens_a_private_host(
    ws_ctx: Context, private_network: net.Topology
) -> None:
    wid = ws.workspace_create(
        ws_ctx, "debian:12", network_policy="egress", allow_cidr=["10.77.0.0/24"]
    )["id"]
    seen = _probe(ws_ctx, wid, f"{net.PRIVATE_IP}:80", f"{net.WEB_IP}:80")
    assert seen == {f"{net.PRIVATE_IP}:80": "ok hello from private", f"{net.WEB_IP}:80": "timeout"}


def _fetch_on_host(topo: net.Topology, port: int) -> str:
    return _in_host_ns(topo, "python3", "-c", PROBE, f"127.0.0.1:{port}").strip()


def test_a_published_port_answers_on_the_host_until_its_service_stops(
    ws_ctx: Context, private_network: net.Topology
) -> None:
    wid = ws.workspace_create(ws_ctx, "debian:12", network_policy="egress+published-ports")["id"]
    wc.workspace_file_write(ws_ctx, wid, "index.html", text="hello from the guest\n")
    started = sv.service_start(
        ws_ctx,
        wid,
        "web",
        "python3 -m http.server 8080",
        ready_tcp="127.0.0.1:8080",
        publish=["0:8080"],
    )
    port = started["published_ports"][0]["host_port"]
    assert port > 0 and started["published_ports"][0]["host_ip"] == "127.0.0.1"
    assert _fetch_on_host(private_network, port) == f"127.0.0.1:{port} ok hello from the guest"
    status = ws.workspace_status(ws_ctx, wid)
    assert [p["host_port"] for p in status["network"]["published_ports"]] == [port]
    sv.service_stop(ws_ctx, wid, "web")
    assert _fetch_on_host(private_network, port) == f"127.0.0.1:{port} refused"
    assert ws.workspace_status(ws_ctx, wid)["network"]["published_ports"] == []


def test_a_killed_vmm_leaves_no_rule_address_or_port_after_reconcile(
    ws_ctx: Context, private_network: net.Topology
) -> None:
    record = ws.workspace_create(
        ws_ctx, "debian:12", network_policy="egress+published-ports", publish=["0:8080"]
    )
    link = Link.of(next(lease.slot for lease in leases.held() if lease.vm_id == record["id"]))
    assert nft.vm_present(link)
    os.kill(record["vmm_pid"], 9)
    ws.workspace_status(ws_ctx, record["id"])  # reconciles: the VM is found dead
    assert not nft.vm_present(link)
    assert [lease.vm_id for lease in leases.held()].count(record["id"]) == 0
    assert "does not exist" in _in_host_ns(private_network, "ip", "link", "show", link.tap)


def test_bad_network_input_gets_a_clear_error_and_leaves_nothing(
    ws_ctx: Context, private_network: net.Topology
) -> None:
    cases = [
        ({"network_policy": "sometimes"}, "network policy must be one of"),
        ({"network_policy": "egress", "publish": ["8080:80"]}, "needs the egress+published"),
        ({"network_policy": "egress", "allow_cidr": ["10.0.0.0/33"]}, "is not an IPv4"),
        ({"network_policy": "egress", "allow_host": ["not a name"]}, "is not a domain"),
        ({"allow_host": ["web.test"]}, "an allowlist needs a network"),
        ({"network_policy": "egress+published-ports", "publish": ["70000:80"]}, "not a number"),
    ]
    for options, message in cases:
        with pytest.raises(InvalidArgument, match=re.escape(message)):
            ws.workspace_create(ws_ctx, "debian:12", **options)
    assert ws.workspace_list(ws_ctx)["workspaces"] == []
    assert leases.held() == []


def test_a_host_port_in_use_is_refused_and_nothing_is_left(
    ws_ctx: Context, private_network: net.Topology
) -> None:
    from pyro_mcp.errors import Conflict
    from pyro_mcp.network.namespace import run_in_namespace

    def hold() -> socket.socket:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        return sock

    holder = run_in_namespace(hold)
    try:
        port = holder.getsockname()[1]
        with pytest.raises(Conflict, match=f"127.0.0.1:{port} is in use"):
            ws.workspace_create(
                ws_ctx,
                "debian:12",
                network_policy="egress+published-ports",
                publish=[f"{port}:80"],
            )
    finally:
        holder.close()
    assert ws.workspace_list(ws_ctx)["workspaces"] == []
    assert leases.held() == [] and nft.published() == []


SEND_RAW = r"""
import socket, struct, sys
dst = socket.inet_aton(sys.argv[1])
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # IP_HDRINCL
for item in sys.argv[2:]:
    source, port = item.split(":")
    payload = b"pyro"
    udp = struct.pack("!HHHH", 40000, int(port), 8 + len(payload), 0) + payload
    # The kernel fills in the total length and checksum; the source is ours to choose.
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0, 64, 17, 0,
                         socket.inet_aton(source), dst)
    for _ in range(3):
        raw.sendto(header + udp, (sys.argv[1], 0))
print("sent")
"""

COUNTERS = """
table ip pyrotest {
  chain seen {
    type filter hook prerouting priority -300; policy accept;
    udp dport 9998 counter
    udp dport 9999 counter
  }
}
"""


def _udp_counts(topo: net.Topology) -> dict[int, int]:
    listing = _in_host_ns_of(topo.ns("inet"), "nft", "-j", "list", "table", "ip", "pyrotest")
    counts = {}
    for item in json.loads(listing)["nftables"]:
        rule = item.get("rule")
        if rule:
            port = next(e["match"]["right"] for e in rule["expr"] if "match" in e)
            counts[port] = next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    return counts


def _in_host_ns_of(namespace: str, *argv: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", namespace, *argv],
        capture_output=True,
        text=True,
        check=True,
        input=stdin,
    )
    return done.stdout


def test_a_guest_root_cannot_send_from_an_address_not_its_own(
    ws_ctx: Context, private_network: net.Topology
) -> None:
    """Root in the guest crafts packets with any source: only its own address leaves."""
    inet = private_network.ns("inet")
    _in_host_ns_of(inet, "nft", "-f", "-", stdin=COUNTERS)
    try:
        record = ws.workspace_create(ws_ctx, "debian:12", network_policy="egress")
        own = record["network"]["guest_ip"]
        gateway = record["network"]["gateway"]
        another_guest = str(ipaddress.IPv4Address(own) + 4)  # the next slot's guest
        result = wc.workspace_exec(
            ws_ctx,
            record["id"],
            ["python3", "-c", SEND_RAW, net.WEB_IP, f"{own}:9998"]
            + [f"{source}:9999" for source in ("198.51.100.7", another_guest, gateway)],
        )
        assert result["stdout"] == "sent\n", result
        deadline = time.monotonic() + 5
        while _udp_counts(private_network).get(9998, 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _udp_counts(private_network) == {9998: 3, 9999: 0}
    finally:
        _in_host_ns_of(inet, "nft", "delete", "table", "ip", "pyrotest")


FLOOD = r"""
import os, socket, struct, sys, time
gateway = sys.argv[1]
flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flood.setblocking(False)
sent = 0
for n in range(20000):
    name = b"".join(bytes([len(p)]) + p for p in (os.urandom(6).hex().encode(), b"test"))
    query = struct.pack("!HHHHHH", n & 0xFFFF, 0x0100, 1, 0, 0, 0) + name + b"\0\0\1\0\1"
    for packet in (query, os.urandom(n % 600)):  # a query, then junk of any size
        try:
            flood.sendto(packet, (gateway, 53))
            sent += 1
        except BlockingIOError:
            time.sleep(0.001)
time.sleep(2)  # the rate limit's bucket refills
try:
    print(sent > 10000, socket.gethostbyname("web.test"))
except OSError as exc:
    print(sent > 10000, "no answer", exc)
"""


def test_a_guest_flooding_its_resolver_with_queries_and_junk_still_gets_answers(
    ws_ctx: Context, private_network: net.Topology
) -> None:
    record = ws.workspace_create(ws_ctx, "debian:12", network_policy="egress")
    lease = next(lease for lease in leases.held() if lease.vm_id == record["id"])
    resolver = ProcessIdentity.from_dict(lease.resolver)
    assert resolver is not None
    result = wc.workspace_exec(
        ws_ctx,
        record["id"],
        ["python3", "-c", FLOOD, record["network"]["gateway"]],
        timeout_seconds=120,
    )
    assert result["stdout"] == f"True {net.WEB_IP}\n", result
    assert resolver.alive()
    rss_kib = int(
        next(
            line.split()[1]
            for line in Path(f"/proc/{resolver.pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )
    )
    assert rss_kib < 200 * 1024  # bounded: the flood queued nothing without limit


def test_a_lifecycle_vm_with_network_reports_its_address_and_its_link_goes_when_it_stops(
    ws_ctx: Context, private_network: net.Topology
) -> None:
    from pyro_mcp.api.operations import vm_lifecycle as vm_life

    created = vm_life.vm_create(ws_ctx, "debian:12", network=True)
    vid = created["vm_id"]
    assert (created["network_enabled"], created["guest_ip"]) == (True, None)  # not started
    started = vm_life.vm_start(ws_ctx, vid)
    info = vm_life.vm_network_info(ws_ctx, vid)
    assert (info["vm_id"], info["policy"]) == (vid, "egress")
    assert started["guest_ip"] == info["guest_ip"]
    link = ipaddress.ip_network(f"{info['gateway']}/30", strict=False)
    assert ipaddress.ip_address(info["guest_ip"]) in link  # its own /30, beside the gateway
    ran = vm_life.vm_exec(ws_ctx, vid, ["python3", "-c", PROBE, "web.test:80"], timeout_seconds=60)
    assert ran["stdout"] == "web.test:80 ok hello from internet\n", ran
    vm_life.vm_stop(ws_ctx, vid)
    assert [lease.vm_id for lease in leases.held()].count(vid) == 0
    assert vm_life.vm_network_info(ws_ctx, vid)["guest_ip"] is None
    vm_life.vm_delete(ws_ctx, vid)
