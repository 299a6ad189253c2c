"""`pyro doctor` as text: the report :func:`pyro_mcp.runtime.doctor.diagnose` gathers.

:func:`render_text` prints the summary, then one aligned section of rows (marker, label,
value) per probe; a section that is missing, failed, or cannot be rendered still prints.
It is re-exported from :mod:`pyro_mcp.runtime.doctor`.

The report's type (``Report``), :func:`format_size` and ``LOW_DISK_BYTES`` live here
because the doctor's summary uses them too, and this module imports nothing from it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pyro_mcp.runtime import binaries

Report = dict[str, Any]
LOW_DISK_BYTES = 5 << 30

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
    packages = {"ip": "iproute2", "nft": "nftables"}
    rows: list[Row] = [
        (OK, name, data[name]) if data.get(name) else (MISSING, name, f"apt-get install {pkg}")
        for name, pkg in packages.items()
    ]
    rows.append((OK if data.get("tun") else MISSING, "/dev/net/tun", _yes(data.get("tun"))))
    rights = data.get("net_admin")
    rows.append(
        (OK if rights else MISSING, "CAP_NET_ADMIN", "yes" if rights else "no: run as root")
    )
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
