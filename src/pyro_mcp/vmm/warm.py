"""Warm starts: choose between restoring a VM from its template and booting it, and build
the template the first time one is needed (see :mod:`pyro_mcp.vmm.templates`).

Every run and workspace create asks :func:`plan_boot` first. It answers ``warm`` with a
verified template, or ``cold`` with the reason (a network link, the
caller asked for it with ``PYRO_BOOT_MODE=cold``, the template failed verification or
could not be built). A template that fails verification is removed with a warning, so the
next VM of that shape rebuilds it.

Building a template boots a VM of the shape with its RAM in the template's ``ram`` file
(the workspace disk slot holds an empty sparse placeholder, never mounted), waits for its
agent, has it sync and drop its caches, lets go of the agent channel and saves the VM's
device state (its RAM stays in the file) and root disk.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyro_mcp.errors import IntegrityError, PyroError
from pyro_mcp.runtime import binaries, environments, lock
from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.vmm import launch, templates
from pyro_mcp.vmm.base import VM, Disk, VMSpec
from pyro_mcp.vmm.firecracker import FirecrackerVM
from pyro_mcp.vmm.firecracker.config import kernel_command_line as firecracker_command_line
from pyro_mcp.vmm.launch import BackendChoice
from pyro_mcp.vmm.qemu.vm import QemuVM, kernel_command_line
from pyro_mcp.vmm.templates import TEMPLATE_HOSTNAME, Template

BOOT_MODE_ENV = "PYRO_BOOT_MODE"  # "cold" turns warm starts off
PLACEHOLDER_BYTES = 1 << 40  # the template's workspace disk: sparse, never mounted
BUILD_TIMEOUT_S = 120.0
Progress = Callable[[str], None]


def _quiet(_message: str) -> None:
    return None


@dataclass(frozen=True)
class Shape:
    """What a VM is, as far as restoring it from a template goes."""

    environment: str
    choice: BackendChoice
    vcpu_count: int
    mem_mib: int
    agent_ports: int = 1
    workspace_disk: bool = False  # a workspace: a second disk, mounted at /workspace
    network: bool = False


@dataclass(frozen=True)
class BootPlan:
    mode: str  # "warm" | "cold"
    reason: str
    template: Template | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "reason": self.reason,
            "template": self.template.key if self.template else None,
        }


def cold(reason: str) -> BootPlan:
    return BootPlan("cold", reason)


def inputs_for(paths: RuntimePaths, shape: Shape) -> dict[str, Any]:
    """The template inputs a VM of ``shape`` needs (see :mod:`templates`)."""
    image = environments.image_for(paths, shape.environment)
    kernel = launch.kernel_for(paths)
    placeholder = (Disk(Path("placeholder"), "raw"),) if shape.workspace_disk else ()
    spec = launch.describe_spec(
        paths,
        environment=shape.environment,
        choice=shape.choice,
        vcpu_count=shape.vcpu_count,
        mem_mib=shape.mem_mib,
        vm_id="0" * 12,
        extra_disks=placeholder,
        agent_ports=shape.agent_ports,
        hostname=TEMPLATE_HOSTNAME,
    )
    if shape.choice.backend == "firecracker":
        found = binaries.installed_binaries(paths)
        vmm_version = found.version if found else None
        command_line = firecracker_command_line(spec)
    else:
        vmm_version = lock.qemu_version()
        command_line = kernel_command_line(spec, shape.choice.accel)
    return {
        "environment": shape.environment,
        "image_sha256": image.name.split(".")[0],
        "kernel_key": kernel.key,
        "kernel_file": spec.kernel.name,
        "initrd": spec.initrd.name if spec.initrd else None,
        "backend": shape.choice.label,
        "vmm_version": vmm_version,
        "vcpu_count": shape.vcpu_count,
        "mem_mib": shape.mem_mib,
        "agent_ports": shape.agent_ports,
        "disks": [[d.format, d.read_only] for d in (spec.root_disk, *spec.extra_disks)],
        "nic": None,
        "command_line": command_line,
    }


def plan_boot(paths: RuntimePaths, shape: Shape, *, progress: Progress = _quiet) -> BootPlan:
    """Warm (with a verified template, built now if there is none yet) or cold, and why."""
    if os.environ.get(BOOT_MODE_ENV, "").strip().lower() == "cold":
        return cold(f"{BOOT_MODE_ENV}=cold")
    if shape.network:
        return cold("a VM with a network link boots (templates have no network device yet)")
    try:
        inputs = inputs_for(paths, shape)
    except PyroError as exc:
        return cold(f"no template can be made: {exc.message}")
    template = templates.find(paths, inputs)
    built = ""
    if template is None:
        key = templates.key_of(inputs)
        with templates.build_lock(paths, key):
            template = templates.find(paths, inputs)  # another process may have built it
            if template is None:
                progress(f"building a template for {shape.environment} (once per shape)")
                try:
                    template = build_template(paths, shape, inputs)
                except PyroError as exc:
                    return cold(f"the template could not be built: {exc.message}")
                built = f" (built now in {template.manifest['build_ms'] / 1000:.1f} s)"
    try:
        templates.verify(template)
    except IntegrityError as exc:
        progress(f"warning: {exc.message}: booting cold; it is rebuilt on next use")
        templates.remove(template)
        return cold(f"{exc.message}; removed, rebuilt on next use")
    return BootPlan("warm", f"restored from template {template.key[:12]}{built}", template)


def build_template(paths: RuntimePaths, shape: Shape, inputs: dict[str, Any]) -> Template:
    """Boot a VM of ``shape``, quiesce it and save it as the template for ``inputs``."""
    started = time.monotonic()
    staging = templates.staging_dir(paths)
    spec: VMSpec | None = None
    vm: VM | None = None
    try:
        extra: tuple[Disk, ...] = ()
        if shape.workspace_disk:
            placeholder = staging / "placeholder.raw"
            with placeholder.open("wb") as handle:
                handle.truncate(PLACEHOLDER_BYTES)
            extra = (Disk(placeholder, "raw"),)
        qemu = shape.choice.backend == "qemu"
        ram = staging / templates.RAM if qemu else None
        if ram is not None:
            ram.touch(mode=0o600)  # QEMU sizes it; the guest's RAM lives in it
        spec = launch.build_spec(
            paths,
            environment=shape.environment,
            choice=shape.choice,
            vcpu_count=shape.vcpu_count,
            mem_mib=shape.mem_mib,
            extra_disks=extra,
            agent_ports=shape.agent_ports,
            hostname=TEMPLATE_HOSTNAME,
            ram_file=ram,
        )
        vm = launch.create_vm(paths, spec, shape.choice)
        try:
            launch.start_owned(vm)
            agent = vm.wait_ready(BUILD_TIMEOUT_S)
            agent.call("quiesce", {}, timeout_s=60)
            vm.release_agent()  # a clone's first host connects to a channel no one holds
            _save(vm, staging)
        finally:
            vm.kill()
        root_name = templates.ROOT if qemu else templates.FIRECRACKER_ROOT
        shutil.move(str(spec.root_disk.path), staging / root_name)
        (staging / "placeholder.raw").unlink(missing_ok=True)
        template = templates.install(paths, inputs, staging, (time.monotonic() - started) * 1000)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if vm is not None:
            with contextlib.suppress(Exception):
                launch.discard_vm(vm)
        if spec is not None:
            shutil.rmtree(spec.run_dir, ignore_errors=True)
    return template


def _save(vm: VM, staging: Path) -> None:
    """The stopped VM's state into ``staging``: QEMU's device state (its RAM is in its file
    already), or a Firecracker snapshot (``vm.state``, ``vm.mem``, ``snapshot.json``)."""
    if isinstance(vm, QemuVM):
        vm.save_state(staging / templates.STATE)
    elif isinstance(vm, FirecrackerVM):
        vm.create_snapshot(staging)
    else:
        raise PyroError(f"no template can be made with {vm.backend}")
