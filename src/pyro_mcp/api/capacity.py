"""What this host can take now, as a cluster's placement reads it (pyro_mcp.cluster):
VM slots and reservable memory left under its admission limits, the memory the kernel
has available, the environments and warm templates installed, and its backend."""

from __future__ import annotations

from typing import Any

from pyro_mcp.api.context import Context
from pyro_mcp.errors import PyroError


def host_capacity(ctx: Context) -> dict[str, Any]:
    """This host's room for VMs: ``vm_slots``, ``free_mem_mib`` (under its admission
    limits), ``available_mem_mib`` (the kernel's MemAvailable), ``environments`` and
    ``templates`` (environments with a warm template) installed."""
    from pyro_mcp.api.operations.workspaces import open_workspaces
    from pyro_mcp.runtime import environments
    from pyro_mcp.vmm import templates
    from pyro_mcp.vmm.launch import overhead_mib
    from pyro_mcp.workspace.admission import Limits
    from pyro_mcp.workspace.states import RESERVING_STATES

    limits = Limits.for_host()
    with open_workspaces(ctx) as workspaces:
        live = [r for r in workspaces.every_kind().store.list() if r.state in RESERVING_STATES]
    reserved = sum(r.mem_mib + overhead_mib(r.backend) for r in live)
    installed = [row.name for row in environments.list_environments(ctx.paths) if row.installed]
    made = templates.installed(ctx.paths)
    return {
        "vm_slots": max(0, limits.max_workspaces - len(live)),
        "free_mem_mib": max(0, limits.max_reserved_mem_mib - reserved),
        "available_mem_mib": _available_mib(),
        "environments": installed,
        "templates": sorted({str(t.manifest.get("inputs", {}).get("environment")) for t in made}),
    }


def backend_label(ctx: Context) -> str | None:
    """The backend this host boots guests with (the boot probe's pick), None if none."""
    from pyro_mcp.vmm.selection import choose_backend

    try:
        return choose_backend(ctx.paths).label
    except PyroError:
        return None


def _available_mib() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0
