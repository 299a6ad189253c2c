"""The QEMU backend: ``-M microvm``, KVM when it works, TCG otherwise."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyro_mcp.vmm.qemu.vm import QemuVM

__all__ = ["QemuVM"]


def __getattr__(name: str) -> object:
    # Imported on first use: a process attaching to a running VM needs only the channel
    # sockets (:mod:`.channels`), not the backend that started it.
    if name == "QemuVM":
        from pyro_mcp.vmm.qemu.vm import QemuVM

        return QemuVM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
