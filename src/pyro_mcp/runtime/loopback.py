"""Whether a host name or address stays on this machine, without resolving anything; and
the HOST:PORT a server is told to listen at."""

from __future__ import annotations

import ipaddress


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ::1 (a name is not resolved)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_address(text: str, *, flag: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8000`` for IPv6) as (host, port); SystemExit naming ``flag``
    (the command line's option) when it is not one."""
    host, _, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SystemExit(f"pyro: error: {flag} takes HOST:PORT (e.g. 127.0.0.1:8000), got {text!r}")
    return host, int(port)
