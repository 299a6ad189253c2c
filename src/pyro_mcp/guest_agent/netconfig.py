"""The guest's end of its network link, configured by pyro-init at boot.

``pyro.net=ADDRESS/PREFIX,GATEWAY,MAC`` on the kernel command line: the interface with that
MAC gets the address, comes up, and routes everything through the gateway, which is also
the DNS server (``/etc/resolv.conf``). Without the option the guest has no network
device at all. ioctls only (no ``ip`` process: every program start is slow under
emulation); imports are C modules and ``struct``.
"""

import _socket
import fcntl
import posix as os
import struct

SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCADDRT = 0x890B
IFF_UP = 0x1
RTF_UP = 0x1
RTF_GATEWAY = 0x2
RESOLV_CONF = "/etc/resolv.conf"
SYS_NET = "/sys/class/net"


class NetConfigError(Exception):
    pass


def parse(option: str) -> tuple[str, int, str, str]:
    """(address, prefix, gateway, mac) of a ``pyro.net`` value."""
    try:
        cidr, gateway, mac = option.split(",")
        address, prefix = cidr.split("/")
        _socket.inet_aton(address)
        _socket.inet_aton(gateway)
        bits = int(prefix)
    except ValueError as exc:
        raise NetConfigError(f"pyro.net={option!r} is not ADDRESS/PREFIX,GATEWAY,MAC") from exc
    if not 8 <= bits <= 30 or len(mac) != 17:
        raise NetConfigError(f"pyro.net={option!r}: bad prefix or MAC")
    return address, bits, gateway, mac.lower()


def _sockaddr(address: str) -> bytes:
    return struct.pack("=H2s4s8x", _socket.AF_INET, b"\0\0", _socket.inet_aton(address))


def _netmask(bits: int) -> str:
    value = (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF
    return _socket.inet_ntoa(value.to_bytes(4, "big"))


def interface_with_mac(mac: str, sys_net: str = SYS_NET) -> str:
    for name in os.listdir(sys_net):
        try:
            with open(f"{sys_net}/{name}/address") as handle:
                if handle.read().strip().lower() == mac:
                    return name
        except OSError:
            continue
    raise NetConfigError(f"no network interface has the MAC {mac}")


def _ifreq(name: str, payload: bytes) -> bytes:
    return name.encode().ljust(16, b"\0") + payload.ljust(24, b"\0")


def configure(option: str) -> str:
    """Configure the link ``option`` describes; returns the interface's name."""
    address, bits, gateway, mac = parse(option)
    name = interface_with_mac(mac)
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM, 0)
    try:
        fd = sock.fileno()
        fcntl.ioctl(fd, SIOCSIFADDR, _ifreq(name, _sockaddr(address)))
        fcntl.ioctl(fd, SIOCSIFNETMASK, _ifreq(name, _sockaddr(_netmask(bits))))
        flags = int.from_bytes(fcntl.ioctl(fd, SIOCGIFFLAGS, _ifreq(name, b""))[16:18], "little")
        fcntl.ioctl(fd, SIOCSIFFLAGS, _ifreq(name, (flags | IFF_UP).to_bytes(2, "little")))
        # struct rtentry: pad, dst, gateway, genmask, flags, pad, pad, pad, metric, dev,
        # mtu, window, irtt (native alignment, padded to 120 bytes)
        route = struct.pack(
            "@L16s16s16sHhLPhPLLH6x",
            0,
            _sockaddr("0.0.0.0"),
            _sockaddr(gateway),
            _sockaddr("0.0.0.0"),
            RTF_UP | RTF_GATEWAY,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        )
        fcntl.ioctl(fd, SIOCADDRT, route)
    except OSError as exc:
        raise NetConfigError(f"cannot configure {name}: {exc}") from exc
    finally:
        sock.close()
    with open(RESOLV_CONF + ".pyro", "w") as handle:
        handle.write(
            f"# written by pyro-init at boot: the host's resolver for this VM\n"
            f"nameserver {gateway}\n"
        )
    os.rename(RESOLV_CONF + ".pyro", RESOLV_CONF)
    return name
