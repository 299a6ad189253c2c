"""QEMU confined as the jailer confines Firecracker: its own uid, root and cgroups.

A QEMU escape must not be host root. When pyro runs as root, every QEMU process starts as
:mod:`jail` (which then execs QEMU in the same process):

- an unprivileged uid and gid of its own, allocated per VM from ``UID_BASE`` upwards; the
  allocation is a lock held by the VMM process itself (an inherited descriptor), so it is
  released the moment the VMM ends, however it ends;
- its own mount namespace whose root holds only the system's programs and libraries
  (read-only), the VM's kernel and backing images (read-only), the disks it writes, the
  directory it makes its sockets in (``<run dir>/vmm``, the only place it may create
  files) and fresh device nodes; pyro's own files in the run directory (logs, locks,
  console) are out of its reach;
- cgroups (v1 or v2, whichever controllers the host has) limiting memory (guest RAM plus
  the VMM's overhead and a margin), CPU (its vCPUs plus one for I/O) and pids;
- then QEMU's own seccomp sandbox (``-sandbox on,...``).

Without root nothing can be dropped: QEMU runs as the calling user, with the seccomp
sandbox only. What was applied is written to ``<run dir>/confinement.json``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyro_mcp.errors import VMError
from pyro_mcp.vmm.cgroups import RELEASE_TIMEOUT_S, remove_cgroup

if TYPE_CHECKING:
    from pyro_mcp.vmm.base import VMSpec

UID_BASE = 900_000
UID_SLOTS = 65_536
UID_LOCKS = Path("/run/pyro-mcp-uids")  # host-wide: every run directory shares the range
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_GROUP = "pyro-mcp"
MEMORY_MARGIN_MIB = 256  # beyond guest RAM and the VMM's overhead, before the OOM killer
PIDS_MAX = 512
CPU_PERIOD_US = 100_000
CONFINEMENT_FILE = "confinement.json"
VMM_DIR = "vmm"  # under the run dir: where QEMU makes its sockets (the only place it writes)
DEVICES = (("/dev/null", 1, 3), ("/dev/zero", 1, 5), ("/dev/urandom", 1, 9))
KVM_DEVICE = ("/dev/kvm", 10, 232)


@dataclass
class Confinement:
    """What confines one QEMU: the launch argv, the descriptors it inherits, its limits."""

    argv: list[str]
    pass_fds: list[int] = field(default_factory=list)
    uid: int | None = None
    cgroups: list[Path] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def close_parent_fds(self) -> None:
        """The VMM holds the uid lock now; the launching process lets go of its copy."""
        for fd in self.pass_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pass_fds = []


def vmm_dir(run_dir: Path) -> Path:
    return run_dir / VMM_DIR


def _allocate_uid() -> tuple[int, int]:
    """(uid, fd of its lock): the first uid of the range no live VMM holds."""
    UID_LOCKS.mkdir(mode=0o700, parents=True, exist_ok=True)
    for slot in range(UID_SLOTS):
        fd = os.open(UID_LOCKS / f"{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return UID_BASE + slot, fd
    raise VMError(f"all {UID_SLOTS} VMM uids are in use")


def _cgroup_dirs(vm_id: str) -> dict[str, Path]:
    """The cgroup directory per controller this host offers (v1 hierarchies, else v2)."""
    found: dict[str, Path] = {}
    for controller in ("memory", "cpu", "pids"):
        v1 = CGROUP_ROOT / controller
        if (v1 / "cgroup.procs").exists():
            found[controller] = v1 / CGROUP_GROUP / vm_id
    unified = CGROUP_ROOT if (CGROUP_ROOT / "cgroup.controllers").exists() else None
    if unified is not None:
        enabled = (unified / "cgroup.subtree_control").read_text().split()
        for controller in ("memory", "cpu", "pids"):
            if controller not in found and controller in enabled:
                found[controller] = unified / CGROUP_GROUP / vm_id
    return found


def _write(path: Path, value: str) -> bool:
    try:
        path.write_text(value)
    except OSError:
        return False
    return True


def _make_cgroups(vm_id: str, mem_mib: int, vcpus: int) -> tuple[list[Path], dict[str, Any]]:
    applied: dict[str, Any] = {}
    made: list[Path] = []
    memory = mem_mib << 20
    quota = (vcpus + 1) * CPU_PERIOD_US
    for controller, directory in _cgroup_dirs(vm_id).items():
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if directory not in made:
            made.append(directory)
        v2 = (directory / "cgroup.controllers").exists()
        if controller == "memory":
            name = "memory.max" if v2 else "memory.limit_in_bytes"
            if _write(directory / name, str(memory)):
                applied["memory_bytes"] = memory
        elif controller == "cpu":
            ok = (
                _write(directory / "cpu.max", f"{quota} {CPU_PERIOD_US}")
                if v2
                else _write(directory / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                and _write(directory / "cpu.cfs_quota_us", str(quota))
            )
            if ok:
                applied["cpu_quota"] = round(quota / CPU_PERIOD_US, 2)
        elif controller == "pids" and _write(directory / "pids.max", str(PIDS_MAX)):
            applied["pids_max"] = PIDS_MAX
    return made, applied


def release(vm_id: str, timeout_s: float = RELEASE_TIMEOUT_S) -> None:
    """Remove what confined the VM ``vm_id`` once its VMM was ended: its cgroups (what is
    still in them is killed; see :func:`~pyro_mcp.vmm.cgroups.remove_cgroup`). The uid lock
    went with the VMM process itself."""
    deadline = time.monotonic() + timeout_s
    for directory in set(_cgroup_dirs(vm_id).values()):
        remove_cgroup(directory, deadline)


def _chown(path: Path, uid: int) -> None:
    os.chown(path, uid, uid, follow_symlinks=False)


def confine(
    spec: VMSpec,
    argv: list[str],
    *,
    accel: str,
    overhead_mib: int,
    read_files: list[Path],
    ends_with_owner: bool = False,
    proc: bool = False,
) -> Confinement:
    """How to launch ``argv`` (QEMU) confined, or as it is when not root.

    ``read_files`` are what QEMU only reads (kernel, initrd, backing images); the disks in
    ``spec`` that are not read-only are handed to the VM's uid. With ``ends_with_owner``
    the VMM is killed when this process (the thread launching it) ends.
    """
    from pyro_mcp.vmm.qemu import jail

    directory = vmm_dir(spec.run_dir)
    directory.mkdir(mode=0o700, exist_ok=True)
    if os.geteuid() != 0:
        summary = {"confined": False, "reason": "not root: only QEMU's seccomp sandbox applies"}
        _record(spec.run_dir, summary)
        return Confinement(argv, summary=summary)
    uid, lock = _allocate_uid()
    try:
        _chown(directory, uid)
        disks = [spec.root_disk, *spec.extra_disks]
        binds: list[list[str]] = [[str(directory), "rw"]]
        for disk in disks:
            if not disk.read_only:
                _chown(disk.path, uid)
            binds.append([str(disk.path), "ro" if disk.read_only else "rw"])
        if spec.ram_file is not None:  # a template being built keeps its RAM there
            _chown(spec.ram_file, uid)
            binds.append([str(spec.ram_file), "rw"])
        for path in read_files:
            if str(path) not in {bind[0] for bind in binds}:
                binds.append([str(path), "ro"])
        devices = [list(device) for device in DEVICES]
        if accel == "kvm":
            devices.append(list(KVM_DEVICE))
        memory_mib = spec.mem_mib + overhead_mib + MEMORY_MARGIN_MIB
        cgroups, limits = _make_cgroups(spec.vm_id, memory_mib, spec.vcpu_count)
        root = spec.run_dir / "root"
        root.mkdir(mode=0o700, exist_ok=True)
        config = {
            "uid": uid,
            "gid": uid,
            "root": str(root),
            "cgroup_procs": [str(c / "cgroup.procs") for c in cgroups],
            "binds": binds,
            "devices": devices,
            "parent": os.getpid() if ends_with_owner else None,
            "proc": proc,
        }
    except BaseException:
        os.close(lock)
        raise
    launch = [sys.executable, "-I", "-S", jail.__file__, json.dumps(config), "--", *argv]
    summary = {
        "confined": True,
        "uid": uid,
        "gid": uid,
        "mount_namespace": True,
        "root": [bind[0] for bind in binds],
        "devices": [device[0] for device in devices],
        "cgroups": [str(c) for c in cgroups],
        "limits": limits,
        "no_new_privs": True,
        "proc": "own process only" if proc else False,
    }
    _record(spec.run_dir, summary)
    return Confinement(launch, [lock], uid, cgroups, summary)


def _record(run_dir: Path, summary: dict[str, Any]) -> None:
    try:
        (run_dir / CONFINEMENT_FILE).write_text(json.dumps(summary, indent=2))
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
