"""Process lifecycle hooks for the surfaces (which never touch the VMM layer directly)."""

from __future__ import annotations

from pyro_mcp.vmm.ownership import discard_all


def discard_owned_vms() -> None:
    """Kill every one-shot VM this process started and remove its run directory."""
    discard_all()
