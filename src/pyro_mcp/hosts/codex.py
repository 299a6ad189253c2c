"""Codex (OpenAI's ``codex`` CLI): stdio servers as ``[mcp_servers.NAME]`` tables.

- user scope: ``config.toml`` in ``$CODEX_HOME`` (default ``~/.codex``).
- project scope: ``.codex/config.toml`` in the project; Codex reads it only in a project
  the user has trusted.

An entry: ``command``, ``args``, ``required = true`` and an ``[mcp_servers.pyro.env]``
table. Two things only Codex does:

- It starts servers in the background and the first turn goes ahead without those not
  yet up, unless the server is ``required``: then the session waits for it (and fails
  plainly when it cannot start). pyro's entry is required.
- It does not give a server its own environment: only the variables of
  :data:`FORWARDED` (plus those the entry lists in ``env_vars``), then ``env``. So
  ``XDG_*`` and ``PYRO_*`` of the user's shell never reach the server.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyro_mcp.hosts import config_files, toml_text
from pyro_mcp.hosts.base import Host, Problem, home, repair_fix, string_list, string_map
from pyro_mcp.hosts.server import SERVER_NAME, ServerEntry

# What Codex passes on to a stdio server from its own environment on Unix (codex-rs,
# rmcp-client: DEFAULT_ENV_VARS), checked against codex-cli 0.171.0.
FORWARDED = (
    "HOME",
    "LOGNAME",
    "PATH",
    "SHELL",
    "USER",
    "__CF_USER_TEXT_ENCODING",
    "LANG",
    "LC_ALL",
    "TERM",
    "TMPDIR",
    "TZ",
)
TABLE = ("mcp_servers", SERVER_NAME)


class Codex(Host):
    name = "codex"
    title = "Codex"
    format = "toml"

    def config_file(self, scope: str, project: Path, environ: Mapping[str, str]) -> Path:
        if scope == "project":
            return project / ".codex" / "config.toml"
        codex_home = environ.get("CODEX_HOME")
        return (Path(codex_home) if codex_home else home(environ) / ".codex") / "config.toml"

    def parse(self, loaded: config_files.Loaded) -> dict[str, Any]:
        return config_files.parse_toml(loaded)

    def servers(self, data: dict[str, Any]) -> Any:
        return data.get("mcp_servers")

    def entry_for(self, server: ServerEntry, existing: Any) -> dict[str, Any]:
        kept = dict(existing) if isinstance(existing, dict) else {}
        kept.pop("env", None)  # a table: written after the plain keys
        entry = {**kept, "command": server.command, "args": list(server.args)}
        if "enabled" in entry:
            entry["enabled"] = True
        return {**entry, "required": True, "env": server.env}

    def read_entry(self, raw: Any) -> tuple[ServerEntry | None, list[Problem]]:
        fix = repair_fix(self)
        if not isinstance(raw, dict):
            return None, [Problem("[mcp_servers.pyro] is not a table", fix)]
        if "url" in raw:
            return None, [Problem("the pyro entry is an HTTP server (url), not stdio", fix)]
        command, args = raw.get("command"), string_list(raw.get("args", []))
        env = string_map(raw.get("env", {}))
        if not isinstance(command, str) or not command or args is None or env is None:
            return None, [Problem("the pyro entry needs a command, a list of args and env", fix)]
        problems = []
        if raw.get("enabled") is False:
            problems.append(Problem("the pyro entry is disabled (enabled = false)", fix))
        return ServerEntry(command, tuple(args), env), problems

    def server_environ(self, raw: Any, environ: Mapping[str, str]) -> dict[str, str]:
        entry, _ = self.read_entry(raw)
        listed = string_list(raw.get("env_vars", [])) if isinstance(raw, dict) else None
        names = [*FORWARDED, *(listed or [])]
        passed = {name: environ[name] for name in names if name in environ}
        return {**passed, **(entry.env if entry else {})}

    def entry_problems(self, raw: Any) -> list[Problem]:
        if isinstance(raw, dict) and raw.get("required") is not True:
            return [
                Problem(
                    "required is not true: Codex starts the server in the background and "
                    "the first turn may go ahead without pyro's tools",
                    f"{repair_fix(self)} (sets required = true)",
                )
            ]
        return []

    def render(self, loaded: config_files.Loaded, data: dict[str, Any], raw: Any) -> str:
        return toml_text.replace_table(loaded.text or "", TABLE, raw, str(loaded.path))

    def snippet(self, raw: dict[str, Any]) -> str:
        return toml_text.table(TABLE, raw)

    def notes(self, scope: str) -> list[str]:
        if scope == "project":
            return ["Codex reads .codex/config.toml only in a project you have trusted"]
        return []
