"""Whether a workspace VM may start, and who is changing a workspace.

Admission refuses a VM that would take the host past its limits (the number of live
workspaces, and memory counted as each VMM really costs); the store runs it in the
transaction that records the VM's claim. A create, start or stop records its process as
the workspace's ``owner`` (``pid:start time``): whether that process still runs decides
whether the change is under way, never a clock.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyro_mcp.errors import InvalidArgument, TooLarge
from pyro_mcp.vmm.identity import start_time

if TYPE_CHECKING:
    from pyro_mcp.vmm.launch import BackendChoice
    from pyro_mcp.workspace.records import WorkspaceRecord

MAX_WORKSPACES_ENV = "PYRO_MAX_WORKSPACES"
MEMORY_SHARE = 0.9  # of host memory that workspace VMs may reserve together


@dataclass(frozen=True)
class Limits:
    """How many workspaces may live at once, and how much memory they may reserve."""

    max_workspaces: int
    max_reserved_mem_mib: int

    @classmethod
    def for_host(cls) -> Limits:
        from pyro_mcp.runtime.host_probe import probe_platform

        total = int(probe_platform().get("memory_bytes") or 0) // (1 << 20)
        budget = int(total * MEMORY_SHARE) if total else 1 << 20
        configured = os.environ.get(MAX_WORKSPACES_ENV)
        if configured is not None and not configured.isdigit():
            raise InvalidArgument(f"{MAX_WORKSPACES_ENV} must be a whole number")
        # Without a configured limit, memory is the bound (at 128 MiB per workspace).
        count = int(configured) if configured else max(1, budget // 128)
        return cls(count, budget)


def check_sizes(vcpu: int, mem: int, disk: int | None, ttl: float | None) -> None:
    """Sizes within bounds (``disk`` None: a VM, which has no workspace disk)."""
    if not 1 <= vcpu <= 32:
        raise InvalidArgument(f"vcpu_count must be between 1 and 32, got {vcpu}")
    if not 128 <= mem <= 65536:
        raise InvalidArgument(f"mem_mib must be between 128 and 65536, got {mem}")
    if disk is not None and not 16 <= disk <= 1 << 20:
        raise InvalidArgument(f"disk_mib must be between 16 and 1048576, got {disk}")
    if ttl is not None and ttl <= 0:
        raise InvalidArgument(f"ttl_seconds must be positive, got {ttl}")


def admit(limits: Limits, mem_mib: int, choice: BackendChoice, live: list[WorkspaceRecord]) -> None:
    from pyro_mcp.vmm.launch import overhead_mib

    if len(live) >= limits.max_workspaces:
        raise TooLarge(
            f"{len(live)} workspaces are live, the limit is {limits.max_workspaces}",
            hint=f"stop or delete one, or raise {MAX_WORKSPACES_ENV}",
        )
    reserved = sum(r.mem_mib + overhead_mib(r.backend) for r in live)
    wanted = mem_mib + overhead_mib(choice.label)
    if reserved + wanted > limits.max_reserved_mem_mib:
        raise TooLarge(
            f"starting another {mem_mib} MiB workspace ({wanted} MiB with its VMM) would "
            f"reserve {reserved + wanted} MiB of the {limits.max_reserved_mem_mib} MiB "
            "this host allows",
            hint="stop a workspace or ask for less memory with --mem-mib",
        )


def this_owner() -> str:
    """This process, as a workspace's ``owner`` while it creates or starts it."""
    return f"{os.getpid()}:{start_time(os.getpid())}"


def owner_alive(owner: str | None) -> bool:
    """Whether the process ``owner`` names still runs (the same process: its start time)."""
    pid, _, started = (owner or "").partition(":")
    if not pid.isdigit() or not started.isdigit():
        return False
    return start_time(int(pid)) == int(started)
