"""Bringing a workspace's VM up: from a warm template, from its own saved state, or from
its disks, until its agent answers and the record says ``running``.

:func:`boot` decides how (a template fits only a root disk never booted; a restore that
fails falls back to a cold boot when it was a template's) and records the plan it used;
the VM is built, started and checked here (its ``/workspace`` disk mounted, its secrets
given, its ports published) before the store's transition to ``running``. Create, start,
resume and fork (:mod:`pyro_mcp.workspace.lifecycle`, :mod:`pyro_mcp.workspace.memory`)
all come through it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyro_mcp.errors import VMError
from pyro_mcp.workspace import secret_delivery
from pyro_mcp.workspace.paths import WORKSPACE_ROOT
from pyro_mcp.workspace.states import Kind
from pyro_mcp.workspace.store import WorkspaceRecord, noun

if TYPE_CHECKING:
    from collections.abc import Callable

    from pyro_mcp.vmm.attach import AgentEndpoint
    from pyro_mcp.vmm.base import VM, Restore
    from pyro_mcp.vmm.launch import BackendChoice
    from pyro_mcp.vmm.warm import BootPlan
    from pyro_mcp.workspace.layout import WorkspaceFiles
    from pyro_mcp.workspace.lifecycle import Workspaces

    Progress = Callable[[str], None]

AGENT_PORTS = 8  # the agent channels of a workspace VM (templates are made with as many)
BOOT_TIMEOUT_S = 90.0


def boot(
    ws: Workspaces,
    record: WorkspaceRecord,
    files: WorkspaceFiles,
    *,
    choice: BackendChoice,
    progress: Progress,
    first: bool,
    restore: Restore | None = None,
    fresh: bool = False,
) -> None:
    """Bring the workspace's VM up: restored from a template when one fits a root disk
    never booted (a create, or a VM's first start: ``fresh``), restored from
    ``restore`` (a resume or a fork), else booted from its disks."""
    from pyro_mcp.network.policy import NetworkPolicy
    from pyro_mcp.vmm.warm import BootPlan, Shape, cold, plan_boot

    policy = NetworkPolicy.from_dict(record.network)
    plan = cold(f"a stopped {noun(record.kind)} boots from its own disks")
    if restore is not None:
        plan = BootPlan("warm", "restored from its own saved state")
    elif first or fresh:
        shape = Shape(
            record.environment,
            choice,
            record.vcpu_count,
            record.mem_mib,
            AGENT_PORTS,
            workspace_disk=record.kind == Kind.WORKSPACE,
            network=policy.enabled,
        )
        plan = plan_boot(ws.paths, shape, progress=progress)
    try:
        _boot_vm(ws, record, files, choice, progress, first, plan, restore)
    except VMError as exc:
        if plan.template is None:
            raise
        plan = cold(f"restoring failed ({exc.message}); booted instead")
        progress(f"warning: {plan.reason}")
        _boot_vm(ws, record, files, choice, progress, first, plan, None)
    ws.boot_plans[record.id] = plan


def _boot_vm(
    ws: Workspaces,
    record: WorkspaceRecord,
    files: WorkspaceFiles,
    choice: BackendChoice,
    progress: Progress,
    first: bool,
    plan: BootPlan,
    restore: Restore | None,
) -> None:
    import secrets
    import shutil

    from pyro_mcp.network.policy import NetworkPolicy
    from pyro_mcp.vmm.base import Disk
    from pyro_mcp.vmm.launch import WORKSPACE_DEVICE, build_spec, create_vm, discard_spec
    from pyro_mcp.workspace import memory

    warm = plan.template is not None
    has_disk = record.kind == Kind.WORKSPACE  # a VM has no /workspace disk
    spec = build_spec(
        ws.paths,
        environment=record.environment,
        choice=choice,
        vcpu_count=record.vcpu_count,
        mem_mib=record.mem_mib,
        vm_id=record.id,
        root_overlay=files.root_disk(choice.backend),
        base_image=files.base_image,
        extra_disks=(Disk(files.workspace_disk, "raw"),) if has_disk else (),
        kernel_args=() if warm or not has_disk else (f"pyro.workspace={WORKSPACE_DEVICE}",),
        agent_ports=AGENT_PORTS,
        network=NetworkPolicy.from_dict(record.network),
        template=plan.template,
    )
    if restore is not None:
        spec = memory.with_saved_devices(files, dataclasses.replace(spec, restore=restore))
    else:
        memory.record_devices(files, spec)
    try:
        vm = create_vm(ws.paths, spec, choice)
    except BaseException:
        discard_spec(spec)
        raise
    progress(f"booting ({choice.label}, {'restored' if spec.restore else 'cold'})")
    try:
        vm.start()
        client = vm.wait_ready(BOOT_TIMEOUT_S)
        if has_disk:
            _require_workspace_mount(client.hello_info, vm)
        if restore is None:  # a restored guest holds what it was given before
            secret_delivery.deliver(ws.store, ws.vault, record.id, client)
        _publish_ports(record)
    except BaseException:
        vm.kill()
        shutil.rmtree(spec.run_dir, ignore_errors=True)
        raise
    endpoint = _endpoint(vm)
    vm.release_agent()  # later calls attach through a port of their own
    ws.store.transition(
        record.id,
        "running",
        expect={"creating"} if first else {"starting", "resuming"},
        note=f"booted {plan.mode}: {plan.reason}",
        vmm_pid=vm.pid,
        run_dir=str(spec.run_dir),
        backend=choice.label,
        boot_id=secrets.token_hex(8),
        agent_endpoint=endpoint.to_str(),
        error=None,
        owner=None,
    )


def _publish_ports(record: WorkspaceRecord) -> None:
    """The ports given at create, published again at every boot (a host port of 0
    picks a free one each time)."""
    from pyro_mcp.network.link import link_of
    from pyro_mcp.network.ports import check_publish_list, publish_ports

    entries = check_publish_list(record.network.get("publish") or [])
    link = link_of(record.id)
    if entries and link is not None:
        publish_ports(link, entries, "workspace")


def _require_workspace_mount(hello: dict[str, Any], vm: VM) -> None:
    """A workspace guest whose /workspace disk did not mount is refused (its agent would
    serve the root disk's empty directory in its place)."""
    mounts = hello.get("mounts")
    mount = mounts.get(WORKSPACE_ROOT) if isinstance(mounts, dict) else None
    if isinstance(mount, dict) and mount.get("fstype") == "ext4":
        return
    errors = hello.get("boot_errors")
    why = "; ".join(str(e) for e in errors) if isinstance(errors, list) and errors else ""
    raise VMError(
        f"the workspace disk did not mount at {WORKSPACE_ROOT}"
        + (f": {why}" if why else " (the guest reported no reason)"),
        hint="its data is kept; `pyro workspace disk export` copies the disk image out",
        console_tail=vm.console_tail(),
    )


def _endpoint(vm: VM) -> AgentEndpoint:
    from pyro_mcp.vmm.attach import VIRTIO_SERIAL, VSOCK, AgentEndpoint

    vsock = getattr(vm, "vsock_socket", None)
    if isinstance(vsock, Path):
        return AgentEndpoint(VSOCK, vsock)
    return AgentEndpoint(VIRTIO_SERIAL, vm.spec.run_dir, vm.spec.agent_ports)
