"""The address plan: each VM's link is one /30 of pyro's pool, named by its slot.

Slot ``n`` owns the ``n``-th /30 of the pool: the host's end of the link (the guest's
gateway and DNS server) is its first address, the guest the second. The TAP device, the
MAC address and the nftables names all derive from the slot, so anything that knows a
VM's slot can find and remove everything of its link.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from pyro_mcp.errors import InvalidArgument

DEFAULT_POOL = "10.241.0.0/16"
POOL_ENV = "PYRO_NET_POOL"
LINK_PREFIX = 30
TAP_PREFIX = "pyro-t"  # every TAP of pyro's: the nftables rules match "pyro-t*"


def pool() -> ipaddress.IPv4Network:
    """pyro's address pool (``PYRO_NET_POOL``, default 10.241.0.0/16)."""
    text = os.environ.get(POOL_ENV, DEFAULT_POOL)
    try:
        network = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise InvalidArgument(
            f"{POOL_ENV}={text!r} is not an IPv4 network: {exc}",
            hint="use a private CIDR with room for at least one /30, e.g. 10.241.0.0/16",
        ) from exc
    if not network.is_private or network.prefixlen > LINK_PREFIX:
        raise InvalidArgument(
            f"{POOL_ENV}={text!r} must be a private IPv4 network of /{LINK_PREFIX} or wider"
        )
    return network


def slot_count(network: ipaddress.IPv4Network | None = None) -> int:
    network = network or pool()
    return 1 << (LINK_PREFIX - network.prefixlen)


@dataclass(frozen=True)
class Link:
    """The addresses and names of one VM's link."""

    slot: int
    network: ipaddress.IPv4Network  # the /30

    @classmethod
    def of(cls, slot: int, within: ipaddress.IPv4Network | None = None) -> Link:
        within = within or pool()
        if not 0 <= slot < slot_count(within):
            raise InvalidArgument(f"slot {slot} is outside the pool {within}")
        base = int(within.network_address) + (slot << (32 - LINK_PREFIX))
        return cls(slot, ipaddress.IPv4Network((base, LINK_PREFIX)))

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The host's end: the guest's default route and DNS server."""
        return self.network.network_address + 1

    @property
    def guest(self) -> ipaddress.IPv4Address:
        return self.network.network_address + 2

    @property
    def tap(self) -> str:
        return f"{TAP_PREFIX}{self.slot:x}"  # at most 15 characters for any /8 pool

    @property
    def mac(self) -> str:
        """A locally administered unicast MAC that names the slot."""
        octets = (self.slot >> 16) & 0xFF, (self.slot >> 8) & 0xFF, self.slot & 0xFF
        return "02:70:79:" + ":".join(f"{octet:02x}" for octet in octets)

    @property
    def chain(self) -> str:
        """The nftables chain holding this VM's egress policy."""
        return f"vm{self.slot}"

    @property
    def allow_set(self) -> str:
        """The nftables set of the CIDRs its allowlist opens (private ranges included)."""
        return f"allow{self.slot}"

    @property
    def names_set(self) -> str:
        """The nftables set of the addresses its resolver answered for allowed names:
        public addresses only (a name cannot open what is blocked)."""
        return f"names{self.slot}"

    def kernel_arg(self) -> str:
        """How the guest learns its link: ``pyro.net=GUEST/PREFIX,GATEWAY,MAC``."""
        return f"pyro.net={self.guest}/{LINK_PREFIX},{self.gateway},{self.mac}"
