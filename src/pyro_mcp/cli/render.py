"""Human-readable output for operation results (``--json`` bypasses this)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyro_mcp.runtime.doctor import format_size
from pyro_mcp.runtime.doctor import render_text as doctor_text

Renderer = Callable[[dict[str, Any]], str]


def _env_list(result: dict[str, Any]) -> str:
    lines = [f"{'NAME':<18} {'INSTALLED':<10} {'SIZE':>10}  DIGEST"]
    for row in result["environments"]:
        digest = (row.get("image_sha256") or "-")[:16]
        installed = "yes" if row.get("installed") else "no"
        lines.append(
            f"{row['name']:<18} {installed:<10} {format_size(row.get('image_size')):>10}  {digest}"
        )
    return "\n".join(lines)


def _doctor(result: dict[str, Any]) -> str:
    return doctor_text(result)


def _status(result: dict[str, Any]) -> str:
    lines = [f"cache: {result.get('cache_dir', '-')}", "components:"]
    for name, component in sorted(result["components"].items()):
        problems = component.get("problems") or []
        mark = "ok  " if not problems else "FAIL"
        version = component.get("version") or "-"
        detail = "; ".join(problems)
        lines.append(f"  {mark} {name:<22} {version:<24} {detail}")
    lines.append("capabilities:")
    for name, value in result["capabilities"].items():
        reason = result["capability_reasons"][name]
        lines.append(f"  {name:<14} {str(value).lower():<6} {reason}")
    return "\n".join(lines)


def _generic(result: dict[str, Any], indent: int = 0) -> str:
    lines = []
    pad = "  " * indent
    for key, value in result.items():
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            lines.append(_generic(value, indent + 1))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{pad}{key}:")
            for item in value:
                lines.append(_generic(item, indent + 1))
                lines.append("")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: {', '.join(str(v) for v in value) or '-'}")
        else:
            lines.append(f"{pad}{key}: {value}")
    return "\n".join(line for line in lines if line is not None)


def _demo(result: dict[str, Any]) -> str:
    timings = ", ".join(
        f"{k.removesuffix('_ms')} {v:.0f} ms" for k, v in result["timings_ms"].items()
    )
    lines = [
        f"$ {' '.join(result['command'])}   (in a fresh {result['environment']} microVM)",
        str(result["stdout"]).rstrip("\n"),
        "",
        f"exit code {result['exit_code']} in {result['duration_ms']:.0f} ms on "
        f"{result['backend']} ({result['boot'].get('mode', '?')} boot): {timings}",
    ]
    address = (result.get("network") or {}).get("guest_ip")
    if address:
        lines.append(f"the VM's address: {address}")
    lines += ["", "try next:", *(f"  {step}" for step in result["next"])]
    return "\n".join(lines)


def _demo_ollama(result: dict[str, Any]) -> str:
    lines = [f"{result['model']}: {result['answer']}", ""]
    for call in result["tool_calls"]:
        lines.append(f"  called {call['name']}: {call['outcome']}")
    lines.append(f"({len(result['tool_calls'])} tool calls in {result['rounds']} rounds)")
    return "\n".join(lines)


def _streamed(result: dict[str, Any]) -> str:
    # The output was written live; only say what a reader could not see.
    notes = []
    if result.get("timed_out"):
        notes.append("pyro: the command timed out and was killed")
    for stream in ("stdout", "stderr"):
        if result.get(f"{stream}_truncated"):
            notes.append(f"pyro: {stream} was truncated at the output cap")
    return "\n".join(notes)


def _created(result: dict[str, Any]) -> str:
    if result.get("id_only"):
        return str(result.get("id") or result.get("shell_id"))
    return _generic(result)


def _workspaces(result: dict[str, Any]) -> str:
    lines = [f"{'ID':<14} {'NAME':<16} {'STATE':<10} {'ENVIRONMENT':<16} LABELS"]
    for row in result["workspaces"]:
        labels = ",".join(f"{k}={v}" for k, v in sorted(row.get("labels", {}).items()))
        name = row.get("name") or "-"
        lines.append(
            f"{row['id']:<14} {name:<16} {row['state']:<10} {row['environment']:<16} {labels}"
        )
    return "\n".join(lines)


def _shell_read(result: dict[str, Any]) -> str:
    return str(result.get("output", ""))


def _host_config(result: dict[str, Any]) -> str:
    if "text" in result:  # print-config, connect --print: the snippet alone, to paste
        return str(result["text"]).rstrip("\n")
    lines = [f"{result['host']}: {'wrote' if result['changed'] else 'unchanged'} {result['file']}"]
    lines += [f"  {change}" for change in result["changes"] if result["changed"]]
    if result.get("backup"):
        lines.append(f"  backup: {result['backup']}")
    lines += [f"  note: {note}" for note in result.get("notes", [])]
    return "\n".join(lines)


def _host_reports(result: dict[str, Any]) -> str:
    lines = []
    for name, report in result["hosts"].items():
        state = "ok" if report["ok"] else ("PROBLEMS" if report["found"] else "not connected")
        lines.append(f"{name}: {state}")
        for repaired in report.get("repaired", []):
            lines += [f"  changed {repaired['file']}: {c}" for c in repaired["changes"]]
        for problem in report["problems"]:
            where = f" [{problem['file']}]" if problem.get("file") else ""
            lines.append(f"  - {problem['problem']}{where}")
            lines.append(f"    fix: {problem['fix']}")
    return "\n".join(lines)


RENDERERS: dict[str, Renderer] = {
    "host_print_config": _host_config,
    "host_connect": _host_config,
    "host_doctor": _host_reports,
    "host_repair": _host_reports,
    "shell_open": _created,
    "shell_read": _shell_read,
    "workspace_exec": _streamed,
    "demo": _demo,
    "demo_ollama": _demo_ollama,
    "workspace_create": _created,
    "workspace_list": _workspaces,
    "vm_run": _streamed,
    "vm_exec": _streamed,
    "env_list": _env_list,
    "runtime_doctor": _doctor,
    "runtime_status": _status,
    "runtime_bundle": _status,
    "runtime_materialize": _status,
}


def render_text(operation: str, result: Any) -> str:
    if not isinstance(result, dict):
        return str(result)
    return RENDERERS.get(operation, _generic)(result)
