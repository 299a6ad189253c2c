"""The CLI builds the parser of the one command a command line names, imports only that
operation's module, and still helps, parses and errs as the whole command tree does."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench.cli import AT_CONNECT, FakeWorkspace, fake_workspace
from tests.unit.test_surfaces import _required_args

from pyro_mcp import __version__
from pyro_mcp.api.registry import all_operations
from pyro_mcp.cli import index, make_index
from pyro_mcp.cli.main import main
from pyro_mcp.cli.parser import build_parser, command_path, indexed_commands

# What no `pyro --version`, no `--help` and no `workspace exec` needs: the doctor, the MCP
# SDK, the registry client, zstd, the environment operations, the VM-creating machinery.
HEAVY = (
    "mcp",
    "zstandard",
    "cryptography",
    "pyro_mcp.mcp_server",
    "pyro_mcp.runtime.doctor",
    "pyro_mcp.runtime.oci.registry",
    "pyro_mcp.runtime.environments",
    "pyro_mcp.runtime.binaries",
    "pyro_mcp.api.operations.environments",
    "pyro_mcp.api.operations.runtime",
    "pyro_mcp.api.operations.services",
    "pyro_mcp.vmm.launch",
    "pyro_mcp.vmm.qemu.vm",
    "pyro_mcp.vmm.firecracker.vm",
    "pyro_mcp.network.link",
    "pyro_mcp.workspace.seeds",
)
# What `workspace exec` and help need no more than the rest: the compression modules
# shutil brings (argparse imports it for the terminal's width), difflib (only an unknown
# argument is answered with a guess), the result types (named for the type checker).
NOT_ON_THE_WAY = ("shutil", "bz2", "lzma", "difflib", "pyro_mcp.api.results")
# Runs main() as the `pyro` script does, then reports the modules it imported on stderr.
REPORT = (
    "import json, sys\n"
    "from pyro_mcp.cli.main import main\n"
    "try:\n"
    "    code = main(sys.argv[1:])\n"
    "except SystemExit as exc:\n"
    "    code = exc.code\n"
    "print(json.dumps({'code': code, 'modules': sorted(sys.modules)}), file=sys.stderr)\n"
)


def _run(
    code: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["--version"], f"pyro-mcp {__version__}\n"),
        (["workspace", "exec", "--help"], "usage: pyro workspace exec [-h]"),
        (["--help"], "usage: pyro [-h] [--version] [--cluster ADDRESS] COMMAND ..."),
    ],
)
def test_version_and_help_import_none_of_the_heavy_modules(argv: list[str], shown: str) -> None:
    done = _run(REPORT, *argv)
    report = json.loads(done.stderr.splitlines()[-1])
    assert report["code"] == 0
    assert done.stdout.startswith(shown)
    assert [name for name in HEAVY if name in report["modules"]] == []
    assert [name for name in NOT_ON_THE_WAY if name in report["modules"]] == []
    if argv == ["--version"]:
        assert "pyro_mcp.api.registry" not in report["modules"]  # nor any operation
        assert "argparse" not in report["modules"]


@pytest.fixture
def running_workspace(tmp_path: Path) -> Iterator[FakeWorkspace]:
    with fake_workspace(tmp_path) as workspace:
        yield workspace


def test_workspace_exec_reaches_the_agent_importing_none_of_the_heavy_modules(
    running_workspace: FakeWorkspace,
) -> None:
    args = ["workspace", "exec", running_workspace.id, "--", "true"]
    done = _run(AT_CONNECT, *args, env=running_workspace.env)
    assert done.returncode == 0, done.stderr
    modules = json.loads(done.stderr.splitlines()[-1])
    assert "pyro_mcp.vmm.attach" in modules  # it got as far as attaching
    assert [name for name in HEAVY if name in modules] == []
    assert [name for name in NOT_ON_THE_WAY if name in modules] == []


@pytest.mark.parametrize("columns", ["60", "120"])
def test_help_is_wrapped_to_the_columns_asked_for(columns: str) -> None:
    done = _run(REPORT, "workspace", "exec", "--help", env={"COLUMNS": columns})
    options = done.stdout[done.stdout.index("\noptions:") :]  # the doc above keeps its lines
    lines = options.splitlines()
    widest = max(len(line) for line in lines)
    assert widest <= int(columns)
    assert widest > int(columns) - 20  # wrapped to that width, not to some other


def test_pyro_version_prints_the_version() -> None:
    done = _run(REPORT, "--version")
    assert done.stdout == f"pyro-mcp {__version__}\n"


def test_the_index_says_what_the_registry_does() -> None:
    # Stale after a command is added, renamed or moved, or its summary changed: run
    # `make cli-index` (python -m pyro_mcp.cli.make_index).
    assert tuple(make_index.entries()) == index.COMMANDS
    assert Path(index.__file__).read_text() == make_index.source()


def _parser_of(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> argparse.ArgumentParser:
    for word in words:
        choices = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = choices.choices[word]
    return parser


def _every_path() -> list[tuple[str, ...]]:
    words = {op.cli[:depth] for op in all_operations() for depth in range(len(op.cli) + 1)}
    return sorted(words | {("mcp",), ("mcp", "serve")})


@pytest.mark.parametrize("path", _every_path(), ids=" ".join)
def test_a_parser_built_for_one_command_or_group_helps_as_the_whole_tree(
    path: tuple[str, ...],
) -> None:
    commands = indexed_commands()
    whole = _parser_of(build_parser(), path)
    built = _parser_of(build_parser(commands, command_path(commands, [*path, "--help"])), path)
    assert built.format_help() == whole.format_help()


def test_each_command_line_parses_as_the_whole_tree_parses_it() -> None:
    commands = indexed_commands()
    whole = build_parser()
    for op in all_operations():
        argv = [*op.cli, *_required_args(op), "--json"]
        assert command_path(commands, argv) == op.cli
        parsed = build_parser(commands, op.cli).parse_args(argv)
        assert parsed.operation is op
        assert vars(parsed) == vars(whole.parse_args(argv))


def test_workspace_help_lists_every_workspace_command_with_its_summary(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["workspace", "--help"])
    assert exited.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    ops = [op for op in all_operations() if op.cli[0] == "workspace"]
    lines = {op.cli[1]: op.summary for op in ops if len(op.cli) == 2}
    lines |= {op.cli[1]: f"{op.cli[1]} commands" for op in ops if len(op.cli) > 2}
    assert len(lines) > 20
    for word, line in lines.items():
        assert f"{word} {' '.join(line.split())}" in shown


def test_pyro_help_lists_every_top_level_command_and_group(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out.split()
    assert {op.cli[0] for op in all_operations()} | {"mcp"} <= set(shown)


def test_an_option_before_the_command_errs_as_the_whole_tree_does(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `--json` belongs to the command: before it, the command's parser (not built for a
    # group's listing) reports what is missing, as it always has.
    with pytest.raises(SystemExit) as exited:
        main(["workspace", "--json", "exec"])
    assert exited.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error == (
        "pyro workspace exec: error: the following arguments are required: workspace_id, command"
    )
