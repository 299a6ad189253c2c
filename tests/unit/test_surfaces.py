"""Every operation is declared once and reachable from every surface."""

from __future__ import annotations

import argparse
import inspect
import json
from typing import Annotated, Any

import pytest

from pyro_mcp.api import OPERATIONS, Context, all_operations, operation, registry
from pyro_mcp.api.registry import CLI_ONLY, EVERY, STREAMED, Arg, Surface
from pyro_mcp.cli.main import main
from pyro_mcp.cli.parser import build_parser
from pyro_mcp.sdk import Pyro

# The parameters that only mean something at a terminal: they print less, or read the
# CLI's own standard input, or stream to its stdout.
CLI_ONLY_PARAMETERS = {
    ("workspace_create", "id_only"),
    ("shell_open", "id_only"),
    ("workspace_file_read", "content_only"),
    ("workspace_disk_read", "content_only"),
    ("workspace_file_write", "stdin"),
    ("workspace_create", "secret"),  # --secret NAME=VALUE, --secret-file NAME=PATH: the
    ("workspace_create", "secret_file"),  # CLI's spelling of the SDK/MCP `secrets` list
}
# Output that keeps coming: the CLI prints it, a REST stream route sends it as events.
STREAMED_PARAMETERS = {("service_logs", "follow")}
# Given as pyro-mcp 3.x's list of {"name", "value" | "file_path"}, where no terminal is.
SDK_AND_MCP_PARAMETERS = {("workspace_create", "secrets"), ("service_start", "readiness")}


def test_every_operation_has_a_cli_command_with_its_help() -> None:
    parser = build_parser()
    for op in all_operations():
        namespace = parser.parse_args([*op.cli, *_required_args(op), "--json"])
        assert namespace.operation is op
        assert op.summary and all(p.arg.help for p in op.params)


def test_every_operation_is_a_pyro_method_with_its_sdk_parameters_in_order() -> None:
    for op in all_operations():
        method = getattr(Pyro, op.sdk)
        assert method.__doc__ == op.doc
        sdk_params = list(inspect.signature(method).parameters)[1:]
        offered = [p.name for p in op.params if p.arg.surfaces & Surface.SDK]  # in order
        assert sdk_params == offered, op.name


def test_every_parameter_declares_the_surfaces_it_belongs_to() -> None:
    with pytest.raises(TypeError, match="surfaces"):
        Arg("a parameter that says nowhere where it may be given")  # type: ignore[call-arg]
    for op in all_operations():
        for param in op.params:
            assert isinstance(param.arg.surfaces, Surface), (op.name, param.name)
            assert param.arg.surfaces, (op.name, param.name)  # at least one surface


def test_cli_only_and_streamed_parameters_are_exactly_the_terminal_ones() -> None:
    cli_only = {
        (op.name, p.name)
        for op in all_operations()
        for p in op.params
        if p.arg.surfaces == CLI_ONLY
    }
    assert cli_only == CLI_ONLY_PARAMETERS
    streamed = {
        (op.name, p.name) for op in all_operations() for p in op.params if p.on(Surface.STREAM)
    }
    assert streamed == STREAMED_PARAMETERS
    for op in all_operations():  # everything else is offered on every surface
        for param in op.params:
            if (op.name, param.name) in SDK_AND_MCP_PARAMETERS:
                assert param.arg.surfaces == Surface.SDK | Surface.MCP, (op.name, param.name)
            elif (op.name, param.name) in STREAMED_PARAMETERS:
                assert param.arg.surfaces == STREAMED, (op.name, param.name)
            elif (op.name, param.name) not in CLI_ONLY_PARAMETERS:
                assert param.arg.surfaces == EVERY, (op.name, param.name)


def _cli_dests(op_cli: tuple[str, ...]) -> set[str]:
    parser = build_parser()
    for word in op_cli:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return {
        a.dest
        for a in parser._actions
        if a.dest not in ("help", "json")
        and not isinstance(a, argparse._SubParsersAction)  # a command that is a group too
    }


@pytest.mark.parametrize("op_name, name", sorted(CLI_ONLY_PARAMETERS))
def test_a_cli_only_parameter_is_a_flag_but_no_sdk_argument(op_name: str, name: str) -> None:
    op = OPERATIONS[op_name]
    assert name in _cli_dests(op.cli)
    assert name not in inspect.signature(getattr(Pyro, op.sdk)).parameters
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{name}'"):
        getattr(Pyro(), op.sdk)("ws", "x", **{name: True})


def test_the_cli_offers_exactly_each_operations_cli_parameters() -> None:
    for op in all_operations():
        assert _cli_dests(op.cli) == {p.name for p in op.params_on(Surface.CLI)}, op.name


def test_a_number_without_bounds_cannot_be_declared(monkeypatch: pytest.MonkeyPatch) -> None:
    all_operations()
    monkeypatch.setattr(registry, "OPERATIONS", dict(registry.OPERATIONS))

    def unbounded(
        ctx: Context, count: Annotated[int, Arg("how many", surfaces=EVERY)] = 1
    ) -> dict[str, Any]:
        """A stand-in whose number states no range."""
        return {}

    with pytest.raises(TypeError, match=r"unbounded.count: a number needs Arg\(minimum="):
        operation(cli=("unbounded",), sdk="unbounded")(unbounded)


def test_operation_names_cli_words_and_sdk_names_are_unique() -> None:
    ops = all_operations()
    assert len({op.name for op in ops}) == len(ops)
    assert len({op.cli for op in ops}) == len(ops)
    assert len({op.sdk for op in ops}) == len(ops)


def _required_args(op: object) -> list[str]:
    args: list[str] = []
    for param in op.params:  # type: ignore[attr-defined]
        if param.required:
            value = param.arg.choices[0] if param.arg.choices else "x"
            flag = f"--{param.arg.flag or param.name.replace('_', '-')}={value}"
            args.append(value if param.arg.positional else flag)
    return args


def test_unknown_environment_is_a_clear_json_error(
    tmp_path: object, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYRO_CACHE_DIR", str(tmp_path))
    code = main(["env", "inspect", "debian:99", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 1
    assert result["error"] == "not_found"
    assert "debian:99" in result["message"]
    assert "debian:12" in result["message"] + result.get("hint", "")


def test_sdk_reports_the_same_catalog_as_the_cli(
    tmp_path: object, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYRO_CACHE_DIR", str(tmp_path))
    assert main(["env", "list", "--json"]) == 0
    from_cli = json.loads(capsys.readouterr().out)
    from_sdk = Pyro(cache_dir=str(tmp_path)).list_environments()
    assert from_cli == json.loads(json.dumps(from_sdk, default=str))
    names = [row["name"] for row in from_sdk["environments"]]
    assert names == ["debian:12-base", "debian:12", "debian:12-build"]
    assert not any(row["installed"] for row in from_sdk["environments"])


def test_every_cli_option_shows_the_default_the_operation_applies() -> None:
    parser = build_parser()
    for op in all_operations():
        command = parser
        for word in op.cli:
            sub = next(a for a in command._actions if isinstance(a, argparse._SubParsersAction))
            command = sub.choices[word]
        shown = {a.dest: a.help or "" for a in command._actions}
        for param in op.params_on(Surface.CLI):
            default = param.default
            if param.required or default is None or isinstance(default, bool) or default == []:
                continue
            assert shown[param.name].endswith(f"(default: {default})"), (op.name, param.name)
    run = next(op for op in all_operations() if op.name == "vm_run")
    assert "(default: 512)" in _cli_help(run.cli)  # a changed default users must see


def _cli_help(words: tuple[str, ...]) -> str:
    command = build_parser()
    for word in words:
        sub = next(a for a in command._actions if isinstance(a, argparse._SubParsersAction))
        command = sub.choices[word]
    return command.format_help()
