"""The benchmark harness: ``make bench`` (= ``python -m bench.run``).

Prints one table (metric | n | min | p50 | p99 | unit) under a header of host facts. It
only measures: no figure is compared with a threshold. A row that cannot be measured
says why instead of stopping the run. ``--quick`` takes 2-3 samples per row (CI smoke);
``--repeat N`` scales every row so the cold-run row takes N; ``--json PATH`` writes every
sample with the table for later comparison.

VMs live in a private ``PYRO_RUN_DIR`` under /tmp, removed at the end; every VM is
discarded even on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from bench.cli import VERSION_ROW, CliCounts, measure_cli
from bench.cluster import CLUSTER_EXEC_ROW, measure_cluster
from bench.firecracker_tiny import bench_tiny_guest
from bench.guest import Counts, measure_boots, measure_cold_run
from bench.host import HostCounts, measure_host_side
from bench.network import NetworkCounts, measure_network
from bench.registry import measure_registry
from bench.serve import REST_EXEC_ROW, measure_serve
from bench.services import ServiceCounts, measure_services_and_shells
from bench.stats import Row, Table
from bench.warm import WarmCounts, measure_warm
from bench.workspace import WorkspaceCounts, measure_workspaces
from pyro_mcp.runtime import kernels
from pyro_mcp.runtime.binaries import installed_binaries
from pyro_mcp.runtime.host_probe import probe_kvm, probe_platform
from pyro_mcp.runtime.paths import RuntimePaths, runtime_paths
from pyro_mcp.sdk import Pyro
from pyro_mcp.vmm.launch import BackendChoice
from pyro_mcp.vmm.selection import choose_backend, run_probes
from pyro_mcp.vmm.warm import BOOT_MODE_ENV

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ENVIRONMENT = "debian:12"
DEFAULT_MEM_MIB = 512  # what `pyro run` gives a guest by default


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description="Measure pyro-mcp and print one table."
    )
    parser.add_argument(
        "--quick", action="store_true", help="2-3 samples per row (a smoke run for CI)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        metavar="N",
        help="cold runs to take (default 8); every other row's count scales with it",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write samples here")
    parser.add_argument("--environment", default=DEFAULT_ENVIRONMENT, help="guest environment")
    parser.add_argument(
        "--mem-mib", type=int, default=DEFAULT_MEM_MIB, help="memory of the booted guests"
    )
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def choose_counts(args: argparse.Namespace) -> Counts:
    if args.repeat is not None:
        return Counts.scaled(args.repeat)
    return Counts.quick() if args.quick else Counts()


def choose_workspace_counts(args: argparse.Namespace) -> WorkspaceCounts:
    if args.repeat is not None:
        return WorkspaceCounts.scaled(args.repeat)
    return WorkspaceCounts.quick() if args.quick else WorkspaceCounts()


def choose_service_counts(args: argparse.Namespace) -> ServiceCounts:
    if args.repeat is not None:
        return ServiceCounts.scaled(args.repeat)
    return ServiceCounts.quick() if args.quick else ServiceCounts()


def choose_host_counts(args: argparse.Namespace) -> HostCounts:
    if args.repeat is not None:
        return HostCounts.scaled(args.repeat)
    return HostCounts.quick() if args.quick else HostCounts()


def choose_cli_counts(args: argparse.Namespace) -> CliCounts:
    if args.repeat is not None:
        return CliCounts.scaled(args.repeat)
    return CliCounts.quick() if args.quick else CliCounts()


def _git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def host_facts() -> dict[str, Any]:
    kvm = probe_kvm()
    facts = probe_platform()
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = facts.get("cores")
    return {
        "platform": facts,
        "cpus_usable": usable,
        "kvm": kvm.to_dict(),
        "ci": os.environ.get("CI") or None,
        "virtualized_host": "hypervisor" in kvm.flags,
        "python": platform.python_version(),
        "git": _git_revision(),
    }


def describe_backend(paths: RuntimePaths, choice: BackendChoice) -> tuple[str, dict[str, Any]]:
    """One line saying which backend runs the guests and why the others do not."""
    report = run_probes(paths)
    others = []
    for label, result in report.get("results", {}).items():
        if label == choice.label:
            continue
        if result.get("skipped"):
            others.append(f"{label} skipped ({result['skipped']})")
        elif not result.get("ok"):
            error = str(result.get("error") or "failed").split(": error: ")[-1]
            others.append(f"{label} failed its boot probe ({error})")
        else:
            others.append(f"{label} works ({result.get('boot_ms')} ms probe boot)")
    line = f"backend: {choice.label}: {choice.reason}"
    if others:
        line += "; " + "; ".join(others)
    return line, report


def header_lines(
    facts: dict[str, Any],
    backend_line: str,
    guest_line: str,
    counts_line: str,
    elapsed_s: float,
) -> list[str]:
    plat = facts["platform"]
    kvm = facts["kvm"]
    environment = "CI" if facts["ci"] else "local (CI unset)"
    if facts["virtualized_host"]:
        environment += ", host is itself a VM (cpu flag hypervisor)"
    memory = plat.get("memory_bytes")
    memory_text = f", {memory / (1 << 30):.0f} GiB" if memory else ""
    return [
        f"pyro-mcp benchmark @ {facts['git']}, "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, run took {elapsed_s:.0f} s",
        f"host: {facts['cpus_usable']} CPUs ({plat.get('cpu_model')}){memory_text}, "
        f"{plat.get('distribution')}, Linux {plat.get('kernel')}; KVM: {kvm['kind']} "
        f"({'accessible' if kvm['device_accessible'] else 'no usable /dev/kvm'}); "
        f"environment: {environment}; Python {facts['python']}",
        backend_line,
        guest_line,
        counts_line,
    ]


def measure_firecracker_tiny(table: Table, n: int) -> dict[str, Any] | None:
    """Firecracker with the tiny test guest (not Linux): boot, snapshot, restore, RSS."""
    rows = {
        "boot_ms": table.row("firecracker tiny guest: boot (config file)", "ms", 1),
        "api_boot_ms": table.row("  boot through API calls", "ms", 1),
        "snapshot_create_ms": table.row("  snapshot create (128 MiB)", "ms", 1),
        "restore_ms": table.row("  restore (new process, load + resume)", "ms", 1),
        "restore_echo_ms": table.row("  restore -> first serial echo", "ms", 1),
        "rss_mib": table.row("  idle RSS", "MiB", 2),
    }
    kvm = probe_kvm()
    if not kvm.device_accessible:
        table.explain(rows.values(), "skipped: /dev/kvm is missing or not accessible")
        return None
    if installed_binaries(runtime_paths()) is None:
        table.explain(rows.values(), "skipped: Firecracker is not installed (pyro runtime fetch)")
        return None
    result: dict[str, Any] = bench_tiny_guest(n)
    for key, row in rows.items():
        for value in result.get(key, []):
            row.add(value)
    return {k: v for k, v in result.items() if not isinstance(v, list)}


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = choose_counts(args)
    ws_counts = choose_workspace_counts(args)
    svc_counts = choose_service_counts(args)
    host_counts = choose_host_counts(args)
    cli_counts = choose_cli_counts(args)
    net_counts = NetworkCounts.quick() if args.quick else NetworkCounts()
    started = time.monotonic()
    run_root = Path(tempfile.mkdtemp(prefix="pyro-bench-", dir="/tmp"))
    os.environ["PYRO_RUN_DIR"] = str(run_root)
    previous = signal.signal(signal.SIGTERM, _interrupt)

    table = Table()
    facts = host_facts()
    extra: dict[str, Any] = {}
    backend_line = "backend: not chosen"
    guest_line = f"guest: {args.environment}"
    interrupted = False
    failed_sections: list[str] = []

    def section(name: str, placeholder: tuple[str, str], body: Callable[[], None]) -> None:
        nonlocal interrupted
        before = len(table.rows)
        if interrupted:
            rows: list[Row] = table.rows[before:] or [table.row(*placeholder)]
            table.explain(rows, "not run: interrupted")
            return
        log(f"{name} ...")
        section_started = time.monotonic()
        try:
            body()
        except KeyboardInterrupt:
            interrupted = True
            rows = table.rows[before:] or [table.row(*placeholder)]
            table.explain(rows, "interrupted")
        except Exception as exc:
            failed_sections.append(name)
            first = (str(exc).splitlines() or [""])[0][:160]
            rows = table.rows[before:] or [table.row(*placeholder)]
            table.explain(rows, f"{type(exc).__name__}: {first}")
        log(f"{name} done in {time.monotonic() - section_started:.1f} s")

    paths = runtime_paths()
    choice_box: list[BackendChoice] = []

    def pick_backend() -> None:
        nonlocal backend_line, guest_line
        choice = choose_backend(paths, progress=log)  # probes (cached) before any timing
        choice_box.append(choice)
        backend_line, report = describe_backend(paths, choice)
        extra["probes"] = report.get("results")
        flavor = kernels.default_flavor()
        kernel = kernels.installed_kernel(paths, flavor)
        release = kernel.release if kernel else "not installed"
        guest_line = (
            f"guest: {args.environment}, kernel flavor {flavor} ({release}), "
            f"1 vCPU, {args.mem_mib} MiB for booted guests (run_in_vm default: 512 MiB)"
        )

    def cold() -> None:
        os.environ[BOOT_MODE_ENV] = "cold"  # the cold path keeps its own rows
        try:
            measure_cold_run(table, Pyro(), args.environment, counts.cold_run)
        finally:
            os.environ.pop(BOOT_MODE_ENV, None)

    def warm_starts() -> None:
        warm_counts = WarmCounts.quick() if args.quick else WarmCounts()
        extra["warm"] = measure_warm(table, paths, args.environment, warm_counts, args.mem_mib)

    def boots() -> None:
        if not choice_box:
            raise RuntimeError("no backend was chosen")
        measure_boots(table, paths, choice_box[0], args.environment, counts, args.mem_mib)

    def workspaces() -> None:
        extra["workspaces"] = measure_workspaces(
            table, paths, args.environment, ws_counts, args.mem_mib
        )

    def services() -> None:
        extra["services"] = measure_services_and_shells(
            table, paths, args.environment, svc_counts, args.mem_mib
        )

    def host_side() -> None:
        measure_host_side(table, host_counts)

    def cli() -> None:
        measure_cli(table, cli_counts)

    def rest() -> None:
        measure_serve(table, paths.cache_dir, paths.run_root, args.environment, ws_counts.ws_exec)

    def cluster() -> None:
        calls, runs = (3, 4) if args.quick else (ws_counts.ws_exec, 12)
        measure_cluster(table, paths.cache_dir, args.environment, calls, runs)

    def network() -> None:
        extra["network"] = measure_network(table, paths, args.environment, net_counts, args.mem_mib)

    def registry() -> None:
        extra["registry"] = measure_registry(table, paths, args.environment, 2 if args.quick else 3)

    def firecracker() -> None:
        info = measure_firecracker_tiny(table, counts.fc_tiny)
        if info is not None:
            extra["firecracker_tiny"] = info

    try:
        # A successful choice adds no row; a failed one leaves a row saying why.
        section("backend choice", ("backend choice", "-"), pick_backend)
        section(
            f"cold run x{counts.cold_run}",
            (f"cold run `{args.environment} -- true`", "ms"),
            cold,
        )
        section("warm starts", ("warm run", "ms"), warm_starts)
        section(
            f"boots x{counts.boot} + in-guest calls",
            ("boot to agent-ready", "ms"),
            boots,
        )
        section(
            f"workspaces (create x{ws_counts.ws_create}, diff/checkpoint on 10,000 files)",
            ("workspace create", "ms"),
            workspaces,
        )
        section(
            f"services (x{svc_counts.svc_start} per probe) and shells "
            f"(x{svc_counts.shell_roundtrip} round trips)",
            ("service start", "ms"),
            services,
        )
        section(
            f"guest networking (create x{net_counts.creates} per policy, "
            f"{net_counts.round_trips} round trips), in a private network",
            ("workspace create, network off (no NIC)", "ms"),
            network,
        )
        section(
            f"host side, no VM (manifest x{host_counts.host_manifest}, "
            f"archive bombs x{host_counts.host_bomb})",
            ("agent manifest (in process)", "ms"),
            host_side,
        )
        section(
            f"CLI overhead, no VM (x{cli_counts.cli_exec} per row)",
            VERSION_ROW[:2],
            cli,
        )
        section(f"pyro serve: REST (x{ws_counts.ws_exec} per row)", REST_EXEC_ROW[:2], rest)
        section(
            "environments through a loopback registry",
            (f"env publish {args.environment} (zstd + chunked upload, empty registry)", "ms"),
            registry,
        )
        section(
            f"firecracker tiny guest x{counts.fc_tiny}",
            ("firecracker tiny guest", "ms"),
            firecracker,
        )
        # Last: its Ray driver stays in this process.
        section("a pyro cluster on Ray, local nodes", CLUSTER_EXEC_ROW[:2], cluster)
    finally:
        signal.signal(signal.SIGTERM, previous)
        leftovers = sorted(p.name for p in run_root.iterdir()) if run_root.exists() else []
        shutil.rmtree(run_root, ignore_errors=True)

    elapsed = time.monotonic() - started
    all_counts = (
        asdict(counts)
        | asdict(ws_counts)
        | asdict(svc_counts)
        | asdict(host_counts)
        | asdict(cli_counts)
        | asdict(net_counts)
    )
    counts_line = "samples: " + ", ".join(f"{k}={v}" for k, v in all_counts.items())
    if args.quick and args.repeat is None:
        counts_line += " (--quick)"
    if leftovers:
        counts_line += f"; VM run directories left behind (removed now): {leftovers}"
    header = header_lines(facts, backend_line, guest_line, counts_line, elapsed)
    rendered = table.render(header)
    print(rendered, flush=True)
    log(f"total {elapsed:.1f} s")
    if args.json is not None:
        document = {
            "header": header,
            "host": facts,
            "counts": all_counts,
            "elapsed_s": round(elapsed, 1),
            "interrupted": interrupted,
            "rows": table.to_dict(),
            "table": rendered,
            **extra,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
        log(f"samples written to {args.json}")
    if interrupted:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
