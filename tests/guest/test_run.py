"""One-shot `run` on real guests: streams, exit codes, limits, faults, cleanup."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tests.leftovers import vmm_processes

from pyro_mcp.api import Context
from pyro_mcp.api.operations.vm import vm_run
from pyro_mcp.errors import AgentUnavailable, BootTimeout, InvalidArgument, NotFound
from pyro_mcp.runtime import kernels
from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.vmm.launch import build_spec, create_vm, discard_vm, start_owned
from pyro_mcp.vmm.ownership import sweep_orphans
from pyro_mcp.vmm.selection import choose_backend

pytestmark = pytest.mark.guest
PYRO = [sys.executable, "-m", "pyro_mcp.cli.main"]


def _pyro(
    runtime: RuntimePaths, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ, PYRO_CACHE_DIR=str(runtime.cache_dir), PYRO_RUN_DIR=str(runtime.run_root)
    )
    return subprocess.run([*PYRO, *args], capture_output=True, text=True, env=env, timeout=timeout)


def _vmm_processes(runtime: RuntimePaths) -> list[str]:
    """The VMMs (QEMU or Firecracker) of this test run's VMs still running."""
    return vmm_processes([runtime.run_root])


def test_cli_run_prints_both_streams_and_exits_with_the_guest_code(runtime: RuntimePaths) -> None:
    result = _pyro(runtime, "run", "debian:12", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert result.returncode == 3
    assert result.stdout == "out\n"
    assert "err\n" in result.stderr


def test_cli_run_json_gives_the_same_in_one_structured_result(runtime: RuntimePaths) -> None:
    result = _pyro(
        runtime, "run", "debian:12", "--json", "--", "sh", "-c", "echo out; echo err >&2; exit 3"
    )
    assert result.returncode == 3
    data = json.loads(result.stdout)
    assert (data["stdout"], data["stderr"], data["exit_code"]) == ("out\n", "err\n", 3)
    assert data["backend"].startswith(("qemu", "firecracker"))
    assert {"create_ms", "boot_ms", "exec_ms", "cleanup_ms"} <= set(data["timings_ms"])


def test_the_command_runs_on_the_guest_kernel_not_the_hosts(ctx: Context) -> None:
    result = vm_run(ctx, "debian:12", ["uname", "-r"])
    kernel = kernels.installed_kernel(ctx.paths, kernels.default_flavor())
    assert kernel is not None
    assert result["stdout"].strip() == kernel.release
    assert result["stdout"].strip() != os.uname().release


def test_a_missing_program_exits_127_not_a_crash(ctx: Context) -> None:
    result = vm_run(ctx, "debian:12", ["no-such-program", "--flag"])
    assert result["exit_code"] == 127
    assert "no-such-program" in result["stderr"]


def test_output_floods_are_capped_and_flagged(ctx: Context) -> None:
    result = vm_run(ctx, "debian:12", ["sh", "-c", "yes | head -c 5000000"], output_cap_bytes=65536)
    assert len(result["stdout"]) == 65536
    assert result["stdout_truncated"] is True
    assert result["exit_code"] == 0


def test_a_command_past_its_timeout_is_killed_with_partial_output(ctx: Context) -> None:
    result = vm_run(ctx, "debian:12", ["sh", "-c", "echo partial; sleep 60"], timeout_seconds=2)
    assert result["timed_out"] is True
    assert result["stdout"] == "partial\n"
    assert result["duration_ms"] < 30000


def test_bad_input_is_refused_before_anything_boots(ctx: Context) -> None:
    with pytest.raises(NotFound, match="debian:99"):
        vm_run(ctx, "debian:99", ["true"])
    with pytest.raises(InvalidArgument, match="vcpu_count"):
        vm_run(ctx, "debian:12", ["true"], vcpu_count=0)
    with pytest.raises(InvalidArgument, match="mem_mib"):
        vm_run(ctx, "debian:12", ["true"], mem_mib=16)
    with pytest.raises(InvalidArgument, match="command is empty"):
        vm_run(ctx, "debian:12", [])


def test_a_guest_that_never_becomes_ready_fails_with_the_console_tail(ctx: Context) -> None:
    choice = choose_backend(ctx.paths)
    spec = build_spec(ctx.paths, environment="debian:12", choice=choice)
    # init=/bin/cat: the kernel boots, but no agent ever starts.
    spec = dataclasses.replace(spec, kernel_args=(*spec.kernel_args, "init=/bin/cat"))
    vm = create_vm(ctx.paths, spec, choice)
    try:
        start_owned(vm)
        with pytest.raises(BootTimeout) as caught:
            vm.wait_ready(timeout_s=8)
    finally:
        discard_vm(vm)
    assert "did not become ready" in str(caught.value)
    assert caught.value.console_tail  # what the guest printed, to debug it
    assert not spec.run_dir.exists()


def test_vmm_killed_mid_exec_is_a_clear_error_and_leaves_nothing(ctx: Context) -> None:
    choice = choose_backend(ctx.paths)
    spec = build_spec(ctx.paths, environment="debian:12", choice=choice)
    vm = create_vm(ctx.paths, spec, choice)
    errors: list[Exception] = []
    try:
        start_owned(vm)
        agent = vm.wait_ready(timeout_s=60)

        def run() -> None:
            try:
                agent.exec(["sleep", "60"])
            except Exception as exc:
                errors.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(0.5)
        assert vm.pid is not None
        os.kill(vm.pid, signal.SIGKILL)
        worker.join(timeout=10)
    finally:
        discard_vm(vm)
    assert len(errors) == 1 and isinstance(errors[0], AgentUnavailable)
    assert not spec.run_dir.exists()
    assert vm.status() == "exited"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_ctrl_c_sigterm_or_sighup_kill_the_vm_and_leave_nothing_behind(
    runtime: RuntimePaths, signum: int
) -> None:
    env = dict(
        os.environ, PYRO_CACHE_DIR=str(runtime.cache_dir), PYRO_RUN_DIR=str(runtime.run_root)
    )
    proc = subprocess.Popen(
        [*PYRO, "run", "debian:12", "--", "sh", "-c", "echo running; sleep 60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"running\n"
    proc.send_signal(signum)
    assert proc.wait(timeout=20) == 128 + signum
    assert _vmm_processes(runtime) == []
    assert list(Path(runtime.run_root).glob("*")) == []


def test_a_vm_whose_owner_was_killed_is_swept(runtime: RuntimePaths) -> None:
    env = dict(
        os.environ, PYRO_CACHE_DIR=str(runtime.cache_dir), PYRO_RUN_DIR=str(runtime.run_root)
    )
    proc = subprocess.Popen(
        [*PYRO, "run", "debian:12", "--", "sh", "-c", "echo running; sleep 60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"running\n"
    proc.kill()  # SIGKILL: the owner gets no chance to clean up
    proc.wait()
    if os.geteuid() == 0:  # a confined one-shot VMM dies with its owner, at once
        deadline = time.monotonic() + 2
        while _vmm_processes(runtime) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _vmm_processes(runtime) == []
    else:
        assert len(_vmm_processes(runtime)) == 1  # it lives on in its own session
    swept = sweep_orphans(runtime.run_root)
    assert len(swept) == 1
    deadline = time.monotonic() + 5
    while _vmm_processes(runtime) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _vmm_processes(runtime) == []
    assert list(Path(runtime.run_root).glob("*")) == []


def test_demo_ollama_a_model_runs_git_in_a_real_vm_and_reads_its_output(
    runtime: RuntimePaths,
) -> None:
    """The model (a scripted stand-in on loopback) calls vm_run as a model would; its
    answer is built from the guest's real output, which only a real VM can give."""
    from tests.fake_ollama import Reply, calls, fake_ollama, tool_results

    def answer_from_the_vm(request: dict[str, object]) -> tuple[int, bytes]:
        [ran] = tool_results(request)  # type: ignore[arg-type]
        words = f"The VM has {ran['content']['stdout'].strip()}."
        body = {"message": {"role": "assistant", "content": words}, "done": True}
        return 200, json.dumps(body).encode()

    script: list[Reply] = [
        calls(("vm_run", {"environment": "debian:12", "command": ["git", "--version"]})),
        answer_from_the_vm,
    ]
    with fake_ollama(*script) as server:
        done = _pyro(runtime, "demo", "ollama", "--base-url", server.url, "--json", timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["answer"].startswith("The VM has git version 2.39.")
    assert result["tool_calls"] == [
        {
            "name": "vm_run",
            "arguments": {"environment": "debian:12", "command": ["git", "--version"]},
            "ok": True,
            "outcome": "exit code 0",
        }
    ]
    [ran] = tool_results(server.requests[1])
    assert ran["content"]["exit_code"] == 0
    assert ran["content"]["stdout"].startswith("git version 2.39.")  # what the guest printed
