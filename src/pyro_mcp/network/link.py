"""A VM's network link, made before its VMM starts and released by every way it ends.

:func:`attach_network` leases a slot, makes the TAP, installs the VM's policy in pyro's
nftables table and starts its DNS resolver; :func:`release_network` undoes all of it from
the lease alone (so a crashed process's VM is cleaned up by whoever ends it, and a stale
lease by the next VM that needs a slot). Nothing half-made is left when a step fails.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyro_mcp.network import leases, nft, resolver_process
from pyro_mcp.network.addresses import Link
from pyro_mcp.network.leases import LEASES_ROOT, Lease
from pyro_mcp.network.namespace import configured_namespace, namespace_gone
from pyro_mcp.network.policy import NetworkPolicy
from pyro_mcp.network.rights import require_net_admin
from pyro_mcp.network.tap import create_tap, remove_tap, tap_exists
from pyro_mcp.vmm.base import Nic


@dataclass
class GuestNetwork:
    policy: NetworkPolicy
    link: Link
    nic: Nic

    def info(self) -> dict[str, Any]:
        return network_info(self.policy, self.link)


def network_info(policy: NetworkPolicy, link: Link | None) -> dict[str, Any]:
    """What status shows of a VM's network."""
    info: dict[str, Any] = {"policy": policy.mode, **policy.to_dict()}
    info.pop("mode")
    if link is None:
        return {
            **info,
            "guest_ip": None,
            "gateway": None,
            "mac": None,
            "tap": None,
            "published_ports": [],
        }
    ports = [port.to_dict() for port in nft.published(link)]
    return {
        **info,
        "guest_ip": str(link.guest),
        "gateway": str(link.gateway),
        "mac": link.mac,
        "tap": link.tap,
        "published_ports": ports,
    }


def attach_network(
    vm_id: str,
    run_dir: Path,
    policy: NetworkPolicy,
    *,
    persistent_owner: int | None = None,
    root: Path = LEASES_ROOT,
) -> GuestNetwork:
    """Make the VM's link (see the module's docstring). ``persistent_owner``: the uid of
    a VMM that opens its TAP by name (Firecracker); None hands QEMU an open TAP."""
    require_net_admin()
    nft.ensure_table()
    lease = leases.acquire(vm_id, run_dir, reclaim=_release_lease, root=root)
    link = lease.link
    tap = None
    try:
        _release_lease(lease)  # whatever an earlier holder of the slot may have left
        tap = create_tap(link, persistent_owner=persistent_owner)
        nft.add_vm(link, nft.Egress(policy.restricted, policy.allow_cidrs))
        resolver = resolver_process.start(link, policy, run_dir)
        leases.record_resolver(vm_id, resolver, root=root)
    except BaseException:
        if tap is not None:
            tap.close()
        with contextlib.suppress(Exception):
            release_network(vm_id, root=root)
        raise
    return GuestNetwork(policy, link, Nic(link.tap, link.mac, link.kernel_arg(), tap.fd))


def release_network(vm_id: str, *, root: Path = LEASES_ROOT) -> None:
    """Give back everything of the VM's link; quiet when it has none."""
    lease = leases.find(vm_id, root=root)
    if lease is None:
        return
    _release_lease(lease)
    leases.release(vm_id, root=root)
    name = configured_namespace()
    if name is not None:  # a namespace removed: its last link takes what pyro kept of it
        leases.forget_namespace(name, root=root)


def _release_lease(lease: Lease) -> None:
    link = lease.link
    if lease.resolver is not None:
        resolver_process.stop(lease.resolver)
    if namespace_gone():
        return  # its TAP and nftables rules went with the namespace
    nft.remove_vm(link)
    if tap_exists(link.tap):  # a persistent TAP (Firecracker), or a VMM still ending
        remove_tap(link.tap)


def link_of(vm_id: str, *, root: Path = LEASES_ROOT) -> Link | None:
    lease = leases.find(vm_id, root=root)
    return lease.link if lease else None


def vm_network_info(policy: NetworkPolicy, vm_id: str | None) -> dict[str, Any]:
    """What status shows of the network of VM ``vm_id`` (None: no VM runs now)."""
    link = link_of(vm_id) if vm_id is not None and policy.enabled else None
    return network_info(policy, link)
