"""One-shot VMs: boot, run one command, discard."""

from __future__ import annotations

import time
from typing import Annotated, Any

from pyro_mcp.api.context import Context
from pyro_mcp.api.registry import Arg, operation
from pyro_mcp.errors import InvalidArgument
from pyro_mcp.runtime import environments
from pyro_mcp.vmm.launch import discard_vm, prepare_vm, start_owned
from pyro_mcp.vmm.selection import BACKEND_NAMES, choose_backend

ALL_PROFILES = ("vm-run", "workspace-core", "workspace-full")
BOOT_TIMEOUT_S = 60.0
MAX_TIMEOUT_S = 24 * 3600
DEFAULT_OUTPUT_CAP = 1 << 20


def _validate(vcpu_count: int, mem_mib: int, timeout_seconds: float) -> None:
    if not 1 <= vcpu_count <= 32:
        raise InvalidArgument(f"vcpu_count must be between 1 and 32, got {vcpu_count}")
    if not 128 <= mem_mib <= 65536:
        raise InvalidArgument(f"mem_mib must be between 128 and 65536, got {mem_mib}")
    if not 0 < timeout_seconds <= MAX_TIMEOUT_S:
        raise InvalidArgument(
            f"timeout_seconds must be > 0 and at most {MAX_TIMEOUT_S}, got {timeout_seconds}"
        )


@operation(
    cli=("run",), sdk="run_in_vm", profiles=ALL_PROFILES, progress=True, exit_code_key="exit_code"
)
def vm_run(
    ctx: Context,
    environment: Annotated[str, Arg("environment to boot, e.g. debian:12", positional=True)],
    command: Annotated[list[str], Arg("the command and its arguments (after --)", positional=True)],
    vcpu_count: Annotated[int, Arg("virtual CPUs (1-32)")] = 1,
    mem_mib: Annotated[int, Arg("guest memory in MiB (128-65536)")] = 512,
    timeout_seconds: Annotated[float, Arg("kill the command after this many seconds")] = 60.0,
    backend: Annotated[
        str | None, Arg("VMM backend (default: the boot probe's pick)", choices=BACKEND_NAMES)
    ] = None,
    output_cap_bytes: Annotated[
        int, Arg("keep at most this many bytes of each output stream")
    ] = DEFAULT_OUTPUT_CAP,
) -> dict[str, Any]:
    """Boot a fresh microVM, run one command in it, and discard the VM.

    The command runs as argv (use ``sh -c '...'`` for shell syntax). Returns stdout,
    stderr, exit_code (127 when the program does not exist; the exit code is data, not an
    error), timed_out, truncation flags, duration_ms, the backend used and phase timings
    in milliseconds. Errors: NotFound for an unknown environment, InvalidArgument for bad
    sizes, RuntimeMissing when the environment or kernel is not installed, BootTimeout
    (with the serial console tail) when the guest never becomes ready.
    """
    if not command:
        raise InvalidArgument("command is empty: give the program to run after --")
    _validate(vcpu_count, mem_mib, timeout_seconds)
    if output_cap_bytes < 0:
        raise InvalidArgument("output_cap_bytes must not be negative")
    started = time.monotonic()
    timings: dict[str, float] = {}

    def mark(phase: str, since: float) -> float:
        now = time.monotonic()
        timings[phase] = round((now - since) * 1000, 1)
        return now

    environments.image_for(ctx.paths, environment)  # unknown or missing: fail before booting
    choice = choose_backend(ctx.paths, backend, progress=ctx.progress)
    ctx.progress(f"creating VM ({choice.label}, {environment})")
    vm = prepare_vm(
        ctx.paths, environment=environment, choice=choice, vcpu_count=vcpu_count, mem_mib=mem_mib
    )
    spec = vm.spec
    phase = mark("create_ms", started)
    try:
        start_owned(vm)
        ctx.progress("booting")
        agent = vm.wait_ready(BOOT_TIMEOUT_S)
        phase = mark("boot_ms", phase)
        ctx.progress("running command")
        result = agent.exec(
            list(command),
            timeout_s=timeout_seconds,
            output_cap=output_cap_bytes,
            on_output=ctx.output,
        )
        phase = mark("exec_ms", phase)
    finally:
        cleanup = time.monotonic()
        discard_vm(vm)
        mark("cleanup_ms", cleanup)
    return {
        "environment": environment,
        "command": list(command),
        **result.to_dict(),
        "duration_ms": round((time.monotonic() - started) * 1000, 1),  # the whole run
        "backend": choice.label,
        "vm_id": spec.vm_id,
        "timings_ms": timings,
    }
