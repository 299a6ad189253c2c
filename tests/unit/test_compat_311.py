"""Every recorded pyro-mcp 3.11-style call (tests/compat/pyro311.py) is accepted as it
is by our MCP tools' schemas, our SDK's signatures and argument checks, and our CLI's
parser: nothing to rename, no type to change. The guest tests run the same calls."""

from __future__ import annotations

import inspect
from typing import Any

import anyio
import jsonschema
import pytest
from mcp.client import Client
from tests.compat.pyro311 import CLI_LINES, STEPS, Step, fill

from pyro_mcp import Pyro
from pyro_mcp.api.registry import Surface, all_operations
from pyro_mcp.api.validation import check_arguments
from pyro_mcp.cli.parser import build_parser
from pyro_mcp.mcp_server import COMPAT_TOOLS, build_server
from pyro_mcp.sdk import COMPAT_METHODS

NAMES = {
    "ws": "0123456789ab",
    "shell": "s1",
    "vm": "fedcba987654",
    "tmp": "/tmp/compat",
    "surface": "unit",
}
# pyro-mcp 3.11's 43 workspace-full tools, as its server listed them.
PYRO_311_TOOLS = {
    "vm_run", "vm_list_environments", "vm_create", "vm_start", "vm_exec", "vm_stop",
    "vm_delete", "vm_status", "vm_network_info", "vm_reap_expired",
    "workspace_create", "workspace_list", "workspace_update", "workspace_exec",
    "workspace_sync_push", "workspace_status", "workspace_stop", "workspace_start",
    "workspace_delete", "workspace_logs", "workspace_export", "workspace_diff",
    "workspace_file_list", "workspace_file_read", "workspace_file_write",
    "workspace_patch_apply", "workspace_disk_export", "workspace_disk_list",
    "workspace_disk_read", "snapshot_create", "snapshot_delete", "snapshot_list",
    "workspace_reset", "shell_open", "shell_read", "shell_write", "shell_signal",
    "shell_close", "service_start", "service_list", "service_status", "service_logs",
    "service_stop",
}  # fmt: skip


def _tools() -> dict[str, Any]:
    async def body() -> dict[str, Any]:
        async with Client(build_server("workspace-full")) as client:
            return {tool.name: tool for tool in (await client.list_tools()).tools}

    return anyio.run(body)


def _operation(method: str) -> Any:
    name = COMPAT_METHODS.get(method, method)
    return next(op for op in all_operations() if op.sdk == name)


def test_the_recording_covers_every_pyro_311_tool() -> None:
    recorded = {step.tool for step in STEPS}
    assert recorded == PYRO_311_TOOLS


@pytest.mark.parametrize("step", STEPS, ids=lambda step: step.tool)
def test_a_recorded_mcp_call_validates_against_our_tool_schema(step: Step) -> None:
    tools = _tools()
    assert step.tool in tools, f"no tool {step.tool}"
    jsonschema.validate(fill(step.arguments, NAMES), tools[step.tool].input_schema)


@pytest.mark.parametrize("step", STEPS, ids=lambda step: step.method)
def test_a_recorded_sdk_call_binds_and_passes_the_argument_checks(step: Step) -> None:
    method = getattr(Pyro, step.method)
    arguments = fill(step.arguments, NAMES)
    inspect.signature(method).bind(None, **arguments)
    check_arguments(_operation(step.method), arguments, Surface.SDK)


@pytest.mark.parametrize("line", CLI_LINES, ids=lambda line: " ".join(line[:3]))
def test_a_recorded_cli_line_parses_and_passes_the_argument_checks(line: tuple[str, ...]) -> None:
    namespace = build_parser().parse_args(list(fill(line, NAMES)))
    op = namespace.operation
    values = {
        p.name: getattr(namespace, p.name)
        for p in op.params_on(Surface.CLI)
        if getattr(namespace, p.name) not in (None, [])
    }
    check_arguments(op, values, Surface.CLI)


def test_pyro_311_compat_tool_names_are_the_same_tools() -> None:
    tools = _tools()
    for alias, target in COMPAT_TOOLS.items():
        assert tools[alias].input_schema == tools[target].input_schema
    for old, new in COMPAT_METHODS.items():
        assert getattr(Pyro, old) is getattr(Pyro, new)


def test_demo_network_asks_run_for_egress_and_shows_the_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pyro_mcp.api import Context
    from pyro_mcp.api.operations import demo
    from pyro_mcp.cli.render import render_text

    asked: dict[str, Any] = {}

    def fake_run(ctx: Context, environment: str, command: list[str], **kwargs: Any) -> Any:
        asked.update(environment=environment, command=command, **kwargs)
        return {"exit_code": 0, "stdout": "git version 2.39.5\n", "stderr": "",
                "duration_ms": 900.0, "timings_ms": {"boot_ms": 500.0}, "backend": "qemu-tcg",
                "boot": {"mode": "warm"}, "network": {"guest_ip": "10.241.0.2"}}  # fmt: skip

    monkeypatch.setattr(demo, "vm_run", fake_run)
    result = demo.demo(Context(), network=True)
    assert asked == {"environment": "debian:12", "command": ["git", "--version"], "network": True}
    text = render_text("demo", result)
    assert "the VM's address: 10.241.0.2" in text.splitlines()
    assert "exit code 0 in 900 ms on qemu-tcg (warm boot): boot 500 ms" in text.splitlines()
