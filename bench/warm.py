"""Warm starts: template build, restored runs and workspaces, pause/resume/fork, and the
host memory of many idle workspaces restored from one template."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.guest import vmm_memory_mib
from bench.stats import Row, Table
from pyro_mcp.api import Context
from pyro_mcp.api.operations.workspaces import open_workspaces
from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.sdk import Pyro
from pyro_mcp.vmm import templates, warm
from pyro_mcp.vmm.selection import choose_backend
from pyro_mcp.workspace.lifecycle import Workspaces

MIB = 1 << 20


@dataclass(frozen=True)
class WarmCounts:
    run: int = 10
    create: int = 5
    pause: int = 5
    idle: int = 50  # workspaces kept idle at once for the memory rows
    idle_mem_mib: int = 128  # so that 50 fit this host's admission limit (90% of its RAM)

    @classmethod
    def quick(cls) -> WarmCounts:
        return cls(run=2, create=2, pause=2, idle=3, idle_mem_mib=128)


def _ms(start: float) -> float:
    return (time.monotonic() - start) * 1000


def measure_warm(
    table: Table, paths: RuntimePaths, environment: str, counts: WarmCounts, mem_mib: int
) -> dict[str, Any]:
    build = table.row("template build (boot, quiesce, save; run shape)", "ms", 0)
    size = table.row("  template on disk (RAM file's written blocks, state, root disk)", "MiB", 1)
    run = table.row(f"warm run `{environment} -- true` (SDK, end to end)", "ms", 0)
    restore = table.row("  phase boot (restore + agent ready)", "ms", 1)
    create = table.row("warm workspace create -> first exec done", "ms", 0)
    pause = table.row(f"workspace pause ({mem_mib} MiB guest)", "ms", 0)
    resume = table.row("workspace resume -> first exec done", "ms", 0)
    fork = table.row("workspace fork -> first exec in the fork done", "ms", 0)
    rss = table.row(f"idle warm workspace host RSS ({mem_mib} MiB guests, each)", "MiB", 1)
    pss = table.row("  idle warm workspace host PSS (each)", "MiB", 1)
    many = f"{counts.idle} idle warm workspaces ({counts.idle_mem_mib} MiB guests)"
    total = table.row(f"{many}: sum of RSS (shared pages in each)", "MiB", 0)
    total_pss = table.row(f"  {many}: host memory (sum of PSS)", "MiB", 0)
    each_pss = table.row(f"  {many}: PSS each", "MiB", 1)
    info: dict[str, Any] = {}
    choice = choose_backend(paths, None)
    shape = warm.Shape(environment, choice, 1, mem_mib)
    inputs = warm.inputs_for(paths, shape)
    found = templates.find(paths, inputs)
    if found is not None:
        templates.remove(found)  # measure a build from nothing
    started = time.monotonic()
    template = warm.build_template(paths, shape, inputs)
    build.add(_ms(started))
    size.add(template.disk_bytes() / MIB)
    pyro = Pyro()
    for _ in range(counts.run):
        started = time.monotonic()
        result = pyro.run_in_vm(environment, ["true"], mem_mib=mem_mib)
        if result.get("exit_code") == 0 and result["boot"]["mode"] == "warm":
            run.add(_ms(started))
            restore.add(float(result["timings_ms"]["boot_ms"]))
        else:
            run.note = f"not warm: {result.get('boot')}"
    scratch = Path(tempfile.mkdtemp(prefix="pyro-bench-warm-", dir="/tmp"))
    ctx = Context(paths=paths, state_dir=scratch / "state")
    try:
        with open_workspaces(ctx) as workspaces:

            def first_exec(workspace_id: str) -> None:
                with workspaces.agent(workspace_id, "exec") as client:
                    client.exec(argv=["true"], timeout_s=30)

            ids: list[str] = []
            for _ in range(counts.create):
                started = time.monotonic()
                record = workspaces.create(environment, mem_mib=mem_mib)
                first_exec(record.id)
                create.add(_ms(started))
                ids.append(record.id)
            for _ in range(counts.pause):
                started = time.monotonic()
                workspaces.pause(ids[0])
                pause.add(_ms(started))
                started = time.monotonic()
                workspaces.resume(ids[0])
                first_exec(ids[0])
                resume.add(_ms(started))
                started = time.monotonic()
                forked = workspaces.fork(ids[0])
                first_exec(forked.id)
                fork.add(_ms(started))
                workspaces.delete(forked.id)
            time.sleep(5)  # let them settle
            _memory(workspaces, ids, rss, pss)
            for workspace_id in ids:
                workspaces.delete(workspace_id)
            ids = [
                workspaces.create(environment, mem_mib=counts.idle_mem_mib).id
                for _ in range(counts.idle)
            ]
            time.sleep(5)
            sums = _memory(workspaces, ids, None, each_pss)
            total.add(sums[0])
            total_pss.add(sums[1])
            for workspace_id in ids:
                workspaces.delete(workspace_id)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    info["template"] = template.to_dict()
    info["pid"] = os.getpid()
    return info


def _memory(
    workspaces: Workspaces, ids: list[str], rss: Row | None, pss: Row | None
) -> tuple[float, float]:
    """Each VMM's RSS and PSS into the rows; their sums."""
    all_rss = all_pss = 0.0
    for workspace_id in ids:
        pid = workspaces.store.get(workspace_id).vmm_pid
        if not pid:
            continue
        one_rss, one_pss = vmm_memory_mib(pid)
        if one_rss is not None:
            all_rss += one_rss
            if rss is not None:
                rss.add(one_rss)
        if one_pss is not None:
            all_pss += one_pss
            if pss is not None:
                pss.add(one_pss)
    return all_rss, all_pss
