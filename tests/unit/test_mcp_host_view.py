"""What an MCP host shows of pyro's tools: titles and hints, capabilities, log lines, and
errors that name tools rather than CLI commands. No VM: the SDK's own client talks to
``build_server`` in-process (as in test_mcp_schema.py)."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypedDict, TypeVar

import anyio
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, LoggingMessageNotificationParams, PromptReference, Tool

from pyro_mcp.api import OPERATIONS, Context, all_operations, operation, registry
from pyro_mcp.api.hints import for_mcp
from pyro_mcp.api.registry import EVERY, Arg
from pyro_mcp.cli.main import main
from pyro_mcp.errors import InvalidState, VMError
from pyro_mcp.mcp_profiles import PROFILES
from pyro_mcp.mcp_server import COMPAT_TOOLS, build_server, error_text
from pyro_mcp.vmm.firecracker.api import FirecrackerAPIError

T = TypeVar("T")
MODES = ("auto", "legacy")  # protocol 2026-07-28 (per-request log levels), and 2025-11-25


def _run(body: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        with anyio.fail_after(30):
            return await body()

    return anyio.run(bounded)


def _tools(profile: str) -> dict[str, Tool]:
    async def body() -> dict[str, Tool]:
        async with Client(build_server(profile)) as client:
            return {tool.name: tool for tool in (await client.list_tools()).tools}

    return _run(body)


def _text(result: CallToolResult) -> str:
    return "\n".join(getattr(block, "text", "") for block in result.content)


# --- titles and hints --------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_every_tool_has_a_title_and_all_four_hints(profile: str) -> None:
    for name, tool in _tools(profile).items():
        effects = OPERATIONS[COMPAT_TOOLS.get(name, name)].effects
        assert effects is not None, name
        hints = tool.annotations
        assert hints is not None, name
        assert tool.title == hints.title == effects.title, name
        assert (
            hints.read_only_hint,
            hints.destructive_hint,
            hints.idempotent_hint,
            hints.open_world_hint,
        ) == (effects.read_only, effects.destructive, effects.idempotent, effects.open_world)


def test_every_operation_declares_its_effects_with_a_title_of_its_own() -> None:
    titles = [op.effects.title for op in all_operations() if op.effects is not None]
    assert len(titles) == len(all_operations())  # CLI-only ones too: they may become tools
    assert len(set(titles)) == len(titles)
    assert all(title[0].isupper() and not title.endswith(".") for title in titles)


@pytest.mark.parametrize(
    ("tool", "read_only", "destructive", "idempotent", "open_world"),
    [
        ("workspace_delete", False, True, True, False),
        ("workspace_list", True, False, True, False),
        ("workspace_file_read", True, False, True, False),
        ("workspace_create", False, False, False, False),
        ("workspace_exec", False, True, False, True),  # a command may do anything
        ("vm_run", False, False, False, True),  # its VM is discarded, may have a network
        ("env_list", True, False, True, False),
    ],
)
def test_known_tools_carry_the_hints_a_host_relies_on(
    tool: str, read_only: bool, destructive: bool, idempotent: bool, open_world: bool
) -> None:
    hints = _tools("workspace-full")[tool].annotations
    assert hints is not None
    assert (
        hints.read_only_hint,
        hints.destructive_hint,
        hints.idempotent_hint,
        hints.open_world_hint,
    ) == (read_only, destructive, idempotent, open_world)


def test_a_title_is_words_for_a_person_not_the_tool_name() -> None:
    tools = _tools("workspace-full")
    assert tools["workspace_delete"].title == "Delete a workspace"
    assert tools["vm_run"].title == "Run a command in a fresh microVM"


def test_a_read_only_operation_is_idempotent_and_never_destructive() -> None:
    for op in all_operations():
        if op.effects is not None and op.effects.read_only:
            assert op.effects.idempotent and not op.effects.destructive, op.name


def test_an_operation_cannot_be_read_only_and_destructive(monkeypatch: pytest.MonkeyPatch) -> None:
    all_operations()
    monkeypatch.setattr(registry, "OPERATIONS", dict(registry.OPERATIONS))
    with pytest.raises(TypeError, match="not both read_only and destructive"):
        operation(cli=("x",), sdk="x", title="X", read_only=True, destructive=True)


# --- capabilities ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_the_server_advertises_tools_and_logging_and_nothing_else(mode: str) -> None:
    async def body() -> dict[str, Any]:
        async with Client(build_server("workspace-full"), mode=mode) as client:
            assert client.server_capabilities is not None
            return client.server_capabilities.model_dump(exclude_none=True)

    assert _run(body) == {"tools": {"list_changed": False}, "logging": {}}


ASKS_FOR_WHAT_IT_LACKS: dict[str, Callable[[Client], Awaitable[Any]]] = {
    "prompts": lambda client: client.list_prompts(),
    "resources": lambda client: client.list_resources(),
    "resource templates": lambda client: client.list_resource_templates(),
    "completions": lambda client: client.complete(
        PromptReference(type="ref/prompt", name="any"), {"name": "x", "value": "y"}
    ),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("what", sorted(ASKS_FOR_WHAT_IT_LACKS))
def test_prompts_resources_and_completions_it_lacks_are_method_not_found(
    mode: str, what: str
) -> None:
    async def body() -> int:
        async with Client(build_server("vm-run"), mode=mode) as client:
            with pytest.raises(MCPError) as caught:
                await ASKS_FOR_WHAT_IT_LACKS[what](client)
            return caught.value.error.code

    assert _run(body) == -32601


# --- log lines ---------------------------------------------------------------------------


class NamedResult(TypedDict):
    """What a stand-in returns."""

    name: str


def mcp_test_logger(
    ctx: Context, name: Annotated[str, Arg("what to log", surfaces=EVERY, positional=True)]
) -> NamedResult:
    """Log at two levels (a stand-in used by the MCP tests)."""
    ctx.progress(f"looking {name} up")  # an info line: "mcp_test_logger: looking ... up"
    logging.getLogger("pyro_mcp.tests").warning("%s is not cached", name)
    return {"name": name}


def _register_for_one_test(monkeypatch: pytest.MonkeyPatch, func: Callable[..., Any]) -> None:
    """Register the stand-in ``func`` in every profile, for the test that asks only."""
    all_operations()  # the real ones first, so the copy below holds them
    monkeypatch.setattr(registry, "OPERATIONS", dict(registry.OPERATIONS))
    name = func.__name__
    operation(cli=(name.replace("_", "-"),), sdk=name, profiles=PROFILES, title=name)(func)


@pytest.fixture
def logger_operation(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """``mcp_test_logger``, with pyro's info lines logged as ``pyro mcp serve`` logs them
    (the SDK sets up logging at INFO)."""
    caplog.set_level(logging.INFO, logger="pyro_mcp")
    _register_for_one_test(monkeypatch, mcp_test_logger)


def _logs(mode: str, level: str | None) -> list[tuple[str, str | None, Any]]:
    seen: list[tuple[str, str | None, Any]] = []

    async def on_log(params: LoggingMessageNotificationParams) -> None:
        seen.append((params.level, params.logger, params.data))

    async def body() -> None:
        # At 2026-07-28 a request asks for its levels itself; before, logging/setLevel.
        per_request = {"log_level": level} if mode == "auto" and level else {}
        async with Client(
            build_server("vm-run"), mode=mode, logging_callback=on_log, **per_request
        ) as client:
            if mode == "legacy" and level:
                with warnings.catch_warnings():  # the SDK: "deprecated as of 2026-07-28"
                    warnings.simplefilter("ignore")
                    await client.set_logging_level(level)  # type: ignore[arg-type]
            result = await client.call_tool("mcp_test_logger", {"name": "debian:12"})
            assert not result.is_error

    _run(body)
    return seen


@pytest.mark.parametrize("mode", MODES)
def test_a_client_that_asks_for_info_gets_the_calls_log_lines(
    mode: str, logger_operation: None
) -> None:
    assert _logs(mode, "info") == [
        ("info", "pyro_mcp.mcp_server", "mcp_test_logger: looking debian:12 up"),
        ("warning", "pyro_mcp.tests", "debian:12 is not cached"),
    ]


@pytest.mark.parametrize("mode", MODES)
def test_the_level_a_client_sets_is_respected(mode: str, logger_operation: None) -> None:
    assert _logs(mode, "warning") == [("warning", "pyro_mcp.tests", "debian:12 is not cached")]
    assert _logs(mode, "error") == []


@pytest.mark.parametrize("mode", MODES)
def test_a_client_that_never_asks_gets_no_log_lines(mode: str, logger_operation: None) -> None:
    assert _logs(mode, None) == []


# --- errors name tools, not CLI commands ---------------------------------------------------


def mcp_test_stopped(
    ctx: Context, workspace: Annotated[str, Arg("a workspace", surfaces=EVERY, positional=True)]
) -> NamedResult:
    """Refuse as a stopped workspace does (a stand-in used by the MCP tests)."""
    raise InvalidState(
        f"workspace {workspace} is stopped; exec needs it running",
        hint=f"run `pyro workspace start {workspace}`",
    )


@pytest.fixture
def stopped_operation(monkeypatch: pytest.MonkeyPatch) -> None:
    _register_for_one_test(monkeypatch, mcp_test_stopped)


def _call(profile: str, name: str, arguments: dict[str, Any], **options: Any) -> str:
    async def body() -> CallToolResult:
        async with Client(build_server(profile, **options)) as client:
            return await client.call_tool(name, arguments)

    result = _run(body)
    assert result.is_error
    return _text(result)


def test_a_hint_to_run_a_command_tells_an_mcp_client_the_tool_to_call(
    stopped_operation: None,
) -> None:
    text = _call("workspace-full", "mcp_test_stopped", {"workspace": "ab12"})
    assert text.endswith(
        "invalid_state: workspace ab12 is stopped; exec needs it running "
        '(call `workspace_start` (arguments: `{"workspace_id": "ab12"}`))'
    )


def test_a_command_whose_tool_the_profile_lacks_is_said_to_be_run_on_the_host(
    stopped_operation: None,
) -> None:
    text = _call("workspace-core", "mcp_test_stopped", {"workspace": "ab12"})
    assert text.endswith(
        "(run `pyro workspace start ab12` on the host, or `workspace_start` in MCP profile "
        "workspace-full)"
    )


def test_the_cli_keeps_its_command_where_mcp_names_the_tool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PYRO_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("PYRO_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["workspace", "start", "nope", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["hint"] == (
        "list workspaces with `pyro workspace list`"
    )
    context = {"make_context": lambda: Context(state_dir=tmp_path / "state")}
    text = _call("workspace-full", "workspace_start", {"workspace_id": "nope"}, **context)
    assert text.endswith("not_found: no workspace 'nope' (list workspaces with `workspace_list`)")


@pytest.mark.parametrize(
    ("text", "profile", "calling", "told"),
    [
        (
            "list them with `pyro workspace snapshot list ab12`",
            "workspace-full",
            None,
            'list them with `snapshot_list` (arguments: `{"workspace_id": "ab12"}`)',
        ),
        (  # a bare command as the whole hint
            "pyro env pull debian:12",
            "vm-run",
            None,
            "`pyro env pull debian:12` on the host",
        ),
        (  # no MCP tool at all
            "see `pyro doctor` for each backend's probe result",
            "workspace-full",
            None,
            "see `pyro doctor` on the host for each backend's probe result",
        ),
        (  # flags are the arguments of the tool being called
            "add `--network-policy egress` (or `--network` on `pyro run`)",
            "vm-run",
            "vm_run",
            'add `{"network_policy": "egress"}` (or `{"network": true}` on `vm_run`)',
        ),
        (  # a flag the calling tool lacks stays as written
            "add `--network` on `pyro run`",
            "workspace-full",
            "workspace_create",
            "add `--network` on `vm_run`",
        ),
        (  # a list positional takes every word; numbers stay numbers
            "run `pyro workspace exec ab12 --timeout-seconds 30 -- ls -l`",
            "workspace-core",
            None,
            "call `workspace_exec`",  # `--` is no flag the tool takes: the name alone
        ),
        (  # words that are no pyro command are left alone
            "run `make host-packages` (or `pyro runtime install-host-packages`)",
            "workspace-full",
            None,
            "run `make host-packages` (or `pyro runtime install-host-packages` on the host)",
        ),
        (  # a command with no arguments, mid-sentence
            "disks kept: `pyro workspace start` boots it again",
            "workspace-full",
            None,
            "disks kept: `workspace_start` boots it again",
        ),
    ],
)
def test_commands_in_a_hint_become_the_tools_of_the_profile(
    text: str, profile: str, calling: str | None, told: str
) -> None:
    op = None if calling is None else OPERATIONS[calling]
    assert for_mcp(text, profile, op) == told


def test_a_number_flag_becomes_a_number_argument() -> None:
    all_operations()
    told = for_mcp("run `pyro workspace update ab12 --ttl-seconds 60`", "workspace-full")
    assert (
        told
        == 'call `workspace_update` (arguments: `{"workspace_id": "ab12", "ttl_seconds": 60.0}`)'
    )


def test_a_tail_the_guest_wrote_is_never_rewritten() -> None:
    all_operations()
    tail = "guest says: run `pyro workspace start ab12`"
    exc = VMError("the VM died", hint="run `pyro workspace start ab12`", console_tail=tail)
    assert error_text(exc, "workspace-full") == (
        'vm_error: the VM died (call `workspace_start` (arguments: `{"workspace_id": "ab12"}`))'
        f"\n--- serial console (tail) ---\n{tail}"
    )


def test_an_error_whose_constructor_takes_other_arguments_renders_too() -> None:
    exc = FirecrackerAPIError("PUT", "/machine-config", 400, "bad vcpu_count")
    assert error_text(exc, "vm-run") == (
        "vm_error: Firecracker API PUT /machine-config failed (400): bad vcpu_count"
    )
