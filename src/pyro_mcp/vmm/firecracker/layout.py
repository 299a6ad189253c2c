"""Where one Firecracker process finds its files.

Firecracker is given only names relative to one directory: its chroot when jailed (see
:mod:`.jailer`), its working directory otherwise. The names are the same in both modes, and
a snapshot records them, so it restores into any other root that holds the same names:
another jail, or a plain directory.
"""

from __future__ import annotations

import contextlib
import shutil
from abc import ABC, abstractmethod
from pathlib import Path

from pyro_mcp.errors import VMError

# The names inside a root. Drives are "drive0", "drive1"... in VMSpec order (root first).
KERNEL = "vmlinux"
INITRD = "initrd"
API_SOCKET = "api.sock"
VSOCK_SOCKET = "v.sock"
VMM_LOG = "vmm.log"
CONFIG_FILE = "vm-config.json"
SNAPSHOT_STATE = "snapshot.state"
SNAPSHOT_MEMORY = "snapshot.mem"
# Unix socket paths are limited to 108 bytes including the terminating NUL; Firecracker
# also binds "<vsock path>_<port>" for guest-initiated connections.
MAX_SOCKET_PATH = 96


def drive_name(index: int) -> str:
    return f"drive{index}"


class VMRoot(ABC):
    """The directory one Firecracker process sees its files in."""

    root: Path

    def host_path(self, name: str) -> Path:
        """Where ``name`` (as Firecracker sees it) lives on the host."""
        return self.root / name

    def check_socket_paths(self) -> None:
        longest = self.host_path(VSOCK_SOCKET + "_4294967295")
        if len(str(longest)) > MAX_SOCKET_PATH:
            raise VMError(
                f"path too long for Firecracker's Unix sockets: {longest}",
                hint="use a shorter run directory (PYRO_RUN_DIR)",
            )

    @abstractmethod
    def prepare(self) -> None:
        """Create the (empty) root directory; refuses one that already exists."""

    @abstractmethod
    def place(self, source: Path, name: str, *, writable: bool) -> None:
        """Make ``source`` reachable as ``name`` for the VMM (read-write when ``writable``)."""

    @abstractmethod
    def take(self, name: str, destination: Path) -> None:
        """Move a file the VMM wrote as ``name`` out of the root to ``destination``."""

    @abstractmethod
    def cleanup(self) -> None:
        """Remove the root and everything in it (the VMM must have exited)."""


class DirectRoot(VMRoot):
    """A plain directory used as Firecracker's working directory (no jailer)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def prepare(self) -> None:
        self.check_socket_paths()
        try:
            self.root.mkdir(parents=True, mode=0o700)
        except FileExistsError as exc:
            raise VMError(
                f"{self.root} already exists: a VM with this id runs or was not cleaned up"
            ) from exc

    def place(self, source: Path, name: str, *, writable: bool) -> None:
        del writable  # the VMM runs as us: the file's own permissions apply
        target = self.host_path(name)
        target.unlink(missing_ok=True)
        target.symlink_to(source.absolute())

    def take(self, name: str, destination: Path) -> None:
        shutil.move(self.host_path(name), destination)

    def cleanup(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.root)
