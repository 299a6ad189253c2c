"""System operations: re-identify a guest restored from a snapshot, and power off.

A guest restored from a memory snapshot wakes with the template's clock, random state and
hostname. ``reidentify`` sets all three from the host's values:

- ``time_ns`` (int): the host's CLOCK_REALTIME, set in the guest;
- ``seed`` (hex str): fresh entropy, mixed into the kernel pool with credit and followed
  by a forced reseed of the CRNG, so two clones never share random output;
- ``hostname`` (str);
- ``machine_id`` (32 hex digits): written to ``/etc/machine-id``;
- ``workspace_device`` (str, e.g. ``/dev/vdb``): the workspace disk, mounted at
  /workspace now (a template boots without it: its slot held a placeholder). The block
  device's cached pages are dropped first, since they are the placeholder's.

``quiesce`` readies a guest to be saved as a template: every file system synced and the
page cache dropped, so the saved state is small and holds no cached disk block.
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

from pyro_mcp.guest_agent import boot_state
from pyro_mcp.guest_agent.calls import Call, CallError

RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
BLKFLSBUF = 0x1261


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
    machine_id = args.get("machine_id")
    if machine_id is not None:
        _write_machine_id(machine_id)
        done.append("machine_id")
    reply: dict[str, Any] = {"reidentified": done}
    device = args.get("workspace_device")
    if device is not None:
        if not isinstance(device, str) or not device.startswith("/dev/vd"):
            raise CallError("invalid_argument", "workspace_device must be a /dev/vdX path")
        _mount_workspace(device)
        done.append("workspace")
        reply["mounts"] = boot_state.mounts(boot_state.REPORTED_MOUNTS)
        reply["boot_errors"] = boot_state.boot_errors()
    return reply, b""


def _write_machine_id(machine_id: object) -> None:
    if not isinstance(machine_id, str) or len(machine_id) != 32:
        raise CallError("invalid_argument", "machine_id must be 32 hex digits")
    try:
        int(machine_id, 16)
    except ValueError as exc:
        raise CallError("invalid_argument", "machine_id must be 32 hex digits") from exc
    temp = "/etc/.machine-id.pyro"
    with open(temp, "w") as handle:  # atomic, not synced: nothing is promised of its life
        handle.write(machine_id + "\n")
    os.chmod(temp, 0o444)
    os.replace(temp, "/etc/machine-id")


def _mount_workspace(device: str) -> None:
    from pyro_mcp.guest_agent import init

    with open(device, "rb") as disk:  # the placeholder's blocks must not be read as ours
        fcntl.ioctl(disk.fileno(), BLKFLSBUF)
    init.mount_workspace(init.Libc(), device)


def quiesce(call: Call) -> tuple[dict[str, Any], bytes]:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as handle:
        handle.write("3")
    return {"quiesced": True}, b""


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
