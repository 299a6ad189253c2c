"""Firecracker with the tiny test guest: boot, snapshot and restore timings.

``bench_tiny_guest(n)`` returns raw samples (milliseconds unless the key says otherwise);
the benchmark table is built elsewhere. Run as a script to print medians:
``python bench/firecracker_tiny.py [n] [--jailed]``.

Each round boots one VM from a config file (``boot_ms``: process start to the guest's
marker on the serial console), one through API calls (``api_boot_ms``), snapshots the
latter (``snapshot_create_ms``, 128 MiB of memory), and restores that snapshot into a new
Firecracker process (``restore_ms``: process start to "loaded and resumed";
``restore_echo_ms``: until the restored guest echoed a byte).
"""

from __future__ import annotations

import importlib.util
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from pyro_mcp.runtime.binaries import BinarySet, fetch_binaries
from pyro_mcp.runtime.paths import runtime_paths
from pyro_mcp.vmm.base import Disk, VMSpec
from pyro_mcp.vmm.firecracker import FirecrackerVM, JailerConfig

REPO = Path(__file__).resolve().parents[1]
MEM_MIB = 128
TIMEOUT_S = 10.0


def _tiny_guest_support() -> ModuleType:
    """The tests' tiny-guest builder (one definition of how the guest is linked)."""
    path = REPO / "tests" / "firecracker" / "fc_support.py"
    spec = importlib.util.spec_from_file_location("fc_support", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rss_mib(pid: int | None) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 2)
    return 0.0


class _Round:
    def __init__(self, binaries: BinarySet, kernel: Path, disk: Path, base: Path, jailed: bool):
        self.binaries, self.kernel, self.disk, self.base = binaries, kernel, disk, base
        self.jailed = jailed
        self.count = 0

    def vm(self) -> FirecrackerVM:
        self.count += 1
        vm_id = f"b{self.count}"
        spec = VMSpec(
            vm_id=vm_id,
            run_dir=self.base / vm_id,
            kernel=self.kernel,
            root_disk=Disk(self.disk),
            mem_mib=MEM_MIB,
        )
        jailer = JailerConfig.for_vm(vm_id) if self.jailed else None
        return FirecrackerVM(spec, self.binaries, jailer=jailer, serial_input=True)


def bench_tiny_guest(n: int, *, jailed: bool = False) -> dict[str, Any]:
    """``n`` rounds of boot / API boot / snapshot / restore; returns the samples."""
    support = _tiny_guest_support()
    binaries = fetch_binaries(runtime_paths())
    base = Path(tempfile.mkdtemp(prefix="pyro-bench-", dir="/tmp"))  # short socket paths
    samples: dict[str, list[float]] = {
        key: []
        for key in (
            "boot_ms",
            "api_boot_ms",
            "snapshot_create_ms",
            "restore_ms",
            "restore_echo_ms",
            "rss_mib",
        )
    }
    try:
        kernel = support.build_tiny_guest(base)
        disk = base / "disk.raw"
        disk.write_bytes(bytes(1 << 20))
        rounds = _Round(binaries, kernel, disk, base, jailed)
        for index in range(n):
            with rounds.vm() as vm:
                vm.start(config_file=True)
                samples["boot_ms"].append(vm.wait_for_console(support.TINY_MARKER, TIMEOUT_S))
                time.sleep(0.05)  # let it settle before reading its memory use
                samples["rss_mib"].append(_rss_mib(vm.pid))
            with rounds.vm() as vm:
                vm.start()
                samples["api_boot_ms"].append(vm.wait_for_console(support.TINY_MARKER, TIMEOUT_S))
                snapshot = vm.create_snapshot(base / f"snap{index}")
                samples["snapshot_create_ms"].append(snapshot.created_ms)
            with rounds.vm() as vm:
                vm.restore(snapshot)
                samples["restore_ms"].append(vm.timings["restored_ms"])
                vm.write_serial(b"!")
                samples["restore_echo_ms"].append(vm.wait_for_console(b"!", TIMEOUT_S))
            shutil.rmtree(snapshot.directory)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return {
        **samples,
        "n": n,
        "jailed": jailed,
        "mem_mib": MEM_MIB,
        "firecracker": binaries.version,
    }


def main(argv: list[str]) -> None:
    n = int(next((a for a in argv if a.isdigit()), "10"))
    result = bench_tiny_guest(n, jailed="--jailed" in argv)
    print(f"Firecracker {result['firecracker']} tiny guest, n={n}, jailed={result['jailed']}")
    for key, values in result.items():
        if isinstance(values, list) and values:
            print(f"  {key:<20} median {statistics.median(values):8.1f}   max {max(values):8.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
