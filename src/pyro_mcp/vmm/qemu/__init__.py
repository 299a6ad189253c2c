"""The QEMU backend: ``-M microvm``, KVM when it works, TCG otherwise."""

from pyro_mcp.vmm.qemu.vm import QemuVM

__all__ = ["QemuVM"]
