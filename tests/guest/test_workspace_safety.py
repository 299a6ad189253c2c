"""What a careless user or a hostile guest does to a workspace costs nothing: real guests.

Each test names the failure it guards against; each failed on the code before it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from tests.guest import hostile
from tests.guest.measure import pyro_cli

from pyro_mcp.api import Context
from pyro_mcp.api.context import HostPathPolicy
from pyro_mcp.api.operations import workspace_content as wc
from pyro_mcp.api.operations import workspaces as ws
from pyro_mcp.api.operations.workspaces import open_workspaces
from pyro_mcp.errors import (
    Conflict,
    GuestError,
    IntegrityError,
    InvalidArgument,
    VMError,
)
from pyro_mcp.storage.disk_create import create_workspace_disk

pytestmark = pytest.mark.guest

PEAK_RSS_BOUND_MIB = 150
# Only an explicit sync (or pyro's) writes dirty data back: what a test then finds on the
# disk after a VMM crash is what pyro flushed, not what the kernel happened to write.
NO_WRITEBACK = "sysctl -q vm.dirty_writeback_centisecs=0 vm.dirty_expire_centisecs=360000"


def _files(ctx: Context, wid: str) -> Path:
    with open_workspaces(ctx) as workspaces:
        return workspaces.layout.workspace(workspaces.store.get(wid).id).directory


def _sh(ctx: Context, wid: str, script: str) -> str:
    ran = wc.workspace_exec(ctx, wid, ["sh", "-c", script])
    assert ran["exit_code"] == 0, ran
    return str(ran["stdout"])


# --- durability: stop, mounts ---------------------------------------------------------


def test_stop_syncs_the_guest_even_when_its_services_will_not_stop(ws_ctx: Context) -> None:
    wid = ws.workspace_create(ws_ctx, "debian:12")["id"]
    set_mode = hostile.install(ws_ctx, wid)
    _sh(ws_ctx, wid, NO_WRITEBACK)
    digest = _sh(ws_ctx, wid, "head -c 65536 /dev/urandom > unsynced.bin; sha256sum unsynced.bin")
    set_mode("stall_stop_all")  # service_stop_all never answers
    ws.workspace_stop(ws_ctx, wid)
    ws.workspace_start(ws_ctx, wid)
    assert _sh(ws_ctx, wid, "sha256sum unsynced.bin") == digest


def test_a_workspace_disk_that_does_not_mount_fails_the_boot_and_is_kept(
    ws_ctx: Context,
) -> None:
    wid = ws.workspace_create(ws_ctx, "debian:12")["id"]
    wc.workspace_file_write(ws_ctx, wid, "keep.txt", text="kept\n")
    ws.workspace_stop(ws_ctx, wid)
    disk = _files(ws_ctx, wid) / "workspace.ext4"
    size = disk.stat().st_size
    with disk.open("r+b") as handle:  # the primary superblock
        handle.seek(1024)
        superblock = handle.read(1024)
        handle.seek(1024)
        handle.write(bytes(1024))
    with pytest.raises(VMError, match="the workspace disk did not mount at /workspace"):
        ws.workspace_start(ws_ctx, wid)
    status = ws.workspace_status(ws_ctx, wid)
    assert status["state"] == "failed"
    assert disk.stat().st_size == size  # the data is kept
    with disk.open("r+b") as handle:
        handle.seek(1024)
        handle.write(superblock)
    ws.workspace_start(ws_ctx, wid)
    assert wc.workspace_file_read(ws_ctx, wid, "keep.txt")["content"] == "kept\n"


# --- checkpoints and the blob store -----------------------------------------------------


def test_a_checkpoint_records_what_was_fetched_whatever_the_manifest_claimed(
    ws_ctx: Context, tmp_path: Path
) -> None:
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "a.txt").write_text("original\n")
    wid = ws.workspace_create(ws_ctx, "debian:12", seed_path=str(seed))["id"]
    wc.workspace_file_write(ws_ctx, wid, "a.txt", text="as checkpointed\n")
    set_mode = hostile.install(ws_ctx, wid)
    # As when the file changes between its hashing and its fetch: the digest is wrong.
    set_mode("lie_digest", path="a.txt", digest="0" * 64)
    wc.snapshot_create(ws_ctx, wid, "changing")
    set_mode("honest")
    wc.workspace_file_write(ws_ctx, wid, "a.txt", text="later\n")
    assert wc.workspace_diff(ws_ctx, wid, against="changing")["summary"]["modified"] == 1
    wc.workspace_reset(ws_ctx, wid, snapshot="changing")
    assert wc.workspace_file_read(ws_ctx, wid, "a.txt")["content"] == "as checkpointed\n"


def test_checkpoints_of_a_file_being_rewritten_always_reset(ws_ctx: Context) -> None:
    wid = ws.workspace_create(ws_ctx, "debian:12")["id"]
    churn = "i=0; while :; do i=$((i+1)); echo $i > churn.txt; done"
    _sh(ws_ctx, wid, f"setsid sh -c '{churn}' >/dev/null 2>&1 & echo $! > /tmp/churn; sleep 0.2")
    for round_ in range(3):
        wc.snapshot_create(ws_ctx, wid, f"churn-{round_}")
    # Killed, and gone: a write still in flight after `kill` returns lands after a reset.
    gone = "p=$(cat /tmp/churn); kill $p; while kill -0 $p 2>/dev/null; do sleep 0.05; done"
    _sh(ws_ctx, wid, gone)
    for round_ in range(3):
        wc.workspace_reset(ws_ctx, wid, snapshot=f"churn-{round_}")
        summary = wc.workspace_diff(ws_ctx, wid, against=f"churn-{round_}")["summary"]
        assert summary == {"added": 0, "modified": 0, "deleted": 0, "type_changed": 0}


def test_a_reset_whose_checkpoint_lost_a_blob_changes_nothing(ws_ctx: Context) -> None:
    wid = ws.workspace_create(ws_ctx, "debian:12")["id"]
    wc.workspace_file_write(ws_ctx, wid, "one.txt", text="one\n")
    wc.workspace_file_write(ws_ctx, wid, "two.txt", text="two\n")
    wc.snapshot_create(ws_ctx, wid, "both")
    wc.workspace_exec(ws_ctx, wid, ["sh", "-c", "echo changed > one.txt; rm two.txt; touch x"])
    state = "cat one.txt; ls"
    before = _sh(ws_ctx, wid, state)
    blob = _files(ws_ctx, wid) / "blobs" / hashlib.sha256(b"two\n").hexdigest()[:2]
    (blob / hashlib.sha256(b"two\n").hexdigest()).unlink()
    with pytest.raises(IntegrityError, match=r"'two.txt'.*nothing was changed"):
        wc.workspace_reset(ws_ctx, wid, snapshot="both")
    assert _sh(ws_ctx, wid, state) == before == "changed\none.txt\nx\n"
    with pytest.raises(IntegrityError, match="checkpoint 'both' is damaged"):
        wc.workspace_diff(ws_ctx, wid, against="both")


def test_blobs_no_checkpoint_needs_are_freed_and_a_deleted_workspace_leaves_nothing(
    ws_ctx: Context, tmp_path: Path
) -> None:
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "base.txt").write_text("base\n")
    wid = ws.workspace_create(ws_ctx, "debian:12", seed_path=str(seed))["id"]
    store = _files(ws_ctx, wid) / "blobs"
    _sh(ws_ctx, wid, "head -c 200000 /dev/urandom > big.bin")
    big = _sh(ws_ctx, wid, "sha256sum big.bin").split()[0]
    wc.snapshot_create(ws_ctx, wid, "with-big")
    assert (store / big[:2] / big).is_file()
    deleted = wc.snapshot_delete(ws_ctx, wid, "with-big")
    assert deleted["blobs_removed"] >= 2 and deleted["bytes_freed"] >= 200000  # + its manifest
    assert not (store / big[:2] / big).exists()
    base = hashlib.sha256(b"base\n").hexdigest()
    assert (store / base[:2] / base).is_file()  # the baseline still needs it
    ws.workspace_delete(ws_ctx, wid)
    assert not store.parent.exists()


# --- ordinary content never disables diff, checkpoints and reset ----------------------


def test_names_that_are_not_utf8_survive_diff_checkpoint_and_reset(ws_ctx: Context) -> None:
    wid = ws.workspace_create(ws_ctx, "debian:12")["id"]
    name = os.fsdecode(b"caf\xe9.txt")  # Latin-1, as an old tool would write it
    wc.workspace_file_write(ws_ctx, wid, name, text="bytes\n")
    diff = wc.workspace_diff(ws_ctx, wid)
    assert diff["summary"]["added"] == 1
    assert 'diff --git "a/caf\\351.txt" "b/caf\\351.txt"' in diff["patch"]
    wc.snapshot_create(ws_ctx, wid, "latin1")
    _sh(ws_ctx, wid, "rm -f caf*")
    wc.workspace_reset(ws_ctx, wid, snapshot="latin1")
    assert _sh(ws_ctx, wid, "ls -b") == "caf\\351.txt\n"
    listed = pyro_cli(ws_ctx, "workspace", "diff", wid, "--json")  # JSON needs real text
    assert listed.code == 0 and json.loads(listed.stdout)["files"][0]["path"] == "caf\\xe9.txt"


def test_special_files_are_recorded_and_recreated_and_sockets_never_fail_a_reset(
    ws_ctx: Context,
) -> None:
    wid = ws.workspace_create(ws_ctx, "debian:12")["id"]
    make = (
        "mkfifo -m 640 pipe && mknod -m 600 null c 1 3 && "
        "python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind(\"sock\")'"
    )
    _sh(ws_ctx, wid, make)
    diff = wc.workspace_diff(ws_ctx, wid)
    assert {f["path"]: f["type"] for f in diff["files"]} == {
        "null": "chardev",
        "pipe": "fifo",
        "sock": "socket",
    }
    wc.snapshot_create(ws_ctx, wid, "specials")
    _sh(ws_ctx, wid, "rm pipe null sock")
    reset = wc.workspace_reset(ws_ctx, wid, snapshot="specials")
    assert any("socket" in note for note in reset["kept"])
    assert _sh(ws_ctx, wid, "stat -c '%n %F %a %t:%T' pipe null") == (
        "pipe fifo 640 0:0\nnull character special file 600 1:3\n"
    )


def test_a_tree_of_more_than_100000_entries_can_be_diffed_checkpointed_and_reset(
    ws_ctx: Context, tmp_path: Path
) -> None:
    wid = ws.workspace_create(ws_ctx, "debian:12")["id"]
    ws.workspace_stop(ws_ctx, wid)
    # An npm-sized tree, made on the host and packed into the workspace disk (creating
    # 120,000 files inside an emulated guest would take minutes on its own).
    tree = tmp_path / "tree"
    for d in range(120):
        package = tree / "node_modules" / f"p{d:03d}"
        package.mkdir(parents=True)
        for f in range(1000):
            (package / f"f{f:04d}.js").touch()
    disk = _files(ws_ctx, wid) / "workspace.ext4"
    disk.unlink()
    create_workspace_disk(disk, 1024, tree)
    ws.workspace_start(ws_ctx, wid)
    entries = 1 + 120 + 120_000
    diff = pyro_cli(ws_ctx, "workspace", "diff", wid, "--json", timeout_s=900)
    assert diff.code == 0, diff
    result = json.loads(diff.stdout)
    assert result["summary"]["added"] == entries and result["files_omitted"] == entries - 10_000
    assert diff.peak_mib < PEAK_RSS_BOUND_MIB, diff
    wc.snapshot_create(ws_ctx, wid, "many")
    _sh(ws_ctx, wid, "rm -rf node_modules/p000")
    wc.workspace_reset(ws_ctx, wid, snapshot="many")
    assert _sh(ws_ctx, wid, "find node_modules | wc -l") == f"{entries}\n"


# --- host memory, disk and time stay bounded ---------------------------------------------


def test_a_sparse_gigabyte_is_checkpointed_and_restored_as_holes(ws_ctx: Context) -> None:
    wid = ws.workspace_create(ws_ctx, "debian:12")["id"]
    _sh(ws_ctx, wid, "truncate -s 1G sparse.img && echo tail >> sparse.img")
    taken = pyro_cli(ws_ctx, "workspace", "snapshot", "create", wid, "sparse", timeout_s=600)
    assert taken.code == 0, taken
    assert taken.peak_mib < PEAK_RSS_BOUND_MIB, taken
    blobs = [p for p in (_files(ws_ctx, wid) / "blobs").rglob("*") if p.is_file()]
    big = max(blobs, key=lambda p: p.stat().st_size)
    assert big.stat().st_size == (1 << 30) + 5 and big.stat().st_blocks * 512 < 1 << 20
    _sh(ws_ctx, wid, "rm sparse.img")
    wc.workspace_reset(ws_ctx, wid, snapshot="sparse")
    size, blocks = _sh(ws_ctx, wid, "stat -c '%s %b' sparse.img").split()
    assert int(size) == (1 << 30) + 5 and int(blocks) * 512 < 1 << 20
    assert _sh(ws_ctx, wid, "tail -c 5 sparse.img") == "tail\n"


def test_an_output_flood_is_capped_on_the_host_in_bounded_memory(ws_ctx: Context) -> None:
    wid = ws.workspace_create(ws_ctx, "debian:12")["id"]
    ran = pyro_cli(
        ws_ctx, "workspace", "exec", wid, "--json", "--output-cap-bytes", "1048576",
        "--", "head", "-c", "268435456", "/dev/zero",
    )  # fmt: skip
    result = json.loads(ran.stdout)
    assert (len(result["stdout"]), result["stdout_truncated"]) == (1 << 20, True)
    assert ran.peak_mib < PEAK_RSS_BOUND_MIB, ran


def test_reading_a_fifo_is_refused_at_once(ws_ctx: Context) -> None:
    wid = ws.workspace_create(ws_ctx, "debian:12")["id"]
    _sh(ws_ctx, wid, "mkfifo pipe")
    read = pyro_cli(ws_ctx, "workspace", "file", "read", wid, "pipe", timeout_s=60)
    assert read.code == 1 and "is not a regular file" in read.stderr, read


def test_the_console_stays_bounded_whatever_the_guest_writes_to_it(ws_ctx: Context) -> None:
    from pyro_mcp.vmm.console import CONSOLE_MAX_BYTES

    wid = ws.workspace_create(ws_ctx, "debian:12")["id"]
    flood = "head -c 4000000 /dev/zero | tr '\\0' x > /dev/console; echo END > /dev/console"
    wc.workspace_exec(ws_ctx, wid, ["sh", "-c", flood], timeout_seconds=300)
    run_dir = Path(ws.workspace_status(ws_ctx, wid)["run_dir"])
    logs = [run_dir / "console.log", run_dir / "console.log.1"]
    total = sum(path.stat().st_size for path in logs if path.exists())
    assert total <= CONSOLE_MAX_BYTES + (64 << 10)
    assert b"xxxxEND" in (run_dir / "console.log").read_bytes()[-64:]


def test_a_guest_crafted_inode_size_costs_the_offline_reader_nothing(ws_ctx: Context) -> None:
    wid = ws.workspace_create(ws_ctx, "debian:12")["id"]
    _sh(ws_ctx, wid, "ln -s target huge-link")
    ws.workspace_stop(ws_ctx, wid)
    disk = _files(ws_ctx, wid) / "workspace.ext4"
    # What root in the guest can do to its own disk: a symlink claiming 2 GiB.
    subprocess.run(
        ["debugfs", "-w", "-R", "sif /huge-link size 2147483648", str(disk)],
        check=True,
        capture_output=True,
    )
    listed = pyro_cli(ws_ctx, "workspace", "disk", "list", wid, "/", "--json")
    assert listed.code == 0, listed
    link = next(e for e in json.loads(listed.stdout)["entries"] if e["name"] == "huge-link")
    assert link["target"] is None and "4095" in link["target_error"]
    assert listed.peak_mib < PEAK_RSS_BOUND_MIB, listed


# --- QEMU confinement --------------------------------------------------------------------


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


@pytest.mark.skipif(os.geteuid() != 0, reason="confinement needs root to drop from")
def test_qemu_runs_as_its_own_unprivileged_user_in_its_own_root_and_cgroups(
    ws_ctx: Context,
) -> None:
    created = ws.workspace_create(ws_ctx, "debian:12", mem_mib=256)
    wid = created["id"]
    status = ws.workspace_status(ws_ctx, wid)
    pid = status["vmm_pid"]
    fields = _status(pid)
    uid = int(fields["Uid"].split()[0])
    assert uid >= 900_000 and set(fields["Uid"].split()) == {str(uid)}
    assert set(fields["Gid"].split()) == {str(uid)}
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1" and fields["Seccomp"].strip() == "2"
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    root = Path(f"/proc/{pid}/root")
    visible = {p.name for p in root.iterdir()}
    assert "usr" in visible and "home" not in visible
    # Restored from a template, it maps the template's sealed RAM as /proc/self/fd/N: its
    # procfs shows its own process and nothing else of the host.
    assert created["boot"]["mode"] == "warm" and "proc" in visible
    as_the_vmm = ["nsenter", "-t", str(pid), "-m", "-r", "-S", str(uid), "-G", str(uid)]
    listed = subprocess.run(
        [*as_the_vmm, "ls", "-a", "/proc"], capture_output=True, text=True, check=True
    ).stdout.split()
    named = {entry for entry in listed if not entry.isdigit()}
    assert {"self", "thread-self"} <= named <= {".", "..", "self", "thread-self"}, named
    pids = {entry for entry in listed if entry.isdigit()} - {str(pid)}
    assert len(pids) <= 1  # its own, and the `ls` run as its uid
    assert not (root / str(ws_ctx.state_dir).lstrip("/") / "store.sqlite3").exists()
    assert (root / str(_files(ws_ctx, wid) / "workspace.ext4").lstrip("/")).exists()
    cgroups = Path(f"/proc/{pid}/cgroup").read_text()
    assert f"pyro-mcp/{status['id']}" in cgroups
    limits = json.loads((Path(status["run_dir"]) / "confinement.json").read_text())["limits"]
    assert limits["memory_bytes"] >= 256 << 20 and limits["pids_max"] == 512
    assert limits["cpu_quota"] == 2.0  # its one vCPU and one for I/O
    ws.workspace_delete(ws_ctx, wid)
    assert not any(
        (Path("/sys/fs/cgroup") / c / "pyro-mcp" / status["id"]).exists()
        for c in ("memory", "cpu", "pids")
    )


# --- host files --------------------------------------------------------------------------


def test_force_never_replaces_an_allowed_root_a_fifo_or_a_device(
    ws_ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "allowed"
    root.mkdir()
    monkeypatch.chdir(root)  # as `pyro mcp serve` without --root: the root is the cwd
    os.mkfifo(root / "pipe")
    confined = Context(
        paths=ws_ctx.paths,
        state_dir=ws_ctx.state_dir,
        host_paths=HostPathPolicy.confined_to([root]),
    )
    wid = ws.workspace_create(confined, "debian:12")["id"]
    wc.workspace_file_write(confined, wid, "f.txt", text="x\n")
    for output in (str(root), ".", ""):
        with pytest.raises(InvalidArgument):
            wc.workspace_export(confined, wid, "f.txt", output=output, force=True)
    with pytest.raises(Conflict, match="fifo"):
        wc.workspace_export(confined, wid, "f.txt", output=str(root / "pipe"), force=True)
    assert sorted(p.name for p in root.iterdir()) == ["pipe"] and root.is_dir()
    with pytest.raises(GuestError):
        wc.workspace_file_read(confined, wid, "nothing-here")


def _rss_mib(pid: int, field: str = "VmRSS") -> float:
    return int(_status(pid)[field].split()[0]) / 1024


def test_memory_the_guest_frees_leaves_the_vmm(
    ws_ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A booted guest gives freed memory back (virtio balloon, free page reporting): QEMU
    would otherwise keep every page the guest ever touched. (A clone of a template does
    not: see docs/warm-start.md, "The balloon".)"""
    monkeypatch.setenv("PYRO_BOOT_MODE", "cold")
    wid = ws.workspace_create(ws_ctx, "debian:12", mem_mib=768)["id"]
    pid = ws.workspace_status(ws_ctx, wid)["vmm_pid"]
    before = _rss_mib(pid)
    _sh(ws_ctx, wid, "python3 -c 'data = b\"x\" * (400 << 20)'")  # touch 400 MiB, free it
    # The peak, not the RSS now: the guest may report the freed pages before we look.
    touched = _rss_mib(pid, "VmHWM")
    assert touched > before + 300, (before, touched)
    deadline = time.monotonic() + 60
    while _rss_mib(pid) > before + 120 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _rss_mib(pid) <= before + 120, (before, touched, _rss_mib(pid))
