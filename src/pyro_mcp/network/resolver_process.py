"""Start and end a VM's DNS resolver (:mod:`pyro_mcp.network.resolver`), a process of
its own on the host's end of the link, known by pid and start time like a VMM."""

from __future__ import annotations

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
from pyro_mcp.vmm.identity import ProcessIdentity

UPSTREAMS_ENV = "PYRO_DNS_UPSTREAMS"  # "IP[:PORT],...": where resolvers forward queries
READY_TIMEOUT_S = 10.0
DNS_PORT = 53


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
    config_path = run_dir / "resolver.json"
    config_path.write_text(json.dumps(config))
    argv = in_namespace_argv(
        [sys.executable, "-I", "-m", "pyro_mcp.network.resolver", str(config_path)]
    )
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    with (run_dir / "resolver.log").open("ab") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,  # outlives this process, as the VM does
            close_fds=True,
            env=env,
        )
    assert process.stdout is not None
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
