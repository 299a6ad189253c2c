"""Rows for workspace services and shells, timed through the operations a client calls.

All rows share one workspace (no seed) in a private state directory under /tmp; it is
deleted in a ``finally`` (Ctrl-C included) and the directory removed.

Services: host wall clock around ``service_start`` until it returns, i.e. until the
guest agent saw the readiness probe pass (or, with no probe, until the process was
started: the floor). Probes are checked every ``PROBE_INTERVAL_MS``, so a row includes
up to one interval of waiting after the service became ready. Each sample starts a
fresh name (and port) and stops the service afterwards (TERM, grace 1 s; that stop is
its own row). One untimed round of every kind runs first, so the rows measure warm
page caches rather than the first ``python3`` start after boot. A sample counts only
if the service ends in the expected state ("ready", or "running" without a probe).

Shells: one PTY shell; per sample ``echo marker-N`` is written and the output read from
the last cursor (``wait_for_idle_ms`` 0, polled in a loop without sleeping) until a
line that is exactly ``marker-N`` appears (the PTY echo of the typed command does not
count). Timed from before the write to the read that shows the marker; once through
the operations (each call opens the store and attaches, as a client does) and once
through one attached AgentClient, the floor of the same exchange.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.guest import Counts
from bench.stats import Row, Table
from bench.workspace import delete_all
from pyro_mcp.api.context import Context
from pyro_mcp.api.operations import services as sv
from pyro_mcp.api.operations import shells as sh
from pyro_mcp.api.operations import workspaces as ws
from pyro_mcp.api.operations.workspaces import open_workspaces
from pyro_mcp.errors import PyroError
from pyro_mcp.guest.client import AgentClient
from pyro_mcp.runtime.paths import RuntimePaths

PROBE_INTERVAL_MS = 20
STOP_GRACE_S = 1.0
READY_TIMEOUT_S = 30.0
FIRST_PORT = 18000
MARKER_TIMEOUT_S = 10.0
PROBED = f"probe interval {PROBE_INTERVAL_MS} ms"

# (metric, unit, decimals)
NO_PROBE_ROW = ("service start, no probe: `sleep 1000` (state running; the floor)", "ms", 1)
FILE_ROW = (
    f"  -> ready, file probe ({PROBED}): sh touches /tmp/ready-N, execs sleep",
    "ms",
    1,
)
TCP_ROW = (f"  -> ready, tcp probe ({PROBED}): python3 -m http.server", "ms", 1)
HTTP_ROW = (f"  -> ready, http probe ({PROBED}): python3 -m http.server, GET /", "ms", 1)
COMMAND_ROW = (f"  -> ready, command probe `true` ({PROBED}): `sleep 1000`", "ms", 1)
STOP_ROW = (f"  service stop (TERM, grace {STOP_GRACE_S:g} s), any of the above", "ms", 1)
SHELL_OP_ROW = (
    "shell write `echo marker-N` -> marker read (operations, shell_read polled)",
    "ms",
    1,
)
SHELL_ATTACHED_ROW = ("  same through one attached AgentClient (agent.call)", "ms", 1)

SERVICE_ROWS = [NO_PROBE_ROW, FILE_ROW, TCP_ROW, HTTP_ROW, COMMAND_ROW, STOP_ROW]
SHELL_ROWS = [SHELL_OP_ROW, SHELL_ATTACHED_ROW]


@dataclass(frozen=True)
class ServiceCounts:
    """Samples per service probe kind, and shell round trips per way."""

    svc_start: int = 5
    shell_roundtrip: int = 20

    @classmethod
    def quick(cls) -> ServiceCounts:
        return cls(svc_start=2, shell_roundtrip=5)

    @classmethod
    def scaled(cls, repeat: int) -> ServiceCounts:
        """Scaled like :meth:`bench.guest.Counts.scaled` (by ``repeat`` / default cold runs)."""
        base = cls()
        factor = repeat / Counts().cold_run
        return cls(
            svc_start=max(1, round(base.svc_start * factor)),
            shell_roundtrip=max(1, round(base.shell_roundtrip * factor)),
        )


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def _miss(row: Row, what: str) -> None:
    """Note on ``row`` that a sample was not counted, and why (the first reason is kept)."""
    row.note = row.note or f"sample(s) not counted: {what}"


def _reason(exc: BaseException) -> str:
    return (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0][:160]


# -- services -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    """One way of starting a service: its row, the expected state and the start call."""

    label: str
    row: tuple[str, str, int]
    expected: str
    options: Callable[[int], tuple[list[str], dict[str, Any]]]


def _http_server(port: int) -> list[str]:
    return ["python3", "-m", "http.server", str(port), "--bind", "127.0.0.1"]


KINDS = [
    Kind("none", NO_PROBE_ROW, "running", lambda i: (["sleep", "1000"], {})),
    Kind(
        "file",
        FILE_ROW,
        "ready",
        lambda i: (
            ["sh", "-c", f"touch /tmp/ready-{i}; exec sleep 1000"],
            {"ready_file": f"/tmp/ready-{i}"},
        ),
    ),
    Kind(
        "tcp",
        TCP_ROW,
        "ready",
        lambda i: (_http_server(FIRST_PORT + i), {"ready_tcp": f"127.0.0.1:{FIRST_PORT + i}"}),
    ),
    Kind(
        "http",
        HTTP_ROW,
        "ready",
        lambda i: (
            _http_server(FIRST_PORT + i),
            {"ready_http": f"http://127.0.0.1:{FIRST_PORT + i}/"},
        ),
    ),
    Kind("command", COMMAND_ROW, "ready", lambda i: (["sleep", "1000"], {"ready_command": "true"})),
]


def measure_services_and_shells(
    table: Table,
    paths: RuntimePaths,
    environment: str,
    counts: ServiceCounts,
    mem_mib: int,
) -> dict[str, Any]:
    """Every service and shell row, on one workspace; a failing part explains its rows."""
    for spec in SERVICE_ROWS + SHELL_ROWS:
        table.row(*spec)
    scratch = Path(tempfile.mkdtemp(prefix="pyro-bench-svc-", dir="/tmp"))
    ctx = Context(paths=paths, state_dir=scratch / "state")
    info: dict[str, Any] = {
        "probe_interval_ms": PROBE_INTERVAL_MS,
        "guest_ready_ms": {kind.label: [] for kind in KINDS},
        "shell_polls": {"operations": [], "attached": []},
        "deleted_workspaces": [],
    }
    try:
        created = ws.workspace_create(ctx, environment, mem_mib=mem_mib)
        wid = created["id"]
        if created.get("state") != "running":
            raise RuntimeError(f"workspace is {created.get('state')}, not running")
        parts: list[tuple[list[tuple[str, str, int]], Callable[[], None]]] = [
            (SERVICE_ROWS, lambda: measure_services(table, ctx, wid, counts.svc_start, info)),
            (SHELL_ROWS, lambda: measure_shell(table, ctx, wid, counts.shell_roundtrip, info)),
        ]
        for specs, part in parts:
            try:
                part()
            except Exception as exc:
                table.explain([table.row(*spec) for spec in specs], _reason(exc))
    finally:
        info["deleted_workspaces"] += delete_all(ctx)  # the one created above
        shutil.rmtree(scratch, ignore_errors=True)
    return info


def measure_services(table: Table, ctx: Context, wid: str, n: int, info: dict[str, Any]) -> None:
    """``n`` starts of every kind, round-robin (after one untimed warm-up round)."""
    stop_row = table.row(*STOP_ROW)
    sample = 0
    for round_index in range(n + 1):
        warm_up = round_index == 0
        for kind in KINDS:
            sample += 1
            row = table.row(*kind.row)
            name = f"bench-{kind.label}-{sample}"
            command, probe = kind.options(sample)
            started = time.perf_counter()
            try:
                result = sv.service_start(
                    ctx,
                    wid,
                    name,
                    command,
                    ready_timeout_seconds=READY_TIMEOUT_S,
                    ready_interval_ms=PROBE_INTERVAL_MS,
                    **probe,
                )
            except PyroError as exc:
                _miss(row, f"start failed: {_reason(exc)}")
                continue  # a start that failed leaves the service stopped or failed
            elapsed = _ms_since(started)
            if result.get("state") != kind.expected:
                _miss(row, f"state {result.get('state')}, expected {kind.expected}")
            elif not warm_up:
                row.add(elapsed)
                info["guest_ready_ms"][kind.label].append(result.get("ready_ms"))
            started = time.perf_counter()
            stopped = sv.service_stop(ctx, wid, name, grace_seconds=STOP_GRACE_S)
            elapsed = _ms_since(started)
            if stopped.get("state") != "stopped" or stopped.get("killed"):
                _miss(stop_row, f"state {stopped.get('state')}, killed {stopped.get('killed')}")
            elif not warm_up:
                stop_row.add(elapsed)


# -- shells ---------------------------------------------------------------------------------
def _has_line(text: str, line: str) -> bool:
    """Is ``line`` a whole line of ``text`` (a finished line: a newline follows it)?"""
    return f"\n{line}\n" in "\n" + text.replace("\r", "")


ReadFn = Callable[[int], dict[str, Any]]
WriteFn = Callable[[str], dict[str, Any]]


def _round_trip(write: WriteFn, read: ReadFn, cursor: int, marker: str) -> tuple[Any, ...]:
    """Write ``echo marker`` and poll reads from ``cursor`` until the marker line shows.

    (milliseconds or None if not seen in time, the next cursor, polls, why not counted).
    """
    started = time.perf_counter()
    written = write(f"echo {marker}")
    if not written.get("complete", True):
        return None, cursor, 0, "the shell did not take the whole input"
    seen = ""
    polls = 0
    while True:
        got = read(cursor)
        polls += 1
        cursor = int(got["next_cursor"])
        seen += str(got["output"])
        if _has_line(seen, marker):
            return _ms_since(started), cursor, polls, None
        if not got.get("alive", True):
            return None, cursor, polls, "the shell ended"
        if _ms_since(started) > MARKER_TIMEOUT_S * 1000:
            return None, cursor, polls, f"{marker} not seen within {MARKER_TIMEOUT_S:g} s"


def _sample_round_trips(
    row: Row, write: WriteFn, read: ReadFn, cursor: int, n: int, tag: str, polls: list[int]
) -> int:
    """One untimed warm-up round trip, then ``n`` timed ones; returns the last cursor."""
    for index in range(n + 1):
        elapsed, cursor, count, why = _round_trip(write, read, cursor, f"marker-{tag}{index}")
        if why is not None:
            _miss(row, why)
        elif index > 0:
            row.add(elapsed)
            polls.append(count)
    return cursor


def measure_shell(table: Table, ctx: Context, wid: str, n: int, info: dict[str, Any]) -> None:
    """Round trips through the operations, then through one attached AgentClient."""
    shell = sh.shell_open(ctx, wid)["shell_id"]
    try:
        # Let the login shell print its prompt; start reading after it.
        first = sh.shell_read(ctx, wid, shell, plain=True, wait_for_idle_ms=500)
        cursor = int(first["next_cursor"])

        def op_write(text: str) -> dict[str, Any]:
            return sh.shell_write(ctx, wid, shell, text)

        def op_read(at: int) -> dict[str, Any]:
            return sh.shell_read(ctx, wid, shell, cursor=at, plain=True)

        cursor = _sample_round_trips(
            table.row(*SHELL_OP_ROW),
            op_write,
            op_read,
            cursor,
            n,
            "op",
            info["shell_polls"]["operations"],
        )
        try:
            with open_workspaces(ctx) as workspaces, workspaces.agent(wid, "bench") as agent:
                measure_attached_shell(table, agent, shell, cursor, n, info)
        except Exception as exc:
            table.explain([table.row(*SHELL_ATTACHED_ROW)], _reason(exc))
    finally:
        sh.shell_close(ctx, wid, shell)


def measure_attached_shell(
    table: Table, agent: AgentClient, shell: str, cursor: int, n: int, info: dict[str, Any]
) -> None:
    def write(text: str) -> dict[str, Any]:
        args = {"shell_id": shell, "input": text, "newline": True}
        return agent.call("shell_write", args, timeout_s=30)[0]

    def read(at: int) -> dict[str, Any]:
        args = {
            "shell_id": shell,
            "cursor": at,
            "max_chars": 65536,
            "plain": True,
            "wait_for_idle_ms": 0,
        }
        return agent.call("shell_read", args, timeout_s=30)[0]

    row = table.row(*SHELL_ATTACHED_ROW)
    _sample_round_trips(row, write, read, cursor, n, "agent", info["shell_polls"]["attached"])
