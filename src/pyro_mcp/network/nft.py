"""pyro's nftables table (``inet pyro``): NAT, the guests' egress policy, published ports.

One table holds everything, made once per network namespace. Per VM (by its link slot)
it holds a chain with its egress policy, the set of CIDRs its allowlist opens, the set of
addresses its DNS resolver answered for allowed names (public ones only; they expire with
their TTL),
an element in the ``guests`` map sending its TAP's traffic to that chain, the address of
its DNS resolver, and its published ports (elements of the DNAT maps). Removing a VM's
link removes exactly those, found by the slot alone.

Whatever the policy, a guest cannot reach the host itself (anything delivered locally,
except its own resolver), addresses outside the public internet (``BLOCKED``, unless its
allowlist opens them), another guest, or anything over IPv6; with an allowlist, only what
it allows. Rules never match a guest's word: the source address must be the guest's own.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyro_mcp.errors import NetworkUnavailable, ToolFailed
from pyro_mcp.network.addresses import TAP_PREFIX, Link, pool
from pyro_mcp.network.leases import namespace_state_dir
from pyro_mcp.network.namespace import in_namespace_argv, run_in_namespace
from pyro_mcp.runtime.host_tools import run

TABLE = "pyro"
FAMILY = "inet"
TABLE_COMMENT = "pyro-mcp guest networking v1"
# Everything that is not the public internet: "this" network, private ranges, CGNAT,
# loopback, link-local (cloud metadata at 169.254.169.254), IETF and benchmark ranges,
# multicast and reserved.
BLOCKED = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/3",
)
ANY_HOST_IP = ipaddress.IPv4Address("0.0.0.0")
_GUESTS = f'"{TAP_PREFIX}*"'


def _base_ruleset() -> str:
    pool_cidr = str(pool())
    return f"""
table {FAMILY} {TABLE} {{
  comment "{TABLE_COMMENT}"
  set blocked4 {{ type ipv4_addr; flags interval; elements = {{ {", ".join(BLOCKED)} }} }}
  set dns_ends {{ type ifname . ipv4_addr; }}
  map guests {{ type ifname : verdict; }}
  map published_tcp {{ type ipv4_addr . inet_service : ipv4_addr . inet_service; }}
  map published_any {{ type inet_service : ipv4_addr . inet_service; }}
  chain input {{
    type filter hook input priority filter - 5; policy accept;
    iifname {_GUESTS} jump guest_to_host
  }}
  chain guest_to_host {{
    ct state established,related accept
    iifname . ip daddr @dns_ends meta l4proto {{ tcp, udp }} th dport 53 accept
    drop
  }}
  chain forward {{
    type filter hook forward priority filter - 5; policy accept;
    iifname {_GUESTS} jump from_guest
    oifname {_GUESTS} jump to_guest
  }}
  chain from_guest {{
    ct state established,related accept
    iifname vmap @guests
    drop
  }}
  chain to_guest {{
    ct state established,related accept
    ct status dnat accept
    drop
  }}
  chain forward_guard {{
    type filter hook forward priority filter - 6; policy accept;
  }}
  chain published {{
    iifname {_GUESTS} return
    meta nfproto ipv4 dnat ip to ip daddr . tcp dport map @published_tcp
    meta nfproto ipv4 dnat ip to tcp dport map @published_any
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    fib daddr type local jump published
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    fib daddr type local jump published
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {pool_cidr} oifname != {_GUESTS} masquerade
    oifname {_GUESTS} ip saddr 127.0.0.0/8 masquerade
  }}
}}
"""


def nft(script: str, what: str) -> None:
    """Apply an nft script (``nft -f -``, atomically) in pyro's network namespace."""
    try:
        run(in_namespace_argv(["nft", "-f", "-"]), what=what, input_bytes=script.encode())
    except ToolFailed as exc:
        raise NetworkUnavailable(
            f"{what}: nftables refused the change: {exc.stderr_tail or exc}",
            hint="guest networking needs root and the nf_tables kernel module",
        ) from exc


def _nft_json(*args: str) -> dict[str, object] | None:
    try:
        result = run(in_namespace_argv(["nft", "-j", *args]), what="read nftables")
    except ToolFailed:
        return None
    data = json.loads(result.stdout or b"{}")
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def _table_lock() -> Iterator[None]:
    """One pyro process at a time changes the table's shape (creating it, the guard)."""
    directory = namespace_state_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(directory / "nft.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def table_exists() -> bool:
    return _nft_json("list", "table", FAMILY, TABLE) is not None


def ensure_table() -> None:
    """Make the table (once), and turn on IPv4 forwarding if it is off: then only
    forwarding to and from pyro's guests is let through (``forward_guard``)."""
    with _table_lock():
        if not table_exists():
            nft(_base_ruleset(), "create pyro's nftables table")
        _ensure_forwarding()


def _ensure_forwarding() -> None:
    def flip() -> bool:
        path = Path("/proc/sys/net/ipv4/ip_forward")
        if path.read_text().strip() == "1":
            return False
        path.write_text("1")
        return True

    if run_in_namespace(flip):
        # The host did not forward before pyro: keep it that way for everything else.
        nft(
            f"add rule {FAMILY} {TABLE} forward_guard "
            f"iifname != {_GUESTS} oifname != {_GUESTS} drop\n",
            "guard the host's forwarding",
        )


def delete_table() -> None:
    """Remove the whole table (tests; a host with no pyro VM left)."""
    with contextlib.suppress(NetworkUnavailable):
        nft(f"delete table {FAMILY} {TABLE}\n", "delete pyro's nftables table")


@dataclass(frozen=True)
class Egress:
    """What a VM's chain lets through besides its allowlist set."""

    restricted: bool  # an allowlist exists: nothing else is let through
    allow_cidrs: tuple[ipaddress.IPv4Network, ...] = ()


def add_vm(link: Link, egress: Egress) -> None:
    """The VM's chain, allow set, map element and resolver address, in one transaction."""
    elements = ", ".join(str(cidr) for cidr in egress.allow_cidrs)
    rules = [
        f"ip saddr != {link.guest} drop",  # only its own address
        "meta nfproto != ipv4 drop",
        f"ip daddr @{link.allow_set} accept",  # CIDRs the user opened, private ones too
        "ip daddr @blocked4 drop",
        f"ip daddr @{link.names_set} accept",  # after: an allowed name cannot open them
        "drop" if egress.restricted else "accept",
    ]
    script = [
        f"add set {FAMILY} {TABLE} {link.allow_set} {{ type ipv4_addr; flags interval; }}",
        f"add set {FAMILY} {TABLE} {link.names_set} {{ type ipv4_addr; flags timeout; }}",
        f"add chain {FAMILY} {TABLE} {link.chain}",
        f"flush chain {FAMILY} {TABLE} {link.chain}",
        *(f"add rule {FAMILY} {TABLE} {link.chain} {rule}" for rule in rules),
        f'add element {FAMILY} {TABLE} guests {{ "{link.tap}" : jump {link.chain} }}',
        f'add element {FAMILY} {TABLE} dns_ends {{ "{link.tap}" . {link.gateway} }}',
    ]
    if elements:
        script.append(f"add element {FAMILY} {TABLE} {link.allow_set} {{ {elements} }}")
    nft("\n".join(script) + "\n", f"set the network policy of {link.tap}")


def remove_vm(link: Link) -> None:
    """Remove everything of the VM from the table, in one transaction; quiet about what
    is already gone (one listing says what is there)."""
    table = _table_items()
    if table is None:
        return
    chains = {item["chain"]["name"] for item in table if "chain" in item}
    sets = {item["set"]["name"]: item["set"].get("elem") or [] for item in table if "set" in item}
    maps = {item["map"]["name"]: item["map"].get("elem") or [] for item in table if "map" in item}
    script = []
    if any(_first(key) == link.tap for key, _ in maps.get("guests", [])):
        script.append(f'delete element {FAMILY} {TABLE} guests {{ "{link.tap}" }}')
    if {"concat": [link.tap, str(link.gateway)]} in sets.get("dns_ends", []):
        script.append(
            f'delete element {FAMILY} {TABLE} dns_ends {{ "{link.tap}" . {link.gateway} }}'
        )
    for port in published(link):
        name, key = _key(port.host_ip, port.host_port)
        script.append(f"delete element {FAMILY} {TABLE} {name} {{ {key} }}")
    if link.chain in chains:
        script.append(f"delete chain {FAMILY} {TABLE} {link.chain}")
    for name in (link.allow_set, link.names_set):
        if name in sets:
            script.append(f"delete set {FAMILY} {TABLE} {name}")
    if script:
        nft("\n".join(script) + "\n", f"remove the network policy of {link.tap}")


def _first(key: Any) -> Any:
    return key.get("elem", {}).get("val") if isinstance(key, dict) else key


def _table_items() -> list[dict[str, Any]] | None:
    data = _nft_json("list", "table", FAMILY, TABLE)
    items = data.get("nftables") if data else None
    return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else None


def vm_present(link: Link) -> bool:
    """Anything of the VM is still in the table (tests, leftovers checks)."""
    table = _table_items() or []
    names = {item[kind]["name"] for item in table for kind in ("chain", "set") if kind in item}
    return bool({link.chain, link.allow_set, link.names_set} & names) or bool(published(link))


# --- published ports -------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """One published port: TCP to ``host_ip:host_port`` goes to the guest's
    ``guest_port``. ``owner``: what published it (``workspace``, ``service:NAME``)."""

    host_ip: ipaddress.IPv4Address  # 0.0.0.0: any local address
    host_port: int
    guest_port: int
    owner: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "host_ip": str(self.host_ip),
            "host_port": self.host_port,
            "guest_port": self.guest_port,
            "owner": self.owner,
        }


def _key(host_ip: ipaddress.IPv4Address, host_port: int) -> tuple[str, str]:
    if host_ip == ANY_HOST_IP:
        return "published_any", str(host_port)
    return "published_tcp", f"{host_ip} . {host_port}"


def publish(link: Link, port: Published) -> None:
    name, key = _key(port.host_ip, port.host_port)
    element = f'{key} comment "{port.owner}" : {link.guest} . {port.guest_port}'
    nft(f"add element {FAMILY} {TABLE} {name} {{ {element} }}\n", f"publish port {port.host_port}")


def unpublish(port: Published) -> None:
    name, key = _key(port.host_ip, port.host_port)
    with contextlib.suppress(NetworkUnavailable):
        nft(f"delete element {FAMILY} {TABLE} {name} {{ {key} }}\n", "unpublish a port")


def published(link: Link | None = None) -> list[Published]:
    """Every port published to the VM of ``link`` (None: to any VM)."""
    found = []
    for name in ("published_tcp", "published_any"):
        for key, owner, (guest_ip, guest_port) in _map_elements(name):
            if link is not None and guest_ip != str(link.guest):
                continue
            if isinstance(key, list):
                host_ip, host_port = ipaddress.IPv4Address(str(key[0])), int(key[1])
            else:
                host_ip, host_port = ANY_HOST_IP, int(key)
            found.append(Published(host_ip, host_port, guest_port, owner))
    return found


def _map_elements(name: str) -> list[tuple[Any, str, tuple[str, int]]]:
    """The (key, owner, (guest IP, guest port)) elements of one of the DNAT maps."""
    data = _nft_json("list", "map", FAMILY, TABLE, name)
    found: list[tuple[Any, str, tuple[str, int]]] = []
    items = data.get("nftables", []) if data else []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or "map" not in item:
            continue
        for key, value in item["map"].get("elem", []):
            owner = ""
            if isinstance(key, dict) and "elem" in key:  # a key with a comment
                owner = str(key["elem"].get("comment", ""))
                key = key["elem"]["val"]
            key_parts = key["concat"] if isinstance(key, dict) else key
            guest_ip, guest_port = value["concat"]
            found.append((key_parts, owner, (str(guest_ip), int(guest_port))))
    return found
