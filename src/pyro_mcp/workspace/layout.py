"""Where a workspace keeps its files on the host.

``<state_dir>/workspaces/<id>/``:

- ``base.ext4``: a hard link to the environment image the root disk is layered on, so
  ``pyro env prune`` can never pull the ground from under a workspace;
- ``root.qcow2`` (QEMU) or ``root.ext4`` (Firecracker): the root disk, copy-on-write;
- ``workspace.ext4``: the disk mounted at ``/workspace``;
- ``blobs/``: the contents of its baseline and checkpoints, by sha256 (never shared with
  another workspace: a guest can only ever reach what its own workspace stored);
- ``creating.owner``: while a create is in progress, which process runs it.

The store is ``<state_dir>/store.sqlite3``. (``<state_dir>/blobs``, the shared store of
earlier versions, is split into the workspaces' own stores when found.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StateLayout:
    state_dir: Path

    @property
    def store_path(self) -> Path:
        return self.state_dir / "store.sqlite3"

    @property
    def blobs_dir(self) -> Path:
        """The shared blob store of earlier versions (see :meth:`Workspaces.blobs`)."""
        return self.state_dir / "blobs"

    @property
    def workspaces_dir(self) -> Path:
        return self.state_dir / "workspaces"

    def workspace(self, workspace_id: str) -> WorkspaceFiles:
        return WorkspaceFiles(self.workspaces_dir / workspace_id)


@dataclass(frozen=True)
class WorkspaceFiles:
    directory: Path

    @property
    def base_image(self) -> Path:
        return self.directory / "base.ext4"

    def root_disk(self, backend: str) -> Path:
        return self.directory / ("root.ext4" if backend == "firecracker" else "root.qcow2")

    @property
    def workspace_disk(self) -> Path:
        return self.directory / "workspace.ext4"

    @property
    def blobs_dir(self) -> Path:
        """This workspace's own blob store (contents of its baseline and checkpoints)."""
        return self.directory / "blobs"

    def link_base(self, image: Path) -> Path:
        """Hard-link (or, across filesystems, copy) the environment image into place."""
        import shutil

        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.base_image.exists():
            try:
                os.link(image, self.base_image)
            except OSError:
                shutil.copy2(image, self.base_image)
        return self.base_image

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.directory, ignore_errors=True)
