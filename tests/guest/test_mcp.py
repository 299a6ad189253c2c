"""`pyro mcp serve` on real guests, driven by the MCP SDK's own clients (stdio and HTTP)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO, TypeVar

import anyio
import pytest
from mcp import Client
from mcp.client import IncomingMessage
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp_types import CallToolResult
from tests.leftovers import vmm_processes

from pyro_mcp.runtime.paths import RuntimePaths

pytestmark = pytest.mark.guest
T = TypeVar("T")
SERVE = [sys.executable, "-m", "pyro_mcp.cli.main", "mcp", "serve", "--profile", "vm-run"]
STREAMS = ["sh", "-c", "echo out; echo err >&2; exit 3"]


def _env(runtime: RuntimePaths) -> dict[str, str]:
    return dict(
        os.environ, PYRO_CACHE_DIR=str(runtime.cache_dir), PYRO_RUN_DIR=str(runtime.run_root)
    )


def _run(body: Callable[[], Awaitable[T]], timeout_s: float = 120) -> T:
    async def bounded() -> T:
        with anyio.fail_after(timeout_s):
            return await body()

    return anyio.run(bounded)


def _vmm_processes(runtime: RuntimePaths) -> list[str]:
    """The VMMs (QEMU or Firecracker) of this test run's VMs still running."""
    return vmm_processes([runtime.run_root])


def _vm_dirs(runtime: RuntimePaths) -> set[str]:
    """The run directories of this test run's VMs (one per VM made, until discarded)."""
    return {path.name for path in runtime.run_root.iterdir() if path.is_dir()}


def _text(result: CallToolResult) -> str:
    return "\n".join(getattr(block, "text", "") for block in result.content)


def _stdio_client(runtime: RuntimePaths, errlog: TextIO, **options: Any) -> Client:
    params = StdioServerParameters(command=SERVE[0], args=SERVE[1:], env=_env(runtime))
    return Client(stdio_client(params, errlog=errlog), **options)


def test_stdio_server_runs_a_command_and_lists_environments(
    runtime: RuntimePaths, tmp_path: Path
) -> None:
    stray: list[Exception] = []

    async def on_message(message: IncomingMessage) -> None:
        if isinstance(message, Exception):  # a stdout line that is not a JSON-RPC message
            stray.append(message)

    async def body() -> tuple[set[str], CallToolResult, CallToolResult, CallToolResult]:
        with (tmp_path / "stderr.log").open("w") as errlog:
            async with _stdio_client(runtime, errlog, message_handler=on_message) as client:
                tools = {tool.name for tool in (await client.list_tools()).tools}
                run = await client.call_tool(
                    "vm_run", {"environment": "debian:12", "command": STREAMS}
                )
                envs = await client.call_tool("env_list", {})
                unknown = await client.call_tool(
                    "vm_run", {"environment": "debian:99", "command": ["true"]}
                )
                return tools, run, envs, unknown

    tools, run, envs, unknown = _run(body)
    stderr = (tmp_path / "stderr.log").read_text()
    assert tools == {"vm_run", "env_list"}
    assert not run.is_error, _text(run)
    assert run.structured_content is not None
    data = run.structured_content
    assert (data["stdout"], data["stderr"], data["exit_code"]) == ("out\n", "err\n", 3)
    assert envs.structured_content is not None
    installed = {row["name"] for row in envs.structured_content["environments"] if row["installed"]}
    assert "debian:12" in installed
    assert unknown.is_error
    assert "not_found: unknown environment 'debian:99'" in _text(unknown)
    # stdout carried the protocol only; pyro's own notes went to stderr.
    assert stray == []
    assert "vm_run: booting" in stderr
    assert _vmm_processes(runtime) == []


def test_vm_run_reports_progress_while_it_boots(runtime: RuntimePaths, tmp_path: Path) -> None:
    messages: list[str] = []

    async def on_progress(_done: float, _total: float | None, message: str | None) -> None:
        messages.append(message or "")

    async def body() -> CallToolResult:
        with (tmp_path / "stderr.log").open("w") as errlog:
            async with _stdio_client(runtime, errlog) as client:
                return await client.call_tool(
                    "vm_run",
                    {"environment": "debian:12", "command": ["true"]},
                    progress_callback=on_progress,
                )

    result = _run(body)
    assert not result.is_error, _text(result)
    assert any("booting" in message for message in messages), messages
    assert messages.index("booting") < messages.index("running command")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until_listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"server never listened on 127.0.0.1:{port}:\n{log.read_text()}")
            time.sleep(0.1)


def _start_http_server(runtime: RuntimePaths, port: int, log: Path) -> subprocess.Popen[bytes]:
    """`pyro mcp serve --http` on loopback ``port``, its output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [*SERVE, "--http", f"127.0.0.1:{port}"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(runtime),
        )


def test_http_server_runs_on_the_guest_kernel_and_stops_cleanly(
    runtime: RuntimePaths, tmp_path: Path
) -> None:
    port = _free_port()
    log = tmp_path / "server.log"
    proc = _start_http_server(runtime, port, log)
    try:
        _wait_until_listening(proc, port, log)

        async def body() -> tuple[set[str], CallToolResult]:
            async with Client(f"http://127.0.0.1:{port}/mcp") as client:
                tools = {tool.name for tool in (await client.list_tools()).tools}
                run = await client.call_tool(
                    "vm_run", {"environment": "debian:12", "command": ["uname", "-r"]}
                )
                return tools, run

        tools, run = _run(body)
        assert tools == {"vm_run", "env_list"}
        assert not run.is_error, _text(run)
        assert run.structured_content is not None
        guest_kernel = run.structured_content["stdout"].strip()
        assert guest_kernel and guest_kernel != os.uname().release
        proc.terminate()
        # uvicorn shuts down gracefully, then re-raises SIGTERM to report how it ended.
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM), log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _vmm_processes(runtime) == []
    assert list(runtime.run_root.glob("*")) == []


def test_a_stdio_client_leaving_mid_call_leaves_no_vm_behind(
    runtime: RuntimePaths, tmp_path: Path
) -> None:
    async def body() -> None:
        with (tmp_path / "stderr.log").open("w") as errlog:
            async with _stdio_client(runtime, errlog) as client:
                with anyio.move_on_after(8):  # leave while `sleep 60` runs in the guest
                    await client.call_tool(
                        "vm_run", {"environment": "debian:12", "command": ["sleep", "60"]}
                    )
        # Leaving closes stdin; the SDK then ends the server with SIGTERM.

    _run(body)
    deadline = time.monotonic() + 15
    while _vmm_processes(runtime) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _vmm_processes(runtime) == []
    assert list(runtime.run_root.glob("*")) == []


@pytest.mark.parametrize("phase", ["booting", "running command"])
def test_a_cancelled_vm_run_leaves_no_vmm_within_2_s(
    runtime: RuntimePaths, tmp_path: Path, phase: str
) -> None:
    """The client gives up (notifications/cancelled) while the VM boots or while its
    command runs: the server discards the VM at once, starts no other in its place (a
    warm restore cut short is not retried as a cold boot), and goes on serving."""
    reached = anyio.Event()

    async def on_progress(_progress: float, _total: float | None, message: str | None) -> None:
        if message == phase:
            reached.set()

    async def body() -> tuple[list[str], list[str], bool]:
        with (tmp_path / "stderr.log").open("w") as errlog:
            async with _stdio_client(runtime, errlog) as client:
                scope = anyio.CancelScope()

                async def call() -> None:
                    with scope:
                        await client.call_tool(
                            "vm_run",
                            {"environment": "debian:12", "command": ["sleep", "60"]},
                            progress_callback=on_progress,
                        )

                async with anyio.create_task_group() as group:
                    group.start_soon(call)
                    await reached.wait()
                    if phase == "running command":
                        await anyio.sleep(1.0)  # the command is running in the guest
                    with anyio.fail_after(10):  # the jail has exec'd QEMU (while it boots)
                        while not _vmm_processes(runtime):
                            await anyio.sleep(0.02)
                    known = _vm_dirs(runtime)
                    scope.cancel()
                cancelled = time.monotonic()
                while _vmm_processes(runtime) and time.monotonic() - cancelled < 2:
                    await anyio.sleep(0.05)
                left = _vmm_processes(runtime)
                made_since: set[str] = set()  # watched for longer than a VM takes to be made
                while not left and not made_since and time.monotonic() - cancelled < 3:
                    made_since = _vm_dirs(runtime) - known
                    await anyio.sleep(0.02)
                envs = await client.call_tool("env_list", {})
                return left, sorted(made_since), envs.is_error

    left, made_since, env_list_failed = _run(body)
    assert (left, made_since, env_list_failed) == ([], [], False)


def test_a_long_vm_run_sends_progress_while_its_command_runs(
    runtime: RuntimePaths, tmp_path: Path
) -> None:
    messages: list[str] = []

    async def on_progress(_progress: float, _total: float | None, message: str | None) -> None:
        messages.append(message or "")

    async def body() -> CallToolResult:
        with (tmp_path / "stderr.log").open("w") as errlog:
            async with _stdio_client(runtime, errlog) as client:
                return await client.call_tool(
                    "vm_run",
                    {"environment": "debian:12", "command": "echo abc; sleep 11"},
                    progress_callback=on_progress,
                )

    result = _run(body)
    assert not result.is_error
    beats = [m for m in messages if m.startswith("command running:")]
    assert beats[:2] == [
        "command running: 5 s, 4 bytes of output",
        "command running: 10 s, 4 bytes of output",
    ]


def test_an_http_client_that_leaves_mid_call_leaves_no_vm_within_2_s(
    runtime: RuntimePaths, tmp_path: Path
) -> None:
    """Over HTTP the server outlives its clients: one that goes away (its request aborted,
    its session closed) while `vm_run`'s command runs must not leave the VM running."""
    port = _free_port()
    log = tmp_path / "server.log"
    proc = _start_http_server(runtime, port, log)
    try:
        _wait_until_listening(proc, port, log)
        running = anyio.Event()

        async def on_progress(_p: float, _t: float | None, message: str | None) -> None:
            if message == "running command":
                running.set()

        async def body() -> list[str]:
            with anyio.CancelScope() as scope:
                async with (
                    Client(f"http://127.0.0.1:{port}/mcp") as client,
                    anyio.create_task_group() as group,
                ):

                    async def call() -> None:
                        await client.call_tool(
                            "vm_run",
                            {"environment": "debian:12", "command": ["sleep", "60"]},
                            progress_callback=on_progress,
                        )

                    group.start_soon(call)
                    await running.wait()
                    await anyio.sleep(1.0)
                    scope.cancel()  # the client goes away mid-call
            left_at = time.monotonic()
            while _vmm_processes(runtime) and time.monotonic() - left_at < 2:
                await anyio.sleep(0.05)
            return _vmm_processes(runtime)

        assert _run(body) == []
        assert proc.poll() is None, log.read_text()  # the server serves on
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert _vmm_processes(runtime) == []
