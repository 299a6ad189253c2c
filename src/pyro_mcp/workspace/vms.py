"""Lifecycle VMs: the records behind ``pyro vm create|start|exec|stop|delete|status``.

pyro-mcp 3.x had, beside ``vm_run``, VMs that a caller creates (nothing boots), starts,
runs commands in, stops, starts again and deletes, each with a TTL counted from its
creation. Here such a VM is a record of kind ``vm`` in the workspace store, on the
workspace lifecycle: the same states and compare-and-set transitions, the same boot
(a template restore on its first start when one fits), the same recorded VMM identity
and agent attach, the same admission by memory, the same keeper that deletes what
expired on time, and the same reconcile and orphan sweep after a crash. What differs is
small and lives where each concern does: the state ``created`` (``states``), no
``/workspace`` disk (:mod:`pyro_mcp.workspace.boot`), and that each kind's commands see only
records of their kind (``WorkspaceStore``). This module adds what only VMs do: a create
that boots nothing, how status shows a VM, and ``reap_expired``.
"""

from __future__ import annotations

import time
from contextlib import suppress
from typing import Any, Final

from pyro_mcp.errors import InvalidArgument, NotFound
from pyro_mcp.network.link import vm_network_info
from pyro_mcp.network.policy import NetworkPolicy
from pyro_mcp.runtime import environments
from pyro_mcp.workspace.admission import check_sizes, owner_alive, this_owner
from pyro_mcp.workspace.lifecycle import Workspaces
from pyro_mcp.workspace.records import WorkspaceRecord
from pyro_mcp.workspace.states import Kind, WorkspaceState, shown_state

DEFAULT_TTL_S: Final = 600.0  # pyro-mcp 3.x's default, counted from creation


def _require_vms(workspaces: Workspaces) -> None:
    if workspaces.store.kind != Kind.VM:
        raise InvalidArgument("kind: lifecycle VMs need a Workspaces of kind vm")


def create_vm(
    workspaces: Workspaces,
    environment: str,
    *,
    vcpu_count: int = 1,
    mem_mib: int = 512,
    ttl_seconds: float = DEFAULT_TTL_S,
    network: NetworkPolicy | None = None,
) -> WorkspaceRecord:
    """Record a VM in state ``created``: nothing boots until ``Workspaces.start``.

    Its environment image is hard-linked into its directory now, so ``pyro env prune``
    cannot take it before the VM boots. The TTL counts from now. Errors: NotFound (an
    unknown environment) or RuntimeMissing (not installed), InvalidArgument (sizes, TTL).
    """
    _require_vms(workspaces)
    check_sizes(vcpu_count, mem_mib, None, ttl_seconds)
    image = environments.image_for(workspaces.paths, environment)
    workspaces.reconcile()
    record = workspaces.store.create(
        environment=environment,
        vcpu_count=vcpu_count,
        mem_mib=mem_mib,
        disk_mib=0,
        ttl_seconds=ttl_seconds,
        owner=this_owner(),  # a create whose process dies is discarded by reconcile
        network={**(network or NetworkPolicy()).to_dict(), "publish": []},
    )
    try:
        files = workspaces.layout.workspace(record.id)
        files.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        files.link_base(image)
        return workspaces.store.transition(
            record.id,
            "created",
            expect={"creating"},
            note=f"not booted yet: `pyro vm start {record.id}` boots it",
            owner=None,
        )
    except BaseException:
        workspaces._discard(record.id)
        raise


def reap_expired(workspaces: Workspaces) -> list[str]:
    """Delete every VM whose TTL has run out, with its VMM and files; returns their ids.
    A create still under way is left to finish (the keeper or the next reap takes it);
    one the keeper deleted meanwhile is not counted."""
    _require_vms(workspaces)
    deleted: list[str] = []
    for record in workspaces.store.expired(time.time()):
        if record.state is WorkspaceState.CREATING and owner_alive(record.owner):
            continue
        with suppress(NotFound):  # another process (the keeper) deleted it first
            workspaces.delete(record.id)
            deleted.append(record.id)
    return deleted


def vm_view(record: WorkspaceRecord) -> dict[str, Any]:
    """A VM as status shows it (pyro-mcp 3.x's keys: ``vm_id``, ``state`` ``started``,
    ``ttl_seconds``, ``network_enabled``, ``guest_ip`` when networked)."""
    policy = NetworkPolicy.from_dict(record.network)
    view: dict[str, Any] = {
        "vm_id": record.id,
        "environment": record.environment,
        "state": shown_state(record.kind, record.state),
        "state_note": record.state_note,
        "vcpu_count": record.vcpu_count,
        "mem_mib": record.mem_mib,
        "ttl_seconds": ttl_of(record),
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "expires_at": record.expires_at,
        "network_enabled": policy.enabled,
        "backend": record.backend,
        "vmm_pid": record.vmm_pid,
        "error": record.error,
    }
    if policy.enabled:
        view["guest_ip"] = network_of(record)["guest_ip"]  # None until it is started
    return view


def ttl_of(record: WorkspaceRecord) -> float | None:
    """The TTL the record was given, seconds from its creation (None: it has none)."""
    if record.expires_at is None:
        return None
    return round(record.expires_at - record.created_at, 3)


def network_of(record: WorkspaceRecord) -> dict[str, Any]:
    """The VM's network: its policy and, while it runs, its address, gateway, MAC, TAP."""
    running = record.state is WorkspaceState.RUNNING
    policy = NetworkPolicy.from_dict(record.network)
    return vm_network_info(policy, record.id if running else None)
