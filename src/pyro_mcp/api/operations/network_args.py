"""The network parameters of ``run`` and ``workspace create``, and the policy they make."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyro_mcp.api.registry import EVERY, Arg
from pyro_mcp.errors import InvalidArgument
from pyro_mcp.network.policy import EGRESS, EGRESS_PUBLISHED, OFF, POLICIES, NetworkPolicy
from pyro_mcp.network.policy import parse_policy as _parse

if TYPE_CHECKING:
    from ipaddress import IPv4Address

    from pyro_mcp.network.nft import Published
    from pyro_mcp.workspace.records import WorkspaceRecord

FULL_ONLY = ("vm-run", "workspace-full")  # MCP profiles offering network parameters

NETWORK_POLICY = Arg(
    "network policy: off (no network device), egress (the internet, nothing else), "
    "egress+published-ports (and ports published on the host)",
    surfaces=EVERY,
    choices=POLICIES,
    mcp_profiles=FULL_ONLY,
)
ALLOW_CIDR = Arg(
    "let the guest reach only what the allowlist names; this IPv4 CIDR is on it "
    "(repeatable; may open a private range)",
    surfaces=EVERY,
    metavar="CIDR",
    mcp_profiles=FULL_ONLY,
)
ALLOW_HOST = Arg(
    "let the guest reach only what the allowlist names; this domain is on it (repeatable; "
    "*.example.com for its subdomains): the host's resolver answers only these names",
    surfaces=EVERY,
    metavar="NAME",
    mcp_profiles=FULL_ONLY,
)
NETWORK = Arg(
    "give the guest the internet (the egress policy)", surfaces=EVERY, mcp_profiles=FULL_ONLY
)


PUBLISH = Arg(
    "publish a guest port on the host: [HOST_IP:]HOST_PORT:GUEST_PORT (repeatable; host IP "
    "127.0.0.1 unless given, host port 0 picks a free one); needs the "
    "egress+published-ports policy",
    surfaces=EVERY,
    metavar="[HOST_IP:]HOST_PORT:GUEST_PORT",
    mcp_profiles=FULL_ONLY,
)


def require_publishing(policy: NetworkPolicy, publish: list[str] | None) -> None:
    if publish and not policy.publishes:
        raise InvalidArgument(
            f"publishing ports needs the {EGRESS_PUBLISHED} network policy, not {policy.mode}",
            hint=f"create the workspace with `--network-policy {EGRESS_PUBLISHED}`",
        )


def run_policy(
    network: bool,
    network_policy: str | None,
    allow_cidr: list[str] | None,
    allow_hosts: list[str] | None,
) -> NetworkPolicy:
    """The policy of a one-shot run: ``network`` means egress; nothing to publish."""
    if network_policy == EGRESS_PUBLISHED:
        raise InvalidArgument(
            "a one-shot run cannot publish ports (it ends with its command)",
            hint="create a workspace with `--network-policy egress+published-ports`",
        )
    if network and network_policy == OFF:
        raise InvalidArgument("--network asks for egress but the network policy says off")
    mode = network_policy or (EGRESS if network else OFF)
    return _parse(mode, allow_cidr or [], allow_hosts or [])


def workspace_policy(
    network_policy: str | None, allow_cidr: list[str] | None, allow_hosts: list[str] | None
) -> NetworkPolicy:
    return _parse(network_policy or OFF, allow_cidr or [], allow_hosts or [])


def publish_service_ports(
    record: WorkspaceRecord, service: str, entries: list[tuple[IPv4Address, int, int]]
) -> list[Published]:
    """Publish a service's ports before it starts (all or none)."""
    from pyro_mcp.network.link import link_of
    from pyro_mcp.network.ports import publish_ports, unpublish_owner

    if not entries:
        return []
    policy = NetworkPolicy.from_dict(record.network)
    require_publishing(policy, ["-"])
    link = link_of(record.id)
    if link is None:
        raise InvalidArgument(f"workspace {record.id} has no network link (is it running?)")
    unpublish_owner(link, f"service:{service}")  # what an earlier run of it left
    return publish_ports(link, entries, f"service:{service}")
