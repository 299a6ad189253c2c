"""TAP devices: the host's end of a VM's link.

Under QEMU the host opens the TAP and hands QEMU the file descriptor: QEMU needs no
access to ``/dev/net/tun`` in its jail, and the device vanishes with the last descriptor,
so a VMM that dies in any way takes its TAP with it. Firecracker opens its TAP by name
itself (inside the jailer's chroot), so for it the TAP is persistent and owned by the
VM's uid, and removed by the link's release.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from pyro_mcp.errors import NetworkUnavailable, ToolFailed
from pyro_mcp.network.addresses import LINK_PREFIX, Link
from pyro_mcp.network.namespace import in_namespace_argv, run_in_namespace
from pyro_mcp.runtime.host_tools import run

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


@dataclass
class Tap:
    name: str
    fd: int | None  # open while this process holds it (QEMU's, until handed over)
    persistent: bool

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _open_tap(name: str, persistent_owner: int | None) -> int:
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise NetworkUnavailable(
            f"cannot open {TUN_DEVICE}: {exc.strerror}",
            hint="guest networking needs the tun module (`modprobe tun`) and root",
        ) from exc
    try:
        request = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI)
        fcntl.ioctl(fd, TUNSETIFF, request)
        if persistent_owner is not None:
            fcntl.ioctl(fd, TUNSETOWNER, persistent_owner)
            fcntl.ioctl(fd, TUNSETPERSIST, 1)
    except OSError as exc:
        os.close(fd)
        raise NetworkUnavailable(f"cannot create TAP device {name}: {exc.strerror}") from exc
    return fd


def _sysctl(path: str, value: str) -> None:
    Path("/proc/sys", path).write_text(value)


def _configure(link: Link) -> None:
    """Address the host's end, keep IPv6 off the link, let published ports reach it."""
    conf = f"net/ipv4/conf/{link.tap}"
    _sysctl(f"net/ipv6/conf/{link.tap}/disable_ipv6", "1")
    _sysctl(f"{conf}/route_localnet", "1")  # DNAT of 127.0.0.1:PORT to the guest
    _sysctl(f"{conf}/forwarding", "1")


def create_tap(link: Link, *, persistent_owner: int | None = None) -> Tap:
    """Make and configure the TAP of ``link`` in pyro's network namespace.

    ``persistent_owner``: the uid that may attach to a persistent TAP (Firecracker);
    None makes a TAP that lives as long as its descriptor (QEMU).
    """

    def make() -> int:
        fd = _open_tap(link.tap, persistent_owner)
        try:
            _configure(link)
        except OSError as exc:
            os.close(fd)
            raise NetworkUnavailable(f"cannot configure {link.tap}: {exc.strerror}") from exc
        return fd

    fd = run_in_namespace(make)
    tap = Tap(link.tap, fd, persistent_owner is not None)
    try:
        ip = ["ip"]
        address = f"{link.gateway}/{LINK_PREFIX}"
        run(in_namespace_argv([*ip, "addr", "add", address, "dev", link.tap]), what="address TAP")
        run(in_namespace_argv([*ip, "link", "set", link.tap, "up"]), what="bring TAP up")
    except BaseException:
        tap.close()
        if tap.persistent:
            remove_tap(link.tap)
        raise
    if tap.persistent:
        tap.close()  # Firecracker opens it by name
    return tap


def remove_tap(name: str) -> None:
    """Delete a TAP (a persistent one stays until removed); quiet when it is gone."""
    with contextlib.suppress(ToolFailed):
        run(in_namespace_argv(["ip", "link", "delete", name]), what="delete TAP")


def tap_exists(name: str) -> bool:
    """The device exists in pyro's network namespace (sysfs shows the namespace that
    mounted it, so ask ``ip``)."""
    try:
        run(in_namespace_argv(["ip", "link", "show", "dev", name]), what="look for a TAP")
    except ToolFailed:
        return False
    return True
