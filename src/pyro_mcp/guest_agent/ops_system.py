"""System operations: re-identify a guest restored from a snapshot, and power off.

A guest restored from a memory snapshot wakes with the template's clock, random state and
hostname. ``reidentify`` sets all three from the host's values:

- ``time_ns`` (int): the host's CLOCK_REALTIME, set in the guest;
- ``seed`` (hex str): fresh entropy, mixed into the kernel pool with credit and followed
  by a forced reseed of the CRNG, so two clones never share random output;
- ``hostname`` (str).
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from pyro_mcp.guest_agent.calls import Call, CallError

RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


def reidentify(call: Call) -> tuple[dict[str, Any], bytes]:
    args = call.args
    done: list[str] = []
    time_ns = args.get("time_ns")
    if time_ns is not None:
        if not isinstance(time_ns, int):
            raise CallError("invalid_argument", "time_ns must be an integer")
        time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)
        done.append("clock")
    seed = args.get("seed")
    if seed is not None:
        try:
            entropy = bytes.fromhex(seed)
        except (TypeError, ValueError) as exc:
            raise CallError("invalid_argument", "seed must be a hex string") from exc
        _reseed(entropy)
        done.append("rng")
    hostname = args.get("hostname")
    if hostname is not None:
        if not isinstance(hostname, str) or not 0 < len(hostname) <= 63:
            raise CallError("invalid_argument", "hostname must be 1-63 characters")
        socket.sethostname(hostname)
        done.append("hostname")
    return {"reidentified": done}, b""


def _reseed(entropy: bytes) -> None:
    with open("/dev/urandom", "wb", buffering=0) as pool:
        request = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
        try:
            fcntl.ioctl(pool.fileno(), RNDADDENTROPY, request)
            fcntl.ioctl(pool.fileno(), RNDRESEEDCRNG)
        except OSError:
            pool.write(entropy)  # without CAP_SYS_ADMIN: mixed in, not credited


def signal_init() -> None:
    """Ask PID 1 (pyro-init) to sync and power the VM off."""
    os.sync()
    os.kill(1, signal.SIGTERM)


def make_shutdown(poweroff: Callable[[], None]) -> Callable[[Call], tuple[dict[str, Any], bytes]]:
    def shutdown(call: Call) -> tuple[dict[str, Any], bytes]:
        # Answer first, then power off: the host sees the result before the link drops.
        threading.Timer(0.05, poweroff).start()
        return {"shutting_down": True}, b""

    return shutdown
