"""Check a host's pyro entry as the host will start it, and repair what can be repaired.

Each check reads the entry as the host does and the environment the host gives the
server (:meth:`Host.server_environ`: this shell's environment for a host started from
it), and says what is wrong and the command that fixes it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyro_mcp.errors import InvalidState
from pyro_mcp.hosts import config_files
from pyro_mcp.hosts.base import SCOPES, Host, Problem, repair_fix
from pyro_mcp.hosts.connect import HOSTS, write_entry
from pyro_mcp.hosts.server import (
    DIRECTORIES,
    SERVER_NAME,
    Launcher,
    ServerEntry,
    Setup,
    read_serve_args,
    wanted_entry,
)
from pyro_mcp.mcp_profiles import DEFAULT_PROFILE, PROFILES


def _entries(host: Host, setup: Setup) -> tuple[list[tuple[str, Path, Any]], list[dict[str, Any]]]:
    """Each (scope, file, entry) holding pyro, and the problems of the files themselves
    (one that cannot be read, an entry the host prefers to pyro's)."""
    found: list[tuple[str, Path, Any]] = []
    problems: list[dict[str, Any]] = []
    seen: set[Path] = set()
    for scope in SCOPES:
        path = host.config_file(scope, setup.cwd, setup.environ)
        if path in seen:  # the project is the home directory: one file, read once
            continue
        seen.add(path)
        try:
            loaded = config_files.load(path)
            if loaded.text is None:
                continue
            data = host.parse(loaded)
        except InvalidState as exc:
            problem = {"problem": exc.message, "fix": exc.hint or "fix the file"}
            problems.append({"scope": scope, "file": str(path), **problem})
            continue
        problems += [
            {"scope": scope, "file": str(path), **shadow.to_dict()}
            for shadow in host.shadowing(data, scope, setup.cwd)
        ]
        servers = host.servers(data)
        if isinstance(servers, dict) and SERVER_NAME in servers:
            found.append((scope, path, servers[SERVER_NAME]))
    return found, problems


def diagnose_host(host: Host, setup: Setup) -> dict[str, Any]:
    """``found`` (an entry in the user's or the project's file), ``ok`` (found, and
    nothing wrong), ``problems`` (each with its scope, file and fix) and ``entries``."""
    found, problems = _entries(host, setup)
    for scope, path, raw in found:
        problems += [
            {"scope": scope, "file": str(path), **problem.to_dict()}
            for problem in check_entry(host, raw, setup)
        ]
    if not found and not problems:
        files = " or ".join(str(host.config_file(s, setup.cwd, setup.environ)) for s in SCOPES)
        problems.append(
            {
                "scope": None,
                "file": None,
                "problem": f"no {SERVER_NAME} entry in {files}",
                "fix": f"pyro host connect {host.name}",
            }
        )
    return {
        "found": bool(found),
        "ok": bool(found) and not problems,
        "entries": [{"scope": scope, "file": str(path)} for scope, path, _ in found],
        "problems": problems,
    }


def diagnose(setup: Setup, names: list[str]) -> dict[str, Any]:
    hosts = {name: diagnose_host(HOSTS[name], setup) for name in names}
    connected = [report for report in hosts.values() if report["found"]]
    return {"hosts": hosts, "ok": bool(connected) and all(r["ok"] for r in connected)}


def check_entry(host: Host, raw: Any, setup: Setup) -> list[Problem]:
    """Everything wrong with ``raw`` as ``host`` will start it."""
    entry, problems = host.read_entry(raw)
    problems += host.entry_problems(raw)
    if entry is None:
        return problems
    server_env = host.server_environ(raw, setup.environ)
    problems += _command_problems(host, entry, server_env, setup.launcher)
    problems += _argument_problems(host, entry)
    problems += _directory_problems(host, entry, server_env, setup)
    return problems


def _command_problems(
    host: Host, entry: ServerEntry, server_env: Mapping[str, str], launcher: Launcher
) -> list[Problem]:
    fix = f"{repair_fix(host)} (points it at {launcher.describe()})"
    command = entry.command
    if "/" not in command:
        located = shutil.which(command, path=server_env.get("PATH", os.defpath))
        if located is None:
            return [Problem(f"command {command!r} is not on the PATH the host gives it", fix)]
        command = located
    elif not os.path.isabs(command):
        return [Problem(f"command {command} is relative to wherever the host starts", fix)]
    if not os.path.isfile(command):
        return [Problem(f"command {command} does not exist", fix)]
    if not os.access(command, os.X_OK):
        return [Problem(f"command {command} is not executable", fix)]
    serve = read_serve_args(entry.args)
    prefix = serve.prefix if serve else ()
    if not _same_program(command, prefix, launcher):
        started = " ".join((command, *prefix))
        return [Problem(f"the entry starts {started}, not this pyro ({launcher.describe()})", fix)]
    return []


def _same_program(command: str, prefix: tuple[str, ...], launcher: Launcher) -> bool:
    if prefix != launcher.prefix:
        return False
    if launcher.prefix:  # an interpreter: a venv's python is a link to the system's
        return os.path.normpath(command) == os.path.normpath(launcher.command)
    return os.path.realpath(command) == os.path.realpath(launcher.command)


def _argument_problems(host: Host, entry: ServerEntry) -> list[Problem]:
    fix = repair_fix(host)
    serve = read_serve_args(entry.args)
    if serve is None:
        shown = " ".join(entry.args) or "(none)"
        return [Problem(f"the arguments do not run `pyro mcp serve`: {shown}", fix)]
    problems = []
    if serve.http is not None:
        problems.append(Problem("the entry serves HTTP (--http); the host speaks stdio", fix))
    if serve.unknown:
        problems.append(Problem(f"`mcp serve` does not take {' '.join(serve.unknown)}", fix))
    if serve.profile is not None and serve.profile not in PROFILES:
        problems.append(
            Problem(
                f"profile {serve.profile!r} is not one of {', '.join(PROFILES)}",
                f"pyro host connect {host.name} --profile PROFILE",
            )
        )
    if not serve.roots:
        problems.append(
            Problem(
                "no --root: the server would confine host paths to whatever directory the "
                "host starts it in",
                f"pyro host connect {host.name} --root DIR (or {fix}: the current directory)",
            )
        )
    for root in serve.roots:
        wrong = _root_problem(root)
        if wrong:
            problems.append(Problem(wrong, f"pyro host connect {host.name} --root DIR"))
    return problems


def _root_problem(root: str) -> str | None:
    if not os.path.isabs(root):
        return f"root {root} is relative to wherever the host starts the server"
    if not os.path.exists(root):
        return f"root {root} does not exist"
    if not os.path.isdir(root):
        return f"root {root} is not a directory"
    return None


def _directory_problems(
    host: Host, entry: ServerEntry, server_env: Mapping[str, str], setup: Setup
) -> list[Problem]:
    problems = []
    there = {name: resolve(server_env) for name, (_what, resolve) in DIRECTORIES.items()}
    for name, (what, _resolve) in DIRECTORIES.items():
        here = setup.here[name]
        if name not in entry.env and there[name] != here:
            problems.append(
                Problem(
                    f"{name} is not pinned: started by {host.title}, the server would keep "
                    f"its {what} in {there[name]}, not in {here} as this pyro does",
                    f"{repair_fix(host)} (pins {name}={here})",
                )
            )
    cache, state = there["PYRO_CACHE_DIR"], there["PYRO_STATE_DIR"]
    pin = f"{repair_fix(host)} (pins the directories this pyro uses)"
    if not _usable("PYRO_CACHE_DIR", cache):
        fix = pin
        if cache == setup.here["PYRO_CACHE_DIR"]:  # this pyro's own: nothing to pin
            fix = "pyro runtime materialize (builds the runtime there), or pin PYRO_CACHE_DIR"
        problems.append(
            Problem(f"the runtime cache {cache} is missing or unreadable: no runtime", fix)
        )
    if not _usable("PYRO_STATE_DIR", state):
        problems.append(Problem(f"the state directory {state} cannot be written", pin))
    return problems


def repair_host(host: Host, setup: Setup) -> dict[str, Any]:
    """Rewrite each of ``host``'s entries that has problems; what changed, and what is
    still wrong (a file it cannot read, a cache that holds no runtime)."""
    found, _unreadable = _entries(host, setup)
    repaired = []
    for scope, path, raw in found:
        if not check_entry(host, raw, setup):
            continue
        written = write_entry(host, scope, path, lambda old: _repaired(old, setup))
        if written["changed"]:
            repaired.append(written)
    after = diagnose_host(host, setup)
    return {
        "found": bool(found),
        "repaired": repaired,
        "ok": after["ok"],
        "problems": after["problems"],
    }


def repair(setup: Setup, names: list[str]) -> dict[str, Any]:
    hosts = {name: repair_host(HOSTS[name], setup) for name in names}
    connected = [report for report in hosts.values() if report["found"]]
    return {"hosts": hosts, "ok": bool(connected) and all(r["ok"] for r in connected)}


def _repaired(old: ServerEntry | None, setup: Setup) -> ServerEntry:
    """The entry ``old`` should be: this pyro, its profile and roots where they are
    valid (else the default profile, the current directory), its variables kept but
    for directories that are missing or unusable, which are pinned to this pyro's."""
    serve = read_serve_args(old.args) if old else None
    profile = serve.profile if serve and serve.profile in PROFILES else DEFAULT_PROFILE
    roots = [Path(r) for r in (serve.roots if serve else []) if _root_problem(r) is None]
    env = dict(old.env) if old else {}
    for name, value in setup.pinned().items():
        if name not in env or not _usable(name, Path(env[name])):
            env[name] = value
    return wanted_entry(setup.launcher, str(profile), roots or [setup.cwd], env)


def _usable(name: str, path: Path) -> bool:
    """Whether a pinned directory is fit for the server (the cache must hold something)."""
    if not path.is_absolute():
        return False
    if name == "PYRO_CACHE_DIR":
        return path.is_dir() and os.access(path, os.R_OK | os.X_OK)
    nearest = next(p for p in (path, *path.parents) if p.exists())
    return nearest.is_dir() and os.access(nearest, os.W_OK | os.X_OK)
