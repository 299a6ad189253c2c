"""Copy-on-write root disks over a read-only environment image."""

from __future__ import annotations

from pathlib import Path

from pyro_mcp.runtime.host_tools import run


def create_overlay(base: Path, overlay: Path) -> Path:
    """A qcow2 overlay at ``overlay`` whose reads fall through to the raw image ``base``.

    The base is never written: every guest write lands in the overlay.
    """
    overlay.parent.mkdir(parents=True, exist_ok=True)
    run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(overlay)],
        what="create root disk overlay",
    )
    return overlay


def copy_sparse(base: Path, dest: Path) -> Path:
    """A private writable copy of ``base`` (sparse; a reflink where the filesystem has them).

    Firecracker takes raw disks only, so its root disk is a copy rather than an overlay.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    run(
        ["cp", "--sparse=always", "--reflink=auto", str(base), str(dest)],
        what="copy root disk",
    )
    dest.chmod(0o600)
    return dest


def rebase_overlay(overlay: Path, base: Path) -> None:
    """Point the qcow2 ``overlay`` at ``base`` (a file with the same contents as its old
    base: only the header changes)."""
    run(
        [
            "qemu-img",
            "rebase",
            "-q",
            "-u",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            str(base),
            str(overlay),
        ],
        what="point the root disk at its image",
    )
