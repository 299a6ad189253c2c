"""Persistent workspaces on real guests: the whole loop, and what bad input gets."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pyro_mcp.api import Context
from pyro_mcp.api.context import HostPathPolicy
from pyro_mcp.api.operations import workspace_content as wc
from pyro_mcp.api.operations import workspaces as ws
from pyro_mcp.errors import (
    AgentUnavailable,
    Conflict,
    GuestError,
    InvalidArgument,
    InvalidState,
    NotFound,
    OutsideRoot,
    TooLarge,
)

pytestmark = pytest.mark.guest

PATCH = (
    "--- a/src/app.py\n"
    "+++ b/src/app.py\n"
    "@@ -1,3 +1,3 @@\n"
    " def greet():\n"
    '-    return "hello"\n'
    '+    return "hello, world"\n'
    " \n"
)


def _seed(root: Path) -> Path:
    (root / "src").mkdir(parents=True)
    (root / "src" / "app.py").write_text('def greet():\n    return "hello"\n\n')
    (root / "README.md").write_text("# demo\n")
    (root / "run.sh").write_text("#!/bin/sh\necho run\n")
    (root / "run.sh").chmod(0o755)
    (root / "docs").symlink_to("src")
    return root


def test_the_whole_loop_on_a_real_guest(ws_ctx: Context, tmp_path: Path) -> None:
    seed = _seed(tmp_path / "seed")
    created = ws.workspace_create(ws_ctx, "debian:12", seed_path=str(seed), name="loop")
    wid = created["id"]
    assert created["state"] == "running"

    ran = wc.workspace_exec(ws_ctx, wid, ["sh", "-c", "./run.sh; cat README.md; exit 5"])
    assert (ran["stdout"], ran["exit_code"]) == ("run\n# demo\n", 5)

    wc.workspace_file_write(ws_ctx, wid, "notes/todo.txt", text="ship it\n")
    wc.workspace_patch_apply(ws_ctx, wid, patch=PATCH)
    diff = wc.workspace_diff(ws_ctx, wid)
    assert diff["summary"] == {"added": 2, "modified": 1, "deleted": 0, "type_changed": 0}
    assert '+    return "hello, world"' in diff["patch"]
    assert "+++ b/notes/todo.txt" in diff["patch"]

    wc.snapshot_create(ws_ctx, wid, "good")
    wc.workspace_exec(
        ws_ctx, wid, ["sh", "-c", "rm -rf src README.md; echo junk > junk; chmod 600 run.sh"]
    )
    reset = wc.workspace_reset(ws_ctx, wid, snapshot="good")
    assert reset["reset_to"] == "good"
    after = wc.workspace_diff(ws_ctx, wid)
    assert after["summary"] == diff["summary"]
    assert after["patch"] == diff["patch"]
    listing = wc.workspace_exec(ws_ctx, wid, ["stat", "-c", "%a %N", "run.sh", "docs"])
    assert "755 'run.sh'" in listing["stdout"] and "'docs' -> 'src'" in listing["stdout"]

    exported = wc.workspace_export(ws_ctx, wid, "src", str(tmp_path / "out"))
    assert exported["type"] == "dir"
    assert (tmp_path / "out" / "app.py").read_text().count("hello, world") == 1
    with pytest.raises(Conflict):
        wc.workspace_export(ws_ctx, wid, "src", str(tmp_path / "out"))

    assert ws.workspace_stop(ws_ctx, wid)["state"] == "stopped"
    disk = wc.workspace_disk_read(ws_ctx, wid, "/notes/todo.txt")
    assert disk["content"] == "ship it\n"
    names = {e["path"] for e in wc.workspace_disk_list(ws_ctx, wid, "/")["entries"]}
    assert {"/src", "/notes", "/README.md"} <= names
    with pytest.raises(InvalidState, match="stopped"):
        wc.workspace_exec(ws_ctx, wid, ["true"])

    assert ws.workspace_start(ws_ctx, wid)["state"] == "running"
    again = wc.workspace_file_read(ws_ctx, wid, "notes/todo.txt")
    assert again["content"] == "ship it\n"
    logs = ws.workspace_logs(ws_ctx, wid)["commands"]
    assert [c["exit_code"] for c in logs][:1] == [5]

    ws.workspace_delete(ws_ctx, wid)
    with pytest.raises(NotFound):
        ws.workspace_status(ws_ctx, wid)


def test_paths_that_escape_the_workspace_are_refused(ws_ctx: Context, tmp_path: Path) -> None:
    wid = ws.workspace_create(ws_ctx, "debian:12")["id"]
    wc.workspace_exec(ws_ctx, wid, ["ln", "-s", "/etc", "etc-link"])
    for path in ("../etc/passwd", "/etc/passwd", "/workspace/../root"):
        with pytest.raises(OutsideRoot):
            wc.workspace_file_read(ws_ctx, wid, path)
    with pytest.raises(GuestError) as read_through:
        wc.workspace_file_read(ws_ctx, wid, "etc-link/passwd")
    assert read_through.value.guest_code == "outside_root"
    with pytest.raises(GuestError):
        wc.workspace_file_write(ws_ctx, wid, "etc-link/evil", text="x")
    assert "evil" not in wc.workspace_exec(ws_ctx, wid, ["ls", "/etc"])["stdout"]
    with pytest.raises(GuestError):
        wc.workspace_export(ws_ctx, wid, "etc-link/passwd", str(tmp_path / "x"))
    with pytest.raises(TooLarge):
        wc.workspace_file_write(ws_ctx, wid, "big", text="x" * (65 << 20))


def _left_behind(ctx: Context, run_dirs_before: set[str]) -> list[str]:
    """What is left of workspaces in ``ctx``, read without the repairs that listing or
    reconciling makes (either would hide a create that failed to clean up after itself)."""
    from pyro_mcp.api.operations.workspaces import open_workspaces

    with open_workspaces(ctx) as workspaces:  # opening the store repairs nothing
        left = [f"record {r.id} ({r.state})" for r in workspaces.store.list()]
    files = ctx.state_dir / "workspaces"
    if files.exists():
        left += [f"file {p.relative_to(ctx.state_dir)}" for p in sorted(files.rglob("*"))]
    run_root = ctx.paths.run_root
    run_dirs = {p.name for p in run_root.iterdir()} if run_root.exists() else set()
    left += [f"run dir {name}" for name in sorted(run_dirs - run_dirs_before)]
    return left


def test_seeds_that_escape_or_explode_are_refused_and_leave_nothing(
    ws_ctx: Context, tmp_path: Path
) -> None:
    run_root = ws_ctx.paths.run_root
    run_dirs = {p.name for p in run_root.iterdir()} if run_root.exists() else set()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "escape").symlink_to("/etc/passwd")
    with pytest.raises(OutsideRoot, match="escape"):
        ws.workspace_create(ws_ctx, "debian:12", seed_path=str(bad), name="seeded")
    assert _left_behind(ws_ctx, run_dirs) == []
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("../../outside")  # from the staging dir: <state>/workspaces/
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(OutsideRoot, match="outside"):
        ws.workspace_create(ws_ctx, "debian:12", seed_path=str(archive), name="seeded")
    assert _left_behind(ws_ctx, run_dirs) == []
    big = tmp_path / "big"
    big.mkdir()
    (big / "noise").write_bytes(os.urandom(24 << 20))
    with pytest.raises(TooLarge, match="does not fit in a 16 MiB workspace disk"):
        ws.workspace_create(ws_ctx, "debian:12", seed_path=str(big), disk_mib=16, name="seeded")
    assert _left_behind(ws_ctx, run_dirs) == []
    # The name the failed creates asked for is free.
    wid = ws.workspace_create(ws_ctx, "debian:12", name="seeded")["id"]
    assert ws.workspace_status(ws_ctx, "seeded")["id"] == wid
    ws.workspace_delete(ws_ctx, wid)
    assert _left_behind(ws_ctx, run_dirs) == []


def test_mcp_style_host_paths_are_confined(ws_ctx: Context, tmp_path: Path) -> None:
    confined = Context(
        paths=ws_ctx.paths,
        state_dir=ws_ctx.state_dir,
        host_paths=HostPathPolicy.confined_to([tmp_path / "allowed"]),
    )
    (tmp_path / "allowed").mkdir()
    with pytest.raises(OutsideRoot, match="outside the allowed host roots"):
        ws.workspace_create(confined, "debian:12", seed_path="/etc")


def test_unknown_ids_bad_values_and_wrong_states_get_specific_errors(ws_ctx: Context) -> None:
    with pytest.raises(NotFound, match="nosuch"):
        wc.workspace_exec(ws_ctx, "nosuch", ["true"])
    with pytest.raises(InvalidArgument, match="vcpu_count"):
        ws.workspace_create(ws_ctx, "debian:12", vcpu_count=0)
    with pytest.raises(NotFound):
        ws.workspace_create(ws_ctx, "debian:99")
    wid = ws.workspace_create(ws_ctx, "debian:12", name="twin")["id"]
    with pytest.raises(Conflict):
        ws.workspace_create(ws_ctx, "debian:12", name="twin")
    with pytest.raises(InvalidState, match="running"):
        ws.workspace_start(ws_ctx, wid)
    with pytest.raises(InvalidArgument, match="does not exist"):
        wc.workspace_patch_apply(ws_ctx, wid, patch=PATCH)
    wc.workspace_file_write(ws_ctx, wid, "src/app.py", text="def greet():\n    return 1\n\n")
    with pytest.raises(InvalidArgument, match=r"src/app.py: hunk #1 @@ -1,3 \+1,3 @@"):
        wc.workspace_patch_apply(ws_ctx, wid, patch=PATCH)
    unchanged = wc.workspace_file_read(ws_ctx, wid, "src/app.py")["content"]
    assert unchanged == "def greet():\n    return 1\n\n"
    with pytest.raises(InvalidState):
        wc.workspace_disk_list(ws_ctx, wid)


def test_concurrent_calls_on_one_workspace(ws_ctx: Context) -> None:
    wid = ws.workspace_create(ws_ctx, "debian:12")["id"]
    results: list[dict[str, Any]] = []
    script = "date +%s.%N; sleep 2; date +%s.%N"

    def run() -> None:
        results.append(wc.workspace_exec(ws_ctx, wid, ["sh", "-c", script]))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    spans = [[float(t) for t in r["stdout"].split()] for r in results]
    assert len(spans) == 4
    # Every command started before any finished: they ran at once, on separate channels.
    assert max(start for start, _ in spans) < min(end for _, end in spans)


def test_data_survives_the_vmm_being_killed(ws_ctx: Context) -> None:
    """The durability contract: what a command synced (or pyro wrote) survives kill -9."""
    wid = ws.workspace_create(ws_ctx, "debian:12")["id"]
    wc.workspace_file_write(ws_ctx, wid, "written-by-pyro.txt", text="kept\n")
    wc.workspace_exec(ws_ctx, wid, ["sh", "-c", "echo synced > synced.txt && sync"])
    status = ws.workspace_status(ws_ctx, wid)
    errors: list[Exception] = []

    def long_exec() -> None:
        try:
            wc.workspace_exec(ws_ctx, wid, ["sleep", "60"])
        except Exception as exc:
            errors.append(exc)

    worker = threading.Thread(target=long_exec)
    worker.start()
    time.sleep(1.0)
    os.kill(status["vmm_pid"], signal.SIGKILL)
    worker.join(timeout=20)
    assert errors and isinstance(errors[0], AgentUnavailable)
    after = ws.workspace_status(ws_ctx, wid)
    assert after["state"] == "stopped"
    assert "unexpectedly" in after["state_note"]
    ws.workspace_start(ws_ctx, wid)
    assert wc.workspace_file_read(ws_ctx, wid, "written-by-pyro.txt")["content"] == "kept\n"
    assert wc.workspace_file_read(ws_ctx, wid, "synced.txt")["content"] == "synced\n"


def test_a_create_killed_midway_is_reconciled(ws_ctx: Context, tmp_path: Path) -> None:
    env = dict(
        os.environ,
        PYRO_CACHE_DIR=str(ws_ctx.paths.cache_dir),
        PYRO_RUN_DIR=str(ws_ctx.paths.run_root),
        PYRO_STATE_DIR=str(ws_ctx.state_dir),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyro_mcp.cli.main", "workspace", "create", "debian:12"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if b"booting" in line:
            break
    proc.kill()
    proc.wait()
    report = ws.reconcile(ws_ctx)
    listed = ws.workspace_list(ws_ctx)["workspaces"]
    # Either its VM finished booting (kept, it can be used) or nothing of it is left.
    if listed:
        assert [w["state"] for w in listed] == ["running"], (listed, report)
        ws.workspace_delete(ws_ctx, listed[0]["id"])
    else:
        assert len(report["discarded"]) == 1, report
        assert not (ws_ctx.state_dir / "workspaces" / report["discarded"][0]).exists()
    assert ws.workspace_list(ws_ctx)["workspaces"] == []


def _cli_env(ctx: Context) -> dict[str, str]:
    """This environment, pointing a `pyro` process at ``ctx``'s cache, run and state dirs."""
    return dict(
        os.environ,
        PYRO_CACHE_DIR=str(ctx.paths.cache_dir),
        PYRO_RUN_DIR=str(ctx.paths.run_root),
        PYRO_STATE_DIR=str(ctx.state_dir),
    )


def test_cli_create_exec_and_json(ws_ctx: Context, tmp_path: Path) -> None:
    env = _cli_env(ws_ctx)
    cli = [sys.executable, "-m", "pyro_mcp.cli.main", "workspace"]
    wid = subprocess.run(
        [*cli, "create", "debian:12", "--id-only"], capture_output=True, text=True, env=env
    ).stdout.strip()
    ran = subprocess.run(
        [*cli, "exec", wid, "--", "sh", "-c", "echo out; exit 7"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert (ran.stdout, ran.returncode) == ("out\n", 7)
    status = json.loads(
        subprocess.run(
            [*cli, "status", wid, "--json"], capture_output=True, text=True, env=env
        ).stdout
    )
    assert status["state"] == "running" and status["commands"] == 1


def test_content_only_prints_the_files_bytes_running_and_from_the_stopped_disk(
    ws_ctx: Context,
) -> None:
    env = _cli_env(ws_ctx)
    cli = [sys.executable, "-m", "pyro_mcp.cli.main", "workspace"]

    def pyro(*args: str) -> bytes:
        done = subprocess.run([*cli, *args], capture_output=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    wid = pyro("create", "debian:12", "--id-only").decode().strip()
    # Not UTF-8 (0xff), a NUL, a terminal escape; and text without a final newline.
    made = "printf '\\377\\000\\033[31mred' > blob; printf 'no newline' > note"
    pyro("exec", wid, "--", "sh", "-c", made)
    blob = b"\xff\x00\x1b[31mred"
    assert pyro("file", "read", wid, "blob", "--content-only") == blob
    assert pyro("file", "read", wid, "note", "--content-only") == b"no newline"
    read = json.loads(pyro("file", "read", wid, "blob", "--json"))
    assert read["encoding"] == "base64" and read["content"] == "/wAbWzMxbXJlZA=="
    pyro("stop", wid)
    assert pyro("disk", "read", wid, "/workspace/blob", "--content-only") == blob
    disk = json.loads(pyro("disk", "read", wid, "blob", "--json"))
    assert (disk["encoding"], disk["content"]) == ("base64", "/wAbWzMxbXJlZA==")
    assert json.loads(pyro("disk", "read", wid, "note", "--json"))["content"] == "no newline"
    pyro("delete", wid)


def test_sync_push_copies_a_directory_or_an_archive_in(ws_ctx: Context, tmp_path: Path) -> None:
    wid = ws.workspace_create(ws_ctx, "debian:12")["id"]
    source = _seed(tmp_path / "src-tree")
    pushed = wc.workspace_sync_push(ws_ctx, wid, str(source), dest="vendor")
    assert pushed["files"] >= 3
    archive = tmp_path / "bundle.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = b"from an archive\n"
        info = tarfile.TarInfo("pkg/data.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    wc.workspace_sync_push(ws_ctx, wid, str(archive), dest="vendor")
    seen = wc.workspace_exec(
        ws_ctx, wid, ["sh", "-c", "cat vendor/pkg/data.txt; readlink vendor/docs; ./vendor/run.sh"]
    )
    assert seen["stdout"] == "from an archive\nsrc\nrun\n"
    bomb = tmp_path / "bomb.tar.gz"
    with tarfile.open(bomb, "w:gz") as tar:
        for n in range(3):
            info = tarfile.TarInfo(f"../escape{n}")
            info.size = 0
            tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(GuestError) as caught:
        wc.workspace_sync_push(ws_ctx, wid, str(bomb))
    assert caught.value.guest_code == "outside_root"


def test_the_vmm_killed_during_a_checkpoint_loses_nothing(ws_ctx: Context, tmp_path: Path) -> None:
    seed = tmp_path / "many"
    for d in range(20):
        (seed / f"d{d}").mkdir(parents=True)
        for f in range(50):
            (seed / f"d{d}" / f"f{f}").write_bytes(os.urandom(2048))
    wid = ws.workspace_create(ws_ctx, "debian:12", seed_path=str(seed))["id"]
    wc.workspace_exec(ws_ctx, wid, ["sh", "-c", "for f in d*/f*; do echo x >> $f; done; sync"])
    pid = ws.workspace_status(ws_ctx, wid)["vmm_pid"]
    killer = threading.Timer(1.0, os.kill, args=(pid, signal.SIGKILL))
    killer.start()
    with pytest.raises((AgentUnavailable, GuestError)):
        wc.snapshot_create(ws_ctx, wid, "interrupted")
    killer.join()
    names = {snapshot["name"] for snapshot in wc.snapshot_list(ws_ctx, wid)["snapshots"]}
    assert "interrupted" not in names  # no record of a checkpoint that was never finished
    assert ws.workspace_status(ws_ctx, wid)["state"] == "stopped"
    # What it had fetched is collected: the store holds only what the baseline needs.
    assert ws.reconcile(ws_ctx)["collected"] == [wid]
    store = ws_ctx.state_dir / "workspaces" / wid / "blobs"
    blobs = {p.name for p in store.glob("??/*")}
    assert len(blobs) == 20 * 50 + 1  # the seed's files and the baseline manifest
    ws.workspace_start(ws_ctx, wid)
    wc.snapshot_create(ws_ctx, wid, "interrupted")
    wc.workspace_exec(ws_ctx, wid, ["rm", "-rf", "d0"])
    wc.workspace_reset(ws_ctx, wid, snapshot="interrupted")
    assert wc.workspace_diff(ws_ctx, wid, against="interrupted")["summary"]["deleted"] == 0
