"""Workspace secrets on a real guest: they reach exec, a service and a shell, and every
output path shows them as ***; the state directory never holds one in plaintext."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from pyro_mcp.api import Context
from pyro_mcp.api.operations import services as sv
from pyro_mcp.api.operations import shells as sh
from pyro_mcp.api.operations import workspace_content as wc
from pyro_mcp.api.operations import workspaces as ws
from pyro_mcp.errors import GuestError, InvalidArgument
from pyro_mcp.mcp_server import build_server

pytestmark = pytest.mark.guest

# Prints a secret split over two writes (two output chunks), on stdout and on stderr.
SPLIT_PRINT = (
    "import os, sys, time\n"
    "v = os.environ[sys.argv[1]]\n"
    "for out in (sys.stdout, sys.stderr):\n"
    "    out.write('<' + v[:7]); out.flush(); time.sleep(0.4)\n"
    "    out.write(v[7:] + '>\\n'); out.flush()\n"
)
SHA = "import hashlib, os, sys; print(hashlib.sha256(os.environ[sys.argv[1]].encode()).hexdigest())"


def _files_holding(root: Path, needle: bytes) -> list[str]:
    return [
        str(path)
        for path in root.rglob("*")
        if path.is_file() and not path.is_symlink() and needle in path.read_bytes()
    ]


def _mcp_exec(ws_ctx: Context, arguments: dict[str, Any]) -> str:
    async def body() -> str:
        server = build_server("workspace-core", make_context=lambda: ws_ctx)
        async with Client(server) as client:
            result = await client.call_tool("workspace_exec", arguments)
        return json.dumps(result.structured_content) + "".join(
            getattr(block, "text", "") for block in result.content
        )

    return anyio.run(body)


def test_a_secret_reaches_exec_a_service_and_a_shell_and_shows_only_as_stars(
    ws_ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYRO_KEY_DIR", str(tmp_path / "keys"))
    token = "Tk" + secrets.token_hex(12)
    pem = "-----BEGIN KEY-----\n" + secrets.token_hex(24) + "\n-----END KEY-----\n"
    (tmp_path / "key.pem").write_text(pem)
    created = ws.workspace_create(
        ws_ctx,
        "debian:12",
        secret=[f"API_TOKEN={token}"],
        secret_file=[f"KEY_PEM={tmp_path / 'key.pem'}"],
    )
    workspace = created["id"]
    names = [
        {"name": "API_TOKEN", "source_kind": "literal"},
        {"name": "KEY_PEM", "source_kind": "file"},
    ]
    assert created["secrets"] == names
    assert ws.workspace_status(ws_ctx, workspace)["secrets"] == names

    # exec: the value is in the process's environment (its hash), under another name too.
    hashed = wc.workspace_exec(
        ws_ctx, workspace, ["python3", "-c", SHA, "T"], secret_env=["API_TOKEN=T"]
    )
    assert hashed["stdout"] == hashlib.sha256(token.encode()).hexdigest() + "\n"
    pem_hash = wc.workspace_exec(
        ws_ctx, workspace, ["python3", "-c", SHA, "KEY_PEM"], secret_env={"KEY_PEM": "KEY_PEM"}
    )
    assert pem_hash["stdout"] == hashlib.sha256(pem.encode()).hexdigest() + "\n"

    # exec output, live and in the result, split across chunks: only ***.
    live: list[bytes] = []
    ws_ctx.output = lambda _stream, data: live.append(data)
    printed = wc.workspace_exec(
        ws_ctx, workspace, ["python3", "-c", SPLIT_PRINT, "API_TOKEN"], secret_env=["API_TOKEN"]
    )
    ws_ctx.output = None
    assert (printed["stdout"], printed["stderr"]) == ("<***>\n", "<***>\n")
    assert token.encode() not in b"".join(live) and b"<***>\n" in b"".join(live)
    # ... and the command's own text, journaled and echoed, too.
    echoed = wc.workspace_exec(ws_ctx, workspace, ["echo", token])
    assert (echoed["stdout"], echoed["command"]) == ("***\n", ["echo", "***"])
    journal = json.dumps(ws.workspace_logs(ws_ctx, workspace))
    assert token not in journal and '"stdout_tail": "<***>\\n"' in journal

    # A service: its logs (a multi-line value too), its status.
    sv.service_start(
        ws_ctx,
        workspace,
        "app",
        ["sh", "-c", 'echo "svc:$API_TOKEN"; printf "%s" "$KEY_PEM"; exec sleep 1000'],
        secret_env=["API_TOKEN", "KEY_PEM"],
    )
    time.sleep(1.0)
    logs = sv.service_logs(ws_ctx, workspace, "app")
    texts = [line["text"] for line in logs["lines"]]
    assert texts[0] == "svc:***" and "***" in texts, texts
    assert token not in json.dumps(logs) and pem.splitlines()[1] not in json.dumps(logs)
    assert token not in json.dumps(sv.service_list(ws_ctx, workspace))

    # An error the guest sends (a service that exits before it is ready, printing it).
    with pytest.raises(GuestError) as failed:
        sv.service_start(
            ws_ctx,
            workspace,
            "bad",
            ["sh", "-c", 'echo "dying with $API_TOKEN" >&2; exit 3'],
            secret_env=["API_TOKEN"],
            ready_file="/tmp/never",
        )
    assert token not in str(failed.value) and "dying with ***" in str(failed.value)

    # A shell: the value split across two reads is never shown, not even its start.
    shell = sh.shell_open(ws_ctx, workspace, secret_env=["API_TOKEN=IN_SHELL"])["shell_id"]
    sh.shell_write(
        ws_ctx, workspace, shell, 'printf "[%s" "${IN_SHELL:0:7}"; sleep 3; echo "${IN_SHELL:7}]"'
    )
    first = sh.shell_read(ws_ctx, workspace, shell, wait_for_idle_ms=1500)
    time.sleep(3)
    second = sh.shell_read(
        ws_ctx, workspace, shell, cursor=first["next_cursor"], wait_for_idle_ms=800
    )
    shown = first["output"] + second["output"]
    assert token[:7] not in shown and token not in shown
    assert "[***]" in shown, shown
    plain = sh.shell_read(ws_ctx, workspace, shell, plain=True)
    assert "[***]" in plain["output"] and token[:7] not in plain["output"]

    # MCP: the tool result.
    over_mcp = _mcp_exec(
        ws_ctx,
        {
            "workspace_id": workspace,
            "command": ["sh", "-c", "echo $API_TOKEN"],
            "secret_env": {"API_TOKEN": "API_TOKEN"},
        },
    )
    assert token not in over_mcp and "***" in over_mcp

    # Bad names, caught before anything runs, naming the fix.
    with pytest.raises(InvalidArgument, match="has no secret 'NOPE'") as unknown:
        wc.workspace_exec(ws_ctx, workspace, ["true"], secret_env=["NOPE"])
    assert "API_TOKEN, KEY_PEM" in unknown.value.message and unknown.value.hint

    # Stop and start: the guest gets its secrets again (they are in no disk of it).
    ws.workspace_stop(ws_ctx, workspace)
    ws.workspace_start(ws_ctx, workspace)
    again = wc.workspace_exec(
        ws_ctx, workspace, ["python3", "-c", SHA, "API_TOKEN"], secret_env=["API_TOKEN"]
    )
    assert again["stdout"] == hashlib.sha256(token.encode()).hexdigest() + "\n"
    where = wc.workspace_exec(
        ws_ctx,
        workspace,
        ["sh", "-c", "stat -f -c %T /run/pyro-secrets; stat -c %a /run/pyro-secrets"],
    )
    assert where["stdout"] == "tmpfs\n700\n", where

    # Nothing under the state directory holds a value, whatever the file (store, WAL,
    # journal, disks); the key is elsewhere, private.
    ws.workspace_stop(ws_ctx, workspace)
    state = ws_ctx.state_dir
    assert _files_holding(state, token.encode()) == []
    assert _files_holding(state, pem.splitlines()[1].encode()) == []
    key = tmp_path / "keys" / "secrets.key"
    assert (key.stat().st_mode & 0o777, key.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    assert not str(key).startswith(str(state))
    assert os.environ.get("PYRO_KEY_DIR") == str(tmp_path / "keys")
