"""The console pump keeps a VM's serial output bounded and its latest part readable."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pyro_mcp.vmm import console


def _pump_exits(log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        alive = [
            pid
            for pid in os.listdir("/proc")
            if pid.isdigit() and str(log).encode() in _cmdline(int(pid))
        ]
        if not alive:
            return
        time.sleep(0.05)
    raise AssertionError("the pump outlived its VMM's end of the pipe")


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_a_flood_keeps_at_most_the_bound_and_the_latest_output(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    fd = console.start_pump(log, max_bytes=1 << 20)
    assert log.exists()  # readers need not wait for the pump
    line = b"0123456789abcdef" * 4 + b"\n"
    for _ in range((10 << 20) // len(line)):  # 10 MiB through a 1 MiB bound
        os.write(fd, line)
    os.write(fd, b"the last line\n")
    os.close(fd)  # the VMM exits
    _pump_exits(log)
    total = log.stat().st_size + console.rotated(log).stat().st_size
    assert total <= (1 << 20) + console.READ_SIZE
    tail = console.read_tail(log, 4096)
    assert tail.endswith(line + b"the last line\n")
    assert len(console.read_tail(log, 1 << 30)) == total  # both halves, oldest first


def test_a_vanished_run_directory_never_blocks_the_vmm(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    log = run_dir / "console.log"
    fd = console.start_pump(log, max_bytes=1 << 16)
    os.write(fd, b"x" * 1000)
    for path in run_dir.iterdir():
        path.unlink()
    run_dir.rmdir()  # the VM's run directory was cleaned up while it still ran
    deadline = time.monotonic() + 10
    os.set_blocking(fd, False)
    written = 0
    while written < (4 << 20) and time.monotonic() < deadline:
        try:
            written += os.write(fd, b"y" * 65536)
        except BlockingIOError:
            time.sleep(0.01)
    os.close(fd)
    assert written >= 4 << 20  # the pump drained everything: the VMM never stalls on it
    _pump_exits(log)
