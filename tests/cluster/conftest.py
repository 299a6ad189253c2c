"""A real Ray cluster on this machine, on 127.0.0.1 only: a head and two pyro nodes, each
a separate set of processes with its own ``PYRO_STATE_DIR`` and ``PYRO_RUN_DIR`` and the
``pyro_node`` resource (bench/cluster.py starts it; the runtime cache is shared). Started
once for the module, stopped after it; nothing of it may be left running then."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench.cluster import LocalCluster, alive, local_cluster
from tests.leftovers import leftovers

from pyro_mcp.cluster.client import LOOPBACK_ENV
from pyro_mcp.runtime.paths import RuntimePaths

# Every Ray process (head, nodes, this driver) takes 127.0.0.1 as its address, never the
# host's other interfaces: read by Ray when it is first imported (just below, for the
# skip), and inherited by the processes it starts.
os.environ[LOOPBACK_ENV] = "0"
pytest.importorskip("ray", reason="the cluster extra: pip install 'pyro-mcp[ray]'")


@pytest.fixture(scope="module")
def ray_cluster(runtime: RuntimePaths) -> Iterator[LocalCluster]:
    processes: list[int] = []
    with local_cluster(runtime.cache_dir, ("node-a", "node-b")) as made:
        try:
            yield made
        finally:
            processes = made.processes()
            problems = _left_on_live_nodes(made)
    problems += _still_running(processes)
    for host in made.hosts.values():
        problems += leftovers(host.run_root)
        if host.run_root.exists() and not any(host.run_root.iterdir()):
            host.run_root.rmdir()
    assert problems == [], problems


def _left_on_live_nodes(made: LocalCluster) -> list[str]:
    """A live node's VMs left (the tests delete what they make) are a failure; a killed
    node's outlive it, as on a real host. Either way they are ended, so nothing is left."""
    problems = []
    for host in made.hosts.values():
        left = sorted(host.run_root.iterdir()) if host.run_root.exists() else []
        if left and not host.killed:
            problems.append(f"VMs left on {host.name}: {[d.name for d in left]}")
        made.restart(host.name)
    return problems


# The host's holder of a template's sealed guest RAM (vmm/qemu/ram_holder.py) is shared by
# every pyro process of the host and ends itself when idle: not the node's to take along.
SHARED_DAEMONS = ("pyro_mcp/vmm/qemu/ram_holder.py",)


def _still_running(pids: list[int]) -> list[str]:
    pids = [pid for pid in pids if not any(d in _cmdline(pid) for d in SHARED_DAEMONS)]
    deadline = time.monotonic() + 15
    running = pids
    while running and time.monotonic() < deadline:
        running = [pid for pid in pids if alive(pid)]
        time.sleep(0.1)
    if not running:
        return []
    named = {pid: _cmdline(pid) for pid in running}
    for pid in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return [f"Ray processes left running: {named}"]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return "?"
