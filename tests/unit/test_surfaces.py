"""Every operation is declared once and reachable from every surface."""

from __future__ import annotations

import inspect
import json

import pytest

from pyro_mcp.api import all_operations
from pyro_mcp.cli.main import build_parser, main
from pyro_mcp.sdk import Pyro


def test_every_operation_has_a_cli_command_with_its_help() -> None:
    parser = build_parser()
    for op in all_operations():
        namespace = parser.parse_args([*op.cli, *_required_args(op), "--json"])
        assert namespace.operation is op
        assert op.summary and all(p.arg.help for p in op.params)


def test_every_operation_is_a_pyro_method_with_the_same_signature() -> None:
    for op in all_operations():
        method = getattr(Pyro, op.sdk)
        assert method.__doc__ == op.doc
        op_params = list(inspect.signature(op.func).parameters)[1:]
        sdk_params = list(inspect.signature(method).parameters)[1:]
        assert sdk_params == op_params, op.name


def test_operation_names_cli_words_and_sdk_names_are_unique() -> None:
    ops = all_operations()
    assert len({op.name for op in ops}) == len(ops)
    assert len({op.cli for op in ops}) == len(ops)
    assert len({op.sdk for op in ops}) == len(ops)


def _required_args(op: object) -> list[str]:
    args: list[str] = []
    for param in op.params:  # type: ignore[attr-defined]
        if param.required:
            args.append("x" if param.arg.positional else f"--{param.name.replace('_', '-')}=x")
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
