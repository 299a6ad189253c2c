"""Claude Code (``claude``): stdio servers under ``mcpServers``.

- user scope: ``~/.claude.json`` (``$CLAUDE_CONFIG_DIR/.claude.json`` when that is set),
  the top-level ``mcpServers``; the file also holds the account and per-project state,
  all kept as they are, and is private (0600).
- project scope: ``.mcp.json`` in the project, meant to be shared; Claude Code asks to
  approve its servers the first time it starts there (``claude mcp list`` shows the
  server as pending until then).

An entry: ``{"type": "stdio", "command": ..., "args": [...], "env": {...}}``. Claude Code
gives the server its own whole environment plus ``env``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyro_mcp.hosts.base import JsonHost, Problem, home, repair_fix, string_list, string_map
from pyro_mcp.hosts.server import SERVER_NAME, ServerEntry


class ClaudeCode(JsonHost):
    name = "claude-code"
    title = "Claude Code"
    container = ("mcpServers",)

    def config_file(self, scope: str, project: Path, environ: Mapping[str, str]) -> Path:
        if scope == "project":
            return project / ".mcp.json"
        directory = environ.get("CLAUDE_CONFIG_DIR")
        return (Path(directory) if directory else home(environ)) / ".claude.json"

    def entry_for(self, server: ServerEntry, existing: Any) -> dict[str, Any]:
        kept = dict(existing) if isinstance(existing, dict) else {}
        return {
            **kept,
            "type": "stdio",
            "command": server.command,
            "args": list(server.args),
            "env": server.env,
        }

    def read_entry(self, raw: Any) -> tuple[ServerEntry | None, list[Problem]]:
        fix = repair_fix(self)
        if not isinstance(raw, dict):
            return None, [Problem("the pyro entry is not a JSON object", fix)]
        kind = raw.get("type", "stdio")
        if kind != "stdio":
            return None, [Problem(f"the pyro entry is a {kind!r} server, not stdio", fix)]
        command, args = raw.get("command"), string_list(raw.get("args", []))
        env = string_map(raw.get("env", {}))
        if not isinstance(command, str) or not command or args is None or env is None:
            return None, [Problem("the pyro entry needs a command, a list of args and env", fix)]
        return ServerEntry(command, tuple(args), env), []

    def shadowing(self, data: dict[str, Any], scope: str, project: Path) -> list[Problem]:
        # `claude mcp add` writes to the "local" scope by default: the user's file, under
        # the project's path. Claude Code prefers it to a project's or the user's entry.
        projects = data.get("projects") if scope == "user" else None
        local = projects.get(str(project)) if isinstance(projects, dict) else None
        servers = local.get("mcpServers") if isinstance(local, dict) else None
        if isinstance(servers, dict) and SERVER_NAME in servers:
            return [
                Problem(
                    f"a local-scope pyro entry for {project} (in this file's projects) "
                    "takes precedence over the others here",
                    f"claude mcp remove pyro -s local (run in {project})",
                )
            ]
        return []

    def notes(self, scope: str) -> list[str]:
        if scope == "project":
            return [
                "Claude Code asks to approve the servers of .mcp.json the first time it "
                "starts in this project; until then `claude mcp list` shows pyro as pending"
            ]
        return []
