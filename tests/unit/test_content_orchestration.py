"""Work inside a workspace (exec, files, patch, export, sync, diff, checkpoints, reset),
driven through the operations, on fake VMs (tests/unit/fake_vm.py): the real store,
blob stores, workspace disk and guest agent, no kernel."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from pyro_mcp.api.context import Context
from pyro_mcp.api.operations import workspace_content as wc
from pyro_mcp.api.operations import workspaces as ws
from pyro_mcp.api.operations.workspaces import open_workspaces
from pyro_mcp.errors import (
    Conflict,
    GuestError,
    IntegrityError,
    InvalidArgument,
    InvalidState,
    NotFound,
    OutsideRoot,
)

NO_CHANGES = {"added": 0, "modified": 0, "deleted": 0, "type_changed": 0}
PATCH = (
    "--- a/src/app.py\n"
    "+++ b/src/app.py\n"
    "@@ -1,2 +1,2 @@\n"
    " def greet():\n"
    "-    return 'hello'\n"
    "+    return 'hi'\n"
)


@pytest.fixture
def workspace(fake_ctx: Context, tmp_path: Path) -> str:
    seed = tmp_path / "seed"
    (seed / "src").mkdir(parents=True)
    (seed / "src" / "app.py").write_text("def greet():\n    return 'hello'\n")
    (seed / "README.md").write_text("# app\n")
    return str(ws.workspace_create(fake_ctx, "debian:12", seed_path=str(seed))["id"])


def _read(ctx: Context, workspace: str, path: str) -> str:
    return str(wc.workspace_file_read(ctx, workspace, path)["content"])


# --- exec ---------------------------------------------------------------------------------


def test_exec_returns_the_exit_code_as_data_and_journals_every_command(
    fake_ctx: Context, workspace: str
) -> None:
    ran = wc.workspace_exec(
        fake_ctx,
        workspace,
        ["sh", "-c", 'printf "%s in %s\\n" "$GREETING" "$PWD"; echo oops >&2; exit 5'],
        env=["GREETING=hi"],
    )
    assert (ran["exit_code"], ran["stdout"], ran["stderr"]) == (5, "hi in /workspace\n", "oops\n")
    in_src = wc.workspace_exec(fake_ctx, workspace, ["pwd"], cwd="src")
    assert in_src["stdout"] == "/workspace/src\n"
    journal = ws.workspace_logs(fake_ctx, workspace)["commands"]
    assert [(c["argv"][0], c["exit_code"], c["env_keys"]) for c in journal] == [
        ("sh", 5, ["GREETING"]),
        ("pwd", 0, []),
    ]
    with pytest.raises(OutsideRoot):
        wc.workspace_exec(fake_ctx, workspace, ["pwd"], cwd="../etc")


def test_exec_in_a_stopped_workspace_names_its_state(fake_ctx: Context, workspace: str) -> None:
    ws.workspace_stop(fake_ctx, workspace)
    with pytest.raises(InvalidState, match="stopped"):
        wc.workspace_exec(fake_ctx, workspace, ["true"])
    with pytest.raises(NotFound, match="nosuch"):
        wc.workspace_exec(fake_ctx, "nosuch", ["true"])


# --- files ------------------------------------------------------------------------------


def test_files_round_trip_and_every_acknowledged_write_is_on_the_disk(
    fake_ctx: Context, workspace: str
) -> None:
    written = wc.workspace_file_write(fake_ctx, workspace, "notes/todo.txt", text="ship\n")
    assert written == {"path": "/workspace/notes/todo.txt", "size": 5, "mode": 0o644}
    wc.workspace_file_write(fake_ctx, workspace, "run.sh", text="#!/bin/sh\n", mode=0o755)
    assert wc.workspace_exec(fake_ctx, workspace, ["stat", "-c", "%a", "run.sh"])["stdout"] == (
        "755\n"
    )
    binary = wc.workspace_exec(fake_ctx, workspace, ["sh", "-c", "printf '\\0\\1\\2' > blob"])
    assert binary["exit_code"] == 0
    read = wc.workspace_file_read(fake_ctx, workspace, "blob")
    assert (read["encoding"], base64.b64decode(read["content"])) == ("base64", b"\0\1\2")
    listed = wc.workspace_file_list(fake_ctx, workspace, ".")
    names = sorted(entry["path"] for entry in listed["entries"])
    assert names == ["README.md", "blob", "notes", "run.sh", "src"]

    with pytest.raises(GuestError, match="notes is a directory") as refused:
        wc.workspace_file_delete(fake_ctx, workspace, "notes")
    assert refused.value.guest_code == "is_a_directory"
    wc.workspace_file_delete(fake_ctx, workspace, "notes", recursive=True)
    wc.workspace_file_write(fake_ctx, workspace, "kept.txt", text="acknowledged\n")

    ws.workspace_stop(fake_ctx, workspace)  # what the disk holds, read offline
    on_disk = wc.workspace_disk_list(fake_ctx, workspace, "/")
    assert sorted(e["name"] for e in on_disk["entries"]) == [
        "README.md",
        "blob",
        "kept.txt",
        "run.sh",
        "src",
    ]
    assert wc.workspace_disk_read(fake_ctx, workspace, "/kept.txt")["content"] == "acknowledged\n"


def test_paths_that_escape_the_workspace_are_refused(
    fake_ctx: Context, workspace: str, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host file\n")
    wc.workspace_exec(fake_ctx, workspace, ["ln", "-s", str(outside), "out"])
    for path in ("../etc/passwd", "/etc/passwd", "/workspace/../root"):
        with pytest.raises(OutsideRoot):
            wc.workspace_file_read(fake_ctx, workspace, path)
    with pytest.raises(GuestError) as through_link:
        wc.workspace_file_read(fake_ctx, workspace, "out/secret")
    assert through_link.value.guest_code == "outside_root"
    with pytest.raises(GuestError):
        wc.workspace_file_write(fake_ctx, workspace, "out/evil", text="x")
    with pytest.raises(GuestError):
        wc.workspace_export(fake_ctx, workspace, "out/secret", str(tmp_path / "x"))
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert not (tmp_path / "x").exists()


# --- patch ------------------------------------------------------------------------------


def test_a_patch_applies_all_its_hunks_or_none(fake_ctx: Context, workspace: str) -> None:
    both = PATCH + (
        "--- a/README.md\n+++ b/README.md\n@@ -1 +1 @@\n-# not what is there\n+# changed\n"
    )
    refusal = (
        r"^README.md: hunk #1 @@ -1,1 \+1,1 @@ does not apply: "
        r"expected '# not what is there' at line 1, found '# app'$"
    )
    with pytest.raises(InvalidArgument, match=refusal):
        wc.workspace_patch_apply(fake_ctx, workspace, patch=both)
    assert _read(fake_ctx, workspace, "src/app.py") == "def greet():\n    return 'hello'\n"
    assert wc.workspace_diff(fake_ctx, workspace)["summary"] == NO_CHANGES

    applied = wc.workspace_patch_apply(fake_ctx, workspace, patch=PATCH)
    assert applied["modified"] == ["src/app.py"]
    assert _read(fake_ctx, workspace, "src/app.py") == "def greet():\n    return 'hi'\n"


# --- export and sync --------------------------------------------------------------------


def test_export_copies_files_and_directories_out_and_replaces_only_with_force(
    fake_ctx: Context, workspace: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    wc.workspace_export(fake_ctx, workspace, "src", str(out))
    assert (out / "app.py").read_text() == "def greet():\n    return 'hello'\n"
    single = tmp_path / "readme"
    wc.workspace_export(fake_ctx, workspace, "README.md", str(single))
    assert single.read_text() == "# app\n"
    wc.workspace_file_write(fake_ctx, workspace, "README.md", text="# new\n")
    with pytest.raises(Conflict):
        wc.workspace_export(fake_ctx, workspace, "README.md", str(single))
    assert single.read_text() == "# app\n"
    wc.workspace_export(fake_ctx, workspace, "README.md", str(single), force=True)
    assert single.read_text() == "# new\n"


def test_sync_push_copies_a_host_directory_in(
    fake_ctx: Context, workspace: str, tmp_path: Path
) -> None:
    source = tmp_path / "push"
    (source / "lib").mkdir(parents=True)
    (source / "lib" / "util.py").write_text("X = 1\n")
    wc.workspace_sync_push(fake_ctx, workspace, str(source), dest="vendor")
    assert _read(fake_ctx, workspace, "vendor/lib/util.py") == "X = 1\n"
    summary = wc.workspace_diff(fake_ctx, workspace)["summary"]
    assert summary == {**NO_CHANGES, "added": 3}  # vendor, vendor/lib, vendor/lib/util.py


# --- diff, checkpoints, reset -----------------------------------------------------------


def test_diff_checkpoint_and_reset_restore_exactly_what_was_there(
    fake_ctx: Context, workspace: str
) -> None:
    wc.workspace_patch_apply(fake_ctx, workspace, patch=PATCH)
    wc.workspace_file_write(fake_ctx, workspace, "new.txt", text="new\n")
    wc.workspace_file_delete(fake_ctx, workspace, "README.md")
    diff = wc.workspace_diff(fake_ctx, workspace)
    assert diff["summary"] == {**NO_CHANGES, "added": 1, "modified": 1, "deleted": 1}
    assert "-    return 'hello'\n+    return 'hi'\n" in diff["patch"]

    wc.snapshot_create(fake_ctx, workspace, "v1")
    wc.workspace_file_write(fake_ctx, workspace, "new.txt", text="changed after v1\n")
    wc.workspace_exec(fake_ctx, workspace, ["mkdir", "-p", "build/out"])
    assert wc.workspace_diff(fake_ctx, workspace, against="v1")["summary"] == {
        **NO_CHANGES,
        "added": 2,
        "modified": 1,
    }

    reset = wc.workspace_reset(fake_ctx, workspace, snapshot="v1")
    assert reset["reset_to"] == "v1"
    assert wc.workspace_diff(fake_ctx, workspace, against="v1")["summary"] == NO_CHANGES
    assert _read(fake_ctx, workspace, "new.txt") == "new\n"
    assert wc.workspace_exec(fake_ctx, workspace, ["test", "-e", "build"])["exit_code"] == 1

    # The checkpoint lives on the host: it outlives the VM.
    ws.workspace_stop(fake_ctx, workspace)
    ws.workspace_start(fake_ctx, workspace)
    wc.workspace_reset(fake_ctx, workspace)  # to the baseline (the seed)
    assert wc.workspace_diff(fake_ctx, workspace)["summary"] == NO_CHANGES
    assert _read(fake_ctx, workspace, "README.md") == "# app\n"
    assert _read(fake_ctx, workspace, "src/app.py") == "def greet():\n    return 'hello'\n"
    names = [s["name"] for s in wc.snapshot_list(fake_ctx, workspace)["snapshots"]]
    assert names == ["baseline", "v1"]


def test_reset_to_a_damaged_or_unknown_checkpoint_changes_nothing(
    fake_ctx: Context, workspace: str
) -> None:
    wc.workspace_file_write(fake_ctx, workspace, "data.txt", text="in v1\n")
    wc.snapshot_create(fake_ctx, workspace, "v1")
    wc.workspace_file_write(fake_ctx, workspace, "data.txt", text="after v1\n")
    with open_workspaces(fake_ctx) as workspaces:  # the blob of data.txt in v1 goes missing
        store = workspaces.blobs(workspace)
        lost = next(sha for sha in store if store.get_bytes(sha) == b"in v1\n")
        store.path(lost).unlink()
    damaged = r"checkpoint 'v1' is damaged: the content of 'data.txt'"
    with pytest.raises(IntegrityError, match=damaged):
        wc.workspace_reset(fake_ctx, workspace, snapshot="v1")
    with pytest.raises(NotFound):
        wc.workspace_reset(fake_ctx, workspace, snapshot="v9")
    assert _read(fake_ctx, workspace, "data.txt") == "after v1\n"
    assert wc.workspace_diff(fake_ctx, workspace)["summary"] == {**NO_CHANGES, "added": 1}


def test_deleting_a_checkpoint_frees_the_contents_only_it_held(
    fake_ctx: Context, workspace: str
) -> None:
    wc.workspace_file_write(fake_ctx, workspace, "big.txt", text="only in v1\n" * 1000)
    manifest = wc.snapshot_create(fake_ctx, workspace, "v1")["manifest"]
    with open_workspaces(fake_ctx) as workspaces:
        manifest_bytes = workspaces.blobs(workspace).size(manifest)
    wc.workspace_file_delete(fake_ctx, workspace, "big.txt")
    deleted = wc.snapshot_delete(fake_ctx, workspace, "v1")
    # What only v1 held: the content of big.txt and v1's own manifest.
    assert (deleted["blobs_removed"], deleted["bytes_freed"]) == (2, 11000 + manifest_bytes)
    with pytest.raises(NotFound):
        wc.workspace_diff(fake_ctx, workspace, against="v1")
    wc.workspace_reset(fake_ctx, workspace)  # the baseline's contents are all still there
    assert _read(fake_ctx, workspace, "README.md") == "# app\n"


# --- changes never interleave -------------------------------------------------------------


def test_a_patch_waits_for_another_change_to_the_workspace_to_finish(
    fake_ctx: Context, workspace: str
) -> None:
    import threading

    held = threading.Event()
    release = threading.Event()

    def another_change() -> None:  # as a reset running in another process would
        with open_workspaces(fake_ctx) as workspaces, workspaces.changing(workspace, "reset"):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=another_change)
    holder.start()
    held.wait(10)
    applied: list[object] = []
    patcher = threading.Thread(
        target=lambda: applied.append(wc.workspace_patch_apply(fake_ctx, workspace, patch=PATCH))
    )
    patcher.start()
    patcher.join(timeout=1.5)
    waited = patcher.is_alive() and applied == []  # it did not cut into the other change
    release.set()
    patcher.join(timeout=30)
    holder.join()
    assert waited and len(applied) == 1
    assert _read(fake_ctx, workspace, "src/app.py") == "def greet():\n    return 'hi'\n"


def test_a_stop_is_not_taken_for_a_crash_by_a_reconcile_while_it_runs(
    fake_ctx: Context, workspace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyro_mcp.workspace.lifecycle import Workspaces

    real_end = Workspaces._end_vm
    repairs: list[dict[str, list[str]]] = []

    def end_then_reconcile(self: Workspaces, record: object) -> None:
        real_end(self, record)  # type: ignore[arg-type]
        if not repairs:  # another process reconciles right after the VMM exited
            repairs.append(ws.reconcile(fake_ctx))

    monkeypatch.setattr(Workspaces, "_end_vm", end_then_reconcile)
    stopped = ws.workspace_stop(fake_ctx, workspace)
    assert stopped["state"] == "stopped" and repairs[0]["stopped"] == []
