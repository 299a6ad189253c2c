"""`pyro doctor`: what this host can run, what is installed, and what to do next.

``diagnose`` gathers a JSON-able report; ``render_text`` prints it for people. Neither ever
raises because something is missing: each probe is wrapped, and a failure becomes an
``{"error": ...}`` entry in its section.

The doctor only reads. Capabilities come from the runtime lock as written by
``pyro runtime bundle``; the doctor shows them and never computes its own.
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
from pyro_mcp.runtime.host_probe import KvmInfo
from pyro_mcp.runtime.host_tools import HOST_TOOLS, find_program
from pyro_mcp.runtime.paths import RuntimePaths

Report = dict[str, Any]
PROBES_FILE = "probes.json"
LOW_DISK_BYTES = 5 << 30


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
    network = report.get("network", {})
    if network and not (network.get("nft") or network.get("iptables")):
        found.append("Neither nft nor iptables is installed: guest network policies need one")

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


# --- text -------------------------------------------------------------------------------

OK, WARN, MISSING, ERROR = "[ok]", "[warn]", "[missing]", "[error]"
Row = tuple[str, str, str]  # marker, label, value


def format_size(value: Any) -> str:
    """A byte count for people (\"1.5 MiB\"), or '-' when there is none."""
    if not isinstance(value, int):
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def _platform_rows(data: Report) -> list[Row]:
    mem = format_size(data.get("memory_bytes"))
    return [
        ("", "os", f"{data.get('os')}, {data.get('distribution') or 'unknown distribution'}"),
        ("", "kernel", f"{data.get('kernel')} ({data.get('arch')})"),
        ("", "cpu", f"{data.get('cpu_model') or 'unknown'}, {data.get('cores')} cores"),
        ("", "memory", mem),
        ("", "root", _yes(data.get("root"))),
    ]


def _kvm_rows(data: Report) -> list[Row]:
    present, accessible = data.get("device_present"), data.get("device_accessible")
    device = (
        "absent"
        if not present
        else "present, " + ("accessible" if accessible else "not accessible")
    )
    kind = data.get("kind")
    rows: list[Row] = [
        (OK if accessible else (WARN if present else MISSING), "/dev/kvm", device),
        (OK if kind == "hardware" else WARN, "kind", f"{kind}: {data.get('summary')}"),
    ]
    rows += [("", "evidence" if i == 0 else "", e) for i, e in enumerate(data["evidence"])]
    return rows


def _backend_rows(data: Report) -> list[Row]:
    rows: list[Row] = []
    for name in ("firecracker", "qemu"):
        item = data[name]
        verdict = "usable" if item["usable"] else "not usable"
        rows.append((OK if item["usable"] else WARN, name, f"{verdict}: {item['reason']}"))
    probe = data.get("probe")
    if isinstance(probe, dict) and isinstance(probe.get("results"), dict):
        for label, result in probe["results"].items():
            if result.get("ok"):
                text = f"booted {probe.get('environment')} in {result.get('boot_ms')} ms"
            else:
                text = str(result.get("skipped") or result.get("error"))
            rows.append((OK if result.get("ok") else "", f"probe {label}", text))
    else:
        rows.append(("", "boot probe", probe if isinstance(probe, str) else json.dumps(probe)))
    marker = ERROR if data.get("selected") == "none" else ""
    rows.append((marker, "guests use", f"{data.get('selected')}: {data.get('selected_reason')}"))
    return rows


def _binary_rows(data: Report) -> list[Row]:
    rows: list[Row] = []
    for name in binaries.BINARY_NAMES:
        item = data.get(name, {})
        bad = [p for p in data.get("problems", []) if p.startswith(f"{name}:")]
        if item.get("path") is None:
            rows.append((MISSING, name, "not installed: run `pyro runtime fetch`"))
        else:
            text = f"{item.get('version') or 'version unknown'}  {item['path']}"
            rows.append((WARN if bad else OK, name, "; ".join([text, *bad])))
    rows.append(("", "pinned", str(data.get("pinned_version"))))
    if data.get("source"):
        rows.append(("", "source", str(data["source"])))
    return rows


def _tool_rows(data: Report) -> list[Row]:
    return [
        (OK, t["program"], t["path"])
        if t["path"]
        else (MISSING, t["program"], f"apt-get install {t['package']} ({t['purpose']})")
        for t in data["tools"]
    ]


def _network_rows(data: Report) -> list[Row]:
    packages = {"ip": "iproute2", "nft": "nftables", "iptables": "iptables"}
    rows: list[Row] = [
        (OK, name, data[name]) if data.get(name) else (MISSING, name, f"apt-get install {pkg}")
        for name, pkg in packages.items()
    ]
    rows.append((OK if data.get("tun") else MISSING, "/dev/net/tun", _yes(data.get("tun"))))
    forward = data.get("ip_forward")
    note = "" if forward == "1" else " (guest egress needs forwarding enabled)"
    rows.append((OK if forward == "1" else "", "ip_forward", f"{forward}{note}"))
    return rows


def _cgroup_rows(data: Report) -> list[Row]:
    version = str(data.get("version"))
    if data.get("v2_mount") and version == "hybrid":
        version += f" (v1, plus v2 at {data['v2_mount']})"
    rows: list[Row] = [("", "version", version)]
    if data.get("v1_controllers"):
        rows.append(("", "v1 controllers", ", ".join(data["v1_controllers"])))
    if data.get("v2_mount"):
        rows.append(("", "v2 controllers", ", ".join(data["v2_controllers"]) or "none"))
    return rows


def _cache_rows(data: Report) -> list[Row]:
    rows: list[Row] = [("", "dir", str(data.get("cache_dir")))]
    for label, item in data.get("dirs", {}).items():
        files = f"{item['files']} file{'' if item['files'] == 1 else 's'}"
        text = "absent" if item["bytes"] is None else f"{format_size(item['bytes'])} ({files})"
        rows.append(("", label, text))
    free = data.get("free_bytes")
    low = isinstance(free, int) and free < LOW_DISK_BYTES
    rows.append((WARN if low else OK, "free", format_size(free)))
    return rows


def _lock_rows(data: Report) -> list[Row]:
    if data.get("status") != "ok":
        return [(MISSING if data.get("status") == "missing" else ERROR, "lock", data["message"])]
    rows: list[Row] = [("", "lock", f"{data['path']} ({data.get('generated_at')})")]
    for name, comp in data.get("components", {}).items():
        comp = comp if isinstance(comp, dict) else {}
        problems = comp.get("problems") or []
        text = "; ".join([str(comp.get("version") or "-"), *map(str, problems)])
        rows.append((WARN if problems else OK, name, text))
    reasons = data.get("capability_reasons", {})
    for name, value in data.get("capabilities", {}).items():
        reason = reasons.get(name) if isinstance(reasons, dict) else None
        text = _yes(value) + (f": {reason}" if reason else "")
        rows.append((OK if value else WARN, name, text))
    return rows


def _kernel_rows(data: Report) -> list[Row]:
    if data.get("status") != "ok":
        return [("", "kernels", str(data.get("message")))]
    rows: list[Row] = []
    for flavor, kernel in data.get("flavors", {}).items():
        if kernel is None:
            rows.append((MISSING, flavor, "not installed"))
        elif "error" in kernel:
            rows.append((ERROR, flavor, kernel["error"]))
        else:
            rows.append((OK, flavor, str(kernel.get("version") or kernel.get("path") or "")))
    return rows or [("", "kernels", "no kernel flavors known")]


def _environment_rows(data: Report) -> list[Row]:
    if data.get("status") != "ok":
        return [("", "environments", str(data.get("message")))]
    return [
        (
            OK if env.get("installed") else MISSING,
            str(env.get("name")),
            "installed" if env.get("installed") else "not installed",
        )
        for env in data.get("items", [])
    ] or [("", "environments", "none known")]


_SECTIONS: tuple[tuple[str, str, Callable[[Report], list[Row]]], ...] = (
    ("platform", "Platform", _platform_rows),
    ("kvm", "KVM", _kvm_rows),
    ("backends", "Backends", _backend_rows),
    ("binaries", "Firecracker binaries", _binary_rows),
    ("host_tools", "Host tools", _tool_rows),
    ("network", "Network", _network_rows),
    ("cgroups", "cgroups", _cgroup_rows),
    ("cache", "Cache", _cache_rows),
    ("lock", "Runtime lock and capabilities", _lock_rows),
    ("kernels", "Kernels", _kernel_rows),
    ("environments", "Environments", _environment_rows),
)


def _format(rows: list[Row]) -> list[str]:
    marker_width = max((len(m) for m, _, _ in rows), default=0)
    label_width = max((len(label) for _, label, _ in rows), default=0)
    lines = []
    for marker, label, value in rows:
        prefix = f"  {marker:<{marker_width}} " if marker_width else "  "
        lines.append(f"{prefix}{label:<{label_width}}  {value}".rstrip())
    return lines


def render_text(report: Report) -> str:
    """The report for people: a summary, then one aligned section per probe."""
    lines = ["pyro doctor", "", "Summary"]
    summary = report.get("summary")
    lines += [f"  - {item}" for item in summary] if isinstance(summary, list) else ["  -"]
    for key, title, rows_of in _SECTIONS:
        lines += ["", title]
        data = report.get(key)
        if not isinstance(data, dict):
            lines += _format([(MISSING, key, "not in this report")])
            continue
        if "error" in data and len(data) == 1:
            lines += _format([(ERROR, key, str(data["error"]))])
            continue
        try:
            lines += _format(rows_of(data))
        except Exception as exc:  # a malformed section still prints, as JSON
            lines += _format([(ERROR, key, f"cannot render ({type(exc).__name__}: {exc})")])
            lines += ["  " + line for line in json.dumps(data, indent=2, default=str).splitlines()]
    return "\n".join(lines) + "\n"
