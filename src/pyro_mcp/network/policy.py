"""A VM's network policy: what it asked for, checked before anything is made.

``off`` (the default): no network device at all. ``egress``: the guest reaches the public
internet through NAT, and nothing else (not the host, private or link-local ranges, other
guests). ``egress+published-ports``: the same, and ports of the guest may be published on
the host. An allowlist (``allow_cidrs``, ``allow_hosts``) narrows egress to what it names;
a CIDR may also open a private range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyro_mcp.errors import InvalidArgument

if TYPE_CHECKING:
    import ipaddress

OFF = "off"
EGRESS = "egress"
EGRESS_PUBLISHED = "egress+published-ports"
POLICIES = (OFF, EGRESS, EGRESS_PUBLISHED)
MAX_ALLOW = 64


@dataclass(frozen=True)
class NetworkPolicy:
    mode: str = OFF
    allow_cidrs: tuple[ipaddress.IPv4Network, ...] = ()
    allow_hosts: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.mode != OFF

    @property
    def publishes(self) -> bool:
        return self.mode == EGRESS_PUBLISHED

    @property
    def restricted(self) -> bool:
        """An allowlist exists: only what it names is reachable."""
        return bool(self.allow_cidrs or self.allow_hosts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "allow_cidrs": [str(cidr) for cidr in self.allow_cidrs],
            "allow_hosts": list(self.allow_hosts),
        }

    @classmethod
    def from_dict(cls, data: object) -> NetworkPolicy:
        """A stored policy (the store wrote it; it is checked again all the same)."""
        if not isinstance(data, dict):
            return cls()
        return parse_policy(
            data.get("mode", OFF), data.get("allow_cidrs") or [], data.get("allow_hosts") or []
        )


def parse_policy(mode: object, allow_cidrs: object = (), allow_hosts: object = ()) -> NetworkPolicy:
    """A checked policy; InvalidArgument naming the bad value and the fix."""
    if mode not in POLICIES:
        raise InvalidArgument(
            f"network policy must be one of {', '.join(POLICIES)}, got {mode!r}",
            hint="`egress` lets the guest reach the internet; `off` gives it no network",
        )
    cidrs = tuple(_cidr(item) for item in _items(allow_cidrs, "allow_cidr"))
    hosts = tuple(_host(item) for item in _items(allow_hosts, "allow_host"))
    if (cidrs or hosts) and mode == OFF:
        raise InvalidArgument(
            "an allowlist needs a network: the network policy is off",
            hint="add `--network-policy egress` (or `--network` on `pyro run`)",
        )
    return NetworkPolicy(str(mode), tuple(dict.fromkeys(cidrs)), tuple(dict.fromkeys(hosts)))


def _items(value: object, name: str) -> list[object]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise InvalidArgument(f"{name} must be a list, got {type(value).__name__}")
    if len(value) > MAX_ALLOW:
        raise InvalidArgument(f"at most {MAX_ALLOW} {name} entries, got {len(value)}")
    return list(value)


def _cidr(value: object) -> ipaddress.IPv4Network:
    import ipaddress

    if not isinstance(value, str):
        raise InvalidArgument(f"allow_cidr entries are strings, got {type(value).__name__}")
    try:
        network = ipaddress.IPv4Network(value, strict=False)
    except ValueError as exc:
        raise InvalidArgument(
            f"allow_cidr {value!r} is not an IPv4 address or CIDR (e.g. 10.0.0.0/24)"
        ) from exc
    if network.is_loopback or network.is_multicast or network.prefixlen == 0:
        raise InvalidArgument(
            f"allow_cidr {value!r} cannot be allowed: loopback, multicast and 0.0.0.0/0 "
            "are never opened (without an allowlist the guest reaches the whole internet)"
        )
    return network


def _host(value: object) -> str:
    """A domain name as the resolver matches it (:func:`dns_policy.parse_allow_host`)."""
    from pyro_mcp.network.dns_policy import parse_allow_host

    if not isinstance(value, str):
        raise InvalidArgument(f"allow_host entries are strings, got {type(value).__name__}")
    return parse_allow_host(value)
