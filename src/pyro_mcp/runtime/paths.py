"""Where pyro keeps things on the host.

One environment variable moves each base directory:

- ``PYRO_CACHE_DIR``: rebuildable artifacts (binaries, kernels, environment images).
  Default: ``$XDG_CACHE_HOME/pyro-mcp`` or ``~/.cache/pyro-mcp``.
- ``PYRO_STATE_DIR``: records that must survive (workspaces, store).
  Default: ``$XDG_STATE_HOME/pyro-mcp`` or ``~/.local/state/pyro-mcp``.
- ``PYRO_RUN_DIR``: live VMs' sockets and logs (short paths: Unix sockets allow ~100
  bytes). Default: ``/run/pyro-mcp`` as root, else ``$XDG_RUNTIME_DIR/pyro-mcp`` or
  ``/tmp/pyro-mcp-<uid>``.
- ``PYRO_KEY_DIR``: the key that encrypts workspace secrets at rest, kept apart from the
  state directory (a copy of the store alone reveals no secret).
  Default: ``$XDG_CONFIG_HOME/pyro-mcp/keys`` or ``~/.config/pyro-mcp/keys``.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Each resolver below reads ``environ`` when given (the environment another process, such
# as an MCP host starting ``pyro mcp serve``, will have), else this process's own.


def _home(environ: Mapping[str, str]) -> Path:
    home = environ.get("HOME")
    return Path(home) if home else Path(pwd.getpwuid(os.geteuid()).pw_dir)


def _pinned(var: str, environ: Mapping[str, str]) -> Path | None:
    value = environ.get(var)
    if not value:
        return None
    if value == "~" or value.startswith("~/"):
        value = str(_home(environ)) + value[1:]
    return Path(value).expanduser().resolve()


def _xdg(var: str, fallback: str, environ: Mapping[str, str]) -> Path:
    value = environ.get(var)
    if value and Path(value).is_absolute():
        return Path(value)
    return _home(environ) / fallback


@dataclass(frozen=True)
class RuntimePaths:
    """The directory layout of the runtime cache."""

    cache_dir: Path
    run_root: Path = field(default_factory=lambda: run_dir())

    @property
    def bin_dir(self) -> Path:
        """Verified Firecracker and Jailer binaries, one directory per version."""
        return self.cache_dir / "bin"

    @property
    def kernels_dir(self) -> Path:
        """Guest kernels, one directory per cache key."""
        return self.cache_dir / "kernels"

    @property
    def images_dir(self) -> Path:
        """Content-addressed environment images (``<sha256>.ext4``)."""
        return self.cache_dir / "images"

    @property
    def environments_dir(self) -> Path:
        """One manifest per installed environment."""
        return self.cache_dir / "environments"

    @property
    def rootfs_trees_dir(self) -> Path:
        """Cached debootstrap results (tarballs), keyed by their package set."""
        return self.cache_dir / "rootfs-trees"

    @property
    def downloads_dir(self) -> Path:
        """Downloaded inputs (wheels, .deb files) kept to avoid fetching twice."""
        return self.cache_dir / "downloads"

    @property
    def work_dir(self) -> Path:
        """Scratch space for builds; everything here is temporary."""
        return self.cache_dir / "work"

    @property
    def probes_path(self) -> Path:
        """Cached backend boot probes (which VMM boots a real guest here, how fast)."""
        return self.cache_dir / "probes.json"

    @property
    def lock_path(self) -> Path:
        """The runtime lock: what is installed here, its digests, proven capabilities."""
        return self.cache_dir / "runtime.lock.json"

    def ensure(self) -> None:
        for path in (
            self.bin_dir,
            self.kernels_dir,
            self.images_dir,
            self.environments_dir,
            self.rootfs_trees_dir,
            self.downloads_dir,
            self.work_dir,
        ):
            path.mkdir(parents=True, exist_ok=True)


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return _pinned("PYRO_CACHE_DIR", env) or _xdg("XDG_CACHE_HOME", ".cache", env) / "pyro-mcp"


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    pinned = _pinned("PYRO_STATE_DIR", env)
    return pinned or _xdg("XDG_STATE_HOME", ".local/state", env) / "pyro-mcp"


def key_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    pinned = _pinned("PYRO_KEY_DIR", env)
    return pinned or _xdg("XDG_CONFIG_HOME", ".config", env) / "pyro-mcp" / "keys"


def runtime_paths() -> RuntimePaths:
    """The runtime layout for the current environment variables."""
    return RuntimePaths(cache_dir(), run_dir())


def run_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    pinned = _pinned("PYRO_RUN_DIR", env)
    if pinned:
        return pinned
    if os.geteuid() == 0 and os.access("/run", os.W_OK):
        return Path("/run/pyro-mcp")
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_absolute():
        return Path(runtime) / "pyro-mcp"
    return Path(f"/tmp/pyro-mcp-{os.geteuid()}")
