"""The workspace lifecycle (create, stop, start, delete, reconcile, the orphan sweep,
admission) driven through the operations, on fake VMs (tests/unit/fake_vm.py): the real
store, disks and guest agent, a real VMM process per VM, no kernel."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from tests.unit import fake_vm

from pyro_mcp.api.context import Context
from pyro_mcp.api.operations import services as sv
from pyro_mcp.api.operations import workspace_content as wc
from pyro_mcp.api.operations import workspaces as ws
from pyro_mcp.api.operations.workspaces import open_workspaces
from pyro_mcp.errors import InvalidState, NotFound, TooLarge, VMError
from pyro_mcp.storage.disk_create import create_workspace_disk
from pyro_mcp.vmm.base import Disk, VMSpec
from pyro_mcp.vmm.identity import VMMRecord, mark_run_dir
from pyro_mcp.vmm.ownership import OWNER_FILE
from pyro_mcp.workspace import admission
from pyro_mcp.workspace.admission import MAX_WORKSPACES_ENV
from pyro_mcp.workspace.store import WorkspaceStore


def _left_behind(ctx: Context) -> list[str]:
    return fake_vm.left_behind(ctx.state_dir, ctx.paths.run_root)


def _seed(tmp_path: Path) -> Path:
    seed = tmp_path / "seed"
    (seed / "src").mkdir(parents=True)
    (seed / "src" / "app.py").write_text("print('seeded')\n")
    return seed


def _cat(ctx: Context, workspace: str, path: str) -> str:
    ran = wc.workspace_exec(ctx, workspace, ["cat", path])
    assert ran["exit_code"] == 0, ran
    return str(ran["stdout"])


def _power_loss(ctx: Context, workspace: str) -> None:
    """Kill the workspace's VMM as a crash would, and wait until it (and its guest) died:
    its processes gone, and the VMM no longer running (a process killed a moment ago
    loses its command line before it has finished exiting)."""
    from pyro_mcp.vmm.identity import ProcessIdentity

    pid = ws.workspace_status(ctx, workspace)["vmm_pid"]
    identity = ProcessIdentity.of(pid)
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while fake_vm.vmm_processes(ctx.paths.run_root) or (identity and identity.alive()):
        assert time.monotonic() < deadline, "the VMM did not die of SIGKILL"
        time.sleep(0.02)


# --- create, stop, start, delete ---------------------------------------------------------


def test_a_workspace_boots_from_its_seed_and_stop_and_start_keep_its_disk(
    fake_ctx: Context, tmp_path: Path
) -> None:
    created = ws.workspace_create(fake_ctx, "debian:12", seed_path=str(_seed(tmp_path)))
    wid = created["id"]
    assert (created["state"], created["backend"]) == ("running", fake_vm.FAKE_LABEL)
    assert _cat(fake_ctx, wid, "src/app.py") == "print('seeded')\n"
    wc.workspace_file_write(fake_ctx, wid, "notes/todo.txt", text="ship it\n")

    stopped = ws.workspace_stop(fake_ctx, wid)
    assert (stopped["state"], stopped["vmm_pid"]) == ("stopped", None)
    assert fake_vm.vmm_processes(fake_ctx.paths.run_root) == []
    assert list(fake_ctx.paths.run_root.iterdir()) == []
    # What was written is on the disk image, read offline.
    on_disk = wc.workspace_disk_read(fake_ctx, wid, "/notes/todo.txt")
    assert on_disk["content"] == "ship it\n"
    with pytest.raises(InvalidState, match="stopped"):
        wc.workspace_exec(fake_ctx, wid, ["true"])

    started = ws.workspace_start(fake_ctx, wid)
    assert started["state"] == "running" and started["boot_id"] != created["boot_id"]
    assert _cat(fake_ctx, wid, "notes/todo.txt") == "ship it\n"
    assert _cat(fake_ctx, wid, "src/app.py") == "print('seeded')\n"

    assert ws.workspace_delete(fake_ctx, wid) == {"deleted": wid, "name": None, "workspace_id": wid}
    assert _left_behind(fake_ctx) == []
    with pytest.raises(NotFound):
        ws.workspace_status(fake_ctx, wid)


@pytest.mark.parametrize(
    ("failure", "error"),
    [
        ("mount", "the workspace disk did not mount at /workspace: cannot mount /dev/vdb"),
        ("exit", "exited with 3 while waiting for its agent socket"),
    ],
)
def test_a_create_whose_boot_fails_leaves_nothing_and_its_name_free(
    fake_ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str, error: str
) -> None:
    monkeypatch.setenv(fake_vm.FAIL_ENV, failure)
    with pytest.raises(VMError, match=error):
        ws.workspace_create(fake_ctx, "debian:12", seed_path=str(_seed(tmp_path)), name="app")
    assert _left_behind(fake_ctx) == []
    monkeypatch.delenv(fake_vm.FAIL_ENV)
    assert ws.workspace_create(fake_ctx, "debian:12", name="app")["name"] == "app"


def test_a_create_interrupted_while_booting_leaves_nothing(fake_ctx: Context) -> None:
    def interrupt(message: str) -> None:
        if message.startswith("booting"):
            raise KeyboardInterrupt

    interrupted = Context(paths=fake_ctx.paths, state_dir=fake_ctx.state_dir, progress=interrupt)
    with pytest.raises(KeyboardInterrupt):
        ws.workspace_create(interrupted, "debian:12", name="app")
    assert _left_behind(fake_ctx) == []


def test_a_seed_too_large_for_the_disk_leaves_nothing(fake_ctx: Context, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.mkdir()
    (big / "noise").write_bytes(os.urandom(24 << 20))
    with pytest.raises(TooLarge, match="does not fit in a 16 MiB workspace disk"):
        ws.workspace_create(fake_ctx, "debian:12", seed_path=str(big), disk_mib=16)
    assert _left_behind(fake_ctx) == []


# --- reconcile ---------------------------------------------------------------------------


def test_reconcile_marks_a_workspace_whose_vmm_died_stopped_and_start_boots_it_again(
    fake_ctx: Context,
) -> None:
    wid = ws.workspace_create(fake_ctx, "debian:12")["id"]
    wc.workspace_file_write(fake_ctx, wid, "kept.txt", text="acknowledged\n")
    assert sv.service_start(fake_ctx, wid, "sleeper", ["sleep", "1000"])["state"] == "running"
    _power_loss(fake_ctx, wid)

    report = ws.reconcile(fake_ctx)
    assert report["stopped"] == [wid]
    status = ws.workspace_status(fake_ctx, wid)
    assert (status["state"], status["vmm_pid"]) == ("stopped", None)
    assert "the VMM exited unexpectedly" in status["state_note"]
    assert [(s["name"], s["state"]) for s in sv.service_list(fake_ctx, wid)["services"]] == [
        ("sleeper", "stopped")
    ]
    assert fake_vm.vmm_processes(fake_ctx.paths.run_root) == []
    assert list(fake_ctx.paths.run_root.iterdir()) == []
    assert ws.reconcile(fake_ctx)["stopped"] == []  # once repaired, nothing to repair

    assert ws.workspace_start(fake_ctx, wid)["state"] == "running"
    assert _cat(fake_ctx, wid, "kept.txt") == "acknowledged\n"


def test_a_call_on_a_workspace_whose_vmm_died_says_it_is_stopped(fake_ctx: Context) -> None:
    wid = ws.workspace_create(fake_ctx, "debian:12")["id"]
    _power_loss(fake_ctx, wid)
    with pytest.raises(InvalidState, match="stopped"):
        wc.workspace_exec(fake_ctx, wid, ["true"])
    assert ws.workspace_status(fake_ctx, wid)["state"] == "stopped"


def test_a_vmm_that_dies_between_the_state_check_and_the_attach_is_reported_stopped(
    fake_ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyro_mcp.workspace.lifecycle import Workspaces

    wid = ws.workspace_create(fake_ctx, "debian:12")["id"]
    vmm_pid = ws.workspace_status(fake_ctx, wid)["vmm_pid"]

    def checked_then_lost(self: Workspaces, ref: str, action: str) -> Any:
        record = self.store.get(ref)  # running, as the check saw it
        os.killpg(vmm_pid, signal.SIGKILL)  # and then the VMM dies, before the attach
        while fake_vm.vmm_processes(fake_ctx.paths.run_root):
            time.sleep(0.02)
        return record

    monkeypatch.setattr(Workspaces, "running", checked_then_lost)
    with pytest.raises(InvalidState, match="stopped"):
        wc.workspace_exec(fake_ctx, wid, ["true"])
    monkeypatch.undo()
    assert ws.workspace_status(fake_ctx, wid)["state"] == "stopped"


def test_a_create_whose_process_died_is_discarded_with_its_vmm_at_once_by_the_keeper(
    fake_ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(fake_vm.FAIL_ENV, "hang")  # the guest never answers: create waits
    child = os.fork()
    if child == 0:  # the process creating the workspace, killed while it boots
        try:
            ws.workspace_create(fake_ctx, "debian:12", name="doomed")
        finally:
            os._exit(1)
    try:
        deadline = time.monotonic() + 30
        while not _recorded_vmms(fake_ctx.paths.run_root):  # it waits for the guest now
            assert time.monotonic() < deadline, "the create never started its VMM"
            time.sleep(0.05)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    # No pyro command runs from here on: the keeper repairs it (the store is only read).
    store = WorkspaceStore(fake_ctx.state_dir / "store.sqlite3")
    deadline = time.monotonic() + 15
    while (store.list() or fake_vm.vmm_processes(fake_ctx.paths.run_root)) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    left = [r.id for r in store.list()]
    store.close()
    assert left == [] and fake_vm.vmm_processes(fake_ctx.paths.run_root) == []
    assert _left_behind(fake_ctx) == []
    monkeypatch.delenv(fake_vm.FAIL_ENV)
    assert ws.workspace_create(fake_ctx, "debian:12", name="doomed")["state"] == "running"


def _orphan_vm(run_root: Path, tmp_path: Path, name: str) -> Any:
    """A VMM of a workspace that no record knows any more, its run dir 2 minutes old."""
    disk = tmp_path / f"{name}.ext4"
    staging = tmp_path / f"{name}-staging"
    staging.mkdir()
    create_workspace_disk(disk, 16, staging)
    run_dir = mark_run_dir(run_root / name)
    spec = VMSpec(
        vm_id=name,
        run_dir=run_dir,
        kernel=Path("/nonexistent/vmlinux"),
        root_disk=Disk(tmp_path / f"{name}-root"),
        extra_disks=(Disk(disk),),
        agent_ports=1,
    )
    vm = fake_vm.make_fake_vm_class()(spec)
    vm.start()
    vm.wait_ready(30)
    vm.release_agent()
    old = time.time() - 120
    os.utime(run_dir, (old, old))
    return vm


def test_the_sweep_kills_orphan_vmms_and_leaves_one_shot_and_young_run_dirs(
    fake_ctx: Context, tmp_path: Path
) -> None:
    run_root = fake_ctx.paths.run_root
    kept = ws.workspace_create(fake_ctx, "debian:12")["id"]
    orphan = _orphan_vm(run_root, tmp_path, "0rphan0rphan")
    one_shot = mark_run_dir(run_root / "0neshot0ne00")
    (one_shot / OWNER_FILE).write_text("{}")
    old = time.time() - 120
    os.utime(one_shot, (old, old))
    young = mark_run_dir(run_root / "y0ung0y0ung0")  # a VM being set up right now

    assert ws.reconcile(fake_ctx)["orphans"] == ["0rphan0rphan"]
    assert orphan.process.wait(timeout=10) is not None
    assert sorted(p.name for p in run_root.iterdir()) == sorted([kept, one_shot.name, young.name])
    assert wc.workspace_exec(fake_ctx, kept, ["true"])["exit_code"] == 0
    shutil.rmtree(one_shot)
    shutil.rmtree(young)


# --- admission ---------------------------------------------------------------------------


def test_admission_refuses_past_the_limit_and_counts_only_live_workspaces(
    fake_ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MAX_WORKSPACES_ENV, "1")
    first = ws.workspace_create(fake_ctx, "debian:12", name="first")["id"]
    with pytest.raises(TooLarge, match="1 workspaces are live, the limit is 1") as refused:
        ws.workspace_create(fake_ctx, "debian:12", name="second")
    assert refused.value.hint == f"stop or delete one, or raise {MAX_WORKSPACES_ENV}"
    assert [r["name"] for r in ws.workspace_list(fake_ctx)["workspaces"]] == ["first"]

    ws.workspace_stop(fake_ctx, first)  # a stopped workspace holds no VM: it does not count
    second = ws.workspace_create(fake_ctx, "debian:12", name="second")["id"]
    with pytest.raises(TooLarge, match="1 workspaces are live"):
        ws.workspace_start(fake_ctx, first)
    status = ws.workspace_status(fake_ctx, first)
    assert (status["state"], status["vmm_pid"]) == ("stopped", None)
    assert len(fake_vm.vmm_processes(fake_ctx.paths.run_root)) == 2  # second's VMM + guest
    ws.workspace_delete(fake_ctx, second)
    assert ws.workspace_start(fake_ctx, first)["state"] == "running"


# --- races -------------------------------------------------------------------------------


def _together(count: int, call: Any) -> list[Any]:
    """Run ``call(index)`` in ``count`` threads at once: each result or exception."""
    results: list[Any] = [None] * count
    barrier = threading.Barrier(count)

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = call(index)
        except Exception as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_a_reconcile_while_a_create_prepares_its_files_leaves_the_create_alone(
    fake_ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    workspaces_dir = fake_ctx.state_dir / "workspaces"
    real_mkdir = Path.mkdir
    repaired: list[dict[str, Any]] = []

    def mkdir(self: Path, *args: Any, **kwargs: Any) -> None:
        if self.parent == workspaces_dir and not repaired:  # the create's own directory
            repaired.append(ws.reconcile(fake_ctx))  # another process, at just this moment
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    try:
        created = ws.workspace_create(fake_ctx, "debian:12", name="app")
    finally:
        monkeypatch.undo()
    assert repaired and repaired[0]["discarded"] == []
    assert ws.workspace_status(fake_ctx, "app")["state"] == created["state"] == "running"


def test_concurrent_execs_on_one_workspace_each_get_their_own_answer(fake_ctx: Context) -> None:
    wid = ws.workspace_create(fake_ctx, "debian:12")["id"]

    def compute(index: int) -> str:
        script = f"printf '%s\\n' $(({index} * 7 + 1000))"
        return str(wc.workspace_exec(fake_ctx, wid, ["sh", "-c", script])["stdout"])

    results = _together(6, lambda index: [compute(index * 10 + n) for n in range(3)])
    assert results == [[f"{(i * 10 + n) * 7 + 1000}\n" for n in range(3)] for i in range(6)]
    assert len(ws.workspace_logs(fake_ctx, wid, limit=100)["commands"]) == 18


def test_concurrent_creates_never_pass_a_limit_only_one_fits_under(
    fake_ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MAX_WORKSPACES_ENV, "1")
    outcomes: list[str] = []
    lock = threading.Lock()

    def create(index: int) -> None:
        try:
            ws.workspace_create(fake_ctx, "debian:12", name=f"w{index}")
            result = "created"
        except TooLarge:
            result = "refused"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["created", "refused", "refused", "refused"]
    assert len(ws.workspace_list(fake_ctx)["workspaces"]) == 1


def test_a_start_is_judged_by_its_process_never_by_the_clock(fake_ctx: Context) -> None:

    wid = ws.workspace_create(fake_ctx, "debian:12")["id"]
    ws.workspace_stop(fake_ctx, wid)
    with open_workspaces(fake_ctx) as workspaces:
        # A start under way in this (live) process, whose boot has taken ten minutes so far.
        workspaces.store.transition(wid, "starting", owner=admission.this_owner())
    _age(fake_ctx, wid, 600)
    assert ws.reconcile(fake_ctx)["failed"] == []
    assert ws.workspace_status(fake_ctx, wid)["state"] == "starting"
    with open_workspaces(fake_ctx) as workspaces:  # its process is gone now
        workspaces.store.set_fields(wid, owner="1:1")
    assert ws.reconcile(fake_ctx)["failed"] == [wid]


def _age(ctx: Context, wid: str, seconds: float) -> None:
    import sqlite3

    with sqlite3.connect(ctx.state_dir / "store.sqlite3") as conn:
        conn.execute(
            "UPDATE workspaces SET updated_at = updated_at - ? WHERE id = ?", (seconds, wid)
        )


def test_a_process_holds_one_agent_channel_however_many_calls_it_makes(
    fake_ctx: Context,
) -> None:
    from pyro_mcp.vmm.qemu.vm import lock_port

    wid = ws.workspace_create(fake_ctx, "debian:12")["id"]
    run_dir = Path(ws.workspace_status(fake_ctx, wid)["run_dir"])
    started = threading.Barrier(13)
    results: list[int] = []

    def long_exec() -> None:
        started.wait()
        results.append(wc.workspace_exec(fake_ctx, wid, ["sleep", "3"])["exit_code"])

    threads = [threading.Thread(target=long_exec) for _ in range(12)]  # more than 8 ports
    for thread in threads:
        thread.start()
    started.wait()
    time.sleep(1.5)  # all twelve are running their command now
    free = [fd for fd in (lock_port(run_dir, port) for port in range(8)) if fd is not None]
    for fd in free:
        os.close(fd)
    for thread in threads:
        thread.join()
    assert results == [0] * 12 and len(free) == 7  # one channel carried all twelve calls


def test_when_other_processes_hold_every_channel_the_error_says_so(fake_ctx: Context) -> None:
    from pyro_mcp.errors import AgentUnavailable
    from pyro_mcp.vmm.qemu.vm import lock_port

    wid = ws.workspace_create(fake_ctx, "debian:12")["id"]
    run_dir = Path(ws.workspace_status(fake_ctx, wid)["run_dir"])
    held = [lock_port(run_dir, port) for port in range(8)]  # as eight other processes
    try:
        with pytest.raises(AgentUnavailable) as refused:
            wc.workspace_exec(fake_ctx, wid, ["true"])
    finally:
        for fd in held:
            if fd is not None:
                os.close(fd)
    assert refused.value.message == (
        "all 8 agent channels of the VM are held by other processes "
        "(each process working on a VM holds one, however many calls it makes)"
    )
    assert wc.workspace_exec(fake_ctx, wid, ["true"])["exit_code"] == 0


def _recorded_vmms(run_root: Path) -> list[int]:
    """Pids of the VMMs recorded in the run directories under ``run_root``."""
    records = (VMMRecord.load(run_dir) for run_dir in run_root.iterdir())
    return [r.process.pid for r in records if r is not None and r.process is not None]
