"""The MCP server is generated from the registry: tools, schemas and errors, no VM.

Each test talks to ``build_server(profile)`` in-process through the SDK's own client, so
what is asserted is what an MCP client sees. The CLI and SDK sides of "every operation
is reachable from every surface" are in test_surfaces.py; the MCP side is here.
"""

from __future__ import annotations

import asyncio
import threading
import typing
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypedDict, TypeVar, get_args, get_origin

import anyio
import jsonschema
import pytest
from mcp import Client
from mcp_types import CallToolResult, Tool

from pyro_mcp.api import Context, Operation, all_operations, operation, registry
from pyro_mcp.api.registry import EVERY, Arg, Param, Surface
from pyro_mcp.api.result_shapes import result_type
from pyro_mcp.errors import NotFound
from pyro_mcp.mcp_profiles import PROFILES
from pyro_mcp.mcp_server import COMPAT_TOOLS, build_server, confined_context, serve
from pyro_mcp.runtime.paths import RuntimePaths

T = TypeVar("T")
JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object"}
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
    compat = set(COMPAT_TOOLS) if profile == "workspace-full" else set()
    assert set(_list_tools(profile)) == set(_ops(profile)) | compat


@pytest.mark.parametrize("profile", PROFILES)
def test_tool_descriptions_and_schemas_come_from_the_operation(profile: str) -> None:
    tools = _list_tools(profile)
    for name, op in _ops(profile).items():
        tool = tools[name]
        assert tool.description == op.doc
        schema = tool.input_schema
        assert schema["type"] == "object"
        assert schema.get("additionalProperties") is False, name
        offered = op.mcp_params(profile)
        assert list(schema["properties"]) == [p.name for p in offered], name
        assert schema.get("required", []) == [p.name for p in offered if p.required], name
        for param in offered:
            _assert_property(name, param, schema["properties"][param.name])
        assert tool.output_schema is not None and tool.output_schema["type"] == "object"


@pytest.mark.parametrize("profile", PROFILES)
def test_each_tool_publishes_the_result_it_declares_as_its_output_schema(profile: str) -> None:
    tools = _list_tools(profile)
    for name, op in {**_ops(profile), **_compat_ops(profile)}.items():
        declared = result_type(op)
        schema = tools[name].output_schema
        assert schema is not None, name
        assert schema["title"] == declared.__name__, name
        assert set(schema["properties"]) == set(typing.get_type_hints(declared)), name
        assert schema["required"] == sorted(declared.__required_keys__), name
        assert "$schema" not in schema, name  # draft-07 validators refuse 2020-12's address
        assert not _closed_objects(schema), f"{name}: {_closed_objects(schema)}"
        jsonschema.Draft202012Validator.check_schema(schema)


def _compat_ops(profile: str) -> dict[str, Operation]:
    ops = _ops(profile) if profile == "workspace-full" else {}  # where pyro-mcp 3.x had them
    return {alias: ops[target] for alias, target in COMPAT_TOOLS.items() if target in ops}


def _closed_objects(schema: Any, where: str = "") -> list[str]:
    """Where ``schema`` has an object refusing keys it does not name."""
    if isinstance(schema, list):
        return [w for i, item in enumerate(schema) for w in _closed_objects(item, f"{where}[{i}]")]
    if not isinstance(schema, dict):
        return []
    here = [where or "/"] if schema.get("additionalProperties") is False else []
    return here + [w for k, v in schema.items() for w in _closed_objects(v, f"{where}/{k}")]


def test_an_output_schema_types_each_key_and_leaves_room_for_new_ones() -> None:
    schema = _list_tools("workspace-full")["workspace_exec"].output_schema
    assert schema is not None
    validator = jsonschema.Draft202012Validator(schema)
    result = {
        "exit_code": 0, "stdout": "hi\n", "stderr": "", "timed_out": False, "signal": None,
        "stdout_truncated": False, "stderr_truncated": False, "duration_ms": 3.5,
        "workspace_id": "0123456789ab", "command": ["echo", "hi"], "cwd": "/workspace",
    }  # fmt: skip
    assert list(validator.iter_errors(result)) == []
    assert list(validator.iter_errors({**result, "a_key_added_later": 1})) == []
    errors = [e.message for e in validator.iter_errors({**result, "exit_code": "0"})]
    assert errors == ["'0' is not of type 'integer'"]
    missing = {k: v for k, v in result.items() if k != "stdout"}
    assert [e.message for e in validator.iter_errors(missing)] == [
        "'stdout' is a required property"
    ]


def _assert_property(tool: str, param: Param, prop: dict[str, Any]) -> None:
    where = f"{tool}.{param.name}"
    assert prop["description"] == param.arg.help, where
    if param.required:
        assert "default" not in prop, where
    else:
        assert prop["default"] == param.default, where
    # An optional parameter is "anyOf: [<type>..., null]"; a union has one arm per type.
    variants = prop.get("anyOf", [prop])
    if param.optional:
        assert {"type": "null"} in variants, where
    typed = [v for v in variants if v != {"type": "null"}]
    if param.arg.octal:  # an integer, or a string of octal digits
        assert [v["type"] for v in typed] == ["integer", "string"], where
        return
    assert len(typed) == len(param.arms), where
    for arm, schema in zip(param.arms, typed, strict=True):
        if get_origin(arm) is list:
            assert schema["type"] == "array", where
            item = get_args(arm)[0]
            assert schema["items"]["type"] == JSON_TYPES[get_origin(item) or item], where
            continue
        if get_origin(arm) is dict:  # an object of strings (secret_env's 3.x form)
            assert schema == {"type": "object", "additionalProperties": {"type": "string"}}
            continue
        assert schema["type"] == JSON_TYPES[arm], where
        if arm in (int, float):  # every number states its range
            low = "exclusiveMinimum" if param.arg.exclusive_minimum else "minimum"
            assert (schema[low], schema["maximum"]) == (param.arg.minimum, param.arg.maximum)
        if param.arg.choices:
            assert schema["enum"] == list(param.arg.choices), where
        else:
            assert "enum" not in schema, where


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
    compat = set(COMPAT_TOOLS)  # pyro-mcp 3.x's names, beside ours
    assert tools["workspace-full"] == {op.name for op in all_operations() if op.profiles} | compat


# --- malformed calls and operation errors -----------------------------------------------


VM_RUN_TAKES = (
    "it takes environment, command (required) and vcpu_count, mem_mib, timeout_seconds, "
    "backend, output_cap_bytes, network, network_policy, allow_cidr, allow_host, ttl_seconds, "
    "allow_host_compat (optional)"
)


@pytest.mark.parametrize("mode", CLIENT_MODES)
@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ({"command": ["true"]}, "vm_run needs environment"),
        ({}, "vm_run needs environment, command"),
        (
            {"environment": "debian:12", "command": ["true"], "timeout": 5},
            "vm_run has no parameter 'timeout' (did you mean 'timeout_seconds'?)",
        ),
        (
            {"environment": "debian:12", "command": ["true"], "cpus": 2, "labels": {}},
            "vm_run has no parameters 'cpus', 'labels'",
        ),
    ],
)
def test_a_call_missing_or_misspelling_a_parameter_lists_what_the_tool_takes(
    mode: str, arguments: dict[str, Any], problem: str, empty_runtime: dict[str, Any]
) -> None:
    result = _call("vm-run", "vm_run", arguments, mode=mode, **empty_runtime)
    assert result.is_error
    assert _text(result) == (
        f"Error executing tool vm_run: invalid_argument: {problem}; {VM_RUN_TAKES}"
    )


def test_the_listed_parameters_are_those_of_the_tool_in_the_served_profile() -> None:
    # workspace-core offers vm_run without its network parameters: they are unknown there.
    arguments = {"environment": "debian:12", "command": ["true"], "network": True}
    result = _call("workspace-core", "vm_run", arguments)
    assert _text(result).endswith(
        "vm_run has no parameter 'network'; it takes environment, command (required) and "
        "vcpu_count, mem_mib, timeout_seconds, backend, output_cap_bytes, ttl_seconds, "
        "allow_host_compat (optional)"
    )
    no_parameters = _call("vm-run", "env_list", {"name": "debian:12"})
    assert _text(no_parameters).endswith("env_list has no parameter 'name'; it takes no parameters")


@pytest.mark.parametrize("mode", CLIENT_MODES)
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"vcpu_count": "two"},
            "vcpu_count must be an integer between 1 and 32, got 'two'",
        ),
        (
            {"command": 5},
            "command must be a string or a list of strings, got 5",
        ),
        (
            {"backend": "xen"},
            "backend must be one of 'auto', 'firecracker', 'qemu', got 'xen'",
        ),
    ],
)
def test_a_value_of_the_wrong_type_is_the_same_invalid_argument_as_on_every_surface(
    mode: str, arguments: dict[str, Any], message: str, empty_runtime: dict[str, Any]
) -> None:
    call = {"environment": "debian:12", "command": ["true"], **arguments}
    result = _call("vm-run", "vm_run", call, mode=mode, **empty_runtime)
    assert result.is_error
    assert _text(result).endswith(f": invalid_argument: {message}"), _text(result)


@pytest.mark.parametrize("mode", CLIENT_MODES)
def test_an_operation_error_is_an_error_result_with_its_code_and_message(
    mode: str, empty_runtime: dict[str, Any]
) -> None:
    # vm_run checks its sizes before anything else: no runtime needed to see the error.
    arguments = {"environment": "debian:12", "command": ["true"], "vcpu_count": 0}
    result = _call("vm-run", "vm_run", arguments, mode=mode, **empty_runtime)
    assert result.is_error
    assert "invalid_argument: vcpu_count must be an integer between 1 and 32, got 0" in _text(
        result
    )


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


class NamedResult(TypedDict):
    """What a stand-in returns."""

    name: str


def mcp_test_probe(
    ctx: Context,
    name: Annotated[str, Arg("what to look up", surfaces=EVERY, positional=True)],
) -> NamedResult:
    """Look ``name`` up slowly, reporting progress (a stand-in used by the MCP tests)."""
    try:
        asyncio.get_running_loop()
        SEEN["on_event_loop"] = True
    except RuntimeError:
        SEEN["on_event_loop"] = False
    SEEN["thread"] = threading.current_thread()
    ctx.progress("booting the probe")
    ctx.progress("looking it up")
    if name == "grown":  # a later version's result: a key this listing does not name
        return {"name": name, "added_later": True}  # type: ignore[typeddict-unknown-key]
    if name == "mistyped":  # a result unlike its declaration (a bug)
        return {"name": 7}  # type: ignore[typeddict-item]
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


def test_a_client_accepts_a_result_with_keys_added_after_its_listing(
    probe_operation: None,
) -> None:
    result = _call("vm-run", "mcp_test_probe", {"name": "grown"})
    assert not result.is_error
    assert result.structured_content == {"name": "grown", "added_later": True}


def test_a_client_refuses_a_result_whose_value_is_not_of_its_declared_type(
    probe_operation: None,
) -> None:
    # The SDK's client checks structured content against the published schema: the
    # schema is what stands between a wrong result and a program that trusts it.
    with pytest.raises(ExceptionGroup) as raised:  # out of the client's task groups
        _call("vm-run", "mcp_test_probe", {"name": "mistyped"})
    assert raised.group_contains(
        RuntimeError,
        match=r"Invalid structured content returned by tool mcp_test_probe: 7 is not of type",
    )


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


# --- parameters that belong to the CLI, host paths -------------------------------------


def test_file_write_over_mcp_has_no_stdin_and_never_reads_the_servers_own(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    class Watched:
        read = False

        @property
        def buffer(self) -> Watched:
            Watched.read = True
            return self

    monkeypatch.setattr("sys.stdin", Watched())
    tool = _list_tools("workspace-core")["workspace_file_write"]
    assert "stdin" not in tool.input_schema["properties"]
    context = {"make_context": lambda: Context(state_dir=tmp_path / "state")}
    arguments = {"workspace_id": "ws", "path": "f", "stdin": True}
    result = _call("workspace-core", "workspace_file_write", arguments, **context)
    assert result.is_error
    assert "invalid_argument: workspace_file_write has no parameter 'stdin'; it takes " in (
        _text(result)
    )
    assert not Watched.read


@pytest.mark.parametrize(
    ("tool", "option"),
    [("workspace_create", "id_only"), ("workspace_file_read", "content_only")],
)
def test_printing_options_of_the_cli_are_not_mcp_parameters(tool: str, option: str) -> None:
    assert option not in _list_tools("workspace-full")[tool].input_schema["properties"]


# Every host path an MCP client can name, with the other arguments its tool needs.
HOST_PATH_CALLS = {
    ("workspace_create", "seed_path"): {"environment": "debian:12"},
    ("workspace_sync_push", "source_path"): {"workspace_id": "ws"},
    ("workspace_export", "output_path"): {"workspace_id": "ws", "path": "f"},
    ("workspace_disk_export", "output_path"): {"workspace_id": "ws"},
    ("workspace_file_write", "text_file"): {"workspace_id": "ws", "path": "f"},
    ("workspace_patch_apply", "patch_file"): {"workspace_id": "ws"},
}


def test_the_host_path_table_names_every_host_path_an_mcp_client_can_give() -> None:
    host_paths = {
        (op.name, p.name)
        for op in all_operations()
        if op.profiles
        for p in op.params_on(Surface.MCP)
        if p.arg.path and "host" in p.arg.help
    }
    assert host_paths == set(HOST_PATH_CALLS)


@pytest.mark.parametrize(("tool", "option"), sorted(HOST_PATH_CALLS))
def test_a_host_path_from_mcp_outside_the_roots_is_refused_before_anything_runs(
    tool: str, option: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYRO_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("PYRO_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("not for MCP clients\n")
    arguments = {**HOST_PATH_CALLS[(tool, option)], option: str(outside)}
    result = _call("workspace-full", tool, arguments, make_context=confined_context([root]))
    assert result.is_error
    assert "outside_root: " in _text(result)
    assert f"{outside} is outside the allowed host roots ({root})" in _text(result)
    assert not (tmp_path / "state" / "workspaces").exists()  # nothing was created


def test_network_parameters_are_offered_only_where_vms_may_have_a_network() -> None:
    core, full, run = (_list_tools(p) for p in ("workspace-core", "workspace-full", "vm-run"))
    network = {"network_policy", "allow_cidr", "allow_host", "publish"}
    assert network <= set(full["workspace_create"].input_schema["properties"])
    assert not network & set(core["workspace_create"].input_schema["properties"])
    assert {"network", "network_policy"} <= set(run["vm_run"].input_schema["properties"])
    assert "network" not in core["vm_run"].input_schema["properties"]
    assert "publish" in full["service_start"].input_schema["properties"]
