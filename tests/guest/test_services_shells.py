"""Services with typed readiness, and persistent PTY shells, on a real guest."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyro_mcp.api import Context
from pyro_mcp.api.operations import services as sv
from pyro_mcp.api.operations import shells as sh
from pyro_mcp.api.operations import workspace_content as wc
from pyro_mcp.api.operations import workspaces as ws
from pyro_mcp.errors import GuestError, InvalidArgument, InvalidState

pytestmark = pytest.mark.guest


@pytest.fixture
def workspace(ws_ctx: Context, tmp_path: Path) -> Iterator[str]:
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "index.html").write_text("<h1>hello</h1>\n")
    yield ws.workspace_create(ws_ctx, "debian:12", seed_path=str(seed))["id"]


def test_two_services_become_ready_and_leave_the_workspace_alone(
    ws_ctx: Context, workspace: str, tmp_path: Path
) -> None:
    web = sv.service_start(
        ws_ctx,
        workspace,
        "web",
        ["python3", "-m", "http.server", "8080", "--bind", "127.0.0.1"],
        ready_http="http://127.0.0.1:8080/index.html",
    )
    assert web["state"] == "ready"
    worker = sv.service_start(
        ws_ctx,
        workspace,
        "worker",
        ["sh", "-c", "echo working; sleep 0.5; touch /tmp/worker.ready; exec sleep 1000"],
        ready_file="/tmp/worker.ready",
    )
    assert worker["state"] == "ready"

    listed = {s["name"]: s for s in sv.service_list(ws_ctx, workspace)["services"]}
    assert {listed["web"]["state"], listed["worker"]["state"]} == {"ready"}
    assert sv.service_status(ws_ctx, workspace, "web")["pid"]
    fetched = wc.workspace_exec(
        ws_ctx,
        workspace,
        [
            "python3",
            "-c",
            "import urllib.request as u;"
            "print(u.urlopen('http://127.0.0.1:8080/index.html').read().decode())",
        ],
    )
    assert "<h1>hello</h1>" in fetched["stdout"]
    worker_logs = sv.service_logs(ws_ctx, workspace, "worker")
    assert any("working" in str(line) for line in worker_logs["lines"])
    web_logs = sv.service_logs(ws_ctx, workspace, "web", stream="stderr")
    assert any("GET /index.html" in str(line) for line in web_logs["lines"])

    status = ws.workspace_status(ws_ctx, workspace)
    assert status["service_counts"] == {"ready": 2}
    diff = wc.workspace_diff(ws_ctx, workspace)
    assert diff["summary"] == {"added": 0, "modified": 0, "deleted": 0, "type_changed": 0}
    out = wc.workspace_export(ws_ctx, workspace, ".", str(tmp_path / "export"))
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["index.html"], out

    assert sv.service_stop(ws_ctx, workspace, "web")["state"] == "stopped"
    assert sv.service_stop(ws_ctx, workspace, "worker", grace_seconds=1)["state"] == "stopped"
    again = sv.service_stop(ws_ctx, workspace, "worker")
    assert again["state"] == "stopped"  # stopping a stopped service is not an error
    ws.workspace_delete(ws_ctx, workspace)


def test_a_probe_that_never_passes_fails_in_time_with_its_error(
    ws_ctx: Context, workspace: str
) -> None:
    with pytest.raises(GuestError) as caught:
        sv.service_start(
            ws_ctx,
            workspace,
            "nobody",
            ["sleep", "1000"],
            ready_tcp="127.0.0.1:9",
            ready_timeout_seconds=3,
        )
    assert caught.value.guest_code == "not_ready"
    assert "tcp" in str(caught.value) and "127.0.0.1:9" in str(caught.value)
    assert "refused" in str(caught.value).lower()
    assert sv.service_status(ws_ctx, workspace, "nobody")["state"] == "failed"


def test_bad_service_requests_get_specific_errors(ws_ctx: Context, workspace: str) -> None:
    with pytest.raises(InvalidArgument, match="port"):
        sv.service_start(ws_ctx, workspace, "x", ["true"], ready_tcp="127.0.0.1:70000")
    with pytest.raises(InvalidArgument, match="http://"):
        sv.service_start(ws_ctx, workspace, "x", ["true"], ready_http="ftp://host/")
    with pytest.raises(GuestError) as missing:
        sv.service_start(ws_ctx, workspace, "ghost", ["/no/such/program"], ready_file="/tmp/never")
    assert missing.value.guest_code == "exited_before_ready"
    assert "127" in str(missing.value)
    sv.service_start(ws_ctx, workspace, "dup", ["sleep", "1000"])
    with pytest.raises(GuestError) as dup:
        sv.service_start(ws_ctx, workspace, "dup", ["sleep", "1000"])
    assert dup.value.guest_code == "exists"
    flood = sv.service_start(ws_ctx, workspace, "flood", ["yes"])
    assert flood["state"] == "running"
    time.sleep(2)
    assert wc.workspace_exec(ws_ctx, workspace, ["true"])["exit_code"] == 0  # still usable
    sv.service_stop(ws_ctx, workspace, "flood", grace_seconds=1)


def _read_until(
    ctx: Context, workspace: str, shell: str, cursor: int, line: str
) -> tuple[str, int]:
    """Read plain output from ``cursor`` until one whole line of it is ``line``."""
    text = ""
    deadline = time.monotonic() + 30
    while True:
        got = sh.shell_read(ctx, workspace, shell, cursor=cursor, plain=True, wait_for_idle_ms=200)
        text += got["output"]
        cursor = got["next_cursor"]
        if line in [piece.strip() for piece in text.split("\n")]:
            return text, cursor
        assert time.monotonic() < deadline, f"never saw the line {line!r} in {text!r}"


def _foreground_command(ctx: Context, workspace: str, shell: str) -> str:
    (info,) = [s for s in sh.shell_list(ctx, workspace)["shells"] if s["shell_id"] == shell]
    comm = f"/proc/{info['foreground_pgid']}/comm"
    return str(wc.workspace_exec(ctx, workspace, ["cat", comm])["stdout"]).strip()


def test_an_interactive_shell(ws_ctx: Context, workspace: str) -> None:
    # Every line looked for is one the shell computes: the terminal's echo of the typed
    # command never matches it.
    opened = sh.shell_open(ws_ctx, workspace)
    shell = opened["shell_id"]
    sh.shell_write(ws_ctx, workspace, shell, "cd /tmp && printf '%s:%s\\n' \"$PWD\" $((6 * 7))")
    text, cursor = _read_until(ws_ctx, workspace, shell, 0, "/tmp:42")
    assert "\x1b[" not in text
    sh.shell_write(ws_ctx, workspace, shell, "sleep 100")
    deadline = time.monotonic() + 30
    while _foreground_command(ws_ctx, workspace, shell) != "sleep":
        assert time.monotonic() < deadline, "sleep never ran in the shell's foreground"
        time.sleep(0.1)
    sh.shell_signal(ws_ctx, workspace, shell, "INT")
    # Runs only once the interrupt ended the sleep (else in 100 s, long after the read).
    sh.shell_write(ws_ctx, workspace, shell, "echo after-$((40 + 2))")
    later, _ = _read_until(ws_ctx, workspace, shell, cursor, "after-42")
    assert "/tmp:42" not in later  # the cursor reads only what is new
    assert _foreground_command(ws_ctx, workspace, shell) != "sleep"
    assert any(s["shell_id"] == shell for s in sh.shell_list(ws_ctx, workspace)["shells"])
    sh.shell_close(ws_ctx, workspace, shell)
    with pytest.raises(GuestError) as closed:
        sh.shell_write(ws_ctx, workspace, shell, "echo closed")
    assert closed.value.guest_code == "invalid_state"
    assert shell not in {s["shell_id"] for s in sh.shell_list(ws_ctx, workspace)["shells"]}


def test_services_stop_with_the_workspace_and_stay_stopped_after_start(
    ws_ctx: Context, workspace: str
) -> None:
    sv.service_start(ws_ctx, workspace, "sleeper", ["sleep", "1000"])
    assert ws.workspace_status(ws_ctx, workspace)["service_counts"] == {"running": 1}
    ws.workspace_stop(ws_ctx, workspace)
    listed = sv.service_list(ws_ctx, workspace)["services"]
    assert [s["state"] for s in listed] == ["stopped"]
    ws.workspace_start(ws_ctx, workspace)
    assert ws.workspace_status(ws_ctx, workspace)["service_counts"] in ({}, {"stopped": 1})
    # Its output lived in the guest's memory: asking for it says where it went.
    with pytest.raises(InvalidState) as gone:
        sv.service_logs(ws_ctx, workspace, "sleeper")
    assert str(gone.value) == (
        f"service 'sleeper' ran before workspace {workspace} last started: its output was "
        "kept in the guest's memory (/run) and went with that boot"
    )
    restarted = sv.service_start(ws_ctx, workspace, "sleeper", ["sleep", "1000"])
    assert restarted["state"] == "running"
    assert sv.service_logs(ws_ctx, workspace, "sleeper")["lines"] == []
