"""What every host module provides, and the JSON hosts' shared handling."""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pyro_mcp.errors import InvalidState
from pyro_mcp.hosts import config_files
from pyro_mcp.hosts.server import SERVER_NAME, ServerEntry

SCOPES = ("user", "project")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a host's pyro entry, and what fixes it."""

    message: str
    fix: str

    def to_dict(self) -> dict[str, str]:
        return {"problem": self.message, "fix": self.fix}


class Host(ABC):
    """One MCP host: where its configuration lives and how it spells pyro's entry."""

    name: str  # as on the command line: "claude-code"
    title: str  # as people know it: "Claude Code"
    format: str  # "json" or "toml"

    @abstractmethod
    def config_file(self, scope: str, project: Path, environ: Mapping[str, str]) -> Path:
        """The file ``scope`` lives in (``project``: the project's directory)."""

    @abstractmethod
    def parse(self, loaded: config_files.Loaded) -> dict[str, Any]:
        """The file's document. Errors: InvalidState naming the file and line."""

    @abstractmethod
    def servers(self, data: dict[str, Any]) -> Any:
        """The document's map of servers (None when it has none)."""

    @abstractmethod
    def entry_for(self, server: ServerEntry, existing: Any) -> dict[str, Any]:
        """The host's entry for ``server``, keeping what ``existing`` adds of its own."""

    @abstractmethod
    def read_entry(self, raw: Any) -> tuple[ServerEntry | None, list[Problem]]:
        """The server an entry starts, and what is wrong with its form."""

    @abstractmethod
    def render(self, loaded: config_files.Loaded, data: dict[str, Any], raw: Any) -> str:
        """The file's new text with ``raw`` as pyro's entry."""

    @abstractmethod
    def snippet(self, raw: dict[str, Any]) -> str:
        """What to paste into the configuration: pyro's entry under its parents."""

    def server_environ(self, raw: Any, environ: Mapping[str, str]) -> dict[str, str]:
        """The environment the host starts the server with (its own plus the entry's)."""
        entry, _ = self.read_entry(raw)
        return {**environ, **(entry.env if entry else {})}

    def entry_problems(self, raw: Any) -> list[Problem]:
        """What this host in particular needs of the entry."""
        return []

    def shadowing(self, data: dict[str, Any], scope: str, project: Path) -> list[Problem]:
        """Entries in the ``scope`` file's ``data`` that the host prefers to pyro's."""
        return []

    def notes(self, scope: str) -> list[str]:
        """What a person should know after pyro wrote ``scope``."""
        return []

    def new_mode(self, scope: str) -> int:
        """The mode of a file pyro creates: private for a user's file (it will hold the
        server's environment); a project's is shared (0644 under a usual umask)."""
        if scope == "user":
            return config_files.PRIVATE
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask

    def holds_secrets(self, data: dict[str, Any]) -> bool:
        return config_files.holds_secrets(data)


def home(environ: Mapping[str, str]) -> Path:
    value = environ.get("HOME")
    return Path(value) if value else Path.home()


def string_map(value: Any) -> dict[str, str] | None:
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        return {str(k): v for k, v in value.items()}
    return None


def string_list(value: Any) -> list[str] | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def repair_fix(host: Host) -> str:
    return f"pyro host repair {host.name}"


class JsonHost(Host):
    """A host whose configuration is one JSON document with a map of servers at
    ``container`` (a key path from the top)."""

    format = "json"
    container: tuple[str, ...]
    comments = False  # JSONC allowed (comments, trailing commas)
    skeleton: ClassVar[dict[str, Any]] = {}  # what a file pyro creates starts with

    def parse(self, loaded: config_files.Loaded) -> dict[str, Any]:
        return config_files.parse_json(loaded, comments=self.comments)

    def servers(self, data: dict[str, Any]) -> Any:
        cursor: Any = data
        for part in self.container:
            if not isinstance(cursor, dict):
                return None
            cursor = cursor.get(part)
        return cursor

    def render(self, loaded: config_files.Loaded, data: dict[str, Any], raw: Any) -> str:
        document: dict[str, Any] = dict(self.skeleton) if loaded.text is None else data
        cursor = document
        for depth, part in enumerate(self.container, 1):
            child = cursor.get(part)
            if child is not None and not isinstance(child, dict):
                where = ".".join(self.container[:depth])
                raise InvalidState(
                    f"{loaded.path}: {where} is not a JSON object",
                    hint="fix the file (its host cannot read it either), then run again",
                )
            cursor[part] = dict(child or {})
            cursor = cursor[part]
        cursor[SERVER_NAME] = raw
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"

    def snippet(self, raw: dict[str, Any]) -> str:
        document: dict[str, Any] = {SERVER_NAME: raw}
        for part in reversed(self.container):
            document = {part: document}
        return json.dumps({**self.skeleton, **document}, indent=2, ensure_ascii=False) + "\n"
