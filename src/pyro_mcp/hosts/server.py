"""What pyro wants a host to start: this pyro's ``mcp serve`` with an explicit profile and
root, and the runtime's directories pinned in the server's environment.

Two traps measured with each host shape this:

- ``pyro mcp serve`` confines host paths to ``--root`` and, without it, to the directory
  it was started in: whatever directory the host happens to start it in. So every entry
  names its root.
- The server finds its runtime (kernel, images), its records and its keys through
  ``PYRO_CACHE_DIR``/``PYRO_STATE_DIR``/``PYRO_RUN_DIR``/``PYRO_KEY_DIR`` or, unset, through
  ``HOME`` and the ``XDG_*`` variables. A host that starts it with another environment
  (Codex passes only a short allowlist: no ``XDG_*``, no ``PYRO_*``; any host may set
  another ``HOME``) would give it an empty cache and other records. So every entry pins
  the directories this pyro uses.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyro_mcp.errors import InvalidArgument
from pyro_mcp.mcp_profiles import PROFILES
from pyro_mcp.runtime import paths

SERVER_NAME = "pyro"  # the server's name in every host's configuration
MODULE = "pyro_mcp.cli.main"

# The directories the server must share with the pyro that connected it, and what each holds.
DIRECTORIES: dict[str, tuple[str, Callable[[Mapping[str, str] | None], Path]]] = {
    "PYRO_CACHE_DIR": ("runtime cache (kernels, environment images)", paths.cache_dir),
    "PYRO_STATE_DIR": ("workspace records", paths.state_dir),
    "PYRO_RUN_DIR": ("live VMs' sockets", paths.run_dir),
    "PYRO_KEY_DIR": ("key for workspace secrets", paths.key_dir),
}


@dataclass(frozen=True)
class Launcher:
    """How to start this pyro: ``command`` followed by ``prefix`` then pyro's own words."""

    command: str
    prefix: tuple[str, ...] = ()

    def describe(self) -> str:
        return " ".join((self.command, *self.prefix))


def this_pyro(argv0: str | None = None, executable: str | None = None) -> Launcher:
    """The running pyro: the ``pyro`` script that was run (absolute path), else the one
    installed beside this interpreter, else ``python -m pyro_mcp.cli.main``."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    executable = sys.executable if executable is None else executable
    if os.path.basename(argv0) == "pyro" and _is_executable(argv0):
        return Launcher(os.path.abspath(argv0))
    beside = os.path.join(os.path.dirname(os.path.abspath(executable)), "pyro")
    if _is_executable(beside):
        return Launcher(beside)
    return Launcher(os.path.abspath(executable), ("-m", MODULE))


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


@dataclass(frozen=True)
class ServerEntry:
    """pyro's server as any host describes a stdio server: a command, its arguments and
    the environment variables it adds."""

    command: str
    args: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def argv(self) -> list[str]:
        return [self.command, *self.args]


@dataclass(frozen=True)
class Setup:
    """This pyro as a host should start it, and the environment hosts start in.

    ``here``: each variable of :data:`DIRECTORIES` and the directory this pyro uses for
    it. ``environ``: the environment a host inherits (this shell's); ``cwd``: the
    directory a project's configuration and the default root are in.
    """

    launcher: Launcher
    here: dict[str, Path]
    environ: Mapping[str, str]
    cwd: Path

    @classmethod
    def current(cls, cache_dir: Path, state_dir: Path, run_dir: Path) -> Setup:
        """This process: the pyro that runs, its directories, its environment and cwd."""
        here = {
            "PYRO_CACHE_DIR": cache_dir,
            "PYRO_STATE_DIR": state_dir,
            "PYRO_RUN_DIR": run_dir,
            "PYRO_KEY_DIR": paths.key_dir(),
        }
        return cls(this_pyro(), here, dict(os.environ), Path(os.getcwd()))

    def pinned(self) -> dict[str, str]:
        """Each directory variable set to where this pyro has it."""
        return {name: str(path) for name, path in self.here.items()}


def project_root(root: str | None, cwd: Path) -> Path:
    """``root`` (default: ``cwd``) as an absolute path to a directory.

    Errors: InvalidArgument when it does not exist or is not a directory.
    """
    chosen = Path(os.path.normpath(cwd / os.path.expanduser(root))) if root else cwd
    if not chosen.exists():
        raise InvalidArgument(f"root {chosen} does not exist", hint="pass an existing directory")
    if not chosen.is_dir():
        raise InvalidArgument(f"root {chosen} is not a directory", hint="pass a directory")
    return chosen


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise InvalidArgument(
            f"unknown MCP profile {profile!r}", hint=f"choose one of {', '.join(PROFILES)}"
        )
    return profile


def wanted_entry(
    launcher: Launcher, profile: str, roots: Sequence[Path], env: Mapping[str, str]
) -> ServerEntry:
    """The entry a host should have: ``launcher`` serving ``profile`` confined to
    ``roots``, with ``env``."""
    args = [*launcher.prefix, "mcp", "serve", "--profile", check_profile(profile)]
    for root in roots:
        args += ["--root", str(root)]
    return ServerEntry(launcher.command, tuple(args), dict(env))


@dataclass
class ServeArgs:
    """The arguments of an entry, read as ``[prefix] mcp serve [options]``."""

    prefix: tuple[str, ...]
    profile: str | None = None
    roots: list[str] = field(default_factory=list)
    http: str | None = None
    unknown: list[str] = field(default_factory=list)


def read_serve_args(args: Sequence[str]) -> ServeArgs | None:
    """The ``mcp serve`` options in ``args``; None when they do not run ``mcp serve``."""
    words = list(args)
    for start in range(len(words) - 1):
        if words[start : start + 2] == ["mcp", "serve"]:
            break
    else:
        return None
    found = ServeArgs(prefix=tuple(words[:start]))
    rest = iter(words[start + 2 :])
    for word in rest:
        name, has_value, value = word.partition("=")
        if name in ("--profile", "--root", "--http"):
            if not has_value:
                value = next(rest, "")
            if name == "--profile":
                found.profile = value
            elif name == "--root":
                found.roots.append(value)
            else:
                found.http = value
        else:
            found.unknown.append(word)
    return found
