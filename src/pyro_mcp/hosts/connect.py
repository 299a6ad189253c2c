"""Print pyro's entry for a host, or write it into the host's configuration file."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pyro_mcp.errors import InvalidArgument
from pyro_mcp.hosts import config_files
from pyro_mcp.hosts.base import SCOPES, Host
from pyro_mcp.hosts.claude_code import ClaudeCode
from pyro_mcp.hosts.codex import Codex
from pyro_mcp.hosts.config_files import ENV_KEYS
from pyro_mcp.hosts.opencode import OpenCode
from pyro_mcp.hosts.server import (
    DIRECTORIES,
    SERVER_NAME,
    ServerEntry,
    Setup,
    project_root,
    wanted_entry,
)

HIDDEN = "(hidden)"

HOSTS: dict[str, Host] = {host.name: host for host in (ClaudeCode(), Codex(), OpenCode())}


def host_named(name: str) -> Host:
    """Errors: InvalidArgument for a host pyro does not know."""
    try:
        return HOSTS[name]
    except KeyError:
        raise InvalidArgument(
            f"unknown MCP host {name!r}", hint=f"choose one of {', '.join(HOSTS)}"
        ) from None


def _scope(scope: str) -> str:
    if scope not in SCOPES:
        raise InvalidArgument(f"unknown scope {scope!r}", hint=f"choose one of {', '.join(SCOPES)}")
    return scope


def print_config(
    setup: Setup, name: str, profile: str, root: str | None, scope: str = "user"
) -> dict[str, Any]:
    """pyro's entry for host ``name`` as the text to paste, and the file it belongs in."""
    host = host_named(name)
    project = project_root(root, setup.cwd)
    server = wanted_entry(setup.launcher, profile, [project], setup.pinned())
    raw = host.entry_for(server, None)
    return {
        "host": host.name,
        "scope": _scope(scope),
        "file": str(host.config_file(scope, setup.cwd, setup.environ)),
        "format": host.format,
        "text": host.snippet(raw),
    }


def connect(setup: Setup, name: str, profile: str, root: str | None, scope: str) -> dict[str, Any]:
    """Write pyro's entry (``profile``, confined to ``root``) into the host's ``scope``
    file: merged with what is there, nothing written when it is already so."""
    host = host_named(name)
    scope = _scope(scope)
    project = project_root(root, setup.cwd)
    path = host.config_file(scope, setup.cwd, setup.environ)

    def server_for(existing: ServerEntry | None) -> ServerEntry:
        env = {**(existing.env if existing else {}), **setup.pinned()}
        return wanted_entry(setup.launcher, profile, [project], env)

    return write_entry(host, scope, path, server_for)


def write_entry(
    host: Host,
    scope: str,
    path: Any,
    server_for: Callable[[ServerEntry | None], ServerEntry],
) -> dict[str, Any]:
    """Set pyro's entry in ``path`` to ``server_for(the entry there)`` (the host's own
    keys in it kept); what changed, the backup, the notes for ``scope``."""
    seen: dict[str, Any] = {}

    def change(loaded: config_files.Loaded) -> tuple[str, bool] | None:
        data = host.parse(loaded)
        servers = host.servers(data)
        existing = servers.get(SERVER_NAME) if isinstance(servers, dict) else None
        current, _problems = host.read_entry(existing) if existing is not None else (None, [])
        raw = host.entry_for(server_for(current), existing)
        seen.update(previous=existing, entry=raw, mode=loaded.mode)
        if raw == existing:
            return None
        return host.render(loaded, data, raw), host.holds_secrets(data)

    written = config_files.edit(path, change, new_mode=host.new_mode(scope))
    mode = written.mode if written else seen["mode"]
    return {
        "host": host.name,
        "scope": scope,
        "file": str(path),
        "changed": written is not None,
        "changes": describe_changes(redacted(seen["previous"]), redacted(seen["entry"])),
        "backup": str(written.backup) if written and written.backup else None,
        "mode": None if mode is None else f"{mode:04o}",
        "entry": redacted(seen["entry"]),
        "notes": host.notes(scope),
    }


def describe_changes(old: Any, new: dict[str, Any]) -> list[str]:
    """What differs between two entries, one line per key (per variable for env)."""
    if not isinstance(old, dict):
        return [f"added the {SERVER_NAME} entry"]
    lines = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            for var in sorted(set(before) | set(after)):
                was, now = before.get(var), after.get(var)
                if was != now:
                    lines.append(f"{key}.{var}: {_shown(was)} -> {_shown(now)}")
        else:
            lines.append(f"{key}: {_shown(before)} -> {_shown(after)}")
    return lines


def redacted(raw: Any) -> Any:
    """``raw`` with the values of its environment hidden, but for pyro's directories
    (the user's other variables may be tokens)."""
    if not isinstance(raw, dict):
        return raw
    shown = dict(raw)
    for key in ENV_KEYS:
        env = shown.get(key)
        if isinstance(env, dict):
            shown[key] = {k: v if k in DIRECTORIES else HIDDEN for k, v in env.items()}
    return shown


def _shown(value: Any) -> str:
    return "(unset)" if value is None else json.dumps(value, ensure_ascii=False)
