"""The recorded pyro-mcp 3.11-style session (tests/compat/pyro311.py) run for real,
through each surface: MCP tool calls, SDK calls and CLI lines, each against a workspace
of its own in a real guest; and `pyro demo`."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.client import Client
from tests.compat.pyro311 import CLI_LINES, STEPS, fill

from pyro_mcp import Pyro
from pyro_mcp.api import Context
from pyro_mcp.api.context import HostPathPolicy
from pyro_mcp.mcp_server import build_server

pytestmark = pytest.mark.guest


def _host_dir(tmp_path: Path) -> Path:
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "from-host.txt").write_text("pushed\n")
    return tmp_path


READ_TRIES = 30


def _read_again(tool: str, result: dict[str, Any]) -> bool:
    """A shell read that came before the shell answered is read again, as a user polls
    (the shell may still be starting: only the typed line's echo is there yet)."""
    if tool != "shell_read" or "42" in str(result.get("output", "")).splitlines():
        return False
    time.sleep(0.5)
    return True


def _remember(
    tool: str, result: dict[str, Any], results: dict[str, Any], names: dict[str, str]
) -> None:
    """Keep a step's result; the ids later steps name come from what pyro-mcp 3.x's
    users read them from (``workspace_id``, ``shell_id``)."""
    results[tool] = result
    if tool == "workspace_create":
        names["ws"] = result["workspace_id"]
    if tool == "shell_open":
        names["shell"] = result["shell_id"]
    if tool == "vm_create":
        names["vm"] = result["vm_id"]


def _check(results: dict[str, Any], surface: str) -> None:
    """What a pyro-mcp 3.11 user reads from the results, whichever the surface."""
    created = results["workspace_create"]
    assert created["workspace_id"] == created["id"]
    assert created["labels"] == {"suite": "compat"}
    assert results["workspace_list"]["count"] >= 1
    assert results["workspace_status"]["workspace_id"] == created["id"]
    ran = results["workspace_exec"]
    assert (ran["exit_code"], ran["stdout"]) == (0, "one\n")
    assert "src/app.py" in json.dumps(results["workspace_file_list"])
    assert results["workspace_file_read"]["content"] == "print('hi')\n"
    assert "patched" in results["workspace_diff"]["patch"]
    assert results["snapshot_create"]["snapshot_name"] == "s1"
    snapshots = results["snapshot_list"]
    assert "s1" in {s["snapshot_name"] for s in snapshots["snapshots"]}
    assert snapshots["count"] == len(snapshots["snapshots"])
    shell = results["shell_read"]
    assert "42" in shell["output"].splitlines()
    started = results["service_start"]
    assert (started["service_name"], started["state"]) == ("web", "ready")  # its probe passed
    assert results["service_list"]["running_count"] == 1
    assert results["service_status"]["service_name"] == "web"
    assert results["workspace_logs"]["count"] >= 1
    assert results["workspace_update"]["labels"] == {"stage": "done"}
    assert results["workspace_disk_read"]["content"] == "one\n"
    assert results["workspace_delete"]["workspace_id"] == created["id"]
    assert results["vm_start"]["state"] == "started"
    assert results["vm_exec"]["stdout"].startswith("12."), results["vm_exec"]
    assert results["vm_status"]["ttl_seconds"] == 600
    assert results["vm_delete"]["deleted"] == results["vm_create"]["vm_id"]
    one_shot = results["vm_run"]
    assert one_shot["exit_code"] == 0 and one_shot["stdout"].startswith("git version 2."), one_shot
    names = {row["name"] for row in results["vm_list_environments"]["environments"]}
    assert "debian:12" in names, surface


def test_the_recorded_mcp_calls_pass_unchanged(ws_ctx: Context, tmp_path: Path) -> None:
    host = _host_dir(tmp_path)
    ctx = dataclasses.replace(ws_ctx, host_paths=HostPathPolicy.confined_to([host]))
    results: dict[str, Any] = {}

    async def body() -> None:
        names = {"tmp": str(host), "surface": "mcp"}
        async with Client(build_server("workspace-full", make_context=lambda: ctx)) as client:
            for step in STEPS:
                for _attempt in range(READ_TRIES):
                    answer = await client.call_tool(step.tool, fill(step.arguments, names))
                    assert not answer.is_error, (step.tool, answer.content)
                    result = answer.structured_content or {}
                    if not _read_again(step.tool, result):
                        break
                _remember(step.tool, result, results, names)

    anyio.run(body)
    _check(results, "mcp")


def test_the_recorded_sdk_calls_pass_unchanged(
    ws_ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYRO_STATE_DIR", str(ws_ctx.state_dir))
    host = _host_dir(tmp_path)
    pyro = Pyro(cache_dir=ws_ctx.paths.cache_dir)
    names = {"tmp": str(host), "surface": "sdk"}
    results: dict[str, Any] = {}
    for step in STEPS:
        for _attempt in range(READ_TRIES):
            result = getattr(pyro, step.method)(**fill(step.arguments, names))
            if not _read_again(step.tool, result):
                break
        _remember(step.tool, result, results, names)
    _check(results, "sdk")


def _pyro(ctx: Context, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ,
        PYRO_CACHE_DIR=str(ctx.paths.cache_dir),
        PYRO_RUN_DIR=str(ctx.paths.run_root),
        PYRO_STATE_DIR=str(ctx.state_dir),
    )
    return subprocess.run(
        [sys.executable, "-m", "pyro_mcp.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_the_recorded_cli_lines_pass_unchanged(ws_ctx: Context, tmp_path: Path) -> None:
    host = _host_dir(tmp_path)
    names = {"tmp": str(host)}
    outputs: list[dict[str, Any]] = []
    for line in CLI_LINES:
        tool = "shell_read" if line[:3] == ("workspace", "shell", "read") else ""
        for _attempt in range(READ_TRIES):
            done = _pyro(ws_ctx, *fill(line, names))
            assert done.returncode == 0, (line, done.stdout, done.stderr)
            result = json.loads(done.stdout)
            if not _read_again(tool, result):
                break
        outputs.append(result)
        if line[:2] == ("workspace", "create"):
            names["ws"] = result["workspace_id"]
        if line[:3] == ("workspace", "shell", "open"):
            names["shell"] = result["shell_id"]
        if line[:2] == ("vm", "create"):
            names["vm"] = result["vm_id"]
    by_words = {" ".join(w for w in line[:3] if not w.startswith(("$", "-"))): out
                for line, out in zip(CLI_LINES, outputs, strict=True)}  # fmt: skip
    assert by_words["workspace exec"]["stdout"] == "one\n"
    assert "42" in by_words["workspace shell read"]["output"].splitlines()
    assert by_words["workspace disk read"]["content"] == "one\n"
    assert by_words["run debian:12"]["stdout"].startswith("git version 2.")
    assert by_words["vm exec"]["stdout"].startswith("12.")
    assert (host / "app-cli.py").read_text() == "print('patched')\n"


def test_pyro_demo_runs_git_in_a_fresh_vm_and_says_what_to_try_next(ws_ctx: Context) -> None:
    done = _pyro(ws_ctx, "demo")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "$ git --version   (in a fresh debian:12 microVM)"
    assert lines[1].startswith("git version 2."), done.stdout
    assert lines[3].startswith("exit code 0 in ")
    assert "try next:" in lines
    assert "  pyro run debian:12 -- uname -a" in lines
