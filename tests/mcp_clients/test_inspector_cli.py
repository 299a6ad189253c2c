"""The official MCP Inspector's CLI sees pyro's server as a host would, over stdio and
streamable HTTP: what ``initialize`` advertises, every tool with its title and hints,
portable schemas, and errors a model can act on."""

from __future__ import annotations

import jsonschema
import pytest
from tests.mcp_clients.conftest import PROFILE, Inspector

from pyro_mcp import __version__
from pyro_mcp.api import all_operations
from pyro_mcp.mcp_server import COMPAT_TOOLS

TOOL_IS_ERROR = 5  # the Inspector CLI's exit code for a result with isError


def _ops() -> dict[str, object]:
    return {op.name: op for op in all_operations() if PROFILE in op.profiles}


def test_initialize_advertises_tools_and_logging_only(inspector: Inspector) -> None:
    result = inspector("initialize").result
    assert result["serverInfo"] == {"name": "pyro-mcp", "version": __version__}
    assert result["capabilities"] == {"logging": {}, "tools": {"listChanged": False}}
    assert result["instructions"].startswith("Disposable, hardware-isolated Linux microVMs.")


def test_tools_list_shows_every_tool_with_its_title_and_hints(inspector: Inspector) -> None:
    tools = {tool["name"]: tool for tool in inspector("tools/list").result["tools"]}
    assert set(tools) == set(_ops()) | set(COMPAT_TOOLS)  # pyro-mcp 3.x's names too
    for op in all_operations():
        if op.name not in tools:
            continue
        tool, effects = tools[op.name], op.effects
        assert effects is not None
        assert tool["title"] == effects.title
        assert tool["annotations"] == {
            "title": effects.title,
            "readOnlyHint": effects.read_only,
            "destructiveHint": effects.destructive,
            "idempotentHint": effects.idempotent,
            "openWorldHint": effects.open_world,
        }
        assert tool["inputSchema"]["additionalProperties"] is False
    assert tools["workspace_delete"]["annotations"]["destructiveHint"] is True
    assert tools["workspace_list"]["annotations"]["readOnlyHint"] is True


def test_every_tool_schema_passes_the_inspectors_portability_check(
    inspector: Inspector,
) -> None:
    answer = inspector("tools/list", strict=True)  # exit 6 on an error-severity problem
    assert answer.returncode == 0, answer.stderr
    assert len(answer.result["tools"]) == len(_ops()) + len(COMPAT_TOOLS)


def test_logging_set_level_is_answered(inspector: Inspector) -> None:
    answer = inspector("logging/setLevel", "--log-level", "warning")
    assert (answer.returncode, answer.result) == (0, {})


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        (
            '{"workspace_id": "ws", "command": "ls", "timeout": 5}',
            "workspace_exec has no parameter 'timeout' (did you mean 'timeout_seconds'?)",
        ),
        ('{"command": "ls"}', "workspace_exec needs workspace_id"),
    ],
)
def test_an_argument_error_names_the_tool_and_lists_what_it_takes(
    inspector: Inspector, arguments: str, problem: str
) -> None:
    answer = inspector("tools/call", "--tool-name", "workspace_exec", "--tool-args-json", arguments)
    assert answer.returncode == TOOL_IS_ERROR
    assert answer.result["isError"] is True
    [block] = answer.result["content"]
    assert block["text"] == (
        f"Error executing tool workspace_exec: invalid_argument: {problem}; it takes "
        "workspace_id, command (required) and cwd, env, secret_env, timeout_seconds, "
        "output_cap_bytes (optional)"
    )


def test_an_error_hint_names_the_tool_to_call_not_a_cli_command(inspector: Inspector) -> None:
    answer = inspector(
        "tools/call", "--tool-name", "workspace_start", "--tool-arg", "workspace_id=nope"
    )
    assert answer.returncode == TOOL_IS_ERROR
    [block] = answer.result["content"]
    assert block["text"] == (
        "Error executing tool workspace_start: not_found: no workspace 'nope' "
        "(list workspaces with `workspace_list`)"
    )


def test_a_tool_that_boots_nothing_returns_structured_content(inspector: Inspector) -> None:
    result = inspector("tools/call", "--tool-name", "env_list").result
    assert result.get("isError") is not True
    names = [row["name"] for row in result["structuredContent"]["environments"]]
    assert names == ["debian:12-base", "debian:12", "debian:12-build"]


def test_the_structured_content_matches_the_output_schema_the_listing_shows(
    inspector: Inspector,
) -> None:
    tools = {tool["name"]: tool for tool in inspector("tools/list").result["tools"]}
    schema = tools["env_list"]["outputSchema"]
    assert schema["title"] == "EnvListResult"
    assert schema["required"] == ["environments"]
    content = inspector("tools/call", "--tool-name", "env_list").result["structuredContent"]
    # As a 2020-12 validator and as a draft-07 one (what many clients still run) read it.
    for validator in (jsonschema.Draft202012Validator, jsonschema.Draft7Validator):
        validator.check_schema(schema)
        assert list(validator(schema).iter_errors(content)) == []
        first = content["environments"][0]
        wrong = {"environments": [{**first, "name": 12}]}
        assert [e.message for e in validator(schema).iter_errors(wrong)] == [
            "12 is not of type 'string'"
        ]
