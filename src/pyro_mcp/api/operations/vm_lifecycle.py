"""Lifecycle VMs, as pyro-mcp 3.x had them: create, start, exec, stop, delete, status.

A VM is created without booting (``created``), started (``started``), given commands,
stopped and started again, and deleted; its TTL counts from its creation and, when it
runs out, the VM is deleted (on time, by the keeper) and any later call on it says it
expired. Underneath, a VM is a record of kind ``vm`` on the workspace lifecycle (see
:mod:`pyro_mcp.workspace.vms`): workspace commands do not see VMs, nor VM commands
workspaces.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pyro_mcp.api.context import Context
from pyro_mcp.api.operations.network_args import NETWORK, run_policy
from pyro_mcp.api.operations.vm import COMMAND, DEFAULT_OUTPUT_CAP, MEMORY, TIMEOUT, VCPUS
from pyro_mcp.api.operations.workspaces import MAX_TTL_S, open_workspaces
from pyro_mcp.api.registry import EVERY, Arg, operation
from pyro_mcp.errors import InvalidArgument
from pyro_mcp.guest.client import command_fields
from pyro_mcp.workspace import vms
from pyro_mcp.workspace.states import Kind

if TYPE_CHECKING:
    from pyro_mcp.api.results import (
        VmCreateResult,
        VmDeleteResult,
        VmExecResult,
        VmNetworkInfoResult,
        VmReapExpiredResult,
        VmStartResult,
        VmStatusResult,
        VmStopResult,
    )

FULL = ("workspace-full",)
VM_ID = Arg("VM id (as `vm create` printed it)", surfaces=EVERY, positional=True)
TTL = Arg(
    "delete the VM this many seconds after its creation",
    surfaces=EVERY,
    minimum=0,
    exclusive_minimum=True,
    maximum=MAX_TTL_S,
)
ALLOW_HOST_COMPAT = Arg(
    "pyro-mcp 3.x's fallback to running commands on the host: accepted for compatibility, "
    "true is refused (pyro runs every command in a microVM)",
    surfaces=EVERY,
)


@operation(cli=("vm", "create"), sdk="create_vm", profiles=FULL, title="Create a lifecycle VM")
def vm_create(
    ctx: Context,
    environment: Annotated[
        str, Arg("environment to boot, e.g. debian:12", surfaces=EVERY, positional=True)
    ],
    vcpu_count: Annotated[int, VCPUS] = 1,
    mem_mib: Annotated[int, MEMORY] = 512,
    ttl_seconds: Annotated[float, TTL] = vms.DEFAULT_TTL_S,
    network: Annotated[bool, NETWORK] = False,
    allow_host_compat: Annotated[bool, ALLOW_HOST_COMPAT] = False,
) -> VmCreateResult:
    """Create a VM without booting it (state ``created``); ``vm start`` boots it.

    Its TTL (``ttl_seconds``, default 600) counts from now: when it runs out the VM is
    deleted, running or not, and every later call on it fails with ``expired``. With
    ``network`` the guest reaches the internet and nothing else (as ``run --network``).
    Errors: NotFound (an unknown environment), RuntimeMissing (not installed),
    InvalidArgument (bad sizes or TTL; ``allow_host_compat`` true).
    """
    if allow_host_compat:
        raise InvalidArgument(
            "allow_host_compat: pyro never runs commands on the host; every VM is a microVM",
            hint="leave allow_host_compat false (see `pyro doctor` if VMs cannot boot here)",
        )
    policy = run_policy(network, None, None, None)
    with open_workspaces(ctx, Kind.VM) as workspaces:
        record = vms.create_vm(
            workspaces,
            environment,
            vcpu_count=vcpu_count,
            mem_mib=mem_mib,
            ttl_seconds=ttl_seconds,
            network=policy,
        )
        return vms.vm_view(record)


@operation(
    cli=("vm", "start"),
    sdk="start_vm",
    profiles=FULL,
    progress=True,
    title="Start a lifecycle VM",
    idempotent=True,
)
def vm_start(ctx: Context, vm_id: Annotated[str, VM_ID]) -> VmStartResult:
    """Boot a created or stopped VM (state ``started``): its first start restores from a
    warm template when one fits, a later one boots from its own root disk.

    Errors: NotFound (unknown id), Expired (its TTL ran out), InvalidState (it is
    already started), TooLarge (the host's memory is taken), BootTimeout.
    """
    with open_workspaces(ctx, Kind.VM) as workspaces:
        record = workspaces.start(vm_id, progress=ctx.progress)
        plan = workspaces.boot_plans.get(record.id)
        return {**vms.vm_view(record), **({"boot": plan.to_dict()} if plan else {})}


@operation(
    cli=("vm", "exec"),
    sdk="exec_vm",
    profiles=FULL,
    exit_code_key="exit_code",
    title="Run a command in a lifecycle VM",
    destructive=True,
    open_world=True,
)
def vm_exec(
    ctx: Context,
    vm_id: Annotated[str, VM_ID],
    command: Annotated[str | list[str], COMMAND],
    timeout_seconds: Annotated[float, TIMEOUT] = 30.0,
) -> VmExecResult:
    """Run one command in a started VM; output streams, the exit code is data.

    ``command`` is a shell command line (run with ``/bin/sh -lc``) or an argv list (the
    CLI takes the argv after ``--``). Returns what ``run`` returns of its command
    (stdout, stderr, exit_code, timed_out, signal, truncation flags, duration_ms) with
    ``vm_id``, ``environment`` and ``backend``. The VM keeps running.
    Errors: NotFound (unknown id), Expired (its TTL ran out), InvalidState (it is not
    started: names its state), AgentUnavailable (its VM died mid-call).
    """
    how = command_fields(command)
    with open_workspaces(ctx, Kind.VM) as workspaces, ctx.running_command() as output:
        with workspaces.agent(vm_id, "exec") as agent:
            record = workspaces.store.get(vm_id)
            result = agent.exec(
                **how,
                timeout_s=timeout_seconds,
                output_cap=DEFAULT_OUTPUT_CAP,
                on_output=output,
                cancel=ctx.cancelled,
            )
        return {
            "vm_id": record.id,
            "environment": record.environment,
            "command": command,
            **result.to_dict(),
            "backend": record.backend,
        }


@operation(
    cli=("vm", "stop"),
    sdk="stop_vm",
    profiles=FULL,
    progress=True,
    title="Stop a lifecycle VM",
    destructive=True,
    idempotent=True,
)
def vm_stop(ctx: Context, vm_id: Annotated[str, VM_ID]) -> VmStopResult:
    """Power a started VM off (state ``stopped``); its root disk is kept for a later
    start. Errors: NotFound, Expired, InvalidState (it is not started)."""
    with open_workspaces(ctx, Kind.VM) as workspaces:
        return vms.vm_view(workspaces.stop(vm_id, progress=ctx.progress))


@operation(
    cli=("vm", "delete"),
    sdk="delete_vm",
    profiles=FULL,
    title="Delete a lifecycle VM",
    destructive=True,
    idempotent=True,
)
def vm_delete(ctx: Context, vm_id: Annotated[str, VM_ID]) -> VmDeleteResult:
    """Delete a VM in any state: its VMM, its network link, its disk and its record.
    Errors: NotFound (unknown id), Expired (its TTL had already deleted it)."""
    with open_workspaces(ctx, Kind.VM) as workspaces:
        return {"deleted": workspaces.delete(vm_id)["deleted"]}


@operation(
    cli=("vm", "status"),
    sdk="status_vm",
    profiles=FULL,
    title="Show a lifecycle VM",
    read_only=True,
)
def vm_status(ctx: Context, vm_id: Annotated[str, VM_ID]) -> VmStatusResult:
    """A VM's record: vm_id, environment, state (created, started, stopped, ...) and why,
    vcpu_count, mem_mib, ttl_seconds, created_at, expires_at (epoch seconds),
    network_enabled, guest_ip (when networked), backend and VMM pid.
    Errors: NotFound (unknown id), Expired (its TTL ran out: it is deleted now)."""
    with open_workspaces(ctx, Kind.VM) as workspaces:
        workspaces.reconcile_one(vm_id)
        return vms.vm_view(workspaces.store.get(vm_id))


@operation(
    cli=("vm", "network"),
    sdk="network_info_vm",
    profiles=FULL,
    title="Show a lifecycle VM's network",
    read_only=True,
)
def vm_network_info(ctx: Context, vm_id: Annotated[str, VM_ID]) -> VmNetworkInfoResult:
    """A VM's network: its policy and, while it is started, the guest's IP, gateway, MAC
    and TAP device. Errors: NotFound (unknown id), Expired (its TTL ran out)."""
    with open_workspaces(ctx, Kind.VM) as workspaces:
        workspaces.reconcile_one(vm_id)
        record = workspaces.store.get(vm_id)
        return {"vm_id": record.id, **vms.network_of(record)}


@operation(
    cli=("vm", "reap-expired"),
    sdk="reap_expired",
    profiles=FULL,
    title="Delete expired lifecycle VMs",
    destructive=True,
    idempotent=True,
)
def vm_reap_expired(ctx: Context) -> VmReapExpiredResult:
    """Delete every VM whose TTL has run out now (the keeper does it on time anyway; this
    does it at once): ``{"deleted": [vm ids], "count": n}``."""
    with open_workspaces(ctx, Kind.VM) as workspaces:
        deleted = vms.reap_expired(workspaces)
        return {"deleted": deleted, "count": len(deleted)}
