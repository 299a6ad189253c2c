"""pyro on a real Ray cluster (tests/cluster/conftest.py: a head and two pyro nodes on
127.0.0.1): placement across nodes, the workspace loop through the cluster client, a
batch of one-shot runs spread over both nodes, the CLI and MCP over the cluster, and a
node that is killed: its workspaces reported lost, naming it, while the other goes on.
The kill comes last: the tests share one cluster, in this order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bench.cluster import LocalCluster

from pyro_mcp.errors import NodeLost
from pyro_mcp.runtime.paths import RuntimePaths

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def client(ray_cluster: LocalCluster) -> Iterator[Any]:
    from pyro_mcp.cluster import connect

    cluster = connect(ray_cluster.address)
    yield cluster
    for row in cluster.list_workspaces()["workspaces"]:  # whatever a failed test left
        cluster.delete_workspace(row["workspace_id"])


def _listening(pids: list[int]) -> list[str]:
    """The local address of every TCP socket ``pids`` listen on (from /proc)."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                found.append(fields[1].split(":")[0])
    return found


def test_every_ray_process_listens_on_loopback_only(ray_cluster: LocalCluster) -> None:
    addresses = _listening(ray_cluster.processes())
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, ::ffff:127.0.0.1
    assert addresses and set(addresses) <= loopback, addresses


def test_the_nodes_say_what_they_can_take(client: Any) -> None:
    nodes = client.nodes()
    assert [(n["node"], n["alive"]) for n in nodes] == [("node-a", True), ("node-b", True)]
    for node in nodes:
        assert node["vm_slots"] > 0 and node["free_mem_mib"] > 0
        assert "debian:12" in node["environments"] and node["backend"]


def test_an_environment_pulled_over_the_cluster_reaches_every_node(client: Any) -> None:
    pulled = client.pull_environment("debian:12")  # installed on both: nothing to fetch
    assert sorted(pulled["nodes"]) == ["node-a", "node-b"]
    assert all(each["installed"] for each in pulled["nodes"].values()), pulled


def test_two_workspaces_land_on_different_nodes_and_work_through_the_client(client: Any) -> None:
    first = client.create_workspace("debian:12", name="first")
    second = client.create_workspace("debian:12")
    assert {first["node"], second["node"]} == {"node-a", "node-b"}
    wid = first["workspace_id"]
    assert client.exec_workspace(wid, "uname -n; exit 3")["exit_code"] == 3
    client.write_workspace_file(wid, "notes.txt", text="through the cluster\n")
    read = client.read_workspace_file("first", "notes.txt")  # by name, on its node
    assert (read["content"], read["node"]) == ("through the cluster\n", first["node"])
    diff = client.diff_workspace(wid)
    assert "+++ b/notes.txt" in diff["patch"] and diff["node"] == first["node"]
    other = client.exec_workspace(second["workspace_id"], ["cat", "notes.txt"])
    assert other["exit_code"] != 0  # the other workspace, on the other node, has no such file
    listed = client.list_workspaces()
    rows = {row["workspace_id"]: row["node"] for row in listed["workspaces"]}
    assert rows == {wid: first["node"], second["workspace_id"]: second["node"]}
    assert listed["count"] == 2
    for made in (first, second):
        client.delete_workspace(made["workspace_id"])
    assert client.list_workspaces()["workspaces"] == []


def test_a_batch_of_runs_spreads_over_both_nodes(client: Any) -> None:
    specs = [{"environment": "debian:12", "command": "true"} for _ in range(20)]
    outcomes = list(client.map_runs(specs, max_in_flight=4))
    assert sorted(o["index"] for o in outcomes) == list(range(20))
    assert all(o["ok"] and o["result"]["exit_code"] == 0 for o in outcomes), outcomes
    by_node = {name: sum(o["node"] == name for o in outcomes) for name in ("node-a", "node-b")}
    assert min(by_node.values()) >= 5, by_node


def test_a_bad_run_in_a_batch_fails_alone_with_its_own_error(client: Any) -> None:
    specs = [
        {"environment": "debian:12", "command": "echo fine"},
        {"environment": "debian:12", "command": "true", "timeout_seconds": float("nan")},
        {"environment": "no-such:1", "command": "true"},
    ]
    outcomes = {o["index"]: o for o in client.map_runs(specs)}
    assert outcomes[0]["ok"] and outcomes[0]["result"]["stdout"] == "fine\n"
    assert outcomes[1]["error"]["error"] == "invalid_argument"
    assert outcomes[2]["error"]["error"] == "not_found" and outcomes[2]["node"]


def _pyro(ray_cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYRO_CLUSTER=ray_cluster.address)
    return subprocess.run(
        [sys.executable, "-m", "pyro_mcp.cli.main", *args],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


def test_the_cli_runs_on_the_cluster(client: Any, ray_cluster: LocalCluster) -> None:
    made = _pyro(ray_cluster, "workspace", "create", "debian:12", "--json")
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    wid = created["workspace_id"]
    ran = subprocess.run(
        [sys.executable, "-m", "pyro_mcp.cli.main", "--cluster", ray_cluster.address,
         "workspace", "exec", wid, "--", "sh", "-c", "echo on-$(hostname)"],
        capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYRO_CLUSTER"},
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == f"on-pyro-{wid[:8]}\n"  # the command's output, printed as it is
    listed = json.loads(_pyro(ray_cluster, "workspace", "list", "--json").stdout)
    assert [(r["workspace_id"], r["node"]) for r in listed["workspaces"]] == [
        (wid, created["node"])
    ]
    stdin = _pyro(ray_cluster, "workspace", "file", "write", wid, "x.txt", "--stdin")
    assert stdin.returncode == 2 and "over a cluster" in stdin.stderr
    assert _pyro(ray_cluster, "workspace", "delete", wid).returncode == 0


def test_one_mcp_endpoint_fronts_the_whole_cluster(
    client: Any, ray_cluster: LocalCluster, runtime: RuntimePaths, tmp_path: Any
) -> None:
    from mcp import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "pyro_mcp.cli.main", "mcp", "serve", "--cluster", ray_cluster.address],
        env={k: v for k, v in os.environ.items() if k != "PYRO_CLUSTER"},
        cwd=str(tmp_path),
    )

    async def drive() -> list[Any]:
        with open(os.devnull, "w") as errlog:
            async with (
                stdio_client(params, errlog=errlog) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                made = await session.call_tool("workspace_create", {"environment": "debian:12"})
                wid = made.structured_content["workspace_id"]
                ran = await session.call_tool(
                    "workspace_exec", {"workspace_id": wid, "command": "echo via-mcp"}
                )
                listed = await session.call_tool("workspace_list", {})
                await session.call_tool("workspace_delete", {"workspace_id": wid})
                return [r.structured_content for r in (made, ran, listed)]

    made, ran, listed = asyncio.run(drive())
    assert made["node"] in ("node-a", "node-b")
    assert (ran["stdout"], ran["node"]) == ("via-mcp\n", made["node"])
    assert [r["node"] for r in listed["workspaces"]] == [made["node"]]


# --- last: a node is lost -----------------------------------------------------------------


def test_a_killed_node_loses_its_workspaces_honestly_and_the_other_goes_on(
    client: Any, ray_cluster: LocalCluster
) -> None:
    on = {}
    for _ in range(2):
        made = client.create_workspace("debian:12")
        on[made["node"]] = made["workspace_id"]
    assert set(on) == {"node-a", "node-b"}
    # Two one-shot runs in flight, one per node; one of them may be retried elsewhere.
    specs = [
        {"environment": "debian:12", "command": "sleep 8; echo done"},
        {"environment": "debian:12", "command": "sleep 8; echo done", "retryable": True},
    ]
    outcomes: list[dict[str, Any]] = []
    batch = threading.Thread(target=lambda: outcomes.extend(client.map_runs(specs)))
    batch.start()
    deadline = time.monotonic() + 60
    while not all(n["in_flight"] >= 1 for n in client.nodes()):
        assert time.monotonic() < deadline, "the runs never started on both nodes"
        time.sleep(0.2)
    time.sleep(2)  # both VMs are running their command

    ray_cluster.kill("node-a")
    killed = time.monotonic()
    lost = on["node-a"]
    while client.workspace_status(lost)["state"] != "lost":
        assert time.monotonic() - killed < 15, "the lost node's workspace was never reported"
        time.sleep(0.2)
    status = client.workspace_status(lost)
    assert (status["state"], status["node"]) == ("lost", "node-a")
    with pytest.raises(NodeLost) as refused:
        client.exec_workspace(lost, "true")
    assert refused.value.node == "node-a"
    assert refused.value.message == f"workspace {lost} is lost: its node node-a is gone"
    listed = {
        r["workspace_id"]: (r["state"], r["node"]) for r in client.list_workspaces()["workspaces"]
    }
    assert listed[lost] == ("lost", "node-a")
    assert listed[on["node-b"]] == ("running", "node-b")
    # The other node goes on, and new work goes there.
    assert client.exec_workspace(on["node-b"], "echo alive")["stdout"] == "alive\n"
    assert client.create_workspace("debian:12")["node"] == "node-b"
    assert [(n["node"], n["alive"]) for n in client.nodes()] == [
        ("node-b", True),
        ("node-a", False),
    ]

    batch.join(timeout=120)
    by_index = {o["index"]: o for o in outcomes}
    assert sorted(by_index) == [0, 1]
    plain, retried = by_index[0], by_index[1]
    if plain["ok"]:  # the plain run was on node-b: the retryable one was on node-a
        assert (plain["node"], plain["attempts"]) == ("node-b", 1)
        assert retried["ok"] and (retried["node"], retried["attempts"]) == ("node-b", 2)
    else:  # the plain run was on node-a: lost, and said so
        assert plain["error"]["error"] == "node_lost" and plain["error"]["node"] == "node-a"
        assert retried["ok"] and retried["result"]["stdout"] == "done\n"
    # Deleting the lost workspace forgets it; nothing of it is recreated anywhere.
    assert client.delete_workspace(lost)["lost"] is True
    assert lost not in {r["workspace_id"] for r in client.list_workspaces()["workspaces"]}
    for row in client.list_workspaces()["workspaces"]:
        client.delete_workspace(row["workspace_id"])
    ray_cluster.restart("node-a")  # its host's VMs, ended as pyro would on its next start
