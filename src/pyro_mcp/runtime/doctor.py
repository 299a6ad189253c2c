"""`pyro doctor`: what this host can run, what is installed, and what to do next.

``diagnose`` gathers a JSON-able report; ``render_text`` prints it for people. Neither ever
raises because something is missing: each probe is wrapped, and a failure becomes an
``{"error": ...}`` entry in its section.

The doctor only reads. Capabilities come from the runtime lock as written by
``pyro runtime bundle``; the doctor shows them and never computes its own.

This module gathers the report: ``diagnose``, one function per section, and the summary.
Rendering it as text is in :mod:`pyro_mcp.runtime.doctor_text`; ``render_text`` and
``format_size`` are re-exported here.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyro_mcp.runtime import binaries, host_probe, pins
from pyro_mcp.runtime.doctor_text import (
    ERROR,
    LOW_DISK_BYTES,
    MISSING,
    OK,
    WARN,
    Report,
    Row,
    format_size,
    render_text,
)
from pyro_mcp.runtime.host_probe import KvmInfo
from pyro_mcp.runtime.host_tools import HOST_TOOLS, find_program
from pyro_mcp.runtime.paths import RuntimePaths

__all__ = [
    "ERROR",
    "LOW_DISK_BYTES",
    "MISSING",
    "OK",
    "PROBES_FILE",
    "WARN",
    "Report",
    "Row",
    "backends_section",
    "binaries_section",
    "cache_section",
    "diagnose",
    "environments_section",
    "format_size",
    "host_tools_section",
    "kernels_section",
    "lock_section",
    "render_text",
    "summarize",
]

PROBES_FILE = "probes.json"


def network_findings(network: dict[str, Any]) -> list[str]:
    """What guest networking lacks on this host, each with its fix."""
    if not network or "error" in network:
        return [f"Guest networking: check failed ({network.get('error')})"] if network else []
    found = []
    if not network.get("nft"):
        found.append(
            "nft is missing: guest networking (any policy but off) needs nftables "
            "(run `make host-packages` or `apt-get install nftables`)"
        )
    if not network.get("ip"):
        found.append("ip is missing: guest networking needs iproute2 (run `make host-packages`)")
    if not network.get("tun"):
        found.append("/dev/net/tun is missing: guest networking needs it (run `modprobe tun`)")
    if network.get("net_admin") is False:
        found.append(
            "this user lacks CAP_NET_ADMIN: guest networking (any policy but off) "
            "needs root for TAP devices and nftables (run pyro as root)"
        )
    if network.get("ip_forward") == "0":
        found.append(
            "IPv4 forwarding is off: the first VM with a network turns it on and lets only "
            "pyro's guests be forwarded (nftables chain forward_guard)"
        )
    return found


def diagnose(paths: RuntimePaths, *, root: Path = Path("/")) -> Report:
    """The doctor's report on this host, as a JSON-able dict.

    Sections: summary, platform, kvm, backends, binaries, host_tools, network, cgroups,
    cache, lock, kernels, environments. A probe that fails reports ``{"error": ...}``
    in its section instead of raising. ``root`` relocates /proc, /sys and /dev (tests).
    """
    report: Report = {}
    report["platform"] = _guard(lambda: host_probe.probe_platform(root))
    kvm = _guard(lambda: host_probe.probe_kvm(root))
    report["kvm"] = kvm.to_dict() if isinstance(kvm, KvmInfo) else kvm
    report["binaries"] = _guard(lambda: binaries_section(paths))
    qemu = _guard(host_probe.probe_qemu)
    report["backends"] = _guard(
        lambda: backends_section(
            kvm if isinstance(kvm, KvmInfo) else None, qemu, report["binaries"], paths
        )
    )
    report["host_tools"] = _guard(host_tools_section)
    report["network"] = _guard(lambda: host_probe.probe_network(root))
    report["cgroups"] = _guard(lambda: host_probe.probe_cgroups(root))
    report["cache"] = _guard(lambda: cache_section(paths))
    report["lock"] = _guard(lambda: lock_section(paths))
    report["kernels"] = _guard(lambda: kernels_section(paths))
    report["environments"] = _guard(lambda: environments_section(paths))
    summary = _guard(lambda: summarize(report))
    if not isinstance(summary, list):
        summary = [f"error while summarizing: {summary['error']}"]
    return {"summary": summary, **report}


def _guard(probe: Callable[[], Any]) -> Any:
    try:
        return probe()
    except Exception as exc:  # a doctor reports failures, it does not crash on them
        return {"error": f"{type(exc).__name__}: {exc}"}


def _jsonable(value: Any) -> Any:
    """Another module's result as plain JSON values (to_dict, dataclass, Path, ...)."""
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return _jsonable(to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _read_json(path: Path) -> tuple[str, Any]:
    """("ok", value), ("missing", None) or ("error", message): never raises."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return "missing", None
    except OSError as exc:
        return "error", f"cannot read {path}: {exc.strerror or exc}"
    try:
        return "ok", json.loads(text)
    except ValueError as exc:
        return "error", f"{path} is not valid JSON: {exc}"


# --- sections ---------------------------------------------------------------------------


def binaries_section(paths: RuntimePaths) -> Report:
    found = binaries.installed_binaries(paths)
    problems = binaries.verify_binaries(paths)
    directory = paths.bin_dir / pins.FIRECRACKER_VERSION
    section: Report = {
        "pinned_version": pins.FIRECRACKER_VERSION,
        "dir": str(directory),
        "installed": found is not None
        or all((directory / name).exists() for name in binaries.BINARY_NAMES),
        "source": found.source if found else None,
        "ok": not problems,
        "problems": problems,
    }
    for name in binaries.BINARY_NAMES:
        path = directory / name
        usable = path.is_file() and os.access(path, os.X_OK)
        section[name] = {
            "path": str(path) if path.exists() else None,
            "version": binaries.binary_version(path) if usable else None,
        }
    return section


def _firecracker_verdict(kvm: KvmInfo | None, binaries_ok: bool) -> tuple[bool, str]:
    """Whether Firecracker can boot stock Linux guests here, and why in one sentence."""
    if kvm is None:
        return False, "the KVM probe failed, so Firecracker is not trusted here"
    if kvm.kind == "hardware" and not kvm.device_accessible:
        return False, "hardware KVM is present but /dev/kvm is not accessible to this user"
    if kvm.kind == "hardware" and not binaries_ok:
        return False, (
            "hardware KVM is available but the Firecracker binaries are not installed and "
            "verified (run `pyro runtime fetch`)"
        )
    if kvm.kind == "hardware":
        return True, f"hardware KVM and verified Firecracker {pins.FIRECRACKER_VERSION}"
    if kvm.kind == "nested-paravirtual":
        module = next((m for m in kvm.modules if m != "kvm"), "pvm")
        return False, (
            f"KVM here is nested paravirtual ({module}): Firecracker starts and runs the tiny "
            "test guest, but stock Linux guests cannot boot"
        )
    if kvm.kind == "absent":
        return False, "there is no /dev/kvm, and Firecracker needs KVM"
    return False, (
        "the kind of KVM here is unknown, and Firecracker can boot real Linux guests only "
        "with hardware KVM (vmx/svm)"
    )


def backends_section(
    kvm: KvmInfo | None, qemu: Any, binaries_report: Any, paths: RuntimePaths
) -> Report:
    """Which VMM backends can boot stock Linux guests here, and which one guests will use."""
    kind = kvm.kind if kvm else "unknown"
    fc_ok = isinstance(binaries_report, dict) and bool(binaries_report.get("ok"))
    kvm_open = kvm is not None and kvm.device_accessible
    fc_usable, fc_reason = _firecracker_verdict(kvm, fc_ok)

    qemu_path = qemu.get("path") if isinstance(qemu, dict) else None
    qemu_version = qemu.get("version") if isinstance(qemu, dict) else None
    accel = "kvm" if kind == "hardware" and kvm_open else "tcg"
    if qemu_path is None:
        qemu_usable = False
        qemu_reason = "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    elif accel == "kvm":
        qemu_usable, qemu_reason = True, f"QEMU {qemu_version or '?'} with hardware KVM"
    else:
        qemu_usable = True
        why = {
            "nested-paravirtual": "nested paravirtual KVM cannot boot stock guest kernels",
            "absent": "there is no KVM",
        }.get(kind, "hardware KVM is not available to this user")
        qemu_reason = f"QEMU {qemu_version or '?'} with TCG (software emulation): {why}"

    probe_status, probe = _read_json(paths.cache_dir / PROBES_FILE)
    if probe_status == "missing":
        probe = "not run yet"
    elif probe_status == "error":
        probe = f"error: {probe}"

    results = probe.get("results", {}) if isinstance(probe, dict) else {}

    def backend_probe(name: str) -> Any:
        if not isinstance(probe, dict):
            return probe
        found = {label: r for label, r in results.items() if label.split("-")[0] == name}
        return found or "no result for this backend"

    chosen = probe.get("chosen") if isinstance(probe, dict) else None
    if chosen:
        # A boot probe booted the real guest: its pick is what guests will use.
        selected, why_selected = str(chosen), "fastest backend that booted the real guest"
    elif fc_usable:
        selected, why_selected = "firecracker", fc_reason
    elif qemu_usable:
        selected = f"qemu ({accel.upper() if accel == 'tcg' else 'KVM'})"
        why_selected = f"Firecracker is not usable here; {qemu_reason}"
    else:
        selected = "none"
        why_selected = "no backend can boot guests: install qemu-system-x86"
    return {
        "firecracker": {
            "usable": fc_usable,
            "reason": fc_reason,
            "tiny_guest": kvm_open and fc_ok,
            "probe": backend_probe("firecracker"),
        },
        "qemu": {
            "usable": qemu_usable,
            "reason": qemu_reason,
            "path": qemu_path,
            "version": qemu_version,
            "accel": accel,
            "probe": backend_probe("qemu"),
        },
        "probe": probe,
        "selected": selected,
        "selected_reason": why_selected,
    }


def host_tools_section() -> Report:
    tools, missing = [], set()
    for tool in HOST_TOOLS:
        path = find_program(tool.program)
        tools.append({"program": tool.program, "path": path, "package": tool.package,
                      "purpose": tool.purpose})  # fmt: skip
        if path is None:
            missing.add(tool.package)
    return {"tools": tools, "missing_packages": sorted(missing)}


def cache_section(paths: RuntimePaths) -> Report:
    dirs: Report = {}
    for label, path in (
        ("bin", paths.bin_dir),
        ("kernels", paths.kernels_dir),
        ("images", paths.images_dir),
        ("environments", paths.environments_dir),
        ("rootfs-trees", paths.rootfs_trees_dir),
        ("downloads", paths.downloads_dir),
        ("work", paths.work_dir),
    ):
        if path.is_dir():
            size, files = host_probe.disk_usage(path)
            dirs[label] = {"path": str(path), "bytes": size, "files": files}
        else:
            dirs[label] = {"path": str(path), "bytes": None, "files": 0}
    free = host_probe.free_bytes(paths.cache_dir)
    return {
        "cache_dir": str(paths.cache_dir),
        "exists": paths.cache_dir.is_dir(),
        "dirs": dirs,
        "total_bytes": sum(d["bytes"] or 0 for d in dirs.values()),
        "free_bytes": free,
    }


def lock_section(paths: RuntimePaths) -> Report:
    status, value = _read_json(paths.lock_path)
    if status == "missing":
        return {
            "status": "missing",
            "path": str(paths.lock_path),
            "message": "no lock yet: run `pyro runtime bundle`",
        }
    if status == "error" or not isinstance(value, dict):
        message = value if status == "error" else "the lock is not a JSON object"
        return {"status": "error", "path": str(paths.lock_path), "message": message}
    return {
        "status": "ok",
        "path": str(paths.lock_path),
        "generated_at": value.get("generated_at"),
        "components": _jsonable(value.get("components", {})),
        "capabilities": _jsonable(value.get("capabilities", {})),
        "capability_reasons": _jsonable(value.get("capability_reasons", {})),
    }


def _optional_module(name: str) -> Any:
    """The module, or None when it does not exist (yet)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None
        raise


def kernels_section(paths: RuntimePaths) -> Report:
    module = _optional_module("pyro_mcp.runtime.kernels")
    if module is None:
        return {"status": "unavailable", "message": "kernel support is not part of this build"}
    flavors: Report = {}
    for flavor in getattr(module, "KERNEL_FLAVORS", ()):
        try:
            kernel = module.installed_kernel(paths, flavor)
        except Exception as exc:
            flavors[flavor] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        flavors[flavor] = _jsonable(kernel) if kernel is not None else None
    return {"status": "ok", "flavors": flavors}


def environments_section(paths: RuntimePaths) -> Report:
    module = _optional_module("pyro_mcp.runtime.environments")
    if module is None:
        return {"status": "unavailable", "message": "environments are not part of this build"}
    items = []
    for info in module.list_environments(paths):
        data = _jsonable(info)
        items.append(data if isinstance(data, dict) else {"name": str(data)})
    return {"status": "ok", "items": items}


# --- summary ----------------------------------------------------------------------------


def summarize(report: Report) -> list[str]:
    """Short findings, most important first."""
    found: list[str] = []
    where = report.get("platform", {})
    if where.get("runtime_runs_here") is False:
        found.append(
            f"This host is {where.get('name')}: pyro's runtime is built for "
            f"{where.get('runtime_platform')} only, so no guest can run here"
        )
    kvm = report.get("kvm", {})
    backends = report.get("backends", {})
    selected = str(backends.get("selected", "unknown"))
    kind = kvm.get("kind")
    modules = ", ".join(kvm.get("modules", [])) or "none"
    if kind == "nested-paravirtual":
        paravirt = next((m for m in kvm.get("modules", []) if m != "kvm"), "pvm")
        head = f"KVM here is nested paravirtual ({paravirt})"
    elif kind == "hardware":
        head = "KVM here is backed by hardware virtualization"
    elif kind == "absent":
        head = "There is no KVM here"
    elif "error" in kvm:
        head = f"The KVM probe failed ({kvm['error']})"
    else:
        head = f"The kind of KVM here is unknown (modules: {modules})"
    if selected == "firecracker":
        found.append(f"{head}: guests will run under Firecracker")
    elif selected in ("qemu-tcg", "qemu (TCG)"):
        found.append(f"{head}: guests will run under QEMU with TCG (software emulation)")
    elif selected in ("qemu-kvm", "qemu (KVM)"):
        found.append(f"{head}: guests will run under QEMU with KVM")
    else:
        found.append(f"{head}: no backend can boot guests ({backends.get('selected_reason')})")

    bins = report.get("binaries", {})
    if "error" in bins:
        found.append(f"Firecracker binaries: check failed ({bins['error']})")
    elif not bins.get("installed"):
        found.append(
            f"Firecracker {pins.FIRECRACKER_VERSION} is not installed: run `pyro runtime fetch`"
        )
    elif bins.get("problems"):
        found.append("Firecracker binaries have problems: " + "; ".join(bins["problems"]))

    missing = report.get("host_tools", {}).get("missing_packages", [])
    if missing:
        found.append(f"Missing host packages: {' '.join(missing)} (run `make host-packages`)")
    found.extend(network_findings(report.get("network", {})))

    lock = report.get("lock", {})
    if lock.get("status") == "missing":
        found.append("No runtime lock yet: run `pyro runtime bundle`")
    elif lock.get("status") == "error":
        found.append(f"The runtime lock is unreadable: {lock.get('message')}")
    else:
        caps = lock.get("capabilities", {})
        if isinstance(caps, dict) and caps:
            found.append(
                "Capabilities: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in caps.items())
            )

    free = report.get("cache", {}).get("free_bytes")
    if isinstance(free, int) and free < LOW_DISK_BYTES:
        found.append(
            f"Only {format_size(free)} free for the cache: building environments needs more"
        )
    return found
