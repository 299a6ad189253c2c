"""Prove guest networking on this host without sending a packet off it.

The check builds a private network of two namespaces: pyro's host side of guest
networking, and a stand-in for the internet holding a web server on a documentation
address (203.0.113.1) that serves a random token. A real guest with the egress policy
fetches the token through its TAP, the NAT and the forwarding of the host side. Only a
guest that printed the token proves ``guest_network``. Both namespaces (and with them
every TAP and nftables rule the check made) are removed, also when it fails, and so is
what pyro kept of the host side under ``/run/pyro-mcp/network``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from pyro_mcp.errors import NetworkUnavailable, ToolFailed
from pyro_mcp.network import leases
from pyro_mcp.network.namespace import NAMESPACE_ENV
from pyro_mcp.network.resolver_process import UPSTREAMS_ENV
from pyro_mcp.runtime.host_tools import run

SERVER_IP = "203.0.113.1"
UPLINK = ("192.0.2.1/24", "192.0.2.2/24")  # pyro's side, the internet's side
FETCH = (
    "import socket; s = socket.create_connection(('{ip}', 80), timeout=10); "
    "s.sendall(b'GET /token HTTP/1.0\\r\\n\\r\\n'); d = b''\n"
    "while c := s.recv(4096): d += c\n"
    "print(d.split(b'\\r\\n\\r\\n', 1)[-1].decode().strip())"
)

RunInGuest = Callable[[list[str]], str]  # boots a one-shot egress guest, returns its stdout


def _ip(*args: str) -> None:
    run(["ip", *args], what="build the network check's namespaces")


@contextlib.contextmanager
def private_internet(token: str) -> Iterator[str]:
    """The two namespaces and the web server; yields the host side's namespace."""
    prefix = f"pyro-check-{os.getpid()}"
    host, internet = f"{prefix}-h", f"{prefix}-i"
    server: subprocess.Popen[bytes] | None = None
    with tempfile.TemporaryDirectory(prefix="pyro-check-") as site:
        (Path(site) / "token").write_text(token + "\n")
        try:
            _ip("netns", "add", host)
            _ip("netns", "add", internet)
            here, there = f"pc{os.getpid() % 100000}h", f"pc{os.getpid() % 100000}i"
            peer = ("peer", "name", there, "netns", internet)
            _ip("link", "add", here, "netns", host, "type", "veth", *peer)
            _ip("-n", host, "addr", "add", UPLINK[0], "dev", here)
            _ip("-n", internet, "addr", "add", UPLINK[1], "dev", there)
            _ip("-n", internet, "addr", "add", f"{SERVER_IP}/24", "dev", there)
            for namespace, device in ((host, here), (internet, there)):
                _ip("-n", namespace, "link", "set", device, "up")
                _ip("-n", namespace, "link", "set", "lo", "up")
            _ip("-n", host, "route", "add", "default", "via", UPLINK[1].split("/")[0])
            serve = [sys.executable, "-m", "http.server", "--bind", SERVER_IP, "80"]
            server = subprocess.Popen(
                ["ip", "netns", "exec", internet, *serve, "--directory", site],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            yield host
        finally:
            if server is not None:
                server.kill()
                server.wait()
            for namespace in (host, internet):
                with contextlib.suppress(ToolFailed):
                    _ip("netns", "delete", namespace)
            leases.forget_namespace(host)


def check_guest_network(run_in_guest: RunInGuest) -> tuple[bool, str]:
    """(proven, what happened): a guest fetched the token through its link, or why not."""
    token = secrets.token_hex(16)
    saved = {name: os.environ.get(name) for name in (NAMESPACE_ENV, UPSTREAMS_ENV)}
    try:
        with private_internet(token) as host:
            os.environ[NAMESPACE_ENV] = host
            os.environ[UPSTREAMS_ENV] = SERVER_IP  # no DNS is asked: the fetch is by address
            out = run_in_guest(["python3", "-c", FETCH.format(ip=SERVER_IP)])
    except (NetworkUnavailable, ToolFailed) as exc:
        return False, f"the network check could not run: {exc}"
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    if out.strip() == token:
        return True, f"a guest fetched a page from {SERVER_IP} through its link (egress, NAT)"
    return False, f"the guest did not get the page through its link: {out.strip()[-200:]!r}"
