"""Assemble a bootable VM from the runtime's artifacts and a chosen backend.

This is where an environment name becomes a kernel, a copy-on-write root disk and a VMM
process. Callers pick the backend with :mod:`pyro_mcp.vmm.selection`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyro_mcp.errors import InvalidArgument, RuntimeMissing
from pyro_mcp.network.link import attach_network, release_network
from pyro_mcp.network.policy import NetworkPolicy
from pyro_mcp.runtime import binaries, environments, kernels
from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.storage.overlay import copy_sparse, create_overlay, rebase_overlay
from pyro_mcp.vmm.base import VM, Disk, Nic, Restore, VMSpec
from pyro_mcp.vmm.firecracker import FirecrackerVM
from pyro_mcp.vmm.firecracker.jailer import JailerConfig
from pyro_mcp.vmm.firecracker.vm import OVERHEAD_MIB as FIRECRACKER_OVERHEAD_MIB
from pyro_mcp.vmm.identity import mark_run_dir
from pyro_mcp.vmm.ownership import register, sweep_orphans, unregister
from pyro_mcp.vmm.qemu import QemuVM
from pyro_mcp.vmm.qemu.vm import OVERHEAD_MIB as QEMU_OVERHEAD_MIB
from pyro_mcp.vmm.templates import TEMPLATE_HOSTNAME, Template

WORKSPACE_DEVICE = "/dev/vdb"  # the disk after the root disk: a workspace's /workspace


@dataclass(frozen=True)
class BackendChoice:
    """Which VMM runs the guest and how."""

    backend: str  # "qemu" | "firecracker"
    accel: str  # "kvm" | "tcg" (QEMU); "kvm" for Firecracker
    reason: str

    @property
    def label(self) -> str:
        return self.backend if self.backend == "firecracker" else f"qemu-{self.accel}"


# Host memory a VMM takes beyond its guest's RAM, in MiB, as admission counts it (each
# backend states its own); the console pump of every VM adds a few MiB.
CONSOLE_PUMP_MIB = 8
VMM_OVERHEAD_MIB = {
    "qemu-tcg": QEMU_OVERHEAD_MIB["tcg"] + CONSOLE_PUMP_MIB,
    "qemu-kvm": QEMU_OVERHEAD_MIB["kvm"] + CONSOLE_PUMP_MIB,
    "firecracker": FIRECRACKER_OVERHEAD_MIB + CONSOLE_PUMP_MIB,
}


def overhead_mib(label: str | None) -> int:
    """What admission adds to a VM's guest RAM for its VMM (the most when unknown)."""
    return VMM_OVERHEAD_MIB.get(label or "", max(VMM_OVERHEAD_MIB.values()))


def new_vm_id() -> str:
    return secrets.token_hex(6)


def kernel_for(paths: RuntimePaths, flavor: str | None = None) -> kernels.KernelArtifact:
    chosen = flavor or kernels.default_flavor()
    kernel = kernels.installed_kernel(paths, chosen)
    if kernel is None:
        raise RuntimeMissing(
            f"no {chosen} guest kernel is installed",
            hint="run `pyro runtime build-kernel` (or `make run`)",
        )
    return kernel


def describe_spec(
    paths: RuntimePaths,
    *,
    environment: str,
    choice: BackendChoice,
    vcpu_count: int = 1,
    mem_mib: int = 256,
    vm_id: str | None = None,
    kernel_flavor: str | None = None,
    root_overlay: Path | None = None,
    base_image: Path | None = None,
    extra_disks: tuple[Disk, ...] = (),
    kernel_args: tuple[str, ...] = (),
    agent_ports: int = 1,
    hostname: str | None = None,
    template: Template | None = None,
    ram_file: Path | None = None,
) -> VMSpec:
    """The VMSpec :func:`build_spec` makes, without making anything (no files, no link)."""
    vm_id = vm_id or new_vm_id()
    image = base_image or environments.image_for(paths, environment)
    kernel = kernel_for(paths, kernel_flavor)
    run_dir = paths.run_root / vm_id
    identity = f"pyro-{vm_id[:8]}"
    restore = None
    if template is not None:
        restore = Restore(
            template.state,
            identity=identity,
            workspace_device=WORKSPACE_DEVICE if extra_disks else None,
            ram=template.ram,
            ram_digest=template.ram_digest,
        )
        hostname = TEMPLATE_HOSTNAME
    reads: tuple[Path, ...] = ()
    if choice.backend == "firecracker":
        root_disk = Disk(root_overlay or run_dir / "root.ext4", "raw")
    else:
        root_disk = Disk(root_overlay or run_dir / "root.qcow2", "qcow2")
        reads = (image,)  # the overlay's backing file
    if choice.backend == "firecracker":
        boot_image, initrd = kernel.vmlinux, kernel.initramfs
    elif kernel.initramfs is not None:
        boot_image, initrd = kernel.bzimage, kernel.initramfs
    else:
        boot_image, initrd = kernel.vmlinux, None  # PVH entry: the fastest QEMU boot
    spec = VMSpec(
        vm_id=vm_id,
        run_dir=run_dir,
        kernel=boot_image,
        initrd=initrd,
        kernel_args=(*kernel.boot_args(), *kernel_args),
        root_disk=root_disk,
        extra_disks=extra_disks,
        vcpu_count=vcpu_count,
        mem_mib=mem_mib,
        hostname=hostname or identity,
        agent_ports=agent_ports,
        read_files=reads,
        restore=restore,
        ram_file=ram_file,
        free_page_reporting=template is None and ram_file is None,
    )
    spec.validate()
    return spec


def build_spec(
    paths: RuntimePaths,
    *,
    environment: str,
    choice: BackendChoice,
    vcpu_count: int = 1,
    mem_mib: int = 256,
    vm_id: str | None = None,
    kernel_flavor: str | None = None,
    root_overlay: Path | None = None,
    base_image: Path | None = None,
    extra_disks: tuple[Disk, ...] = (),
    kernel_args: tuple[str, ...] = (),
    agent_ports: int = 1,
    network: NetworkPolicy | None = None,
    hostname: str | None = None,
    template: Template | None = None,
    ram_file: Path | None = None,
) -> VMSpec:
    """A VMSpec for ``environment``; creates its root disk if it does not exist yet.

    The root disk is a copy-on-write overlay of the environment image (``base_image``
    overrides which file), in the run directory unless ``root_overlay`` names a place
    that outlives the VM (workspaces). A ``network`` policy other than off gives the VM
    its link (:func:`~pyro_mcp.network.link.attach_network`), released with the VM.
    With a ``template`` (QEMU) the VM restores from it: its root disk starts as a copy of
    the template's, its kernel command line is the template's, and it is given a name of
    its own once restored (the workspace disk, if any, is mounted then).
    """
    vm_id = vm_id or new_vm_id()
    image = base_image or environments.image_for(paths, environment)
    spec = describe_spec(
        paths,
        environment=environment,
        choice=choice,
        vcpu_count=vcpu_count,
        mem_mib=mem_mib,
        vm_id=vm_id,
        kernel_flavor=kernel_flavor,
        root_overlay=root_overlay,
        base_image=base_image,
        extra_disks=extra_disks,
        kernel_args=kernel_args,
        agent_ports=agent_ports,
        hostname=hostname,
        template=template,
        ram_file=ram_file,
    )
    root_disk, run_dir = spec.root_disk, spec.run_dir
    mark_run_dir(run_dir)
    try:
        if template is not None:
            _copy_template_root(template, root_disk.path, base_image)
        elif not root_disk.path.exists():
            if choice.backend == "firecracker":
                copy_sparse(image, root_disk.path)
            else:
                create_overlay(image, root_disk.path)
        if network is not None and network.enabled:
            spec = dataclasses.replace(spec, nic=_attach(spec, choice, network))
    except BaseException:
        release_network(vm_id)
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return spec


def _copy_template_root(template: Template, dest: Path, base_image: Path | None) -> None:
    """The VM's own copy of the template's root disk, layered on ``base_image`` when it has
    one of its own (a workspace's link to the image) rather than on the cache's image."""
    dest.unlink(missing_ok=True)
    copy_sparse(template.root_disk, dest)
    if base_image is not None and dest.suffix == ".qcow2":  # Firecracker's is a whole copy
        rebase_overlay(dest, base_image)


def _attach(spec: VMSpec, choice: BackendChoice, policy: NetworkPolicy) -> Nic:
    owner = None
    if choice.backend == "firecracker":  # it opens its TAP by name, as the jail's uid
        owner = JailerConfig.for_vm(spec.vm_id).uid if os.geteuid() == 0 else os.geteuid()
    return attach_network(spec.vm_id, spec.run_dir, policy, persistent_owner=owner).nic


def create_vm(paths: RuntimePaths, spec: VMSpec, choice: BackendChoice) -> VM:
    if choice.backend == "qemu":
        return QemuVM(spec, accel=choice.accel)
    if choice.backend == "firecracker":
        found = binaries.installed_binaries(paths)
        if found is None:
            raise RuntimeMissing("Firecracker is not installed", hint="run `pyro runtime fetch`")
        return FirecrackerVM(spec, found)
    raise InvalidArgument(f"unknown backend {choice.backend!r}")


def prepare_vm(
    paths: RuntimePaths, *, environment: str, choice: BackendChoice, **options: Any
) -> VM:
    """build_spec + create_vm; removes what build_spec made if the VM cannot be created."""
    spec = build_spec(paths, environment=environment, choice=choice, **options)
    try:
        return create_vm(paths, spec, choice)
    except BaseException:
        discard_spec(spec)
        raise


def discard_spec(spec: VMSpec) -> None:
    """Remove what build_spec made for a VM that never started: its link, its run dir."""
    if spec.nic is not None:
        if spec.nic.fd is not None:
            with contextlib.suppress(OSError):
                os.close(spec.nic.fd)
        release_network(spec.vm_id)
    shutil.rmtree(spec.run_dir, ignore_errors=True)


def start_owned(vm: VM) -> None:
    """Start a one-shot VM owned by this process (see :mod:`pyro_mcp.vmm.ownership`)."""
    sweep_orphans(vm.spec.run_dir.parent)
    register(vm)
    vm.ends_with_owner = True
    vm.start()


def discard_vm(vm: VM) -> None:
    """Kill the VMM and remove everything the VM left in its run directory."""
    vm.kill()
    unregister(vm)
    shutil.rmtree(vm.spec.run_dir, ignore_errors=True)
