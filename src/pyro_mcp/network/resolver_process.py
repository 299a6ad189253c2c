"""Start and end a VM's DNS resolver (:mod:`pyro_mcp.network.resolver`), a process of
its own on the host's end of the link, known by pid and start time like a VMM.

It reads guests' bytes, so a root pyro starts it as a uid of its own (``RESOLVER_UID_BASE``
plus the link's slot) with no capability but the two it needs: binding port 53
(CAP_NET_BIND_SERVICE) and adding answers to its nftables set (CAP_NET_ADMIN). Its config
comes on stdin: it needs no access to the VM's run directory."""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from pyro_mcp.errors import NetworkUnavailable
from pyro_mcp.network.addresses import Link
from pyro_mcp.network.namespace import in_namespace_argv
from pyro_mcp.network.policy import NetworkPolicy
from pyro_mcp.runtime.host_tools import require
from pyro_mcp.vmm.identity import ProcessIdentity

UPSTREAMS_ENV = "PYRO_DNS_UPSTREAMS"  # "IP[:PORT],...": where resolvers forward queries
READY_TIMEOUT_S = 10.0
DNS_PORT = 53
RESOLVER_UID_BASE = 800_000  # below QEMU's uids (900_000 + slot)
RESOLVER_UID_SPAN = 100_000
RESOLVER_CAPS = "net_admin,net_bind_service"


def resolver_uid(link: Link) -> int:
    return RESOLVER_UID_BASE + link.slot % RESOLVER_UID_SPAN


def _unprivileged(link: Link, argv: list[str]) -> list[str]:
    """``argv`` as the resolver's uid with only :data:`RESOLVER_CAPS` (when root)."""
    if os.geteuid() != 0:
        return argv
    uid = str(resolver_uid(link))
    caps = ",".join(f"+{cap}" for cap in RESOLVER_CAPS.split(","))
    return [
        require("setpriv"),
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        f"--inh-caps=-all,{caps}",
        f"--ambient-caps={caps}",
        f"--bounding-set=-all,{caps}",
        *argv,
    ]


def upstreams() -> list[list[object]]:
    """The resolvers guests' queries go to: ``PYRO_DNS_UPSTREAMS``, else the host's."""
    text = os.environ.get(UPSTREAMS_ENV, "").strip()
    if not text:
        from pyro_mcp.network.resolver_config import host_upstreams

        return [[str(ip), int(port)] for ip, port in host_upstreams()]
    found: list[list[object]] = []
    for item in text.split(","):
        host, _, port = item.strip().partition(":")
        found.append([host, int(port or DNS_PORT)])
    return found


def start(link: Link, policy: NetworkPolicy, run_dir: Path) -> dict[str, int]:
    """Start the resolver of ``link``; its identity once it answers (``ready``)."""
    config = {
        "listen": [str(link.gateway), DNS_PORT],
        "upstreams": upstreams(),
        "allow_hosts": list(policy.allow_hosts) if policy.restricted else None,
        "nft_set": ["inet", "pyro", link.names_set] if policy.restricted else None,
    }
    argv = in_namespace_argv(
        _unprivileged(link, [sys.executable, "-I", "-m", "pyro_mcp.network.resolver", "-"])
    )
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    with (run_dir / "resolver.log").open("ab") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,  # outlives this process, as the VM does
            close_fds=True,
            env=env,
            cwd="/",
        )
    assert process.stdin is not None and process.stdout is not None
    with contextlib.suppress(BrokenPipeError):  # it died at once: said below
        process.stdin.write(json.dumps(config).encode())
    with contextlib.suppress(BrokenPipeError):
        process.stdin.close()
    deadline = time.monotonic() + READY_TIMEOUT_S
    line = b""
    while not line.endswith(b"\n") and time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        chunk = os.read(process.stdout.fileno(), 64)
        if not chunk:
            break
        line += chunk
    process.stdout.close()
    identity = ProcessIdentity.of(process.pid)
    if line.strip() != b"ready" or identity is None:
        process.kill()
        process.wait()
        tail = (run_dir / "resolver.log").read_bytes()[-400:].decode("utf-8", "replace")
        raise NetworkUnavailable(
            f"the DNS resolver for {link.tap} did not start: {tail.strip() or 'no output'}"
        )
    return identity.to_dict()


def stop(identity: dict[str, int]) -> None:
    process = ProcessIdentity.from_dict(identity)
    if process is not None:
        process.kill()
