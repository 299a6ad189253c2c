"""Run a ``pyro`` CLI command in a child process and measure it: exit code, output, time
and the child's own peak RSS (VmHWM, read by the child itself at exit)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

from pyro_mcp.api import Context

_RUN = (
    "import sys\n"
    "from pyro_mcp.cli.main import main\n"
    "try:\n"
    "    code = main(sys.argv[1:])\n"
    "finally:\n"
    "    peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
    "    sys.stderr.write('PYRO_PEAK_KB=' + peak.split()[1] + '\\n')\n"
    "sys.exit(code)\n"
)


@dataclass
class Measured:
    code: int
    stdout: str
    stderr: str
    seconds: float
    peak_mib: float


def pyro_cli(ctx: Context, *args: str, timeout_s: float = 600, **env: str) -> Measured:
    environ = dict(
        os.environ,
        PYRO_CACHE_DIR=str(ctx.paths.cache_dir),
        PYRO_RUN_DIR=str(ctx.paths.run_root),
        PYRO_STATE_DIR=str(ctx.state_dir),
        **env,
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _RUN, *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=timeout_s,
    )
    seconds = time.monotonic() - started
    lines = done.stderr.splitlines()
    peaks = [line for line in lines if line.startswith("PYRO_PEAK_KB=")]
    assert peaks, done.stderr
    stderr = "\n".join(line for line in lines if not line.startswith("PYRO_PEAK_KB="))
    return Measured(done.returncode, done.stdout, stderr, seconds, int(peaks[-1][13:]) / 1024)
