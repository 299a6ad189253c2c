"""The typed SDK on real guests: what the operations that need a VM return is what their
TypedDicts declare (pyro_mcp.api.results), keys and value types, run through Pyro (and
the runtime operations on this host's cache); AsyncPyro runs a command, and a cancelled
call stops its VM before the cancellation reaches the caller."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from tests.leftovers import vmm_processes
from tests.result_checks import CheckedCalls

from pyro_mcp import AsyncPyro, Pyro
from pyro_mcp.api import Context
from pyro_mcp.api.cancellable import CANCEL_GRACE_S
from pyro_mcp.runtime.paths import RuntimePaths

pytestmark = pytest.mark.guest

COVERED = {
    "vm_run",
    "template_build",
    "env_prove",
    "runtime_fetch",
    "runtime_build_kernel",
    "runtime_build_rootfs",
    "runtime_bundle",
    "runtime_materialize",
    "runtime_verify",
    "workspace_pause",
    "workspace_resume",
    "workspace_fork",
}
checked = CheckedCalls()
finished: set[str] = set()  # the tests below that ran to their end


@pytest.fixture(scope="module")
def pyro(runtime: RuntimePaths, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pyro]:
    """A Pyro on the test runtime with its own state directory (every workspace left in
    it is deleted after)."""
    state = tmp_path_factory.mktemp("typed-state")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYRO_STATE_DIR", str(state))
        client = Pyro(cache_dir=runtime.cache_dir)
        yield client
        for record in client.list_workspaces()["workspaces"]:
            client.delete_workspace(record["id"])


def sdk(pyro: Pyro, operation: str, *args: Any, **kwargs: Any) -> Any:
    return checked.via_sdk(pyro, operation, *args, **kwargs)


def test_a_one_shot_run_and_a_workspace_on_real_guests_return_what_they_declare(
    pyro: Pyro, runtime: RuntimePaths
) -> None:
    ran = sdk(pyro, "vm_run", "debian:12", "uname -s; echo err >&2; exit 7")
    assert (ran["exit_code"], ran["stdout"], ran["stderr"]) == (7, "Linux\n", "err\n")
    assert ran["network"]["guest_ip"] is None and ran["boot"]["mode"] in ("warm", "cold")

    created = sdk(pyro, "workspace_create", "debian:12", name="typed-real")
    wid = created["id"]
    assert created["boot"]["mode"] in ("warm", "cold")
    ran = sdk(pyro, "workspace_exec", wid, ["sh", "-c", "echo hi > f.txt"])
    assert ran["exit_code"] == 0
    up = ["sh", "-c", "touch ready; exec sleep 600"]
    started = sdk(pyro, "service_start", wid, "svc", up, ready_file="ready")
    assert started["state"] == "ready" and isinstance(started["pid"], int)
    shell = sdk(pyro, "shell_open", wid)["shell_id"]
    sdk(pyro, "shell_write", wid, shell, "echo typed-$((6*7))")
    output, cursor = "", 0
    for _ in range(100):  # the typed line echoes first; its output follows when it ran
        read = sdk(pyro, "shell_read", wid, shell, cursor, wait_for_idle_ms=500, plain=True)
        output, cursor = output + read["output"], read["next_cursor"]
        if "typed-42" in output:
            break
    assert "typed-42" in output
    status = sdk(pyro, "workspace_status", wid)
    assert status["services"]["svc"]["state"] == "ready"

    paused = sdk(pyro, "workspace_pause", wid)
    assert (paused["state"], paused["vmm_pid"]) == ("paused", None)
    resumed = sdk(pyro, "workspace_resume", wid)
    assert resumed["state"] == "running"
    forked = sdk(pyro, "workspace_fork", wid, name="typed-fork")
    assert (forked["source"], forked["state"]) == (wid, "running")
    fork_read = sdk(pyro, "workspace_file_read", forked["id"], "f.txt")
    assert fork_read["content"] == "hi\n"
    for workspace in (forked["id"], wid):
        sdk(pyro, "workspace_delete", workspace)
    assert vmm_processes([runtime.run_root]) == []
    finished.add("guests")


def test_the_runtime_operations_on_this_hosts_cache_return_what_they_declare(
    runtime: RuntimePaths,
) -> None:
    ctx = Context(paths=runtime)
    assert checked(ctx, "runtime_fetch")["version"]
    assert checked(ctx, "runtime_build_kernel")["vmlinux"]
    rows = checked(ctx, "runtime_build_rootfs", ["debian:12"])["environments"]
    assert [row["name"] for row in rows] == ["debian:12"]
    assert {"guest_exec", "vm_boot"} <= set(checked(ctx, "env_prove", "debian:12")["capabilities"])
    built = checked(ctx, "template_build", "debian:12")["templates"]
    assert {(t["kind"], t["mode"]) for t in built} == {("run", "warm"), ("workspace", "warm")}
    assert checked(ctx, "runtime_verify")["ok"] is True
    assert checked(ctx, "runtime_bundle")["capabilities"]["guest_exec"] is True
    done = checked(ctx, "runtime_materialize", ["debian:12"])
    assert done["capabilities"]["vm_boot"] is True and done["templates"]
    for name in ("env_list", "env_inspect", "template_list", "runtime_status"):
        checked(ctx, name, *(["debian:12"] if name == "env_inspect" else []))  # installed
    finished.add("runtime")


def test_async_pyro_runs_a_command_and_a_cancelled_run_leaves_no_vm(
    runtime: RuntimePaths,
) -> None:
    running = threading.Event()

    def progress(message: str) -> None:
        if message == "running command":
            running.set()

    async def run_then_cancel() -> dict[str, Any]:
        client = AsyncPyro(cache_dir=runtime.cache_dir, progress=progress)
        ran = await client.run_in_vm("debian:12", ["uname", "-s"])
        running.clear()
        task = asyncio.create_task(client.run_in_vm("debian:12", "sleep 600"))
        await asyncio.to_thread(running.wait, 600)  # the guest runs the command
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return dict(ran)

    ran = asyncio.run(run_then_cancel())
    checked.check("vm_run", ran)
    assert (ran["exit_code"], ran["stdout"]) == (0, "Linux\n")
    # Without the cancellation the guest would sleep on far past the grace the call gives
    # it: its VM is gone when the cancelled call returns only because it was stopped.
    assert CANCEL_GRACE_S < 600
    assert vmm_processes([runtime.run_root]) == []
    finished.add("async")


def test_the_tests_above_ran_every_operation_this_file_claims() -> None:
    if finished != {"guests", "runtime", "async"}:
        pytest.skip("not every test above ran")
    assert checked.called >= COVERED
