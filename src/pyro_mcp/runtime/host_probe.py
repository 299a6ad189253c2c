"""Facts about the host: platform, what kind of KVM it has, cgroups, networking, QEMU.

Every reader takes ``root`` (default ``/``) so tests can point it at a fake tree holding
``proc/cpuinfo``, ``proc/modules``, ``sys/module/...`` and ``dev/kvm``. Readers never raise
for a missing or unreadable file: they report what they could not see.

KVM kinds:

- ``hardware``: the CPU advertises VMX or SVM and ``kvm_intel``/``kvm_amd`` is loaded;
  stock Linux guests run at native speed (Firecracker, or QEMU with ``-accel kvm``).
- ``nested-paravirtual``: ``/dev/kvm`` is provided by a paravirtual hypervisor module such as
  PVM (``kvm_pvm``). It runs only specially built guest kernels: Firecracker still starts the
  tiny test guest, but stock kernels fault or crawl, so guests need QEMU with TCG.
- ``absent``: no ``/dev/kvm``.
- ``unknown``: ``/dev/kvm`` exists but the evidence does not say which kind it is.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyro_mcp.errors import PyroError
from pyro_mcp.runtime.host_tools import find_program, run
from pyro_mcp.runtime.pins import RUNTIME_PLATFORM

KVM_KINDS = ("hardware", "nested-paravirtual", "absent", "unknown")
_VENDOR_MODULES = ("kvm_intel", "kvm_amd")
_PARAVIRT_MODULES = ("kvm_pvm",)
_KVM_MODULES = ("kvm", *_VENDOR_MODULES, *_PARAVIRT_MODULES)
_HARDWARE_FLAGS = ("vmx", "svm")
_ROOT = Path("/")


def read_text(root: Path, relative: str) -> str | None:
    """The text of ``root/relative``, or None when it cannot be read."""
    try:
        return (root / relative).read_text(errors="replace")
    except OSError:
        return None


def cpu_flags(cpuinfo: str) -> set[str]:
    """The flags of the first CPU in /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cpu_model(cpuinfo: str) -> str | None:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip() or None
    return None


def loaded_modules(root: Path = _ROOT) -> dict[str, str]:
    """Loaded kernel modules -> where they were seen (``/proc/modules`` or ``/sys/module``).

    /sys/module also lists modules built into the kernel (those with parameters), which
    /proc/modules omits; a kernel without module support has no /proc/modules at all.
    """
    seen: dict[str, str] = {}
    modules = read_text(root, "proc/modules")
    if modules:
        for line in modules.splitlines():
            if line.strip():
                seen[line.split()[0]] = "/proc/modules"
    try:
        for entry in (root / "sys/module").iterdir():
            seen.setdefault(entry.name, "/sys/module")
    except OSError:
        pass
    return seen


@dataclass(frozen=True)
class KvmInfo:
    """What this host offers as KVM, with the evidence for the verdict."""

    kind: str
    """One of KVM_KINDS."""
    device_present: bool
    """``/dev/kvm`` exists."""
    device_accessible: bool
    """This user can open ``/dev/kvm`` for reading and writing."""
    flags: list[str] = field(default_factory=list)
    """Virtualization-related CPU flags seen (vmx, svm, hypervisor)."""
    modules: list[str] = field(default_factory=list)
    """KVM modules loaded, with where they were seen."""
    evidence: list[str] = field(default_factory=list)
    """One line per fact the verdict rests on."""
    summary: str = ""
    """One sentence saying what the kind means here."""

    @property
    def hardware(self) -> bool:
        return self.kind == "hardware" and self.device_accessible

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_kvm(root: Path = _ROOT, *, access: Callable[[Path], bool] | None = None) -> KvmInfo:
    """Classify the host's KVM from /proc/cpuinfo, loaded modules and /dev/kvm."""
    device = root / "dev/kvm"
    present = device.exists()
    if access is None:
        accessible = present and os.access(device, os.R_OK | os.W_OK)
    else:
        accessible = present and access(device)
    cpuinfo = read_text(root, "proc/cpuinfo")
    flags = cpu_flags(cpuinfo or "")
    modules = loaded_modules(root)
    kvm_modules = {name: modules[name] for name in _KVM_MODULES if name in modules}

    seen_flags = [f for f in (*_HARDWARE_FLAGS, "hypervisor") if f in flags]
    evidence = []
    if cpuinfo is None:
        evidence.append("/proc/cpuinfo unreadable")
    else:
        hw = [f for f in _HARDWARE_FLAGS if f in flags]
        evidence.append(f"cpu flags: {', '.join(hw)}" if hw else "cpu flags: no vmx/svm")
        if "hypervisor" in flags:
            evidence.append("cpu flag hypervisor: this host is itself a virtual machine")
    if kvm_modules:
        evidence.append(
            "modules: " + ", ".join(f"{n} ({where})" for n, where in kvm_modules.items())
        )
    else:
        evidence.append("modules: no kvm module seen")
    if not present:
        evidence.append("/dev/kvm: absent")
    else:
        evidence.append("/dev/kvm: present, " + ("accessible" if accessible else "not accessible"))

    paravirt = [m for m in _PARAVIRT_MODULES if m in kvm_modules]
    vendor = [m for m in _VENDOR_MODULES if m in kvm_modules]
    hardware_flags = [f for f in _HARDWARE_FLAGS if f in flags]
    if not present:
        kind = "absent"
        summary = "no /dev/kvm: guests can only run under software emulation (QEMU TCG)"
    elif paravirt:
        kind = "nested-paravirtual"
        summary = (
            f"paravirtual KVM from {paravirt[0]}: runs only specially built guest kernels; "
            "stock Linux guests cannot boot on it"
        )
    elif hardware_flags and vendor:
        kind = "hardware"
        summary = f"hardware virtualization ({hardware_flags[0]}, {vendor[0]})"
    else:
        kind = "unknown"
        summary = "/dev/kvm exists but neither vmx/svm with kvm_intel/kvm_amd nor PVM is seen"
    return KvmInfo(
        kind=kind,
        device_present=present,
        device_accessible=accessible,
        flags=seen_flags,
        modules=sorted(kvm_modules),
        evidence=evidence,
        summary=summary,
    )


def probe_platform(root: Path = _ROOT) -> dict[str, Any]:
    """OS, kernel, architecture, CPU, memory, whether pyro runs as root, and whether the
    platform pyro's runtime is built for is this one."""
    cpuinfo = read_text(root, "proc/cpuinfo") or ""
    memory_kib = None
    for line in (read_text(root, "proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])
            break
    distribution = None
    for line in (read_text(root, "etc/os-release") or "").splitlines():
        if line.startswith("PRETTY_NAME="):
            distribution = line.partition("=")[2].strip().strip('"')
    here = f"{platform.system().lower()}-{platform.machine()}"
    return {
        "os": platform.system(),
        "name": here,  # as pyro-mcp 3.x named platforms: linux-x86_64
        "runtime_platform": RUNTIME_PLATFORM,
        "runtime_runs_here": here == RUNTIME_PLATFORM,
        "distribution": distribution,
        "kernel": platform.release(),
        "arch": platform.machine(),
        "cpu_model": cpu_model(cpuinfo),
        "cores": os.cpu_count(),
        "memory_bytes": memory_kib * 1024 if memory_kib is not None else None,
        "root": os.geteuid() == 0,
    }


def probe_cgroups(root: Path = _ROOT) -> dict[str, Any]:
    """The cgroup layout: ``v2``, ``v1``, ``hybrid`` (v1 plus a v2 tree) or ``none``."""
    mounts = read_text(root, "proc/self/mounts") or read_text(root, "proc/mounts") or ""
    v1_mounts: list[str] = []
    v2_mount: str | None = None
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        if parts[2] == "cgroup2":
            v2_mount = v2_mount or parts[1]
        elif parts[2] == "cgroup":
            v1_mounts.append(parts[1])
    v1_controllers: list[str] = []
    for line in (read_text(root, "proc/cgroups") or "").splitlines():
        parts = line.split()
        if len(parts) == 4 and not line.startswith("#") and parts[1] != "0" and parts[3] == "1":
            v1_controllers.append(parts[0])
    v2_controllers: list[str] = []
    if v2_mount is not None:
        text = read_text(root, v2_mount.lstrip("/") + "/cgroup.controllers")
        v2_controllers = (text or "").split()
    if v1_mounts and v2_mount:
        version = "hybrid"
    elif v2_mount:
        version = "v2"
    elif v1_mounts:
        version = "v1"
    else:
        version = "none"
    return {
        "version": version,
        "v1_controllers": sorted(v1_controllers) if v1_mounts else [],
        "v2_mount": v2_mount,
        "v2_controllers": v2_controllers,
    }


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


def probe_network(root: Path = _ROOT) -> dict[str, Any]:
    """What guest networking builds on: tun, ip, nftables, IP forwarding, and whether
    this process has the right to use them (CAP_NET_ADMIN)."""
    forward = read_text(root, "proc/sys/net/ipv4/ip_forward")
    return {
        "ip": find_program("ip"),
        "nft": find_program("nft"),
        "tun": (root / "dev/net/tun").exists(),
        "net_admin": has_net_admin(),
        "ip_forward": forward.strip() if forward is not None else None,
    }


_QEMU_VERSION_RE = re.compile(r"QEMU emulator version (\S+)")


def probe_qemu() -> dict[str, Any]:
    """Where ``qemu-system-x86_64`` is and the version it reports."""
    path = find_program("qemu-system-x86_64")
    version = None
    if path is not None:
        try:
            info = os.stat(path)
        except OSError:
            return {"path": path, "version": None}
        version = _qemu_version(path, info.st_ino, info.st_mtime_ns, info.st_size)
    return {"path": path, "version": version}


@functools.lru_cache(maxsize=8)
def _qemu_version(path: str, _ino: int, _mtime_ns: int, _size: int) -> str | None:
    """What ``path --version`` says, asked once per binary (its stat is part of the key:
    an upgraded QEMU is asked again). Every run asks, to pick its template."""
    try:
        result = run([path, "--version"], what="qemu version", timeout_s=10)
    except PyroError:
        return None
    match = _QEMU_VERSION_RE.search(result.stdout.decode("utf-8", "replace"))
    return match.group(1) if match else None


def disk_usage(path: Path) -> tuple[int, int]:
    """(bytes allocated on disk, number of files) under ``path``; symlinks not followed."""
    total = files = 0
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                else:
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
                    files += 1
            except OSError:
                continue
    return total, files


def free_bytes(path: Path) -> int:
    """Free space on the filesystem that holds (or would hold) ``path``."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free
