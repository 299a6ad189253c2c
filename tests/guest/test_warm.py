"""Warm starts on real guests: clones of a template, pause/resume, fork, broken templates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pyro_mcp.api import Context
from pyro_mcp.api.operations.vm import vm_run
from pyro_mcp.api.operations.workspaces import open_workspaces
from pyro_mcp.errors import VMError
from pyro_mcp.runtime import lock
from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.vmm import templates, warm
from pyro_mcp.vmm.selection import choose_backend
from pyro_mcp.workspace.lifecycle import Workspaces
from pyro_mcp.workspace.memory import STATE_FILE

pytestmark = pytest.mark.guest

IDENTITY = (
    "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; "
    "python3 -c 'import os, uuid; print(os.urandom(16).hex()); print(uuid.uuid4())'; "
    "hostname; cat /etc/machine-id; date +%s.%N"
)


def _run(ctx: Context, command: str) -> dict[str, Any]:
    result = vm_run(ctx, "debian:12", command)
    assert result["exit_code"] == 0, result
    return result


def _exec(workspaces: Workspaces, workspace_id: str, command: str) -> str:
    with workspaces.agent(workspace_id, "exec") as client:
        result = client.exec(argv=["sh", "-c", command], timeout_s=30)
    assert result.exit_code == 0, result
    return result.stdout.decode()


def _run_shape(runtime: RuntimePaths) -> warm.Shape:
    return warm.Shape("debian:12", choose_backend(runtime, None), 1, 512)


def test_two_clones_of_a_template_draw_different_randomness_and_names_and_keep_the_clock(
    ctx: Context,
) -> None:
    _run(ctx, "true")  # the template exists from here on
    first, second = (_run(ctx, IDENTITY) for _ in range(2))
    host_now = time.time()
    for result in (first, second):
        assert result["boot"]["mode"] == "warm", result["boot"]
    a, b = (result["stdout"].split("\n") for result in (first, second))
    for index, what in enumerate(["/dev/urandom", "os.urandom", "uuid4", "hostname", "machine-id"]):
        assert a[index] != b[index], f"both clones have the same {what}: {a[index]}"
    assert a[3] == f"pyro-{first['vm_id'][:8]}"
    for lines, result in ((a, first), (b, second)):
        guest_time = float(lines[5])
        # the command ran at most its own duration before the host's reading
        assert host_now - result["duration_ms"] / 1000 - 1 <= guest_time <= host_now + 1


def test_workspaces_restored_from_one_template_have_separate_disks(ws_ctx: Context) -> None:
    with open_workspaces(ws_ctx) as workspaces:
        one = workspaces.create("debian:12")
        two = workspaces.create("debian:12")
        for record in (one, two):
            assert workspaces.boot_plans[record.id].mode == "warm"
        _exec(workspaces, one.id, "echo mine > /workspace/only-one; echo r > /root/only-one; sync")
        seen = _exec(workspaces, two.id, "ls /workspace /root; hostname; cat /etc/machine-id")
        assert "only-one" not in seen
        other = _exec(workspaces, one.id, "hostname; cat /etc/machine-id")
        assert other.split() != seen.split()[-2:]
        mounts = _exec(workspaces, two.id, "grep ' /workspace ' /proc/mounts")
        assert "/dev/vdb /workspace ext4" in mounts


def test_pause_and_resume_twenty_times_keep_processes_services_shells_and_every_file(
    ws_ctx: Context,
) -> None:
    with open_workspaces(ws_ctx) as workspaces:
        record = workspaces.create("debian:12")
        _exec(
            workspaces,
            record.id,
            # each value lands by rename: a pause between a truncating write and its data
            # would resume (correctly) into an empty file that a reader could see
            "nohup sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.new; "
            "mv /tmp/counter.new /tmp/counter; sleep 0.1; done' > /dev/null 2>&1 & "
            "echo $! > /tmp/counter.pid",
        )
        pid = _exec(workspaces, record.id, "cat /tmp/counter.pid").strip()
        with workspaces.agent(record.id, "service") as client:
            client.service_start(
                "web",
                ["python3", "-m", "http.server", "8080"],
                ready={"type": "tcp", "port": 8080},
                ready_timeout_s=60,
            )
            shell = client.shell_open()["shell_id"]
            client.shell_write(shell, "KEPT=42")
        last = 0
        for cycle in range(20):
            _exec(workspaces, record.id, f"echo {cycle} > /workspace/cycle-{cycle}")
            paused = workspaces.pause(record.id)
            assert paused.state == "paused" and paused.vmm_pid is None
            assert (workspaces.layout.workspace(record.id).directory / STATE_FILE).is_file()
            resumed = workspaces.resume(record.id)
            assert resumed.state == "running"
            counter = int(_exec(workspaces, record.id, "cat /tmp/counter"))
            assert counter >= last  # the counting process went on from where it was
            last = counter
        time.sleep(0.5)
        after = int(_exec(workspaces, record.id, "cat /tmp/counter"))
        assert after > last
        assert _exec(workspaces, record.id, f"cat /proc/{pid}/comm").strip() == "sh"
        files = _exec(workspaces, record.id, "cat /workspace/cycle-*").split()
        assert files == [str(n) for n in sorted(range(20), key=str)]
        with workspaces.agent(record.id, "shell") as client:
            assert client.service_status("web")["state"] == "ready"
            client.shell_write(shell, "echo v=$((KEPT + 1))")
            deadline, seen = time.monotonic() + 10, ""
            while "v=43" not in seen and time.monotonic() < deadline:
                seen = client.shell_read(shell, wait_for_idle_ms=200)["output"]
            assert "v=43" in seen
        page = _exec(
            workspaces,
            record.id,
            'python3 -c "import urllib.request as u; '
            "print(u.urlopen('http://127.0.0.1:8080/').status)\"",
        )
        assert page.strip() == "200"


def test_a_paused_workspace_survives_a_new_pyro_process(ws_ctx: Context) -> None:
    with open_workspaces(ws_ctx) as workspaces:
        record = workspaces.create("debian:12")
        _exec(workspaces, record.id, "echo before > /tmp/in-memory-only")
        workspaces.pause(record.id)
    with open_workspaces(ws_ctx) as fresh:  # another process: only the disk holds the state
        fresh.reconcile()
        assert fresh.store.get(record.id).state == "paused"
        fresh.resume(record.id)
        assert _exec(fresh, record.id, "cat /tmp/in-memory-only").strip() == "before"


def test_a_fork_sees_the_source_at_the_fork_point_and_then_goes_its_own_way(
    ws_ctx: Context,
) -> None:
    with open_workspaces(ws_ctx) as workspaces:
        source = workspaces.create("debian:12")
        _exec(workspaces, source.id, "echo shared > /workspace/f; echo m > /tmp/mem; sleep 600 &")
        forked = workspaces.fork(source.id, name="the-fork")
        assert forked.state == "running" and forked.name == "the-fork"
        assert workspaces.store.get(source.id).state == "running"
        assert _exec(workspaces, forked.id, "cat /workspace/f /tmp/mem").split() == ["shared", "m"]
        assert "sleep 600" in _exec(workspaces, forked.id, "ps -eo args")
        _exec(workspaces, forked.id, "echo fork > /workspace/f")
        _exec(workspaces, source.id, "echo source > /workspace/g")
        assert _exec(workspaces, source.id, "cat /workspace/f").strip() == "shared"
        assert _exec(workspaces, forked.id, "cat /workspace/f").strip() == "fork"
        assert "g" not in _exec(workspaces, forked.id, "ls /workspace").split()
        names = [
            _exec(workspaces, w, "hostname; cat /etc/machine-id") for w in (source.id, forked.id)
        ]
        assert names[0] != names[1]


def test_a_template_changed_by_one_byte_is_not_used_and_is_rebuilt(
    ctx: Context, runtime: RuntimePaths
) -> None:
    _run(ctx, "true")
    template = templates.find(runtime, warm.inputs_for(runtime, _run_shape(runtime)))
    assert template is not None
    state = template.state
    state.chmod(0o600)
    with state.open("r+b") as handle:
        handle.seek(state.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    progress: list[str] = []
    result = vm_run(Context(paths=runtime, progress=progress.append), "debian:12", "echo ok")
    assert result["stdout"] == "ok\n"
    assert result["boot"]["mode"] == "cold"
    assert "does not match its manifest" in result["boot"]["reason"]
    assert any(line.startswith("warning: template") for line in progress)
    again = _run(ctx, "true")
    assert again["boot"]["mode"] == "warm"
    assert "built now" in again["boot"]["reason"]


def test_a_template_of_another_qemu_version_is_never_used(
    ctx: Context, runtime: RuntimePaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run(ctx, "true")
    real = lock.qemu_version()
    monkeypatch.setattr(lock, "qemu_version", lambda: f"{real}-other")
    shape = _run_shape(runtime)
    other = warm.inputs_for(runtime, shape)
    assert templates.find(runtime, other) is None
    # even a template directory renamed to the other key is refused: its inputs differ
    current = [
        t for t in templates.installed(runtime) if t.manifest["inputs"]["vmm_version"] == real
    ]
    assert current
    impostor = templates.templates_dir(runtime) / templates.key_of(other)
    subprocess.run(["cp", "-a", str(current[0].directory), str(impostor)], check=True)
    manifest = json.loads((impostor / templates.MANIFEST).read_text())
    manifest["key"] = impostor.name
    (impostor / templates.MANIFEST).chmod(0o600)
    (impostor / templates.MANIFEST).write_text(json.dumps(manifest))
    try:
        assert templates.find(runtime, other) is None
    finally:
        subprocess.run(["rm", "-rf", str(impostor)], check=True)


def test_a_pause_that_runs_out_of_disk_says_so_and_the_workspace_keeps_running(
    ws_ctx: Context, tmp_path: Path
) -> None:
    with open_workspaces(ws_ctx) as workspaces:
        record = workspaces.create("debian:12")
        _exec(workspaces, record.id, "echo kept > /workspace/kept")
        directory = workspaces.layout.workspace(record.id).directory
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(directory)], check=True
        )
        try:
            with pytest.raises(VMError, match="no space left"):
                workspaces.pause(record.id)
        finally:
            subprocess.run(["umount", str(directory)], check=True)
        after = workspaces.store.get(record.id)
        assert after.state == "running"
        assert not (directory / STATE_FILE).exists()
        assert _exec(workspaces, record.id, "cat /workspace/kept").strip() == "kept"


def _template_ram_mapping(pid: int) -> tuple[int, int]:
    """(inode, KiB shared with other processes) of the VMM's mapping of the template's
    sealed RAM (memfd pages count as dirty: they have no file behind them)."""
    inode, shared, inside = None, 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:
            inside = "memfd:pyro-template-ram" in line
            if inside:
                inode = int(fields[4])
        elif inside and fields[0] in ("Shared_Clean:", "Shared_Dirty:"):
            shared += int(fields[1])
    assert inode is not None, "the VMM maps no template RAM"
    return inode, shared


def test_idle_clones_of_one_template_share_its_ram(ws_ctx: Context) -> None:
    with open_workspaces(ws_ctx) as workspaces:
        records = [workspaces.create("debian:12") for _ in range(2)]
        pids = [workspaces.store.get(r.id).vmm_pid for r in records]
        assert all(pids)
        (inode_a, shared_a), (inode_b, shared_b) = (_template_ram_mapping(p or 0) for p in pids)
        assert inode_a == inode_b  # one sealed copy, mapped by both
        assert min(shared_a, shared_b) > 16 * 1024  # tens of MiB in host memory once
        # A clone that takes memory and gives it back: its balloon reports nothing for
        # QEMU to punch out of the RAM it maps (QEMU 7.2 would try, and fail on the seal).
        _exec(workspaces, records[0].id, "python3 -c 'x = bytearray(64 << 20)'; sleep 3")
        log = Path(workspaces.store.get(records[0].id).run_dir or "", "vmm.log").read_text()
        assert "ram_block_discard_range" not in log


def test_pyro_boot_mode_cold_boots_and_says_why(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(warm.BOOT_MODE_ENV, "cold")
    result = _run(ctx, "true")
    assert result["boot"] == {"mode": "cold", "reason": "PYRO_BOOT_MODE=cold", "template": None}


def test_the_template_commands_build_list_and_keep_what_is_current(runtime: RuntimePaths) -> None:
    env = dict(
        os.environ, PYRO_CACHE_DIR=str(runtime.cache_dir), PYRO_RUN_DIR=str(runtime.run_root)
    )

    def pyro(*args: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-m", "pyro_mcp.cli.main", *args, "--json"],
            capture_output=True, text=True, env=env, timeout=300, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    built = pyro("template", "build", "debian:12")["templates"]
    assert [(t["kind"], t["mode"]) for t in built] == [("run", "warm"), ("workspace", "warm")]
    keys = {t["key"] for t in built}
    listed = {t["key"]: t for t in pyro("template", "list")["templates"]}
    assert keys <= set(listed)
    for key in keys:
        assert listed[key]["size_bytes"] > 0 and listed[key]["inputs"]["environment"] == "debian:12"
    stale = templates.templates_dir(runtime) / ("0" * 64)
    stale.mkdir()
    removed = pyro("template", "prune")["removed"]
    assert stale.name in removed and not keys & set(removed)
    assert not stale.exists()


def test_env_pull_leaves_the_default_templates_ready(ctx: Context) -> None:
    from pyro_mcp.api.operations.environments import env_pull

    result = env_pull(ctx, "debian:12")
    kinds = {(t["kind"], t["mode"]) for t in result["templates"]}
    assert kinds == {("run", "warm"), ("workspace", "warm")}
    first_run = _run(ctx, "true")["boot"]
    assert first_run["mode"] == "warm" and "built now" not in first_run["reason"]


def test_a_fork_has_the_sources_baseline_and_secrets_but_not_its_checkpoints(
    ws_ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyro_mcp.api.operations import workspace_content as wc
    from pyro_mcp.api.operations import workspaces as ws

    monkeypatch.setenv("PYRO_KEY_DIR", str(tmp_path / "keys"))
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "seeded.txt").write_text("from the seed\n")
    token = "Fk" + os.urandom(12).hex()
    source = ws.workspace_create(
        ws_ctx, "debian:12", seed_path=str(seed), secret=[f"TOKEN={token}"]
    )
    wc.workspace_exec(ws_ctx, source["id"], "echo later > /workspace/added.txt")
    wc.snapshot_create(ws_ctx, source["id"], "before-fork")
    fork = ws.workspace_fork(ws_ctx, source["id"])
    diff = json.dumps(wc.workspace_diff(ws_ctx, fork["id"]))
    assert "added.txt" in diff and "seeded.txt" not in diff  # the source's baseline
    names = [s["name"] for s in wc.snapshot_list(ws_ctx, fork["id"])["snapshots"]]
    assert "before-fork" not in names
    shown = wc.workspace_exec(ws_ctx, fork["id"], "echo $TOKEN", secret_env=["TOKEN"])
    assert shown["stdout"] == "***\n"  # the fork knows the secret, and redacts it
    assert fork["secrets"] == [{"name": "TOKEN", "source_kind": "literal"}]
