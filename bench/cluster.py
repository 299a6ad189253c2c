"""A local pyro cluster on Ray (a head and pyro nodes as separate processes, all on
127.0.0.1), for the cluster rows of ``make bench`` and the tests of tests/cluster/; and
those rows: the cluster client's overhead over a local SDK call, and the throughput of a
batch of one-shot runs over one node and over two."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyro_mcp.cluster.client import LOOPBACK_ENV

# A node that stops answering is declared dead within about 1.5 s.
HEALTH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 3,
}


@dataclass
class PyroHost:
    name: str
    state_dir: Path
    run_root: Path
    node: Any  # ray's handle on the node's processes
    killed: bool = False


@dataclass
class LocalCluster:
    address: str
    cluster: Any  # ray.cluster_utils.Cluster
    cache_dir: Path
    work: Path
    hosts: dict[str, PyroHost] = field(default_factory=dict)

    def add(self, name: str) -> PyroHost:
        """Start pyro node ``name``: a Ray node with the ``pyro_node`` resource and its
        own state and run directories (the runtime cache is shared: it only reads it)."""
        state = self.work / name / "state"
        run_root = Path(f"/tmp/pyro-ray-{os.getpid()}-{name}")  # short: socket paths
        env = {
            "PYRO_NODE_NAME": name,
            "PYRO_STATE_DIR": str(state),
            "PYRO_RUN_DIR": str(run_root),
            "PYRO_CACHE_DIR": str(self.cache_dir),
        }
        node = self.cluster.add_node(
            num_cpus=1, resources={"pyro_node": 1}, node_ip_address="127.0.0.1", env_vars=env
        )
        self.cluster.wait_for_nodes()
        host = self.hosts[name] = PyroHost(name, state, run_root, node)
        return host

    def kill(self, name: str) -> None:
        """Kill every process of pyro node ``name`` at once (its raylet and the workers
        under it, the pyro node actor among them), as a host that loses power would."""
        host = self.hosts[name]
        raylets = [p.process.pid for p in host.node.all_processes["raylet"]]
        for pid in [*descendants(raylets), *raylets]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        host.killed = True

    def restart(self, name: str) -> None:
        """What pyro started again on a node's host does first: end the VMs its records
        still name (those of runs that died with it keep their cgroups until then)."""
        from pyro_mcp.vmm.recorded import end_vmm

        host = self.hosts[name]
        if host.run_root.exists():
            for run_dir in sorted(host.run_root.iterdir()):
                end_vmm(run_dir)

    def processes(self) -> list[int]:
        """Every process of the cluster: each node's own (GCS, raylet, agents...) and
        everything under them (the workers, the pyro node actors among them)."""
        own = [
            p.process.pid
            for node in [self.cluster.head_node, *[h.node for h in self.hosts.values()]]
            if node is not None
            for kind in node.all_processes.values()
            for p in kind
        ]
        return sorted({*own, *descendants(own)})


@contextlib.contextmanager
def local_cluster(cache_dir: Path, names: tuple[str, ...] = ()) -> Iterator[LocalCluster]:
    """A head (no CPUs: it runs no VMs) and pyro nodes ``names``; everything stopped
    after. Call before anything imports Ray in this process (it must take loopback)."""
    os.environ[LOOPBACK_ENV] = "0"
    import ray
    from ray.cluster_utils import Cluster

    work = Path(tempfile.mkdtemp(prefix="pyro-ray-"))
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
            "_system_config": HEALTH,
        },
    )
    made = LocalCluster(cluster.address, cluster, cache_dir, work)
    try:
        for name in names:
            made.add(name)
        yield made
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def descendants(pids: list[int]) -> list[int]:
    """Every process under ``pids`` (children, theirs...), from /proc."""
    found: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.append(child)
                    todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] not in "ZX"


# --- the bench rows ------------------------------------------------------------------------

CLUSTER_EXEC_ROW = ("cluster client exec `true` round trip (Ray, one node)", "ms", 1)
LOCAL_EXEC_ROW = ("  the same call through the local SDK", "ms", 1)
OVERHEAD_ROW = ("  cluster overhead per call (cluster - local p50)", "ms", 1)
BATCH_ONE_ROW = ("batch of one-shot `true` runs, one node (map_runs)", "runs/s", 2)
BATCH_TWO_ROW = ("  the same batch over two nodes", "runs/s", 2)


def measure_cluster(table: Any, cache_dir: Path, environment: str, calls: int, runs: int) -> None:
    """The cluster rows: ``calls`` exec round trips each way, a batch of ``runs``."""
    from pyro_mcp.cluster import connect
    from pyro_mcp.sdk import Pyro

    rows = [
        table.row(*spec)
        for spec in (CLUSTER_EXEC_ROW, LOCAL_EXEC_ROW, OVERHEAD_ROW, BATCH_ONE_ROW, BATCH_TWO_ROW)
    ]
    rows[3].note = f"{runs} runs, at most 4 in flight, after an untimed batch warms each node"
    with local_cluster(cache_dir, ("node-a",)) as made:
        cluster = connect(made.address)
        local = Pyro(cache_dir=cache_dir)
        remote_ws = cluster.create_workspace(environment)["workspace_id"]
        local_ws = local.create_workspace(environment)["workspace_id"]
        try:
            for client, wid, row in ((cluster, remote_ws, rows[0]), (local, local_ws, rows[1])):
                client.exec_workspace(wid, ["true"])  # warm, untimed
                for _ in range(calls):
                    started = time.perf_counter()
                    client.exec_workspace(wid, ["true"])
                    row.add((time.perf_counter() - started) * 1000)
            local_p50 = sorted(rows[1].samples)[len(rows[1].samples) // 2]
            for sample in rows[0].samples:
                rows[2].add(sample - local_p50)
        finally:
            cluster.delete_workspace(remote_ws)
            local.delete_workspace(local_ws)
        specs = [{"environment": environment, "command": "true"} for _ in range(runs)]
        for row, more in ((rows[3], None), (rows[4], "node-b")):
            if more is not None:
                made.add(more)
                time.sleep(1.5)  # the client's view of the nodes is at most 1 s old
            list(cluster.map_runs(specs[:4], max_in_flight=4))  # each node's actor warm
            started = time.perf_counter()
            done = [o for o in cluster.map_runs(specs, max_in_flight=4) if o["ok"]]
            if len(done) == runs:
                row.add(runs / (time.perf_counter() - started))
            else:
                row.note = f"{runs - len(done)} of {runs} runs failed"
