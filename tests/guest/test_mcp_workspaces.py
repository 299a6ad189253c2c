"""Workspaces over `pyro mcp serve --profile workspace-core`, driven by the MCP SDK's stdio client.

Each test starts its own server with cwd and ``--root`` set to the test's tmp dir and a
private PYRO_STATE_DIR, so host paths and workspace records stay inside that dir.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp_types import CallToolResult
from tests.leftovers import vmm_processes

from pyro_mcp.mcp_server import operations_for
from pyro_mcp.runtime.paths import RuntimePaths

pytestmark = pytest.mark.guest
T = TypeVar("T")
PROFILE = "workspace-core"
SERVE = ["-m", "pyro_mcp.cli.main", "mcp", "serve", "--profile", PROFILE]
CORE_TOOLS = {
    "workspace_create",
    "workspace_list",
    "workspace_status",
    "workspace_exec",
    "workspace_file_list",
    "workspace_file_read",
    "workspace_file_write",
    "workspace_patch_apply",
    "workspace_diff",
    "workspace_export",
    "workspace_delete",
    "workspace_sync_push",
    "workspace_logs",
    "workspace_update",
    "workspace_reset",
    "vm_run",
    "env_list",
}
PATCH = (
    "--- a/src/app.py\n"
    "+++ b/src/app.py\n"
    "@@ -1,3 +1,3 @@\n"
    " def greet():\n"
    '-    return "hello"\n'
    '+    return "hello, mcp"\n'
    " \n"
)


class Server:
    """Where one test's `pyro mcp serve` runs and keeps its state."""

    def __init__(self, runtime: RuntimePaths, root: Path) -> None:
        self.runtime = runtime
        self.root = root
        self.state_dir = root / "state"
        self.errlog = root / "server-stderr.log"

    def env(self) -> dict[str, str]:
        return dict(
            os.environ,
            PYRO_CACHE_DIR=str(self.runtime.cache_dir),
            PYRO_RUN_DIR=str(self.runtime.run_root),
            PYRO_STATE_DIR=str(self.state_dir),
        )

    @asynccontextmanager
    async def client(self) -> AsyncIterator[Client]:
        params = StdioServerParameters(
            command=sys.executable,
            args=[*SERVE, "--root", str(self.root)],
            env=self.env(),
            cwd=str(self.root),
        )
        with self.errlog.open("a") as errlog:
            async with Client(stdio_client(params, errlog=errlog)) as client:
                yield client

    def pyro(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pyro_mcp.cli.main", *args],
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=120,
        )

    def vmm_processes(self) -> list[str]:
        """The VMMs (QEMU or Firecracker) of this server's VMs still running."""
        return vmm_processes([self.runtime.run_root, self.state_dir])


@pytest.fixture
def server(runtime: RuntimePaths, tmp_path: Path) -> Iterator[Server]:
    """A server's setting; afterwards every workspace in its state dir is deleted (by the
    CLI, as a backstop for a test that failed before its own cleanup) and no VM is left."""
    srv = Server(runtime, tmp_path)
    yield srv
    if srv.state_dir.exists():
        listed = srv.pyro("workspace", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        for record in json.loads(listed.stdout)["workspaces"]:
            deleted = srv.pyro("workspace", "delete", record["id"])
            assert deleted.returncode == 0, deleted.stderr
    assert srv.vmm_processes() == []


def _run(body: Callable[[], Awaitable[T]], timeout_s: float = 240) -> T:
    async def bounded() -> T:
        with anyio.fail_after(timeout_s):
            return await body()

    return anyio.run(bounded)


def _text(result: CallToolResult) -> str:
    return "\n".join(getattr(block, "text", "") for block in result.content)


def _data(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, _text(result)
    data = result.structured_content
    assert isinstance(data, dict), _text(result)
    return data


def _seed(root: Path) -> Path:
    (root / "src").mkdir(parents=True)
    (root / "src" / "app.py").write_text('def greet():\n    return "hello"\n\n')
    (root / "README.md").write_text("# seeded\n")
    return root


def test_registry_declares_the_core_tool_set() -> None:
    assert {op.name for op in operations_for(PROFILE)} == CORE_TOOLS


def test_an_agent_works_a_workspace_through_its_whole_loop(server: Server, tmp_path: Path) -> None:
    seed = _seed(tmp_path / "seed")
    notes: list[str] = []
    seen: dict[str, Any] = {}

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        notes.append(message or "")

    async def body() -> None:
        async with server.client() as client:
            seen["tools"] = {tool.name for tool in (await client.list_tools()).tools}
            created = await client.call_tool(
                "workspace_create",
                {"environment": "debian:12", "seed_path": str(seed), "name": "mcp-loop"},
                progress_callback=on_progress,
            )
            wid = _data(created)["id"]
            try:
                seen["created"] = created.structured_content
                seen["exec"] = _data(
                    await client.call_tool(
                        "workspace_exec",
                        {
                            "workspace_id": wid,
                            "command": ["sh", "-c", "cat README.md; ls src; exit 4"],
                        },
                    )
                )
                seen["write"] = _data(
                    await client.call_tool(
                        "workspace_file_write",
                        {"workspace_id": wid, "path": "notes/todo.txt", "text": "ship it\n"},
                    )
                )
                seen["patch"] = _data(
                    await client.call_tool(
                        "workspace_patch_apply", {"workspace_id": wid, "patch": PATCH}
                    )
                )
                seen["diff"] = _data(
                    await client.call_tool("workspace_diff", {"workspace_id": wid})
                )
                seen["read"] = _data(
                    await client.call_tool(
                        "workspace_file_read", {"workspace_id": wid, "path": "src/app.py"}
                    )
                )
                seen["export"] = _data(
                    await client.call_tool(
                        "workspace_export",
                        {"workspace_id": wid, "path": "src", "output_path": str(tmp_path / "out")},
                    )
                )
                seen["status"] = _data(
                    await client.call_tool("workspace_status", {"workspace_id": wid})
                )
            finally:
                seen["delete"] = await client.call_tool("workspace_delete", {"workspace_id": wid})
            seen["listed"] = _data(await client.call_tool("workspace_list", {}))

    _run(body)

    assert seen["tools"] == CORE_TOOLS
    assert seen["created"]["state"] == "running"
    assert seen["created"]["name"] == "mcp-loop"
    assert any(message.startswith("booting") for message in notes), notes
    assert notes[0].startswith("preparing the workspace disk from"), notes
    assert (seen["exec"]["stdout"], seen["exec"]["exit_code"]) == ("# seeded\napp.py\n", 4)
    diff = seen["diff"]
    assert diff["summary"] == {"added": 2, "modified": 1, "deleted": 0, "type_changed": 0}
    assert '-    return "hello"' in diff["patch"]
    assert '+    return "hello, mcp"' in diff["patch"]
    assert "+++ b/notes/todo.txt" in diff["patch"]
    assert "+ship it" in diff["patch"]
    assert seen["read"]["content"] == 'def greet():\n    return "hello, mcp"\n\n'
    assert seen["export"]["type"] == "dir"
    assert (tmp_path / "out" / "app.py").read_text() == 'def greet():\n    return "hello, mcp"\n\n'
    assert seen["status"]["commands"] >= 1
    assert not seen["delete"].is_error, _text(seen["delete"])
    assert seen["listed"]["workspaces"] == []
    assert server.vmm_processes() == []


def test_host_paths_outside_the_root_and_bad_arguments_are_tool_errors(
    server: Server, tmp_path: Path
) -> None:
    elsewhere = Path(f"/tmp/elsewhere-{uuid.uuid4().hex}")
    seen: dict[str, CallToolResult] = {}

    async def body() -> None:
        async with server.client() as client:
            seen["seed_etc"] = await client.call_tool(
                "workspace_create", {"environment": "debian:12", "seed_path": "/etc"}
            )
            seen["exec_unknown"] = await client.call_tool(
                "workspace_exec", {"workspace_id": "nosuch", "command": ["true"]}
            )
            created = await client.call_tool("workspace_create", {"environment": "debian:12"})
            wid = _data(created)["id"]
            try:
                await client.call_tool(
                    "workspace_file_write", {"workspace_id": wid, "path": "f.txt", "text": "x\n"}
                )
                seen["export_out"] = await client.call_tool(
                    "workspace_export",
                    {"workspace_id": wid, "path": "f.txt", "output_path": str(elsewhere)},
                )
                seen["exec_no_command"] = await client.call_tool(
                    "workspace_exec", {"workspace_id": wid}
                )
            finally:
                seen["delete"] = await client.call_tool("workspace_delete", {"workspace_id": wid})

    try:
        _run(body)
        exists_elsewhere = elsewhere.exists()
    finally:
        if elsewhere.is_dir():
            shutil.rmtree(elsewhere)
        elif elsewhere.exists():
            elsewhere.unlink()

    seed_etc = seen["seed_etc"]
    assert seed_etc.is_error
    assert "outside_root" in _text(seed_etc)
    assert "/etc" in _text(seed_etc)

    export_out = seen["export_out"]
    assert export_out.is_error
    assert "outside_root" in _text(export_out)
    assert not exists_elsewhere

    no_command = seen["exec_no_command"]
    assert no_command.is_error
    assert _text(no_command).endswith(
        "invalid_argument: workspace_exec needs command; it takes workspace_id, command "
        "(required) and cwd, env, secret_env, timeout_seconds, output_cap_bytes (optional)"
    ), _text(no_command)

    unknown = seen["exec_unknown"]
    assert unknown.is_error
    assert "not_found" in _text(unknown)
    assert "nosuch" in _text(unknown)

    assert not seen["delete"].is_error, _text(seen["delete"])
    # The refused seed left no workspace behind, and the one created was deleted.
    listed = server.pyro("workspace", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["workspaces"] == []
    assert server.vmm_processes() == []


def test_a_cancelled_workspace_exec_kills_its_command_in_the_guest(server: Server) -> None:
    async def body() -> tuple[str, str]:
        async with server.client() as client:
            wid = _data(await client.call_tool("workspace_create", {"environment": "debian:12"}))[
                "id"
            ]
            scope = anyio.CancelScope()

            async def call() -> None:
                with scope:
                    await client.call_tool(
                        "workspace_exec", {"workspace_id": wid, "command": ["sleep", "600"]}
                    )

            async with anyio.create_task_group() as group:
                group.start_soon(call)
                listing = ""
                for _ in range(100):  # until the command runs in the guest
                    await anyio.sleep(0.2)
                    found = await client.call_tool(
                        "workspace_exec", {"workspace_id": wid, "command": "pgrep -x sleep || true"}
                    )
                    listing = _data(found)["stdout"]
                    if listing:
                        break
                assert listing, "the command never started"
                scope.cancel()
            await anyio.sleep(2)
            after = await client.call_tool(
                "workspace_exec", {"workspace_id": wid, "command": "pgrep -x sleep || true"}
            )
            await client.call_tool("workspace_delete", {"workspace_id": wid})
            return listing, _data(after)["stdout"]

    listing, after = _run(body)
    assert listing.strip() and after == ""
