"""OpenCode (``opencode``, 1.x): local servers under ``mcp``.

- user scope: ``opencode.json`` in ``$XDG_CONFIG_HOME/opencode`` (default
  ``~/.config/opencode``); an ``opencode.jsonc`` there is edited instead when it is the
  only one (its comments are not kept: the backup has them).
- project scope: ``opencode.json`` in the directory OpenCode starts in.

An entry: ``{"type": "local", "command": [program, arg, ...], "environment": {...},
"enabled": true}``; OpenCode refuses a command that is not an array. It gives the
server its own whole environment plus ``environment``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pyro_mcp.hosts.base import JsonHost, Problem, home, repair_fix, string_list, string_map
from pyro_mcp.hosts.server import ServerEntry

SCHEMA = "https://opencode.ai/config.json"


class OpenCode(JsonHost):
    name = "opencode"
    title = "OpenCode"
    container = ("mcp",)
    comments = True
    skeleton: ClassVar[dict[str, Any]] = {"$schema": SCHEMA}

    def config_file(self, scope: str, project: Path, environ: Mapping[str, str]) -> Path:
        if scope == "project":
            directory = project
        else:
            xdg = environ.get("XDG_CONFIG_HOME")
            base = Path(xdg) if xdg and Path(xdg).is_absolute() else home(environ) / ".config"
            directory = base / "opencode"
        plain, commented = directory / "opencode.json", directory / "opencode.jsonc"
        return commented if commented.exists() and not plain.exists() else plain

    def entry_for(self, server: ServerEntry, existing: Any) -> dict[str, Any]:
        kept = dict(existing) if isinstance(existing, dict) else {}
        return {
            **kept,
            "type": "local",
            "command": server.argv,
            "environment": server.env,
            "enabled": True,
        }

    def read_entry(self, raw: Any) -> tuple[ServerEntry | None, list[Problem]]:
        fix = repair_fix(self)
        if not isinstance(raw, dict):
            return None, [Problem("the pyro entry is not a JSON object", fix)]
        if raw.get("type") != "local":
            kind = raw.get("type")
            return None, [Problem(f"the pyro entry is of type {kind!r}, not 'local'", fix)]
        argv = string_list(raw.get("command"))
        env = string_map(raw.get("environment", {}))
        if not argv or env is None:
            return None, [
                Problem("the pyro entry needs a command array and an environment object", fix)
            ]
        problems = []
        if raw.get("enabled") is False:
            problems.append(Problem("the pyro entry is disabled (enabled: false)", fix))
        return ServerEntry(argv[0], tuple(argv[1:]), env), problems
