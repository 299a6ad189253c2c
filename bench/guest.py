"""Measurements on real Linux guests: one-shot runs, boots, and calls into a booted VM.

Each ``measure_*`` function declares its rows in the table first and then fills them, so
a failure part way leaves the rows in place for the caller to explain. Every VM started
here is discarded in a ``finally`` (Ctrl-C included).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from bench.stats import Table
from pyro_mcp.guest.client import AgentClient
from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.sdk import Pyro
from pyro_mcp.vmm.base import VM
from pyro_mcp.vmm.launch import BackendChoice, build_spec, create_vm, discard_vm, start_owned

BOOT_TIMEOUT_S = 60.0
IDLE_SETTLE_S = 2.0
MIB = 1 << 20
PHASES = ("create_ms", "boot_ms", "exec_ms", "cleanup_ms")
FILE_SIZES_MIB = (1, 64)

# Rows of the calls into a booted guest: (metric, unit, decimals).
PING_ROW = ("agent ping round trip", "us", 0)
EXEC_ROW = ("exec `true` round trip (host wall clock)", "ms", 2)
EXEC_GUEST_ROW = ("  exec `true` as timed by the guest agent", "ms", 2)
CLOCK_ROW = ("guest clock drift vs host over {s} s (+ fast, - slow)", "%", 3)


def file_rows(size_mib: int) -> tuple[tuple[str, str, int], tuple[str, str, int]]:
    return (
        (f"put_file {size_mib} MiB -> guest /tmp (sha256 verified)", "MiB/s", 1),
        (f"get_file {size_mib} MiB <- guest /tmp (sha256 verified)", "MiB/s", 1),
    )


@dataclass(frozen=True)
class Counts:
    """How many samples each row takes."""

    cold_run: int = 8
    boot: int = 3
    exec: int = 50
    ping: int = 500
    file_1m: int = 5
    file_64m: int = 3
    fc_tiny: int = 10
    clock_s: int = 60  # how long the guest clock is compared with the host's

    @classmethod
    def quick(cls) -> Counts:
        return cls(cold_run=2, boot=2, exec=3, ping=3, file_1m=2, file_64m=2, fc_tiny=3, clock_s=5)

    @classmethod
    def scaled(cls, repeat: int) -> Counts:
        """The defaults scaled so that the cold-run row takes ``repeat`` samples (each >= 1)."""
        base = cls()
        factor = repeat / base.cold_run

        def scale(value: int) -> int:
            return max(1, round(value * factor))

        return cls(
            cold_run=max(1, repeat),
            boot=scale(base.boot),
            exec=scale(base.exec),
            ping=scale(base.ping),
            file_1m=scale(base.file_1m),
            file_64m=scale(base.file_64m),
            fc_tiny=scale(base.fc_tiny),
            clock_s=base.clock_s,
        )


def _ms_since(start: float) -> float:
    return (time.monotonic() - start) * 1000


# -- 1. one-shot run through the SDK --------------------------------------------------------
def measure_cold_run(table: Table, pyro: Pyro, environment: str, n: int) -> None:
    """``Pyro().run_in_vm(environment, ["true"])`` n times: wall clock and its phases."""
    wall = table.row(f"cold run `{environment} -- true` (SDK, end to end)", "ms", 0)
    phases = {phase: table.row(f"  phase {phase[:-3]}", "ms", 1) for phase in PHASES}
    failures: list[str] = []
    for _ in range(n):
        started = time.monotonic()
        result = pyro.run_in_vm(environment, ["true"])
        elapsed = _ms_since(started)
        if result.get("exit_code") != 0:
            failures.append(f"exit {result.get('exit_code')}: {result.get('stderr', '')[:80]}")
            continue
        wall.add(elapsed)
        timings = result.get("timings_ms") or {}
        for phase, row in phases.items():
            if phase in timings:
                row.add(float(timings[phase]))
    if failures:
        wall.note = f"{len(failures)} run(s) failed, not counted: {failures[0]}"


# -- 2. boots and what a booted VM offers ---------------------------------------------------
@contextmanager
def booted_vm(
    paths: RuntimePaths, choice: BackendChoice, environment: str, mem_mib: int
) -> Iterator[tuple[VM, AgentClient]]:
    """A started, agent-ready VM; discarded on exit whatever happens."""
    spec = build_spec(paths, environment=environment, choice=choice, mem_mib=mem_mib)
    vm: VM | None = None
    try:
        vm = create_vm(paths, spec, choice)
        start_owned(vm)
        agent = vm.wait_ready(BOOT_TIMEOUT_S)
        yield vm, agent
    finally:
        if vm is not None:
            discard_vm(vm)
        else:
            shutil.rmtree(spec.run_dir, ignore_errors=True)


def _proc_kib(path: Path, key: str) -> float | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1])
    return None


def vmm_memory_mib(pid: int) -> tuple[float | None, float | None]:
    """(RSS, PSS) of a process in MiB; None for what cannot be read."""
    rss = _proc_kib(Path(f"/proc/{pid}/status"), "VmRSS")
    pss = _proc_kib(Path(f"/proc/{pid}/smaps_rollup"), "Pss")
    return (
        None if rss is None else rss / 1024,
        None if pss is None else pss / 1024,
    )


def measure_boots(
    table: Table,
    paths: RuntimePaths,
    choice: BackendChoice,
    environment: str,
    counts: Counts,
    mem_mib: int,
) -> None:
    """Boot ``counts.boot`` VMs: boot timings and idle memory of each; the calls into the
    guest (ping, exec, files) run in the last one."""
    ready = table.row("boot to agent-ready (VMM start -> hello answered)", "ms", 0)
    socket_up = table.row("  VMM start -> agent socket connected", "ms", 0)
    wall = table.row("  host wall: start() + wait_ready()", "ms", 0)
    rss = table.row(f"idle guest VMM RSS (VmRSS, {IDLE_SETTLE_S:.0f} s after ready)", "MiB", 1)
    pss = table.row("idle guest VMM PSS (smaps_rollup)", "MiB", 1)
    # Declared now so that a failed boot leaves them in the table with its reason.
    for spec in (PING_ROW, EXEC_ROW, EXEC_GUEST_ROW):
        table.row(*spec)
    for size in FILE_SIZES_MIB:
        for spec in file_rows(size):
            table.row(*spec)
    table.row(*clock_row_spec(counts.clock_s))
    n = max(1, counts.boot)
    for index in range(n):
        started = time.monotonic()
        with booted_vm(paths, choice, environment, mem_mib) as (vm, agent):
            wall.add(_ms_since(started))
            if "agent_ready_ms" in vm.timings:
                ready.add(vm.timings["agent_ready_ms"])
            if "vmm_started_ms" in vm.timings:
                socket_up.add(vm.timings["vmm_started_ms"])
            time.sleep(IDLE_SETTLE_S)
            if vm.pid is None:
                rss.note = "the VMM process id is unknown"
            else:
                rss_mib, pss_mib = vmm_memory_mib(vm.pid)
                if rss_mib is not None:
                    rss.add(rss_mib)
                if pss_mib is not None:
                    pss.add(pss_mib)
                elif not pss.note:
                    pss.note = f"/proc/{vm.pid}/smaps_rollup unreadable"
            if index == n - 1:
                measure_in_guest(table, agent, counts)
    for row in (ready, socket_up):
        if not row.samples and not row.note:
            row.note = f"not recorded by the {choice.label} backend"


# -- 3-5. calls into one booted guest -------------------------------------------------------
def measure_in_guest(table: Table, agent: AgentClient, counts: Counts) -> None:
    """Ping, exec and file transfers in one booted guest; a failing part explains its rows."""
    sizes = dict(zip(FILE_SIZES_MIB, (counts.file_1m, counts.file_64m), strict=True))
    sections: list[tuple[list[tuple[str, str, int]], Callable[[], None]]] = [
        ([PING_ROW], partial(measure_ping, table, agent, counts.ping)),
        ([EXEC_ROW, EXEC_GUEST_ROW], partial(measure_exec, table, agent, counts.exec)),
    ]
    for size, n in sizes.items():
        sections.append(
            (list(file_rows(size)), partial(measure_files, table, agent, size, n)),
        )
    clock_row = clock_row_spec(counts.clock_s)
    sections.append(([clock_row], partial(measure_clock, table, agent, counts.clock_s)))
    for specs, section in sections:
        try:
            section()
        except Exception as exc:
            reason = (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0][:160]
            table.explain([table.row(*spec) for spec in specs], reason)


def clock_row_spec(seconds: int) -> tuple[str, str, int]:
    metric, unit, decimals = CLOCK_ROW
    return metric.format(s=seconds), unit, decimals


def _guest_uptime(agent: AgentClient) -> tuple[float, float]:
    """(guest CLOCK_MONOTONIC-based uptime, host monotonic at the middle of the read)."""
    before = time.monotonic()
    result = agent.exec(["cat", "/proc/uptime"], timeout_s=30)
    after = time.monotonic()
    return float(result.stdout.split()[0]), (before + after) / 2


def measure_clock(table: Table, agent: AgentClient, seconds: int) -> None:
    """How far the guest's clock moves from the host's over ``seconds`` (TCG guests keep
    time by the TSC frequency pyro gives them)."""
    row = table.row(*clock_row_spec(seconds))
    guest0, host0 = _guest_uptime(agent)
    time.sleep(seconds)
    guest1, host1 = _guest_uptime(agent)
    row.add(((guest1 - guest0) / (host1 - host0) - 1) * 100)


def measure_ping(table: Table, agent: AgentClient, n: int) -> None:
    row = table.row(*PING_ROW)
    agent.ping()  # warm the path once
    for _ in range(n):
        started = time.perf_counter()
        agent.ping()
        row.add((time.perf_counter() - started) * 1e6)


def measure_exec(table: Table, agent: AgentClient, n: int) -> None:
    wall = table.row(*EXEC_ROW)
    inside = table.row(*EXEC_GUEST_ROW)
    failures = 0
    for _ in range(n):
        started = time.perf_counter()
        result = agent.exec(["true"], timeout_s=30)
        elapsed = (time.perf_counter() - started) * 1000
        if result.exit_code != 0:
            failures += 1
            continue
        wall.add(elapsed)
        inside.add(result.duration_ms)
    if failures:
        wall.note = f"{failures} exec(s) exited non-zero, not counted"


def _guest_sha256(agent: AgentClient, path: str) -> str:
    result = agent.exec(["sha256sum", path], timeout_s=120)
    if result.exit_code != 0:
        raise RuntimeError(f"sha256sum {path} failed: {result.stderr.decode(errors='replace')}")
    return result.stdout.decode().split()[0]


def measure_files(table: Table, agent: AgentClient, size_mib: int, n: int) -> None:
    """Put then get ``size_mib`` MiB of random bytes in /tmp; only verified copies count."""
    put_spec, get_spec = file_rows(size_mib)
    put, get = table.row(*put_spec), table.row(*get_spec)
    data = os.urandom(size_mib * MIB)
    digest = hashlib.sha256(data).hexdigest()
    mismatches: list[str] = []
    for index in range(n):
        path = f"/tmp/pyro-bench-{size_mib}m-{index}"
        try:
            started = time.perf_counter()
            agent.put_file(path, data)
            put_s = time.perf_counter() - started
            if _guest_sha256(agent, path) == digest:
                put.add(size_mib / put_s)
            else:
                mismatches.append("put")
            started = time.perf_counter()
            back, _info = agent.get_file(path)
            get_s = time.perf_counter() - started
            if hashlib.sha256(back).hexdigest() == digest:
                get.add(size_mib / get_s)
            else:
                mismatches.append("get")
        finally:
            with contextlib.suppress(Exception):
                agent.exec(["rm", "-f", path], timeout_s=30)
    if "put" in mismatches:
        put.note = f"{mismatches.count('put')} copy(ies) did not match sha256, not counted"
    if "get" in mismatches:
        get.note = f"{mismatches.count('get')} copy(ies) did not match sha256, not counted"
