"""Rows for guest networking, inside a private network (no packet leaves the host).

pyro's host side runs in the namespace of :func:`pyro_mcp.network.selfcheck.private_internet`.
Workspaces live in a private state directory, deleted at the end (Ctrl-C included).

- create cost of a NIC: wall clock of ``workspace create`` with the policy ``off`` and
  with ``egress`` (TAP, nftables, resolver, guest link), alternating; the rows are both
  distributions, the difference of their medians is what a NIC costs;
- TCP round trip host <-> guest: a 64-byte echo through a published port (127.0.0.1 on
  the host, DNAT to a python3 echo server in the guest), one connection, n exchanges;
- throughput guest -> host: the guest's server writes 64 MiB on a new connection to the
  published port; MiB/s from the first byte read to the last.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.stats import Table
from bench.workspace import delete_all
from pyro_mcp.api.context import Context
from pyro_mcp.api.operations import services as sv
from pyro_mcp.api.operations import workspaces as ws
from pyro_mcp.network.namespace import NAMESPACE_ENV, run_in_namespace
from pyro_mcp.network.resolver_process import UPSTREAMS_ENV
from pyro_mcp.network.selfcheck import SERVER_IP, private_internet
from pyro_mcp.runtime.paths import RuntimePaths

STREAM_MIB = 64
ECHO_PORT, STREAM_PORT = 7000, 7001
CREATE_OFF_ROW = ("workspace create, network off (no NIC)", "ms", 1)
CREATE_NIC_ROW = ("  workspace create, network egress (TAP, nftables, resolver)", "ms", 1)
RTT_ROW = ("TCP round trip host <-> guest, 64 B echo via a published port", "us", 0)
STREAM_ROW = (f"TCP guest -> host, {STREAM_MIB} MiB via a published port", "MiB/s", 1)
NETWORK_ROWS = [CREATE_OFF_ROW, CREATE_NIC_ROW, RTT_ROW, STREAM_ROW]

GUEST_SERVERS = f"""
import socket, threading
def echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
def stream(conn):
    with conn:
        block = bytes(1 << 20)
        for _ in range({STREAM_MIB}):
            conn.sendall(block)
def serve(port, handler):
    listener = socket.create_server(("0.0.0.0", port))
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handler, args=(conn,), daemon=True).start()
threading.Thread(target=serve, args=({STREAM_PORT}, stream), daemon=True).start()
serve({ECHO_PORT}, echo)
"""


@dataclass(frozen=True)
class NetworkCounts:
    creates: int = 3
    round_trips: int = 200
    streams: int = 3

    @classmethod
    def quick(cls) -> NetworkCounts:
        return cls(creates=1, round_trips=20, streams=1)


def measure_network(
    table: Table, paths: RuntimePaths, environment: str, counts: NetworkCounts, mem_mib: int
) -> dict[str, Any]:
    rows = {spec: table.row(*spec) for spec in NETWORK_ROWS}
    state = Path(tempfile.mkdtemp(prefix="pyro-bench-net-", dir="/tmp"))
    ctx = Context(paths=paths, state_dir=state)
    saved = {name: os.environ.get(name) for name in (NAMESPACE_ENV, UPSTREAMS_ENV)}
    try:
        with private_internet("bench") as namespace:
            os.environ[NAMESPACE_ENV] = namespace
            os.environ[UPSTREAMS_ENV] = SERVER_IP
            for _ in range(counts.creates):
                for spec, policy in ((CREATE_OFF_ROW, "off"), (CREATE_NIC_ROW, "egress")):
                    started = time.perf_counter()
                    wid = ws.workspace_create(
                        ctx, environment, mem_mib=mem_mib, network_policy=policy
                    )["id"]
                    rows[spec].add((time.perf_counter() - started) * 1000)
                    ws.workspace_delete(ctx, wid)
            wid = ws.workspace_create(
                ctx,
                environment,
                mem_mib=mem_mib,
                network_policy="egress+published-ports",
            )["id"]
            started = sv.service_start(
                ctx,
                wid,
                "net",
                ["python3", "-c", GUEST_SERVERS],
                ready_tcp=f"127.0.0.1:{ECHO_PORT}",
                publish=[f"0:{ECHO_PORT}", f"0:{STREAM_PORT}"],
            )
            ports = {p["guest_port"]: p["host_port"] for p in started["published_ports"]}
            for sample in run_in_namespace(lambda: _round_trips(ports[ECHO_PORT], counts)):
                rows[RTT_ROW].add(sample)
            for _ in range(counts.streams):
                rows[STREAM_ROW].add(run_in_namespace(lambda: _stream(ports[STREAM_PORT])))
    finally:
        delete_all(ctx)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(state, ignore_errors=True)
    return {}


def _round_trips(port: int, counts: NetworkCounts) -> list[float]:
    samples = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        message = bytes(64)
        for _ in range(counts.round_trips + 5):
            started = time.perf_counter()
            conn.sendall(message)
            got = 0
            while got < len(message):
                got += len(conn.recv(4096))
            samples.append((time.perf_counter() - started) * 1e6)
    return samples[5:]  # the first exchanges warm the path


def _stream(port: int) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        first = conn.recv(1 << 20)
        started, total = time.perf_counter(), len(first)
        while chunk := conn.recv(1 << 20):
            total += len(chunk)
    seconds = time.perf_counter() - started
    if total != STREAM_MIB << 20:
        raise RuntimeError(f"the stream brought {total} bytes, not {STREAM_MIB} MiB")
    return (total / (1 << 20)) / seconds
