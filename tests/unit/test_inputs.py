"""Strict inputs: every argument is checked once, from its declaration, with the same
message whether it came from the SDK, the CLI or an MCP client (api/validation.py), and a
command is a shell line (a string) or an argv (a list) on every surface.

Operations that need a workspace run against ``served_workspace`` (a real store and the
real guest agent in this process); ``vm_run`` against a stand-in for the VM layer.
"""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp_types import CallToolResult
from tests.unit.served_workspace import ServedWorkspace, served_workspace

from pyro_mcp.api import OPERATIONS, Context, all_operations
from pyro_mcp.api.registry import Param, Surface
from pyro_mcp.cli.main import main
from pyro_mcp.errors import InvalidArgument, TooLarge
from pyro_mcp.guest.client import AgentClient
from pyro_mcp.mcp_server import build_server
from pyro_mcp.runtime import environments
from pyro_mcp.sdk import Pyro
from pyro_mcp.vmm import launch, selection, warm
from pyro_mcp.vmm.warm import cold
from pyro_mcp.workspace.layout import StateLayout
from pyro_mcp.workspace.store import WorkspaceStore

__all__ = ["served_workspace"]  # the fixture, imported for the tests below
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def ws(served_workspace: ServedWorkspace) -> ServedWorkspace:
    return served_workspace


def _mcp(name: str, arguments: dict[str, Any], profile: str = "workspace-full") -> CallToolResult:
    async def body() -> CallToolResult:
        with anyio.fail_after(30):
            async with Client(build_server(profile)) as client:
                return await client.call_tool(name, arguments)

    return anyio.run(body)


def _mcp_text(result: CallToolResult) -> str:
    return "\n".join(getattr(block, "text", "") for block in result.content)


def _cli_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    cut = argv.index("--") if "--" in argv else len(argv)  # after --: the command's own
    code = main([*argv[:cut], "--json", *argv[cut:]])
    return code, json.loads(capsys.readouterr().out)


# --- commands: a string is a shell line, a list an argv ---------------------------------


def test_exec_workspace_runs_a_string_command_with_the_shell(ws: ServedWorkspace) -> None:
    result = Pyro().exec_workspace(ws.id, command="echo $((6 * 7)) | tr 4 x")
    assert (result["exit_code"], result["stdout"]) == (0, "x2\n")
    assert result["command"] == "echo $((6 * 7)) | tr 4 x"
    journal = Pyro().workspace_logs(ws.id)["commands"]
    assert journal[-1]["shell"] == "echo $((6 * 7)) | tr 4 x"


def test_exec_workspace_runs_a_list_as_the_argv_without_a_shell(ws: ServedWorkspace) -> None:
    result = Pyro().exec_workspace(ws.id, command=["printf", "%s|", "a b", "$HOME"])
    assert (result["exit_code"], result["stdout"]) == (0, "a b|$HOME|")


@pytest.mark.parametrize("command", ["echo $((6 * 7))", ["sh", "-c", "echo $((6 * 7))"]])
def test_mcp_workspace_exec_takes_a_string_or_an_array(
    ws: ServedWorkspace, command: str | list[str]
) -> None:
    result = _mcp("workspace_exec", {"workspace_id": ws.id, "command": command})
    assert not result.is_error, _mcp_text(result)
    assert result.structured_content is not None
    assert result.structured_content["stdout"] == "42\n"


def test_the_mcp_schema_says_a_command_is_a_string_or_an_array_of_strings() -> None:
    async def body() -> dict[str, Any]:
        async with Client(build_server("workspace-full")) as client:
            tools = {tool.name: tool for tool in (await client.list_tools()).tools}
            return {
                name: tools[name].input_schema["properties"]["command"]
                for name in tools
                if "command" in tools[name].input_schema["properties"]
            }

    schemas = anyio.run(body)
    assert set(schemas) == {"vm_run", "vm_exec", "workspace_exec", "service_start"}
    for schema in schemas.values():
        assert schema["anyOf"] == [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}},
        ]


def test_start_service_runs_a_string_command_with_the_shell(ws: ServedWorkspace) -> None:
    ready = ws.root / "ready"
    pyro = Pyro()
    pyro.start_service(
        ws.id,
        "web",
        command=f"echo up-$((40 + 2)); touch {ready}; exec sleep 60",
        cwd=str(ws.root),
        ready_file=str(ready),
    )
    logs = pyro.service_logs(ws.id, "web", stream="stdout")
    assert "up-42" in json.dumps(logs)
    pyro.stop_service(ws.id, "web", grace_seconds=0)


@pytest.fixture
def fake_vm(agent_client: AgentClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """vm_run's VM layer replaced: its "guest" is the in-process agent."""
    vm = SimpleNamespace(
        spec=SimpleNamespace(vm_id="fake", restore=None),
        wait_ready=lambda _s: agent_client,
        kill=lambda: None,
    )
    # Where vm_run finds them when it runs (it imports the VM layer only then).
    monkeypatch.setattr(warm, "plan_boot", lambda *a, **k: cold("a fake VM"))
    monkeypatch.setattr(environments, "image_for", lambda paths, name: Path("/dev/null"))
    monkeypatch.setattr(selection, "choose_backend", lambda *a, **k: SimpleNamespace(label="fake"))
    monkeypatch.setattr(launch, "prepare_vm", lambda *a, **k: vm)
    monkeypatch.setattr(launch, "start_owned", lambda vm: None)
    monkeypatch.setattr(launch, "discard_vm", lambda vm: None)


def test_run_in_vm_runs_a_string_command_with_the_shell(fake_vm: None) -> None:
    result = Pyro().run_in_vm("debian:12", command="echo $((6 * 7)); exit 3")
    assert (result["exit_code"], result["stdout"]) == (3, "42\n")
    assert result["command"] == "echo $((6 * 7)); exit 3"


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ({"argv": ["ls"]}, "command must be a string or a list of strings, got {'argv': ['ls']}"),
        (["ls", 5], "command[1] must be a string, got 5"),
        (b"ls -la", "command must be a string or a list of strings, got b'ls -la'"),
        ("  ", "command is empty: give a shell command line or an argv"),
        ([], "command is empty: give the program to run after --"),
    ],
)
def test_a_command_of_another_type_is_refused_by_name(
    command: object, message: str, fake_vm: None
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        Pyro().run_in_vm("debian:12", command=command)  # type: ignore[arg-type]
    assert caught.value.message == message


def test_an_argv_too_large_for_one_call_is_refused_before_it_is_sent(ws: ServedWorkspace) -> None:
    result = _mcp("workspace_exec", {"workspace_id": ws.id, "command": ["echo", "x" * (3 << 20)]})
    assert result.is_error
    assert _mcp_text(result).endswith(
        "too_large: exec: its arguments take 3.0 MiB encoded; a call's arguments (argv, "
        "environment, paths) must fit in 1 MiB (pass large data as a file (file write, sync "
        "push) instead)"
    )
    assert Pyro().exec_workspace(ws.id, command="echo still here")["stdout"] == "still here\n"


def test_an_environment_too_large_for_one_call_is_refused_before_it_is_sent(
    ws: ServedWorkspace,
) -> None:
    with pytest.raises(TooLarge) as caught:
        Pyro().exec_workspace(ws.id, command="true", env=[f"BIG={'x' * (2 << 20)}"])
    assert caught.value.message.startswith("exec: its arguments take 2.0 MiB encoded")
    assert Pyro().workspace_logs(ws.id)["commands"] == []  # it never ran


# --- the SDK: clear errors instead of TypeError or AttributeError ------------------------


@pytest.mark.parametrize(
    ("method", "arguments", "message"),
    [
        (
            "run_in_vm",
            {"environment": "debian:12", "command": ["true"], "timeout_seconds": "5"},
            "timeout_seconds must be a number greater than 0 and at most 86400, got '5'",
        ),
        (
            "create_workspace",
            {"environment": "debian:12", "vcpu_count": "2"},
            "vcpu_count must be an integer between 1 and 32, got '2'",
        ),
        (
            "create_workspace",
            {"environment": "debian:12", "vcpu_count": True},
            "vcpu_count must be an integer between 1 and 32, got True",
        ),
        (
            "create_workspace",
            {"environment": "debian:12", "seed_path": 5},
            "seed_path must be a path, got 5",
        ),
        (
            "write_workspace_file",
            {"workspace_id": "ws", "path": "f", "text": b"bytes"},
            "text must be a string, got b'bytes'",
        ),
        (
            "create_workspace",
            {"environment": "debian:12", "labels": "a=b"},
            "labels must be an object of strings or a list of strings, got 'a=b'",
        ),
        (
            "read_shell",
            {"workspace_id": "ws", "shell_id": "s", "plain": 1},
            "plain must be true or false, got 1",
        ),
    ],
)
def test_an_sdk_argument_of_the_wrong_type_is_an_invalid_argument_naming_it(
    method: str,
    arguments: dict[str, Any],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYRO_STATE_DIR", str(tmp_path / "state"))
    with pytest.raises(InvalidArgument) as caught:
        getattr(Pyro(cache_dir=tmp_path), method)(**arguments)
    assert caught.value.message == message
    assert not (tmp_path / "state").exists()  # refused before anything was touched


# --- numbers: one rule, one message, a stated maximum -----------------------------------

NUMBERS = [
    (op, param)
    for op in all_operations()
    for param in op.params
    if int in param.arms or float in param.arms
]
BAD_NUMBERS = [math.nan, math.inf, -math.inf, -1, 1e300, 10**30]


def test_every_number_states_both_bounds() -> None:
    assert len(NUMBERS) > 20
    for op, param in NUMBERS:
        assert param.arg.minimum is not None and param.arg.maximum is not None, (op.name, param)


@pytest.mark.parametrize("bad", BAD_NUMBERS, ids=repr)
@pytest.mark.parametrize(("op_name", "name"), [(op.name, p.name) for op, p in NUMBERS])
def test_nan_infinities_negatives_and_huge_numbers_are_refused_alike(
    op_name: str, name: str, bad: float, tmp_path: Path
) -> None:
    op = OPERATIONS[op_name]
    param: Param = next(p for p in op.params if p.name == name)
    ctx = Context(state_dir=tmp_path / "state")
    if bad == -1 and param.arg.minimum is not None and param.arg.minimum < 0:
        pytest.skip("-1 is in range")
    with pytest.raises(InvalidArgument) as caught:
        op.call(ctx, Surface.SDK, **{name: bad})
    noun = "an integer" if int in param.arms else "a number"
    maximum = param.arg.maximum
    assert maximum is not None
    top = str(int(maximum)) if float(maximum).is_integer() else repr(maximum)
    assert caught.value.message.startswith(f"{name} must be {noun} "), caught.value.message
    assert f" {top}" in caught.value.message
    assert caught.value.message.endswith(f", got {bad!r}"), caught.value.message


@pytest.mark.parametrize("value", ["nan", "inf", "1e300", "-5", "0"])
def test_cli_exec_timeout_that_is_not_a_finite_positive_number_is_refused(
    ws: ServedWorkspace, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, error = _cli_json(
        ["workspace", "exec", ws.id, "--timeout-seconds", value, "--", "true"], capsys
    )
    assert code == 2
    assert error == {
        "error": "invalid_argument",
        "message": "timeout_seconds must be a number greater than 0 and at most 86400, "
        f"got {float(value)!r}",
    }
    assert Pyro().workspace_logs(ws.id)["commands"] == []  # nothing ran


def test_cli_update_ttl_nan_is_refused_and_keeps_the_ttl(
    ws: ServedWorkspace, capsys: pytest.CaptureFixture[str]
) -> None:
    code, before = _cli_json(["workspace", "update", ws.id, "--ttl-seconds", "600"], capsys)
    assert code == 0 and before["expires_at"] is not None
    code, error = _cli_json(["workspace", "update", ws.id, "--ttl-seconds", "nan"], capsys)
    assert code == 2
    assert error["message"] == (
        "ttl_seconds must be a number greater than 0 and at most 31536000, got nan"
    )
    assert Pyro().workspace_status(ws.id)["expires_at"] == before["expires_at"]


def test_mcp_ttl_infinity_as_a_string_is_refused_and_the_record_keeps_a_finite_ttl(
    ws: ServedWorkspace,
) -> None:
    result = _mcp("workspace_update", {"workspace_id": ws.id, "ttl_seconds": "Infinity"})
    assert result.is_error
    assert _mcp_text(result).endswith(
        "invalid_argument: ttl_seconds must be a number greater than 0 and at most 31536000, "
        "got 'Infinity'"
    )
    assert Pyro().workspace_status(ws.id)["expires_at"] is None


def test_mcp_vcpu_count_true_is_not_taken_for_1() -> None:
    result = _mcp("workspace_create", {"environment": "debian:12", "vcpu_count": True})
    assert result.is_error
    assert _mcp_text(result).endswith(
        "invalid_argument: vcpu_count must be an integer between 1 and 32, got True"
    )


# --- file modes: octal strings, the same on the CLI and MCP -----------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_mcp_mode_string_0644_is_octal(ws: ServedWorkspace) -> None:
    arguments = {"workspace_id": ws.id, "path": "a.txt", "text": "a", "mode": "0640"}
    result = _mcp("workspace_file_write", arguments)
    assert not result.is_error, _mcp_text(result)
    assert _mode(ws.root / "a.txt") == 0o640


def test_mcp_mode_integer_is_the_permission_bits(ws: ServedWorkspace) -> None:
    arguments = {"workspace_id": ws.id, "path": "b.txt", "text": "b", "mode": 0o600}
    assert not _mcp("workspace_file_write", arguments).is_error
    assert _mode(ws.root / "b.txt") == 0o600


def _cli_write(
    ws: ServedWorkspace, name: str, mode: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, Any]]:
    argv = ["workspace", "file", "write", ws.id, name, "--text", name, "--mode", mode]
    return _cli_json(argv, capsys)


@pytest.mark.parametrize("written", ["640", "0640", "0o640"])
def test_cli_mode_is_octal_like_chmod(
    ws: ServedWorkspace, written: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli_write(ws, "c.txt", written, capsys)[0] == 0
    assert _mode(ws.root / "c.txt") == 0o640


@pytest.mark.parametrize("written", ["0x1a4", "9", "rw-r--r--", "0o77777"])
def test_a_mode_that_is_not_octal_is_refused(
    ws: ServedWorkspace, written: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, error = _cli_write(ws, "d.txt", written, capsys)
    assert code == 2
    assert error["message"] == (
        "mode must be an integer between 0 and 4095 (or a string of octal digits, such as "
        f"'0644'), got {written!r}"
    )
    assert not (ws.root / "d.txt").exists()


# --- text -------------------------------------------------------------------------------


def test_cli_text_that_is_not_utf8_is_refused_and_nothing_is_written(
    ws: ServedWorkspace, capsys: pytest.CaptureFixture[str]
) -> None:
    text = os.fsdecode(b"a\xffb")  # what the shell's $'a\xffb' becomes in argv
    code, error = _cli_json(["workspace", "file", "write", ws.id, "t", "--text", text], capsys)
    assert code == 2
    assert error["message"] == (
        "text must be valid UTF-8 text; character 1 is the byte 0xff, which is not UTF-8"
    )
    assert not (ws.root / "t").exists()


def test_a_lone_surrogate_from_mcp_is_refused_naming_the_argument(ws: ServedWorkspace) -> None:
    result = _mcp("workspace_file_write", {"workspace_id": ws.id, "path": "t", "text": "a\ud800"})
    assert result.is_error
    assert _mcp_text(result).endswith(
        "invalid_argument: text must be valid UTF-8 text; character 1 is a lone surrogate "
        "(U+D800), which no text holds"
    )


def test_a_file_name_that_is_not_utf8_still_reaches_the_workspace(ws: ServedWorkspace) -> None:
    name = os.fsdecode(b"caf\xe9.txt")  # a name as pyro lists it (surrogateescape)
    Pyro().write_workspace_file(ws.id, name, text="bytes in a name")
    assert (ws.root / os.fsdecode(b"caf\xe9.txt")).read_text() == "bytes in a name"


# --- host files given to the CLI --------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "make", "code", "message"),
    [
        ("--text-file", "dir", 2, "text file {path} is a directory, not a file"),
        ("--text-file", "missing", 1, "text file {path} does not exist"),
    ],
)
def test_cli_file_write_from_a_host_file_that_is_no_file_is_a_clear_error(
    ws: ServedWorkspace,
    tmp_path: Path,
    option: str,
    make: str,
    code: int,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / make
    if make == "dir":
        path.mkdir()
    got, error = _cli_json(["workspace", "file", "write", ws.id, "f", option, str(path)], capsys)
    assert (got, error["message"]) == (code, message.format(path=path))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "patch file {path} is a directory, not a file"),
        (b"\xff\xfe not text", "patch file {path} is not UTF-8 text"),
    ],
)
def test_cli_patch_apply_from_a_directory_or_a_binary_file_is_a_clear_error(
    ws: ServedWorkspace,
    tmp_path: Path,
    content: bytes | None,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "patch"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    code, error = _cli_json(
        ["workspace", "patch", "apply", ws.id, "--patch-file", str(path)], capsys
    )
    assert (code, error["error"], error["message"]) == (
        2,
        "invalid_argument",
        message.format(path=path),
    )


def test_cli_disk_export_onto_a_directory_with_force_is_a_conflict_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    monkeypatch.setenv("PYRO_STATE_DIR", str(state))
    state.mkdir()
    layout = StateLayout(state)
    with WorkspaceStore(layout.store_path) as store:
        record = store.create(environment="debian:12", vcpu_count=1, mem_mib=256, disk_mib=64)
        for step in ("running", "stopping", "stopped"):
            store.transition(record.id, step)
    disk = layout.workspace(record.id).workspace_disk
    disk.parent.mkdir(parents=True)
    disk.write_bytes(b"\0" * 4096)
    target = tmp_path / "out"
    target.mkdir()
    argv = ["workspace", "disk", "export", record.id, "--output", str(target), "--force"]
    code, error = _cli_json(argv, capsys)
    assert (code, error["error"]) == (1, "conflict")
    assert error["message"] == (
        f"disk export output {target} is a directory, and force replaces only a regular file "
        "with a file"
    )
    assert list(target.iterdir()) == []


# --- the CLI's output going away --------------------------------------------------------


def test_cli_output_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC), "PYRO_CACHE_DIR": str(tmp_path)}
    child = subprocess.Popen(
        [sys.executable, "-m", "pyro_mcp.cli.main", "env", "list", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # `| head` that has read all it wanted
    stderr = child.stderr.read()
    assert child.wait(timeout=60) == 141  # 128 + SIGPIPE, as a tool killed by it
    assert stderr == b""


# --- the layer itself -------------------------------------------------------------------


def test_a_parameter_the_surface_does_not_offer_is_refused_by_the_layer(
    tmp_path: Path,
) -> None:
    op = OPERATIONS["workspace_file_write"]
    with pytest.raises(InvalidArgument) as caught:
        op.call(Context(state_dir=tmp_path), Surface.MCP, workspace_id="w", path="p", stdin=True)
    assert caught.value.message == (
        "workspace_file_write has no parameter 'stdin' on the mcp surface; it takes "
        "workspace_id, path (required) and text, text_file, mode (optional)"
    )
