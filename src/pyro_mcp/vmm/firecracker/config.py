"""Firecracker's configuration for a VMSpec: machine, kernel and boot arguments, drives, vsock,
balloon.

One dict, keyed like Firecracker's ``--config-file`` format, serves both boot paths: it is
written as that file, or sent resource by resource through the API. Every path in it is a
name inside the VM's root (see :mod:`.layout`), so a snapshot taken in one root restores
into another.
"""

from __future__ import annotations

from typing import Any

from pyro_mcp.errors import VMError
from pyro_mcp.vmm.base import VMSpec, guest_kernel_args
from pyro_mcp.vmm.firecracker import layout as names
from pyro_mcp.vmm.firecracker.layout import drive_name

GUEST_CID = 3  # each Firecracker has its own vsock backend: CIDs never collide across VMs


def kernel_command_line(spec: VMSpec) -> str:
    """The guest kernel's arguments: serial console, root disk, pyro's init, vsock channel."""
    return " ".join([*guest_kernel_args(spec, "vsock"), *spec.kernel_args])


def vm_config(spec: VMSpec, vsock_cid: int = GUEST_CID) -> dict[str, Any]:
    """Firecracker's configuration for ``spec``, keyed like its ``--config-file`` format.

    Every path is a name inside the VM's root (see :mod:`.layout`).
    """
    disks = (spec.root_disk, *spec.extra_disks)
    for disk in disks:
        if disk.format != "raw":
            raise VMError(
                f"Firecracker needs raw disk images; {disk.path} is {disk.format}",
                hint="give the Firecracker backend raw disks (convert with `qemu-img convert`)",
            )
    boot: dict[str, Any] = {
        "kernel_image_path": names.KERNEL,
        "boot_args": kernel_command_line(spec),
    }
    if spec.initrd is not None:
        boot["initrd_path"] = names.INITRD
    config: dict[str, Any] = {
        "machine-config": {"vcpu_count": spec.vcpu_count, "mem_size_mib": spec.mem_mib},
        "boot-source": boot,
        "drives": [
            {
                "drive_id": drive_name(index),
                "path_on_host": drive_name(index),
                "is_root_device": index == 0,
                "is_read_only": disk.read_only,
            }
            for index, disk in enumerate(disks)
        ],
        "vsock": {"guest_cid": vsock_cid, "uds_path": names.VSOCK_SOCKET},
        # A balloon the host can inflate to take memory back (Firecracker 1.12 has no free
        # page reporting); it gives way when the guest runs short (deflate_on_oom).
        "balloon": {"amount_mib": 0, "deflate_on_oom": True, "stats_polling_interval_s": 0},
    }
    if spec.nic is not None:  # a persistent TAP the VM's uid may open by name
        config["network-interfaces"] = [
            {"iface_id": "eth0", "host_dev_name": spec.nic.tap, "guest_mac": spec.nic.mac}
        ]
    return config
