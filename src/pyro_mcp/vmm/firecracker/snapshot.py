"""A full Firecracker snapshot on disk: the microVM state file, guest memory, a manifest.

Disks are not part of it: the VM restored from it is given its disks by its own VMSpec,
in the same order (the snapshot refers to them by name, ``drive0``...). A snapshot loads
only into the Firecracker release that wrote it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pyro_mcp.errors import NotFound

STATE_FILE = "vm.state"
MEMORY_FILE = "vm.mem"
MANIFEST_FILE = "snapshot.json"


@dataclass(frozen=True)
class Snapshot:
    """Where a snapshot lives and what it needs to be restored."""

    directory: Path
    """Holds ``vm.state``, ``vm.mem`` and ``snapshot.json``."""
    source_vm_id: str
    """The VM it was taken from."""
    firecracker_version: str
    """The Firecracker release that wrote it (the only one that can load it)."""
    vcpu_count: int
    mem_mib: int
    drive_count: int
    """How many disks the restored VM must be given (root first)."""
    created_ms: float = 0.0
    """How long creating it took, in milliseconds."""

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    @property
    def memory_path(self) -> Path:
        return self.directory / MEMORY_FILE

    def write_manifest(self) -> None:
        record = {k: v for k, v in asdict(self).items() if k != "directory"}
        (self.directory / MANIFEST_FILE).write_text(json.dumps(record, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> Snapshot:
        """The snapshot stored in ``directory``; NotFound when any of its files is missing."""
        try:
            record = json.loads((directory / MANIFEST_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise NotFound(f"no readable snapshot manifest in {directory}: {exc}") from exc
        snapshot = cls(directory=directory, **record)
        for path in (snapshot.state_path, snapshot.memory_path):
            if not path.is_file():
                raise NotFound(f"snapshot {directory} lacks {path.name}")
        return snapshot
