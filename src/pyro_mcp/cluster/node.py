"""One host of a pyro cluster: its own runtime, behind a Ray actor.

:class:`PyroNode` runs on the Ray node of a KVM host (one per host, held there by the
``pyro_node`` resource the host advertises) and calls that host's operations exactly as
the CLI, SDK and MCP server do (``OPERATIONS[name].call``: the same registry, the same
checks), on the host's own state (``PYRO_STATE_DIR``, ``PYRO_RUN_DIR`` and
``PYRO_CACHE_DIR`` of the node's environment). It answers ``("ok", result)`` or
``("error", PyroError)``: errors cross as themselves, never as a Ray traceback.

It also says what it can take (:meth:`PyroNode.capacity`): the VM slots and memory its
admission budget has left, the environments and warm templates it holds, its backend
(:mod:`pyro_mcp.api.capacity`: what a surface knows of the host comes through api/).
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
        """What this host can take now (:func:`pyro_mcp.api.capacity.host_capacity`),
        its backend, and the calls in flight here."""
        from pyro_mcp.api.capacity import backend_label, host_capacity
        from pyro_mcp.api.context import Context

        ctx = Context()
        if self._backend is None:
            self._backend = backend_label(ctx)
        return {
            **self.identity(),
            **host_capacity(ctx),
            "backend": self._backend,
            "in_flight": self._in_flight,
        }
