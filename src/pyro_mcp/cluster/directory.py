"""Which node owns each workspace and VM of a cluster (a Ray actor on the head node).

Every client of the cluster (SDK programs, CLI calls, an MCP server) records here the node
a workspace or VM was created on, and looks it up for every later call on it, so a
call reaches the node that holds it whichever client makes it. It also remembers each
node's name, so a node that is gone can still be named when its workspaces are reported
lost. It lives as long as the cluster's head does (a detached actor).
"""

from __future__ import annotations

import threading


class Directory:
    """Owners by kind (``workspace``, ``vm``): id → node id, name → id; node names."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: dict[tuple[str, str], str] = {}
        self._names: dict[tuple[str, str], str] = {}
        self._node_names: dict[str, str] = {}

    def add_node(self, node_id: str, name: str) -> None:
        with self._lock:
            self._node_names[node_id] = name

    def node_names(self) -> dict[str, str]:
        with self._lock:
            return dict(self._node_names)

    def record(self, kind: str, ident: str, name: str | None, node_id: str) -> None:
        with self._lock:
            self._owner[(kind, ident)] = node_id
            if name:
                self._names[(kind, name)] = ident

    def lookup(self, kind: str, ref: str) -> tuple[str, str] | None:
        """(id, node id) of the ``kind`` named ``ref`` by id or name, None if unknown."""
        with self._lock:
            ident = ref if (kind, ref) in self._owner else self._names.get((kind, ref))
            if ident is None or (kind, ident) not in self._owner:
                return None
            return ident, self._owner[(kind, ident)]

    def forget(self, kind: str, ident: str) -> None:
        with self._lock:
            self._owner.pop((kind, ident), None)
            for key in [k for k, v in self._names.items() if k[0] == kind and v == ident]:
                del self._names[key]

    def rename(self, kind: str, ident: str, name: str | None) -> None:
        with self._lock:
            for key in [k for k, v in self._names.items() if k[0] == kind and v == ident]:
                del self._names[key]
            if name:
                self._names[(kind, name)] = ident

    def on_node(self, node_id: str) -> list[tuple[str, str, str | None]]:
        """(kind, id, name) of everything recorded on ``node_id``."""
        with self._lock:
            names = {(k, v): n for (k, n), v in self._names.items()}
            return [
                (kind, ident, names.get((kind, ident)))
                for (kind, ident), owner in self._owner.items()
                if owner == node_id
            ]
