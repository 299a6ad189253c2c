"""One host of a pyro cluster: its own runtime, behind a Ray actor.

:class:`PyroNode` runs on the Ray node of a KVM host (one per host, held there by the
``pyro_node`` resource the host advertises) and calls that host's operations exactly as
the CLI, SDK and MCP server do (``OPERATIONS[name].call``: the same registry, the same
checks), on the host's own state (``PYRO_STATE_DIR``, ``PYRO_RUN_DIR`` and
``PYRO_CACHE_DIR`` of the node's environment). It answers ``("ok", result)`` or
``("error", PyroError)``: errors cross as themselves, never as a Ray traceback.

It also says what it can take (:meth:`PyroNode.capacity`): the VM slots and memory its
admission budget has left, the environments and warm templates it holds, its backend.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

from pyro_mcp.errors import PyroError

NODE_NAME_ENV = "PYRO_NODE_NAME"  # how a node is named in records and errors


class PyroNode:
    """This host's pyro runtime, for a cluster (a Ray actor class: see cluster.client)."""

    def __init__(self, ray_node_id: str) -> None:
        self.node_id = ray_node_id
        given = os.environ.get(NODE_NAME_ENV, "").strip()
        self.name = given or f"{socket.gethostname()}-{ray_node_id[:8]}"
        self._backend: str | None = None
        self._lock = threading.Lock()
        self._in_flight = 0

    def identity(self) -> dict[str, str]:
        return {"node": self.name, "node_id": self.node_id}

    def call(
        self, name: str, surface: int, arguments: dict[str, Any], roots: list[str] | None
    ) -> tuple[str, Any]:
        """Operation ``name`` with ``arguments`` as given on ``surface`` (the value of a
        :class:`~pyro_mcp.api.registry.Surface`), host paths confined to ``roots`` when
        given."""
        from pyro_mcp.api.context import Context, HostPathPolicy
        from pyro_mcp.api.registry import OPERATIONS, Surface, all_operations

        with self._lock:
            self._in_flight += 1
        try:
            if name not in OPERATIONS:
                all_operations()
            ctx = Context()
            if roots is not None:
                ctx.host_paths = HostPathPolicy.confined_to(roots)
            return "ok", OPERATIONS[name].call(ctx, Surface(surface), **arguments)
        except PyroError as exc:
            return "error", exc
        except Exception as exc:  # a bug here must still reach the caller as an error
            return "error", PyroError(f"node {self.name}: {type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._in_flight -= 1

    def owns(self, kind: str, ref: str) -> str | None:
        """The id of this host's workspace (``kind`` workspace) or VM (``vm``) named
        ``ref`` by id or name, None when it has none."""
        from pyro_mcp.api.context import Context
        from pyro_mcp.api.operations.workspaces import open_workspaces

        try:
            with open_workspaces(Context(), kind) as workspaces:
                return str(workspaces.store.get(ref).id)
        except PyroError:
            return None

    def capacity(self) -> dict[str, Any]:
        """What this host can take now: VM slots and reservable memory left under its
        admission limits, the memory the kernel has available, the environments and
        warm templates installed, the backend, and calls in flight."""
        from pyro_mcp.api.context import Context
        from pyro_mcp.api.operations.workspaces import open_workspaces
        from pyro_mcp.runtime import environments
        from pyro_mcp.vmm import templates
        from pyro_mcp.vmm.launch import overhead_mib
        from pyro_mcp.workspace.admission import Limits
        from pyro_mcp.workspace.states import RESERVING_STATES

        ctx = Context()
        limits = Limits.for_host()
        with open_workspaces(ctx) as workspaces:
            live = [r for r in workspaces.every_kind().store.list() if r.state in RESERVING_STATES]
        reserved = sum(r.mem_mib + overhead_mib(r.backend) for r in live)
        installed = [row.name for row in environments.list_environments(ctx.paths) if row.installed]
        warm = sorted(
            {
                str(t.manifest.get("inputs", {}).get("environment"))
                for t in templates.installed(ctx.paths)
            }
        )
        return {
            **self.identity(),
            "backend": self._backend_label(ctx),
            "vm_slots": max(0, limits.max_workspaces - len(live)),
            "free_mem_mib": max(0, limits.max_reserved_mem_mib - reserved),
            "available_mem_mib": _available_mib(),
            "environments": installed,
            "templates": warm,
            "in_flight": self._in_flight,
        }

    def _backend_label(self, ctx: Any) -> str | None:
        if self._backend is None:
            from pyro_mcp.vmm.selection import choose_backend

            try:
                self._backend = choose_backend(ctx.paths).label
            except PyroError:
                return None
        return self._backend


def _available_mib() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0
