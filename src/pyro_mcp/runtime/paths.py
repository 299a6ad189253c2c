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
from dataclasses import dataclass, field
from pathlib import Path


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    if value and Path(value).is_absolute():
        return Path(value)
    return Path.home() / fallback


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


def cache_dir() -> Path:
    value = os.environ.get("PYRO_CACHE_DIR")
    if value:
        return Path(value).expanduser().resolve()
    return _xdg("XDG_CACHE_HOME", ".cache") / "pyro-mcp"


def state_dir() -> Path:
    value = os.environ.get("PYRO_STATE_DIR")
    if value:
        return Path(value).expanduser().resolve()
    return _xdg("XDG_STATE_HOME", ".local/state") / "pyro-mcp"


def key_dir() -> Path:
    value = os.environ.get("PYRO_KEY_DIR")
    if value:
        return Path(value).expanduser().resolve()
    return _xdg("XDG_CONFIG_HOME", ".config") / "pyro-mcp" / "keys"


def runtime_paths() -> RuntimePaths:
    """The runtime layout for the current environment variables."""
    return RuntimePaths(cache_dir(), run_dir())


def run_dir() -> Path:
    value = os.environ.get("PYRO_RUN_DIR")
    if value:
        return Path(value).expanduser().resolve()
    if os.geteuid() == 0 and os.access("/run", os.W_OK):
        return Path("/run/pyro-mcp")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_absolute():
        return Path(runtime) / "pyro-mcp"
    return Path(f"/tmp/pyro-mcp-{os.geteuid()}")
