"""Guest kernels: build, fetch, find and verify them.

Two flavors, both cached under ``kernels_dir`` by a key over their inputs:

- ``source`` (default): Debian's pinned ``linux-source-6.1`` built with the project's
  config fragment; virtio built in, no modules, no initramfs; ELF ``vmlinux`` with a
  PVH entry. About 5 minutes to build at -j2; boots to userspace in under 2 s on TCG.
- ``cloud`` (fallback, no compiler needed): Debian's pinned cloud kernel package, its
  vmlinux cut out of the bzImage, plus an initramfs that loads the virtio modules.

``PYRO_KERNEL_FLAVOR`` picks the flavor when a caller does not.
"""

from __future__ import annotations

import os

from pyro_mcp.errors import InvalidArgument
from pyro_mcp.runtime import kernel_cloud, kernel_source
from pyro_mcp.runtime.kernel_artifact import (
    KERNEL_FLAVORS,
    KernelArtifact,
    Progress,
    installed_artifacts,
    quick_problems,
    quiet,
    verify_artifact,
)
from pyro_mcp.runtime.kernel_cloud import fetch_cloud_kernel
from pyro_mcp.runtime.kernel_source import build_source_kernel
from pyro_mcp.runtime.paths import RuntimePaths

__all__ = [
    "DEFAULT_KERNEL_FLAVOR",
    "FLAVOR_ENV",
    "KERNEL_FLAVORS",
    "KernelArtifact",
    "build_source_kernel",
    "default_flavor",
    "ensure_kernel",
    "fetch_cloud_kernel",
    "installed_kernel",
    "resolve_flavor",
    "verify_kernel",
]

DEFAULT_KERNEL_FLAVOR = "source"
FLAVOR_ENV = "PYRO_KERNEL_FLAVOR"


def default_flavor() -> str:
    """$PYRO_KERNEL_FLAVOR if set, else "source"; InvalidArgument if it names no flavor."""
    return resolve_flavor(None)


def resolve_flavor(flavor: str | None = None) -> str:
    """``flavor``, else $PYRO_KERNEL_FLAVOR, else the default; InvalidArgument if unknown."""
    chosen = flavor or os.environ.get(FLAVOR_ENV, "").strip() or DEFAULT_KERNEL_FLAVOR
    if chosen not in KERNEL_FLAVORS:
        source = "flavor" if flavor else FLAVOR_ENV
        raise InvalidArgument(
            f"unknown kernel flavor {chosen!r} (from {source})",
            hint=f"use one of: {', '.join(KERNEL_FLAVORS)}",
        )
    return chosen


def installed_kernel(paths: RuntimePaths, flavor: str) -> KernelArtifact | None:
    """The newest ``flavor`` kernel built from the current pins and recipe, or None.

    Cheap: reads metadata and checks file sizes, hashes nothing (see verify_kernel).
    """
    flavor = resolve_flavor(flavor)
    matches = (
        kernel_source.matches_current_recipe
        if flavor == "source"
        else kernel_cloud.matches_current_recipe
    )
    for meta, artifact in installed_artifacts(paths, flavor):
        if matches(meta) and not quick_problems(artifact):
            return artifact
    return None


def ensure_kernel(
    paths: RuntimePaths, flavor: str | None = None, *, progress: Progress = quiet
) -> KernelArtifact:
    """The kernel of ``flavor`` (default: $PYRO_KERNEL_FLAVOR or "source"), made if missing.

    An installed kernel at the pinned version is returned without touching apt; else the
    kernel is built (source, ~5 min) or fetched (cloud). Raises InvalidArgument (unknown
    flavor), HostToolMissing, BuildError, IntegrityError.
    """
    flavor = resolve_flavor(flavor)
    installed = installed_kernel(paths, flavor)
    if installed is not None and installed.pinned:
        return installed
    if flavor == "source":
        return build_source_kernel(paths, progress=progress)
    return fetch_cloud_kernel(paths, progress=progress)


def verify_kernel(artifact: KernelArtifact, *, deep: bool = True) -> list[str]:
    """Problems with ``artifact``; an empty list when all is well.

    Checks that every recorded file is present at its recorded size, that vmlinux is an
    x86-64 ELF with a PVH entry, that bzImage has the 'HdrS' header at 0x202 and that
    the initramfs is a cpio archive; ``deep`` (the default) also compares every sha256.
    """
    return verify_artifact(artifact, deep=deep)
