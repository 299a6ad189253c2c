"""Published ports: ``[HOST_IP:]HOST_PORT:GUEST_PORT``, forwarded by the kernel (DNAT).

A published port is an element of the DNAT maps of pyro's nftables table (no proxy
process): TCP to the host address and port goes to the guest's port. The host address is
127.0.0.1 unless one is given (0.0.0.0: every address of the host). Host port 0 picks a
free port. A port is refused when something on the host listens on it already, when
pyro publishes it for another VM, or when it is privileged and pyro may not bind it. Each
port carries its owner (``workspace`` for ports given at create, ``service:NAME`` for a
service's), so a service's ports go when it stops and all go with the VM.

The kernel forwarding takes precedence over a host program that binds the port *later*:
its connections reach the guest, not it (``docs/network.md``).
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket

from pyro_mcp.errors import Conflict, InvalidArgument
from pyro_mcp.network import nft
from pyro_mcp.network.addresses import Link
from pyro_mcp.network.namespace import run_in_namespace
from pyro_mcp.network.nft import ANY_HOST_IP, Published

DEFAULT_HOST_IP = ipaddress.IPv4Address("127.0.0.1")
MAX_PUBLISHED = 32
_OWNER = re.compile(r"[A-Za-z0-9_.:-]{1,80}")


def parse_publish(text: object) -> tuple[ipaddress.IPv4Address, int, int]:
    """(host IP, host port, guest port) of ``[HOST_IP:]HOST_PORT:GUEST_PORT``."""
    if not isinstance(text, str):
        raise InvalidArgument(f"publish entries are strings, got {type(text).__name__}")
    parts = text.split(":")
    if len(parts) == 2:
        host_ip, (host_port, guest_port) = DEFAULT_HOST_IP, parts
    elif len(parts) == 3:
        try:
            host_ip = ipaddress.IPv4Address(parts[0])
        except ValueError as exc:
            raise InvalidArgument(f"publish {text!r}: {parts[0]!r} is not an IPv4 address") from exc
        host_port, guest_port = parts[1:]
    else:
        raise InvalidArgument(
            f"publish {text!r} is not [HOST_IP:]HOST_PORT:GUEST_PORT (e.g. 8080:80)"
        )
    return host_ip, _port(host_port, text, allow_zero=True), _port(guest_port, text)


def _port(value: str, text: str, *, allow_zero: bool = False) -> int:
    if not value.isdigit() or not (0 if allow_zero else 1) <= int(value) <= 65535:
        low = 0 if allow_zero else 1
        raise InvalidArgument(f"publish {text!r}: port {value!r} is not a number {low}-65535")
    return int(value)


def check_publish_list(values: list[str] | None) -> list[tuple[ipaddress.IPv4Address, int, int]]:
    entries = [parse_publish(value) for value in values or []]
    if len(entries) > MAX_PUBLISHED:
        raise InvalidArgument(f"at most {MAX_PUBLISHED} published ports, got {len(entries)}")
    return entries


def _free_port(host_ip: ipaddress.IPv4Address, port: int) -> int:
    """``port`` (or, for 0, a free one) on ``host_ip`` once no one listens there."""

    def probe() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((str(host_ip), port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise Conflict(
                        f"host port {host_ip}:{port} is in use on the host",
                        hint="choose another port, or 0 to pick a free one",
                    ) from exc
                if exc.errno == errno.EACCES:
                    raise InvalidArgument(
                        f"host port {port} is privileged (below 1024) and pyro may not bind it",
                        hint="choose a port of 1024 or above, or 0 to pick a free one",
                    ) from exc
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise InvalidArgument(f"{host_ip} is not an address of this host") from exc
                raise
            return int(sock.getsockname()[1])

    return run_in_namespace(probe)


def check_free(entries: list[tuple[ipaddress.IPv4Address, int, int]]) -> None:
    """Refuse, before anything is made, host ports something on the host already uses."""
    for host_ip, host_port, _ in entries:
        if host_port:
            _free_port(host_ip, host_port)


def publish_ports(
    link: Link, entries: list[tuple[ipaddress.IPv4Address, int, int]], owner: str
) -> list[Published]:
    """Publish ``entries`` to the VM of ``link``; all or none (Conflict, PermissionDenied,
    InvalidArgument name the port)."""
    if not _OWNER.fullmatch(owner):
        raise InvalidArgument(f"cannot publish ports for {owner!r}: not a plain name")
    taken = {(port.host_ip, port.host_port) for port in nft.published()}
    done: list[Published] = []
    try:
        for host_ip, host_port, guest_port in entries:
            if (host_ip, host_port) in taken or (ANY_HOST_IP, host_port) in taken:
                raise Conflict(f"host port {host_ip}:{host_port} is published already")
            port = Published(host_ip, _free_port(host_ip, host_port), guest_port, owner)
            nft.publish(link, port)
            taken.add((port.host_ip, port.host_port))
            done.append(port)
    except BaseException:
        for port in done:
            nft.unpublish(port)
        raise
    return done


def unpublish_owner(link: Link, owner: str) -> None:
    """Remove the ports ``owner`` published to the VM of ``link``."""
    for port in nft.published(link):
        if port.owner == owner:
            nft.unpublish(port)
