"""One-shot VMs: boot, run one command, discard."""

import time
from typing import TYPE_CHECKING, Annotated

from pyro_mcp.api.context import Context
from pyro_mcp.api.operations.network_args import (
    ALLOW_CIDR,
    ALLOW_HOST,
    NETWORK,
    NETWORK_POLICY,
    run_policy,
)
from pyro_mcp.api.registry import EVERY, Arg, operation
from pyro_mcp.errors import InvalidArgument, OperationTimeout, VMError
from pyro_mcp.guest.client import command_fields
from pyro_mcp.vmm.selection import BACKEND_NAMES

if TYPE_CHECKING:
    from pyro_mcp.api.results import VmRunResult
    from pyro_mcp.guest.client import AgentClient
    from pyro_mcp.vmm.base import VM

ALL_PROFILES = ("vm-run", "workspace-core", "workspace-full")
BOOT_TIMEOUT_S = 60.0
MAX_TIMEOUT_S = 24 * 3600
DEFAULT_OUTPUT_CAP = 1 << 20
MAX_OUTPUT_CAP = 64 << 20
COMMAND = Arg(
    "the command: a string runs with /bin/sh -lc, a list is the argv "
    "(the CLI takes the argv after --)",
    surfaces=EVERY,
    positional=True,
)
TIMEOUT = Arg(
    "kill the command after this many seconds",
    surfaces=EVERY,
    minimum=0,
    exclusive_minimum=True,
    maximum=MAX_TIMEOUT_S,
)
OUTPUT_CAP = Arg(
    "keep at most this many bytes of each output stream",
    surfaces=EVERY,
    minimum=0,
    maximum=MAX_OUTPUT_CAP,
)
VCPUS = Arg("virtual CPUs", surfaces=EVERY, minimum=1, maximum=32)
ALLOW_HOST_COMPAT = Arg(
    "pyro-mcp 3.x's fallback to running on the host; pyro never does, so only false is accepted",
    surfaces=EVERY,
)
RUN_TTL = Arg(
    "discard the VM at the latest this long after the call starts (the command's timeout "
    "is shortened to fit)",
    surfaces=EVERY,
    minimum=0,
    exclusive_minimum=True,
    maximum=MAX_TIMEOUT_S,
)


def refuse_host_compat(allow_host_compat: bool) -> None:
    """pyro runs commands in a guest or not at all: ``allow_host_compat=True`` is refused."""
    if allow_host_compat:
        raise InvalidArgument(
            "allow_host_compat=true is not supported: pyro runs commands only inside a "
            "microVM, never on the host",
            hint="drop allow_host_compat; when no VM can boot here, `pyro doctor` says why",
        )


MEMORY = Arg("guest memory in MiB", surfaces=EVERY, minimum=128, maximum=65536)


@operation(
    cli=("run",),
    sdk="run_in_vm",
    profiles=ALL_PROFILES,
    progress=True,
    exit_code_key="exit_code",
    title="Run a command in a fresh microVM",
    open_world=True,
)
def vm_run(
    ctx: Context,
    environment: Annotated[
        str, Arg("environment to boot, e.g. debian:12", surfaces=EVERY, positional=True)
    ],
    command: Annotated[str | list[str], COMMAND],
    vcpu_count: Annotated[int, VCPUS] = 1,
    mem_mib: Annotated[int, MEMORY] = 512,
    timeout_seconds: Annotated[float, TIMEOUT] = 60.0,
    backend: Annotated[
        str | None,
        Arg("VMM backend (default: the boot probe's pick)", surfaces=EVERY, choices=BACKEND_NAMES),
    ] = None,
    output_cap_bytes: Annotated[int, OUTPUT_CAP] = DEFAULT_OUTPUT_CAP,
    network: Annotated[bool, NETWORK] = False,
    network_policy: Annotated[str | None, NETWORK_POLICY] = None,
    allow_cidr: Annotated[list[str] | None, ALLOW_CIDR] = None,
    allow_host: Annotated[list[str] | None, ALLOW_HOST] = None,
    ttl_seconds: Annotated[float | None, RUN_TTL] = None,
    allow_host_compat: Annotated[bool, ALLOW_HOST_COMPAT] = False,
) -> "VmRunResult":
    """Boot a fresh microVM, run one command in it, and discard the VM.

    ``command`` is a shell command line (run with ``/bin/sh -lc``) or an argv list (run
    as is; the CLI passes the words after ``--``). Returns stdout, stderr, exit_code (127
    when the program does not exist; the exit code is data, not an error), timed_out,
    truncation flags, duration_ms, the backend used, phase timings in milliseconds and
    the network. Without ``network`` the guest has no network device; with it (or
    ``network_policy="egress"``) it reaches the internet and nothing else (not the host,
    private ranges or other guests), and an allowlist narrows that to what it names.
    Errors: NotFound for an unknown environment, InvalidArgument for bad sizes, policies
    or allowlists, RuntimeMissing when the environment or kernel is not installed,
    BootTimeout (with the serial console tail) when the guest never becomes ready,
    NetworkUnavailable when the host cannot give it the network asked for.
    """
    from pyro_mcp.network.link import vm_network_info
    from pyro_mcp.runtime import environments
    from pyro_mcp.vmm.launch import discard_vm, prepare_vm
    from pyro_mcp.vmm.selection import choose_backend
    from pyro_mcp.vmm.warm import Shape, cold, plan_boot

    refuse_host_compat(allow_host_compat)
    how = command_fields(command)
    policy = run_policy(network, network_policy, allow_cidr, allow_host)
    started = time.monotonic()
    deadline = started + ttl_seconds if ttl_seconds is not None else None
    timings: dict[str, float] = {}

    def mark(phase: str, since: float) -> float:
        now = time.monotonic()
        timings[phase] = round((now - since) * 1000, 1)
        return now

    environments.image_for(ctx.paths, environment)  # unknown or missing: fail before booting
    choice = choose_backend(ctx.paths, backend, progress=ctx.progress)
    shape = Shape(environment, choice, vcpu_count, mem_mib, network=policy.enabled)
    plan = plan_boot(ctx.paths, shape, progress=ctx.progress)
    ctx.progress(f"creating VM ({choice.label}, {environment}, {plan.mode})")
    vm = prepare_vm(
        ctx.paths,
        environment=environment,
        choice=choice,
        vcpu_count=vcpu_count,
        mem_mib=mem_mib,
        network=policy,
        template=plan.template,
    )
    network_info = vm_network_info(policy, vm.spec.vm_id)
    phase = mark("create_ms", started)
    try:
        with ctx.on_cancel(lambda: vm.kill()):  # a caller that gives up ends the VM at once
            try:
                agent = _start(ctx, vm)
            except VMError as exc:
                if plan.mode != "warm" or ctx.cancelled.is_set():
                    raise  # (cut short by the caller giving up: nothing to boot instead)
                discard_vm(vm)  # a restore that failed: boot the same VM from scratch
                plan = cold(f"restoring failed ({exc.message}); booted instead")
                ctx.progress(f"warning: {plan.reason}")
                vm = prepare_vm(
                    ctx.paths,
                    environment=environment,
                    choice=choice,
                    vcpu_count=vcpu_count,
                    mem_mib=mem_mib,
                    network=policy,
                )
                network_info = vm_network_info(policy, vm.spec.vm_id)
                agent = _start(ctx, vm)
            phase = mark("boot_ms", phase)
            ctx.progress("running command")
            timeout_s = timeout_seconds
            if deadline is not None:
                timeout_s = min(timeout_s, deadline - time.monotonic())
                if timeout_s <= 0:
                    raise OperationTimeout(
                        f"the VM's ttl_seconds ({ttl_seconds:g}) ran out while it booted; "
                        "the command did not run",
                        hint="give a longer ttl_seconds",
                    )
            with ctx.running_command() as output:
                result = agent.exec(
                    **how,
                    timeout_s=timeout_s,
                    output_cap=output_cap_bytes,
                    on_output=output,
                )
            phase = mark("exec_ms", phase)
    finally:
        cleanup = time.monotonic()
        discard_vm(vm)
        mark("cleanup_ms", cleanup)
    spec = vm.spec
    return {
        "environment": environment,
        "command": command,
        **result.to_dict(),
        "duration_ms": round((time.monotonic() - started) * 1000, 1),  # the whole run
        "backend": choice.label,
        "vm_id": spec.vm_id,
        "timings_ms": timings,
        "boot": plan.to_dict(),
        "network": network_info,
    }


def _start(ctx: Context, vm: "VM") -> "AgentClient":
    from pyro_mcp.vmm.launch import start_owned

    start_owned(vm)
    # Given up while it launched: the cancel watcher may have fired before this VM was the
    # one to end; it ends here instead (the caller's finally discards it).
    ctx.check_cancelled()
    ctx.progress("booting")  # the phase boot_ms times, whether it restores or boots
    return vm.wait_ready(BOOT_TIMEOUT_S)
