"""The Firecracker backend: jailed microVMs, API over a Unix socket, vsock, snapshots."""

from pyro_mcp.vmm.firecracker.api import FirecrackerAPI, FirecrackerAPIError
from pyro_mcp.vmm.firecracker.config import kernel_command_line, vm_config
from pyro_mcp.vmm.firecracker.jailer import JailerConfig
from pyro_mcp.vmm.firecracker.snapshot import Snapshot
from pyro_mcp.vmm.firecracker.vm import AUTO, FirecrackerVM
from pyro_mcp.vmm.firecracker.vsock import VsockRefused, connect_vsock

__all__ = [
    "AUTO",
    "FirecrackerAPI",
    "FirecrackerAPIError",
    "FirecrackerVM",
    "JailerConfig",
    "Snapshot",
    "VsockRefused",
    "connect_vsock",
    "kernel_command_line",
    "vm_config",
]
