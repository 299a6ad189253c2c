"""The MCP server is generated from the registry: tools, schemas and errors, no VM.

Each test talks to ``build_server(profile)`` in-process through the SDK's own client, so
what is asserted is what an MCP client sees. The CLI and SDK sides of "every operation
is reachable from every surface" are in test_surfaces.py; the MCP side is here.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import anyio
import pytest
from mcp import Client
from mcp_types import CallToolResult, Tool

from pyro_mcp.api import Context, Operation, all_operations, operation, registry
from pyro_mcp.api.registry import Arg, Param
from pyro_mcp.errors import NotFound
from pyro_mcp.mcp_profiles import PROFILES
from pyro_mcp.mcp_server import build_server, serve
from pyro_mcp.runtime.paths import RuntimePaths

T = TypeVar("T")
JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}
CLIENT_MODES = ("auto", "legacy")  # direct dispatch, and JSON-RPC over in-memory streams


def _run(body: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        with anyio.fail_after(30):
            return await body()

    return anyio.run(bounded)


def _list_tools(profile: str, **server_options: Any) -> dict[str, Tool]:
    async def body() -> dict[str, Tool]:
        async with Client(build_server(profile, **server_options)) as client:
            return {tool.name: tool for tool in (await client.list_tools()).tools}

    return _run(body)


def _call(
    profile: str,
    name: str,
    arguments: dict[str, Any],
    *,
    mode: str = "auto",
    progress: list[str] | None = None,
    **server_options: Any,
) -> CallToolResult:
    async def on_progress(_done: float, _total: float | None, message: str | None) -> None:
        if progress is not None:
            progress.append(message or "")

    async def body() -> CallToolResult:
        async with Client(build_server(profile, **server_options), mode=mode) as client:
            return await client.call_tool(name, arguments, progress_callback=on_progress)

    return _run(body)


def _text(result: CallToolResult) -> str:
    return "\n".join(getattr(block, "text", "") for block in result.content)


def _ops(profile: str) -> dict[str, Operation]:
    return {op.name: op for op in all_operations() if profile in op.profiles}


@pytest.fixture
def empty_runtime(tmp_path: Path) -> dict[str, Any]:
    """Server options whose operations see an empty cache: nothing can boot."""
    paths = RuntimePaths(tmp_path / "cache", tmp_path / "run")
    return {"make_context": lambda: Context(paths=paths)}


# --- tools and their schemas ------------------------------------------------------------


def test_vm_run_profile_exposes_exactly_vm_run_and_env_list() -> None:
    assert set(_list_tools("vm-run")) == {"vm_run", "env_list"}
    assert set(_ops("vm-run")) == {"vm_run", "env_list"}


@pytest.mark.parametrize("profile", PROFILES)
def test_each_profile_exposes_the_operations_that_declare_it(profile: str) -> None:
    assert set(_list_tools(profile)) == set(_ops(profile))


@pytest.mark.parametrize("profile", PROFILES)
def test_tool_descriptions_and_schemas_come_from_the_operation(profile: str) -> None:
    tools = _list_tools(profile)
    for name, op in _ops(profile).items():
        tool = tools[name]
        assert tool.description == op.doc
        schema = tool.input_schema
        assert schema["type"] == "object"
        assert schema.get("additionalProperties") is False, name
        assert list(schema["properties"]) == [p.name for p in op.params], name
        assert schema.get("required", []) == [p.name for p in op.params if p.required], name
        for param in op.params:
            _assert_property(name, param, schema["properties"][param.name])
        assert tool.output_schema is not None and tool.output_schema["type"] == "object"


def _assert_property(tool: str, param: Param, prop: dict[str, Any]) -> None:
    where = f"{tool}.{param.name}"
    assert prop["description"] == param.arg.help, where
    if param.required:
        assert "default" not in prop, where
    else:
        assert prop["default"] == param.default, where
    # An optional parameter is "anyOf: [<type>, null]"; the first arm carries the type.
    variants = prop.get("anyOf", [prop])
    if param.optional:
        assert {"type": "null"} in variants, where
    typed = next(v for v in variants if v != {"type": "null"})
    if param.is_list:
        assert typed["type"] == "array", where
        assert typed["items"]["type"] == JSON_TYPES[param.item_type], where
    else:
        assert typed["type"] == JSON_TYPES[param.annotation], where
    if param.arg.choices:
        assert typed["enum"] == list(param.arg.choices), where
    else:
        assert "enum" not in typed, where


def test_choices_become_an_enum_for_vm_run_backend() -> None:
    backend = _list_tools("vm-run")["vm_run"].input_schema["properties"]["backend"]
    arms = [arm for arm in backend["anyOf"] if arm.get("type") == "string"]
    assert arms and set(arms[0]["enum"]) >= {"auto", "qemu", "firecracker"}


# --- reachability (the MCP side of test_surfaces.py) ------------------------------------


def test_every_operation_is_a_tool_in_exactly_the_profiles_it_declares() -> None:
    tools = {profile: set(_list_tools(profile)) for profile in PROFILES}
    for op in all_operations():
        assert op.profiles <= set(PROFILES), f"{op.name} declares an unknown profile"
        for profile in PROFILES:
            assert (op.name in tools[profile]) == (profile in op.profiles), (op.name, profile)


def test_profiles_nest_so_workspace_full_has_every_mcp_tool() -> None:
    tools = {profile: set(_list_tools(profile)) for profile in PROFILES}
    assert tools["vm-run"] <= tools["workspace-core"] <= tools["workspace-full"]
    assert tools["workspace-full"] == {op.name for op in all_operations() if op.profiles}


# --- malformed calls and operation errors -----------------------------------------------


@pytest.mark.parametrize("mode", CLIENT_MODES)
@pytest.mark.parametrize(
    ("arguments", "field", "why"),
    [
        ({"command": ["true"]}, "environment", "Field required"),
        (
            {"environment": "debian:12", "command": ["true"], "vcpu_count": "two"},
            "vcpu_count",
            "valid integer",
        ),
        ({"environment": "debian:12", "command": "true"}, "command", "valid list"),
        (
            {"environment": "debian:12", "command": ["true"], "backend": "xen"},
            "backend",
            "'auto', 'firecracker' or 'qemu'",
        ),
        (
            {"environment": "debian:12", "command": ["true"], "timeout": 5},
            "timeout",
            "Extra inputs are not permitted",
        ),
    ],
)
def test_a_malformed_call_is_an_error_result_naming_the_field(
    mode: str, arguments: dict[str, Any], field: str, why: str, empty_runtime: dict[str, Any]
) -> None:
    result = _call("vm-run", "vm_run", arguments, mode=mode, **empty_runtime)
    assert result.is_error
    text = _text(result)
    assert f"\n{field}\n" in text, text
    assert why in text, text


@pytest.mark.parametrize("mode", CLIENT_MODES)
def test_an_operation_error_is_an_error_result_with_its_code_and_message(
    mode: str, empty_runtime: dict[str, Any]
) -> None:
    # vm_run checks its sizes before anything else: no runtime needed to see the error.
    arguments = {"environment": "debian:12", "command": ["true"], "vcpu_count": 0}
    result = _call("vm-run", "vm_run", arguments, mode=mode, **empty_runtime)
    assert result.is_error
    assert "invalid_argument: vcpu_count must be between 1 and 32, got 0" in _text(result)


def test_an_empty_command_is_refused_by_the_operation(empty_runtime: dict[str, Any]) -> None:
    arguments = {"environment": "debian:12", "command": []}
    result = _call("vm-run", "vm_run", arguments, **empty_runtime)
    assert result.is_error
    assert "invalid_argument: command is empty" in _text(result)


def test_env_list_returns_the_catalog_as_structured_content(
    empty_runtime: dict[str, Any],
) -> None:
    result = _call("vm-run", "env_list", {}, **empty_runtime)
    assert not result.is_error
    assert result.structured_content is not None
    rows = result.structured_content["environments"]
    assert [row["name"] for row in rows] == ["debian:12-base", "debian:12", "debian:12-build"]
    assert not any(row["installed"] for row in rows)


# --- a stand-in operation: errors, progress and threads, without a VM -------------------

SEEN: dict[str, Any] = {}


def mcp_test_probe(
    ctx: Context,
    name: Annotated[str, Arg("what to look up", positional=True)],
) -> dict[str, Any]:
    """Look ``name`` up slowly, reporting progress (a stand-in used by the MCP tests)."""
    try:
        asyncio.get_running_loop()
        SEEN["on_event_loop"] = True
    except RuntimeError:
        SEEN["on_event_loop"] = False
    SEEN["thread"] = threading.current_thread()
    ctx.progress("booting the probe")
    ctx.progress("looking it up")
    if name != "known":
        raise NotFound(f"unknown name {name!r}", hint="try 'known'")
    return {"name": name}


@pytest.fixture
def probe_operation(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Register ``mcp_test_probe`` in the vm-run profile for one test only."""
    all_operations()  # the real ones first, so the copy below holds them
    monkeypatch.setattr(registry, "OPERATIONS", dict(registry.OPERATIONS))
    operation(cli=("mcp-test-probe",), sdk="mcp_test_probe", profiles=("vm-run",))(mcp_test_probe)
    SEEN.clear()
    yield


@pytest.mark.parametrize("mode", CLIENT_MODES)
def test_a_pyro_error_carries_its_code_message_and_hint(mode: str, probe_operation: None) -> None:
    result = _call("vm-run", "mcp_test_probe", {"name": "nope"}, mode=mode)
    assert result.is_error
    assert "not_found: unknown name 'nope' (try 'known')" in _text(result)


@pytest.mark.parametrize("mode", CLIENT_MODES)
def test_progress_phases_reach_the_client_as_notifications(
    mode: str, probe_operation: None
) -> None:
    progress: list[str] = []
    result = _call("vm-run", "mcp_test_probe", {"name": "known"}, mode=mode, progress=progress)
    assert not result.is_error
    assert result.structured_content == {"name": "known"}
    assert progress == ["booting the probe", "looking it up"]


def test_operations_run_in_a_worker_thread_not_on_the_event_loop(
    probe_operation: None,
) -> None:
    _call("vm-run", "mcp_test_probe", {"name": "known"})
    assert SEEN["on_event_loop"] is False
    assert SEEN["thread"] is not threading.main_thread()


# --- serve's address -------------------------------------------------------------------


@pytest.mark.parametrize("address", ["8000", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:70000"])
def test_a_bad_http_address_is_a_clear_error_before_anything_starts(address: str) -> None:
    with pytest.raises(SystemExit, match="--http takes HOST:PORT"):
        serve("vm-run", http=address)
