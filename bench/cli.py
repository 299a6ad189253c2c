"""What the ``pyro`` command line costs before it does anything (no VM).

- ``pyro --version`` and ``pyro workspace exec --help``: from spawning the process to its
  exit.
- ``pyro workspace exec ID -- true``: from spawning the process to the first byte it sends
  the workspace's agent. The workspace is a record in a private store, marked running,
  whose VMM is a ``sleep`` process of this bench and whose agent channel is a socket this
  bench listens on. So the CLI runs all of its own code on the way (imports, parsing, the
  store lookup, the check that the VMM still runs, the port lock, the connect) and the
  first byte of its hello ends the sample; it is killed then. The exec round trip in a real
  guest is a row of the workspace section.
- Under it, what no change to pyro can take away: the standard library modules that exec
  imports on the way (asked of the CLI itself, stopped at its connect), imported alone;
  and ``python -c pass``.

Every process runs as an installed ``pyro`` does: the entry point's own two lines, with its
modules compiled once beforehand (into a private ``PYTHONPYCACHEPREFIX``, filled by an
untimed first run); with ``PYTHONDONTWRITEBYTECODE`` set and no cache, every run would
compile every module it imports.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

from bench.guest import Counts
from bench.stats import Table
from pyro_mcp.vmm.identity import ProcessIdentity, VMMRecord, mark_run_dir
from pyro_mcp.vmm.qemu.confinement import vmm_dir
from pyro_mcp.workspace.layout import StateLayout
from pyro_mcp.workspace.store import WorkspaceStore

# What the `pyro` console script runs (pyproject.toml: pyro = "pyro_mcp.cli.main:main").
ENTRY = "import sys; from pyro_mcp.cli.main import main; sys.exit(main())"
# The same, stopped where it connects to the agent: prints the modules it imported to get
# there (a JSON list on stderr) and exits 0.
AT_CONNECT = (
    "import json, os, socket, sys\n"
    "def connect(sock, address):\n"
    "    print(json.dumps(sorted(sys.modules)), file=sys.stderr, flush=True)\n"
    "    os._exit(0)\n"
    "socket.socket.connect = connect\n"
    "from pyro_mcp.cli.main import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
FIRST_BYTE_TIMEOUT_S = 30.0
VERSION_ROW = ("pyro --version (process start to exit)", "ms", 1)
HELP_ROW = ("pyro workspace exec --help (process start to exit)", "ms", 1)
EXEC_ROW = (
    "pyro workspace exec ID -- true: process start to its first byte to the agent",
    "ms",
    1,
)
STDLIB_ROW = ("  the standard library modules it imports to get there, alone", "ms", 1)
PYTHON_ROW = ("  python -c pass: the interpreter alone", "ms", 1)
NOTES = (
    "target 50 ms; spawn to exit, bytecode compiled (as installed)",
    "spawn to exit, bytecode compiled (as installed)",
    "target 50 ms; spawn to the first byte on the agent socket (a running record, "
    "a sleep as VMM, this bench as agent)",
    "the floor under the row above: python -c 'import <those modules>'",
    "the floor under every row",
)


@dataclass(frozen=True)
class CliCounts:
    """Samples of the CLI rows."""

    cli_version: int = 20
    cli_help: int = 20
    cli_exec: int = 20

    @classmethod
    def quick(cls) -> CliCounts:
        return cls(cli_version=3, cli_help=3, cli_exec=3)

    @classmethod
    def scaled(cls, repeat: int) -> CliCounts:
        """Scaled like :meth:`bench.guest.Counts.scaled` (by ``repeat`` / default cold runs)."""
        factor = repeat / Counts().cold_run
        return cls(**{f.name: max(1, round(getattr(cls(), f.name) * factor)) for f in fields(cls)})


@dataclass(frozen=True)
class FakeWorkspace:
    """A running workspace as the store has it, with no VM behind it."""

    id: str
    env: dict[str, str]  # the variables that point a CLI at its store and run directory
    agent: socket.socket  # listening where the CLI connects to the workspace's agent


@contextmanager
def fake_workspace(work: Path) -> Iterator[FakeWorkspace]:
    """A workspace record marked running, its VMM a ``sleep``, its agent port ours (its
    run directory under /tmp: a socket's path must stay short)."""
    state = work / "state"
    run_root = Path(tempfile.mkdtemp(prefix="pyro-cli-", dir="/tmp"))
    env = {
        "PYRO_STATE_DIR": str(state),
        "PYRO_CACHE_DIR": str(work / "cache"),
        "PYRO_KEY_DIR": str(work / "keys"),
        "PYRO_RUN_DIR": str(run_root),
    }
    vmm = subprocess.Popen(["sleep", "3600"])
    try:
        identity = ProcessIdentity.of(vmm.pid)
        if identity is None:
            raise RuntimeError("the stand-in VMM exited at once")
        state.mkdir(parents=True)
        with WorkspaceStore(StateLayout(state).store_path) as store:
            record = store.create(environment="debian:12", vcpu_count=1, mem_mib=256, disk_mib=64)
            run_dir = mark_run_dir(run_root / record.id)
            VMMRecord("qemu", record.id, identity).save(run_dir)
            store.transition(
                record.id,
                "running",
                vmm_pid=vmm.pid,
                run_dir=str(run_dir),
                backend="qemu-tcg",
                agent_endpoint=f"virtio-serial:1:{run_dir}",
            )
        sockets = vmm_dir(run_dir)
        sockets.mkdir(parents=True, exist_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as agent:
            agent.bind(str(sockets / "agent.0.sock"))
            agent.listen(1)
            yield FakeWorkspace(record.id, env, agent)
    finally:
        vmm.kill()
        vmm.wait()
        shutil.rmtree(run_root, ignore_errors=True)


def cli_env(pycache: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment, with bytecode cached in ``pycache`` (and ``extra``)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env | (extra or {})


def time_to_exit(args: Sequence[str], env: dict[str, str]) -> float:
    """Milliseconds from spawning ``pyro ARGS`` to its exit (RuntimeError if it fails)."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", ENTRY, *args], env=env, capture_output=True, check=False
    )
    elapsed = (time.monotonic() - started) * 1000
    if done.returncode != 0:
        raise RuntimeError(f"pyro {' '.join(args)} exited {done.returncode}: {done.stderr!r}")
    return elapsed


def time_to_first_byte(workspace: FakeWorkspace, env: dict[str, str]) -> float:
    """Milliseconds from spawning ``pyro workspace exec ID -- true`` to its first byte to
    the agent (RuntimeError if none comes)."""
    args = ["workspace", "exec", workspace.id, "--", "true"]
    started = time.monotonic()
    cli = subprocess.Popen(
        [sys.executable, "-c", ENTRY, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    first, elapsed = b"", 0.0
    try:
        if _connects(workspace.agent, cli, started + FIRST_BYTE_TIMEOUT_S):
            conn, _ = workspace.agent.accept()
            with conn:
                conn.settimeout(FIRST_BYTE_TIMEOUT_S)
                first = conn.recv(1)
                elapsed = (time.monotonic() - started) * 1000
    finally:
        cli.kill()
        _, stderr = cli.communicate()
    if not first:
        raise RuntimeError(f"the CLI sent the agent nothing: {stderr[-300:]!r}")
    return elapsed


def _connects(agent: socket.socket, cli: subprocess.Popen[bytes], deadline: float) -> bool:
    """Whether ``cli`` connects to ``agent`` before it exits or the deadline passes."""
    while time.monotonic() < deadline:
        if select.select([agent], [], [], 0.01)[0]:
            return True
        if cli.poll() is not None:
            return bool(select.select([agent], [], [], 0)[0])
    return False


def stdlib_imported(workspace: FakeWorkspace, env: dict[str, str]) -> list[str]:
    """The standard library modules (top-level names) ``pyro workspace exec`` imports
    before it reaches the agent."""
    args = ["workspace", "exec", workspace.id, "--", "true"]
    done = subprocess.run(
        [sys.executable, "-c", AT_CONNECT, *args], env=env, capture_output=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"the CLI never reached the agent: {done.stderr[-300:]!r}")
    modules = json.loads(done.stderr.splitlines()[-1])
    names = {module.partition(".")[0] for module in modules} & sys.stdlib_module_names
    return sorted(name for name in names if not name.startswith("_"))


def time_python(code: str, env: dict[str, str]) -> float:
    """Milliseconds from spawning ``python -c CODE`` to its exit."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return (time.monotonic() - started) * 1000


def measure_cli(table: Table, counts: CliCounts) -> None:
    specs = (VERSION_ROW, HELP_ROW, EXEC_ROW, STDLIB_ROW, PYTHON_ROW)
    rows = [table.row(*spec) for spec in specs]
    work = Path(tempfile.mkdtemp(prefix="pyro-bench-cli-"))
    try:
        env = cli_env(work / "pycache")
        with fake_workspace(work / "ws") as workspace:
            exec_env = env | workspace.env
            time_to_first_byte(workspace, exec_env)  # untimed: compiles what exec imports
            time_to_exit(["workspace", "exec", "--help"], env)
            for _ in range(counts.cli_exec):
                rows[2].add(time_to_first_byte(workspace, exec_env))
            stdlib = "import " + ", ".join(stdlib_imported(workspace, exec_env))
        for _ in range(counts.cli_version):
            rows[0].add(time_to_exit(["--version"], env))
        for _ in range(counts.cli_help):
            rows[1].add(time_to_exit(["workspace", "exec", "--help"], env))
        for _ in range(counts.cli_exec):
            rows[3].add(time_python(stdlib, env))
            rows[4].add(time_python("pass", env))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row, note in zip(rows, NOTES, strict=True):  # how each was measured (target: 50 ms)
        row.note = note
