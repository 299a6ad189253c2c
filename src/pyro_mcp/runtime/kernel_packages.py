"""Debian packages the kernel builders start from: resolve a version, download, unpack.

Downloads go through ``apt-get download`` (apt checks them against the archive's signed
indexes) into a private directory, then are renamed into ``downloads_dir``, so a file
there is always complete. A pinned version that the archive no longer offers falls back
to the candidate version; the result records both so the metadata can say so.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from pyro_mcp.errors import BuildError, ToolFailed
from pyro_mcp.runtime.host_tools import run

Progress = Callable[[str], None]

_APT_HINT = (
    "run `apt-get update` so apt knows the Debian bookworm and bookworm-security "
    "archives, then retry"
)


@dataclass(frozen=True)
class ResolvedPackage:
    """A Debian package at the version that will actually be used."""

    name: str
    version: str
    wanted: str | None  # the pinned version, None when the package is not pinned
    filename: str  # the .deb name apt uses (epoch ':' written as %3a)

    @property
    def pinned(self) -> bool:
        return self.wanted is not None and self.version == self.wanted

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "version": self.version,
            "wanted": self.wanted,
            "pinned": self.pinned,
        }


def _deb_filename(name: str, version: str, arch: str) -> str:
    return f"{name}_{version.replace(':', '%3a')}_{arch}.deb"


def _cached_deb(downloads_dir: Path, name: str, version: str) -> Path | None:
    for arch in ("all", "amd64"):
        candidate = downloads_dir / _deb_filename(name, version, arch)
        if candidate.is_file():
            return candidate
    return None


def _print_uri(spec: str) -> tuple[str, str] | None:
    """(filename, version) apt would download for ``spec``, or None if it has none."""
    try:
        result = run(
            ["apt-get", "download", "--print-uris", "-q", spec],
            what=f"look up {spec} in the apt lists",
        )
    except ToolFailed:
        return None
    for line in result.stdout.decode("utf-8", "replace").splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].startswith("'") and fields[1].endswith(".deb"):
            filename = fields[1]
            parts = unquote(filename).split("_")
            if len(parts) == 3:
                return filename, parts[1]
    return None


def resolve_package(name: str, wanted: str | None, downloads_dir: Path) -> ResolvedPackage:
    """The version of ``name`` to use: ``wanted`` if available, else apt's candidate.

    A .deb already in ``downloads_dir`` for the wanted version counts as available, so
    a host that downloaded once can rebuild offline.
    """
    if wanted is not None:
        cached = _cached_deb(downloads_dir, name, wanted)
        if cached is not None:
            return ResolvedPackage(name, wanted, wanted, cached.name)
        found = _print_uri(f"{name}={wanted}")
        if found is not None:
            return ResolvedPackage(name, found[1], wanted, found[0])
    found = _print_uri(name)
    if found is None:
        raise BuildError(f"Debian package {name!r} is not in the apt lists", hint=_APT_HINT)
    return ResolvedPackage(name, found[1], wanted, found[0])


def download_package(package: ResolvedPackage, downloads_dir: Path, progress: Progress) -> Path:
    """The .deb for ``package`` in ``downloads_dir``, downloading it if needed."""
    target = downloads_dir / package.filename
    if target.is_file():
        return target
    progress(f"downloading {package.name} {package.version}")
    downloads_dir.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".partial-{package.name}-", dir=downloads_dir))
    try:
        try:
            run(
                ["apt-get", "download", "-q", f"{package.name}={package.version}"],
                what=f"download {package.name} {package.version}",
                cwd=partial,
            )
        except ToolFailed as exc:
            raise BuildError(
                f"cannot download {package.name} {package.version}: {exc.message}",
                hint="check network access to deb.debian.org, or " + _APT_HINT,
            ) from exc
        debs = sorted(partial.glob(f"{package.name}_*.deb"))
        if len(debs) != 1:
            raise BuildError(
                f"apt-get download left {len(debs)} .deb files for {package.name}",
                hint="remove the partial download directory and retry",
            )
        got = deb_field(debs[0], "Version")
        if got != package.version:
            raise BuildError(
                f"downloaded {package.name} is version {got}, expected {package.version}",
                hint=_APT_HINT,
            )
        os.replace(debs[0], target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def deb_field(deb: Path, field: str) -> str:
    """One control field of a .deb (``Version``, ``Package``)."""
    result = run(["dpkg-deb", "-f", str(deb), field], what=f"read {field} of {deb.name}")
    return result.stdout.decode().strip()


def unpack_deb(deb: Path, destination: Path) -> None:
    """Extract the files of a .deb into ``destination`` (no maintainer scripts run)."""
    destination.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "-x", str(deb), str(destination)], what=f"unpack {deb.name}")
