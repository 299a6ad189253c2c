"""The rights guest networking needs: CAP_NET_ADMIN, for TAP devices and nftables."""

from __future__ import annotations

from pyro_mcp.errors import NetworkUnavailable

CAP_NET_ADMIN = 12


def has_net_admin() -> bool:
    """This process may make TAP devices and change nftables (its effective set)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return False


def require_net_admin() -> None:
    if not has_net_admin():
        raise NetworkUnavailable(
            "guest networking needs root (CAP_NET_ADMIN): TAP devices and nftables rules",
            hint="run pyro as root, or use --network-policy off",
        )
