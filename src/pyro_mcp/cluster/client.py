"""A client of a pyro cluster on Ray, with the methods of :class:`~pyro_mcp.Pyro`.

``connect(address)`` joins the Ray cluster at ``address`` (``PYRO_CLUSTER`` when none is
given) and returns a :class:`Cluster`: a ``Pyro`` whose every call, once its arguments
are checked here, goes to a node (:mod:`pyro_mcp.cluster.node`) instead of running here.
Where it goes:

- a call on a workspace or VM (it takes ``workspace_id`` or ``vm_id``) goes to the node
  that owns it, as the cluster's directory (:mod:`pyro_mcp.cluster.directory`) records;
- ``create_workspace``, ``create_vm`` and ``run_in_vm`` go to the node that can best take
  them: among those with a VM slot and the memory left, one that holds the environment
  and a warm template of it first, then the one with the most room (counting the calls
  this client has in flight there), so a batch spreads;
- listing workspaces, reconcile, reaping expired VMs, and the host-wide builds and pulls
  (environments, templates, runtime) run on every node, their results merged;
- anything else (a doctor, the catalog...) runs on the first node by name.

A node that is gone is reported, never papered over: its workspaces are listed with the
state ``lost`` and the node's name, ``workspace_status`` says so, any other call on them
raises :class:`~pyro_mcp.errors.NodeLost` (deleting one forgets it), and a call that was
running there fails with NodeLost; nothing is recreated elsewhere. The other nodes go on
serving. :meth:`Cluster.map_runs` runs a batch of one-shot runs, streaming each outcome
as it finishes, and retries a run whose node was lost on another node when the run is
marked ``retryable``.

Host paths in arguments (seeds, exports) name files on the node that runs the call.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyro_mcp.api.context import Context
from pyro_mcp.errors import InvalidArgument, NodeLost, PyroError, RuntimeMissing
from pyro_mcp.sdk import Pyro

if TYPE_CHECKING:
    from pyro_mcp.api.registry import Operation, Surface

CLUSTER_ENV = "PYRO_CLUSTER"
# Ray's switch (named for macOS and Windows) that makes every address it takes 127.0.0.1.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
NAMESPACE = "pyro-mcp"
NODE_RESOURCE = (
    "pyro_node"  # what a host advertises: `ray start ... --resources '{"pyro_node": 1}'`
)
DIRECTORY_ACTOR = "pyro-directory"
NODE_ACTOR = "pyro-node-"  # + the Ray node id
NODE_CONCURRENCY = 64  # calls one node's actor runs at once (each in its own thread)
PROBE_TIMEOUT_S = 10.0  # for a node to say what it can take, or who it is
REFRESH_S = 1.0  # how stale the list of live nodes may be

KINDS = {"workspace_id": "workspace", "vm_id": "vm"}
CREATES = {"workspace_create": "workspace", "vm_create": "vm", "vm_run": None}
DELETES = {"workspace_delete", "vm_delete"}
STATUSES = {"workspace_status", "vm_status"}
# Every node does these, and the results are merged.
EVERY_NODE = frozenset(
    {
        "workspace_list", "reconcile", "vm_reap_expired", "env_pull", "env_import",
        "env_build", "env_prune", "template_build", "template_prune", "runtime_fetch",
        "runtime_build_kernel", "runtime_build_rootfs",
    }
)  # fmt: skip
# What reads the terminal of the process that runs the operation: not across a cluster.
LOCAL_ONLY = {
    "stdin": "--stdin reads this terminal: pass the content as --text or a file instead",
    "follow": "--follow streams to this terminal: read the logs without it",
}


def _stay_on_loopback(address: str) -> None:
    """For a cluster on a loopback address, make this process's Ray speak from loopback
    too (Ray otherwise swaps 127.0.0.1 for the host's outward address, where a cluster
    bound to loopback does not answer): Ray's switch, read when it is first imported, or
    its value if Ray was imported before."""
    import sys

    from pyro_mcp.runtime.loopback import is_loopback_host

    host = address.rsplit(":", 1)[0].strip("[]")
    if not host or not is_loopback_host(host):
        return
    os.environ.setdefault(LOOPBACK_ENV, "0")  # for Ray imported from now on
    if "ray" in sys.modules:  # imported already: the switch it read then, changed
        sys.modules["ray"]._private.ray_constants.ENABLE_RAY_CLUSTER = False


def _answers(address: str) -> None:
    """RuntimeMissing at once when nothing listens at ``address`` (Ray itself would
    retry for a minute before it says so); ``auto`` and other forms are left to Ray."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise RuntimeMissing(
            f"no Ray cluster answers at {address}: {exc.strerror or exc}",
            hint="start its head with `ray start --head`, or check the address "
            f"(--cluster or {CLUSTER_ENV})",
        ) from exc


def connect(address: str | None = None) -> Cluster:
    """A client of the pyro cluster at ``address`` (a Ray address: ``HOST:PORT`` of its
    head, or ``auto``), or ``$PYRO_CLUSTER``."""
    return Cluster(address)


@dataclass
class _Node:
    node_id: str
    name: str
    handle: Any  # the PyroNode actor


@dataclass(frozen=True)
class _Request:
    """One call, as a node runs it: the operation, the surface its arguments were given
    on, the arguments (checked already) and the host roots its paths are confined to."""

    op: Operation
    via: Surface
    arguments: dict[str, Any]
    roots: list[str] | None

    def submit(self, node: _Node) -> Any:
        """Start it on ``node``: the Ray reference of its answer."""
        return node.handle.call.remote(self.op.name, self.via.value, self.arguments, self.roots)


def _memory(request: _Request) -> int:
    """The guest memory (MiB) a create or run asks for: its ``mem_mib``, or the
    operation's default."""
    given = request.arguments.get("mem_mib")
    if isinstance(given, int):
        return given
    param = next((p for p in request.op.params if p.name == "mem_mib"), None)
    return param.default if param is not None and isinstance(param.default, int) else 0


class Cluster(Pyro):
    """The operations of ``Pyro`` over every pyro node of a Ray cluster; plus
    :meth:`nodes` and :meth:`map_runs`."""

    def __init__(self, address: str | None = None) -> None:
        super().__init__()
        self.address = address or os.environ.get(CLUSTER_ENV) or ""
        if not self.address:
            raise InvalidArgument(
                "no cluster address", hint=f"pass the Ray head's HOST:PORT or set {CLUSTER_ENV}"
            )
        _stay_on_loopback(self.address)
        _answers(self.address)
        import ray

        if not ray.is_initialized():
            try:
                ray.init(
                    address=self.address,
                    namespace=NAMESPACE,
                    log_to_driver=False,
                    logging_level="ERROR",
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise RuntimeMissing(
                    f"no Ray cluster answers at {self.address}: {exc}",
                    hint="start its head with `ray start --head` and each host with "
                    "`ray start --address HEAD --resources '{\"pyro_node\": 1}'`",
                ) from exc
        self._lock = threading.RLock()  # one refresh of the node list at a time
        self._nodes: dict[str, _Node] = {}  # live ones, by Ray node id
        self._gone: set[str] = set()  # nodes whose pyro actor died: never asked again
        self._names: dict[str, str] = {}  # every node ever seen, by Ray node id
        self._refreshed = 0.0
        self._in_flight: Counter[str] = Counter()
        self._directory = self._directory_actor()
        self._refresh(force=True)

    # -- what the SDK's methods call ----------------------------------------------------
    def _context(self) -> Context:
        ctx = super()._context()
        ctx.remote = self.dispatch
        return ctx

    def dispatch(self, op: Operation, via: Surface, arguments: dict[str, Any], ctx: Context) -> Any:
        """Run ``op`` (its ``arguments`` checked already) where the cluster places it."""
        for name, why in LOCAL_ONLY.items():
            if arguments.get(name):
                raise InvalidArgument(f"{op.name} over a cluster: {why}")
        roots = None if ctx.host_paths.roots is None else [str(r) for r in ctx.host_paths.roots]
        request = _Request(op, via, arguments, roots)
        if op.name in EVERY_NODE:
            return self._on_every_node(request)
        key = next((k for k in KINDS if k in arguments), None)
        if key is not None:
            result = self._on_owner(request, key)
        elif op.name in CREATES:
            result = self._placed(request)
        else:
            result = self._call(self._first_node(), request)
        if ctx.output is not None and isinstance(result, dict):  # its output, as a whole
            for stream in ("stdout", "stderr"):
                if isinstance(result.get(stream), str) and result[stream]:
                    ctx.output(stream, result[stream].encode())
        return result

    # -- the nodes --------------------------------------------------------------------
    def nodes(self) -> list[dict[str, Any]]:
        """Every node seen: its name, whether it is alive and, for a live one, what it
        can take (``vm_slots``, ``free_mem_mib``, ``environments``, ``templates``,
        ``backend``, ``in_flight``)."""
        self._refresh(force=True)
        live = list(self._nodes.values())
        capacities = self._capacities(live)
        rows = [{**capacities.get(n.node_id, {"node": n.name}), "alive": True} for n in live]
        for node_id, name in sorted(self._names.items(), key=lambda item: item[1]):
            if node_id not in self._nodes:
                rows.append({"node": name, "node_id": node_id, "alive": False})
        return sorted(rows, key=lambda row: (not row["alive"], row["node"]))

    def _refresh(self, *, force: bool = False) -> None:
        import ray

        with self._lock:
            if not force and time.monotonic() - self._refreshed < REFRESH_S:
                return
            self._refreshed = time.monotonic()
            alive = {
                n["NodeID"]
                for n in ray.nodes()
                if n.get("Alive") and NODE_RESOURCE in (n.get("Resources") or {})
            } - self._gone
            for node_id in list(self._nodes):
                if node_id not in alive:
                    del self._nodes[node_id]
            for node_id in alive - set(self._nodes):
                node = self._join(node_id)
                if node is not None:
                    self._nodes[node_id] = node
            known: dict[str, str] = ray.get(self._directory.node_names.remote())
            self._names.update(known)

    def _join(self, node_id: str) -> _Node | None:
        """The PyroNode actor of the Ray node ``node_id`` (started there if need be)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from pyro_mcp.cluster.node import PyroNode

        handle = (
            ray.remote(PyroNode)
            .options(
                name=NODE_ACTOR + node_id,
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                resources={NODE_RESOURCE: 1},
                max_concurrency=NODE_CONCURRENCY,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            )
            .remote(node_id)
        )
        try:
            identity = ray.get(handle.identity.remote(), timeout=PROBE_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError):
            return None
        ray.get(self._directory.add_node.remote(node_id, identity["node"]))
        self._names[node_id] = identity["node"]
        return _Node(node_id, identity["node"], handle)

    def _directory_actor(self) -> Any:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from pyro_mcp.cluster.directory import Directory

        head = next(
            n["NodeID"]
            for n in ray.nodes()
            if n.get("Alive") and "node:__internal_head__" in (n.get("Resources") or {})
        )
        return (
            ray.remote(Directory)
            .options(
                name=DIRECTORY_ACTOR,
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                max_concurrency=NODE_CONCURRENCY,
                scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False),
            )
            .remote()
        )

    def _first_node(self) -> _Node:
        self._refresh()
        if not self._nodes:
            raise RuntimeMissing(
                "no pyro node in the cluster",
                hint="start one: `ray start --address HEAD --resources '{\"pyro_node\": 1}'`",
            )
        return min(self._nodes.values(), key=lambda n: n.name)

    def _capacities(self, nodes: Iterable[_Node]) -> dict[str, dict[str, Any]]:
        import ray

        asked = {n.node_id: n.handle.capacity.remote() for n in nodes}
        found: dict[str, dict[str, Any]] = {}
        for node_id, ref in asked.items():
            try:
                found[node_id] = ray.get(ref, timeout=PROBE_TIMEOUT_S)
            except (ray.exceptions.RayError, TimeoutError):
                continue  # gone or stuck: not a place for anything now
        return found

    def _place(self, environment: str | None, mem_mib: int) -> _Node:
        """The node to create on (see the module's docstring)."""
        self._refresh()
        capacities = self._capacities(self._nodes.values())

        def score(node_id: str) -> tuple[int, int, int, int]:
            cap = capacities[node_id]
            holds = int(environment in cap["environments"]) + int(environment in cap["templates"])
            room = cap["vm_slots"] - self._in_flight[node_id]
            return (holds, room, cap["free_mem_mib"], -cap["in_flight"])

        fits = [
            node_id
            for node_id, cap in capacities.items()
            if node_id in self._nodes
            and cap["vm_slots"] - self._in_flight[node_id] > 0
            and cap["free_mem_mib"] >= mem_mib
        ]
        if not fits:
            raise RuntimeMissing(
                f"no pyro node can take a {mem_mib} MiB VM now "
                f"({len(capacities)} node(s) answered)",
                hint="wait for runs to finish, delete workspaces, or add a node",
            )
        return self._nodes[max(fits, key=score)]

    # -- calls ------------------------------------------------------------------------
    def _collect(self, node: _Node, ref: Any) -> Any:
        import ray

        try:
            status, value = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self._gone.add(node.node_id)  # before Ray itself may have noticed
            self._nodes.pop(node.node_id, None)
            raise NodeLost(
                f"node {node.name} is gone: the call it was running is lost ({type(exc).__name__})",
                node=node.name,
            ) from exc
        if status == "error":
            raise value
        return value

    def _call(self, node: _Node, request: _Request) -> Any:
        self._in_flight[node.node_id] += 1
        try:
            result = self._collect(node, request.submit(node))
        finally:
            self._in_flight[node.node_id] -= 1
        return {**result, "node": node.name} if isinstance(result, dict) else result

    def _placed(self, request: _Request) -> Any:
        node = self._place(request.arguments.get("environment"), _memory(request))
        result = self._call(node, request)
        kind = CREATES[request.op.name]
        if kind is not None and isinstance(result, dict):
            ident = result.get("workspace_id" if kind == "workspace" else "vm_id")
            self._record(kind, str(ident), result.get("name"), node)
        return result

    def _record(self, kind: str, ident: str, name: Any, node: _Node) -> None:
        import ray

        ray.get(self._directory.record.remote(kind, ident, name or None, node.node_id))

    def _owner(self, kind: str, ref: str) -> tuple[str, str] | None:
        """(id, Ray node id) of the workspace or VM ``ref``: as the directory records it,
        or (made on a node by another way) as a live node says it holds it."""
        import ray

        found = ray.get(self._directory.lookup.remote(kind, ref))
        if found is not None:
            return (str(found[0]), str(found[1]))
        self._refresh()
        asked = {n.node_id: n.handle.owns.remote(kind, ref) for n in self._nodes.values()}
        for node_id, answer in asked.items():
            try:
                ident = ray.get(answer, timeout=PROBE_TIMEOUT_S)
            except (ray.exceptions.RayError, TimeoutError):
                continue
            if ident is not None:
                ray.get(self._directory.record.remote(kind, ident, None, node_id))
                return (str(ident), node_id)
        return None

    def _on_owner(self, request: _Request, key: str) -> Any:
        import ray

        op, kind = request.op, KINDS[key]
        owner = self._owner(kind, str(request.arguments[key]))
        if owner is None:  # unknown everywhere: a node says so as it says it anywhere
            return self._call(self._first_node(), request)
        ident, node_id = owner
        self._refresh()
        node = self._nodes.get(node_id)
        if node is None:
            return self._lost(op, kind, key, ident, node_id)
        try:
            result = self._call(node, request)
        except NodeLost:  # it went while the call ran
            return self._lost(op, kind, key, ident, node_id)
        if op.name in DELETES:
            ray.get(self._directory.forget.remote(kind, ident))
        elif op.name == "workspace_fork" and isinstance(result, dict):
            self._record(kind, str(result["workspace_id"]), result.get("name"), node)
        elif op.name == "workspace_update" and isinstance(result, dict):
            ray.get(self._directory.rename.remote(kind, ident, result.get("name")))
        return result

    def _lost(self, op: Operation, kind: str, key: str, ident: str, node_id: str) -> Any:
        """What a call on a workspace or VM of a node that is gone gets."""
        import ray

        node = self._names.get(node_id, node_id)
        if op.name in STATUSES:
            return {key: ident, "id": ident, "state": "lost", "node": node}
        if op.name in DELETES:
            ray.get(self._directory.forget.remote(kind, ident))
            return {key: ident, "id": ident, "deleted": True, "lost": True, "node": node}
        raise NodeLost(
            f"{kind} {ident} is lost: its node {node} is gone",
            node=node,
            hint=f"delete it to forget it (`{kind}_delete`); nothing of it was recreated elsewhere",
        )

    def _on_every_node(self, request: _Request) -> dict[str, Any]:
        """``op`` on every live node at once, the results merged: lists joined (each row
        naming its node), counts added, the rest as the first node said, and each node's
        own result under ``nodes``. Listing workspaces adds those of nodes that are gone,
        as ``lost``."""
        import ray

        self._refresh()
        live = sorted(self._nodes.values(), key=lambda n: n.name)
        asked = [(n, request.submit(n)) for n in live]
        merged: dict[str, Any] = {}
        per_node: dict[str, Any] = {}
        for node, ref in asked:
            try:
                result = self._collect(node, ref)
            except NodeLost:
                continue  # gone meanwhile: its workspaces show as lost below
            per_node[node.name] = result
            for name, value in (result or {}).items():
                if isinstance(value, list):
                    rows = [{**v, "node": node.name} if isinstance(v, dict) else v for v in value]
                    merged.setdefault(name, []).extend(rows)
                elif isinstance(value, int) and not isinstance(value, bool):
                    merged[name] = merged.get(name, 0) + value
                else:
                    merged.setdefault(name, value)
        if request.op.name == "workspace_list" and not request.arguments.get("label"):
            for node_id, node_name in self._names.items():
                if node_id in self._nodes:
                    continue
                gone = ray.get(self._directory.on_node.remote(node_id))
                for kind, ident, name in gone:
                    if kind != "workspace":
                        continue
                    merged.setdefault("workspaces", []).append(
                        {"workspace_id": ident, "id": ident, "name": name, "state": "lost",
                         "node": node_name}
                    )  # fmt: skip
                    merged["count"] = merged.get("count", 0) + 1
        merged["nodes"] = per_node
        return merged

    # -- batches of one-shot runs -----------------------------------------------------
    def map_runs(
        self, specs: Iterable[dict[str, Any]], *, max_in_flight: int = 8
    ) -> Iterator[dict[str, Any]]:
        """Run each of ``specs`` (the arguments of ``run_in_vm``, and ``retryable``:
        run it again elsewhere if its node is lost) as a one-shot VM, at most
        ``max_in_flight`` at once across the cluster; yield each outcome as it finishes:
        ``{"index", "node", "ok", "result" | "error", "attempts"}``."""
        import ray

        from pyro_mcp.api.registry import OPERATIONS, Surface, all_operations
        from pyro_mcp.api.validation import check_arguments

        if not 1 <= max_in_flight <= 10_000:
            raise InvalidArgument(f"max_in_flight must be from 1 to 10000, not {max_in_flight}")
        if "vm_run" not in OPERATIONS:
            all_operations()
        op = OPERATIONS["vm_run"]
        waiting: list[tuple[int, dict[str, Any], bool, int]] = []
        for index, spec in enumerate(specs):
            arguments = dict(spec)
            retryable = bool(arguments.pop("retryable", False))
            try:
                check_arguments(op, arguments, Surface.SDK)
            except PyroError as exc:
                yield {"index": index, "node": None, "ok": False, "error": exc.to_dict(),
                       "attempts": 0}  # fmt: skip
                continue
            waiting.append((index, arguments, retryable, 0))
        waiting.reverse()  # popped from the end: in their order
        running: dict[Any, tuple[int, dict[str, Any], bool, int, _Node]] = {}
        while waiting or running:
            while waiting and len(running) < max_in_flight:
                index, arguments, retryable, attempts = waiting.pop()
                request = _Request(op, Surface.SDK, arguments, None)
                try:
                    node = self._place(arguments.get("environment"), _memory(request))
                except PyroError as exc:
                    if running:  # room comes back as runs finish
                        waiting.append((index, arguments, retryable, attempts))
                        break
                    yield {"index": index, "node": None, "ok": False,
                           "error": exc.to_dict(), "attempts": attempts}  # fmt: skip
                    continue
                self._in_flight[node.node_id] += 1
                ref = request.submit(node)
                running[ref] = (index, arguments, retryable, attempts + 1, node)
            if not running:
                continue
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                index, arguments, retryable, attempts, node = running.pop(ref)
                self._in_flight[node.node_id] -= 1
                try:
                    result = self._collect(node, ref)
                except NodeLost as exc:
                    if retryable:
                        waiting.append((index, arguments, retryable, attempts))
                        continue
                    yield {"index": index, "node": node.name, "ok": False,
                           "error": exc.to_dict(), "attempts": attempts}  # fmt: skip
                except PyroError as exc:
                    yield {"index": index, "node": node.name, "ok": False,
                           "error": exc.to_dict(), "attempts": attempts}  # fmt: skip
                else:
                    result = {**result, "node": node.name}
                    yield {"index": index, "node": node.name, "ok": True, "result": result,
                           "attempts": attempts}  # fmt: skip
