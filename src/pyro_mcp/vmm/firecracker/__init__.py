"""The Firecracker backend: jailed microVMs, API over a Unix socket, vsock, snapshots."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyro_mcp.vmm.firecracker.api import FirecrackerAPI, FirecrackerAPIError
    from pyro_mcp.vmm.firecracker.config import kernel_command_line, vm_config
    from pyro_mcp.vmm.firecracker.jailer import JailerConfig
    from pyro_mcp.vmm.firecracker.snapshot import Snapshot
    from pyro_mcp.vmm.firecracker.vm import AUTO, FirecrackerVM
    from pyro_mcp.vmm.firecracker.vsock import VsockRefused, connect_vsock

# Each name and the module defining it, imported on first use: a process attaching to a
# running VM over vsock needs only :mod:`.vsock`, not the backend that started it.
_MODULES = {
    "AUTO": "vm",
    "FirecrackerAPI": "api",
    "FirecrackerAPIError": "api",
    "FirecrackerVM": "vm",
    "JailerConfig": "jailer",
    "Snapshot": "snapshot",
    "VsockRefused": "vsock",
    "connect_vsock": "vsock",
    "kernel_command_line": "config",
    "vm_config": "config",
}

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


def __getattr__(name: str) -> object:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
