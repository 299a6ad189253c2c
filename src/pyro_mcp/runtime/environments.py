"""Environments: the catalog, the content-addressed image store and the manifests.

Layout under the cache dir (:class:`~pyro_mcp.runtime.paths.RuntimePaths`)::

    images/<sha256>.ext4          immutable images, named by their digest
    environments/<name>.json      one manifest per installed environment (written last)
    environments/.lock            held while a build or a prune runs
    rootfs-trees/<key>/           cached debootstrap trees (see rootfs.py)
    work/env-build-*              scratch space of a running build, pull or import
    downloads/oci/                blobs and sessions of registry transfers (oci/blobs.py)

An environment is *installed* when its manifest exists and names an image that is
present with the recorded size. A build writes the image first and the manifest last
(temp + fsync + rename), so an interrupted build is never listed as installed; what it
leaves behind (``env-build-*``, ``.partial-*``, ``.tmp-*``) is removed by the next build
or by :func:`prune`.

An environment comes from one of three sources, recorded as the manifest's ``source``:
``debootstrap`` (a catalog entry, or ``pyro env build NAME --from … --packages …``),
``registry`` (pulled as an OCI artifact, :mod:`pyro_mcp.runtime.oci.pull`) or ``import``
(any OCI image, :mod:`pyro_mcp.runtime.oci.importer`). Obtaining one, a registry pull or
a local build, is :mod:`pyro_mcp.runtime.env_obtain`'s.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyro_mcp.errors import (
    NotFound,
    RuntimeMissing,
    ToolFailed,
)
from pyro_mcp.runtime import env_image, rootfs
from pyro_mcp.runtime.digests import sha256_file
from pyro_mcp.runtime.jsonfile import write_json_atomic
from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.runtime.pins import ENVIRONMENTS, EnvironmentSpec

MANIFEST_SCHEMA = 1
BUILD_PREFIX = "env-build-"

Progress = Callable[[str], None]


def _quiet(message: str) -> None:
    return None


@dataclass(frozen=True)
class EnvironmentInfo:
    """One catalog row.

    ``stale`` is True when the installed image was built from another package set or
    other guest files than this pyro version uses; ``pull`` rebuilds it.
    """

    name: str
    description: str
    installed: bool
    image_sha256: str | None
    image_size: int | None
    image_path: Path | None
    built_at: str | None
    packages: tuple[str, ...]
    stale: bool = False
    source: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "description": self.description,
            "installed": self.installed,
            "image_sha256": self.image_sha256,
            "image_size": self.image_size,
            "image_path": str(self.image_path) if self.image_path else None,
            "built_at": self.built_at,
            "packages": list(self.packages),
            "stale": self.stale,
            "source": self.source,
        }


# --- catalog --------------------------------------------------------------------------


def catalog() -> tuple[EnvironmentSpec, ...]:
    return ENVIRONMENTS


def get_spec(name: str) -> EnvironmentSpec:
    for spec in ENVIRONMENTS:
        if spec.name == name:
            return spec
    raise unknown_environment(name)


def unknown_environment(name: str, extra: tuple[str, ...] = ()) -> NotFound:
    known = [spec.name for spec in ENVIRONMENTS] + [n for n in extra if n]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return NotFound(
        f"unknown environment {name!r}",
        hint=f"{hint}known environments: {', '.join(known)}",
    )


def safe_name(name: str) -> str:
    """The manifest file stem for an environment name (``debian:12`` -> ``debian_12``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


# --- manifests ------------------------------------------------------------------------


def manifest_path(paths: RuntimePaths, name: str) -> Path:
    return paths.environments_dir / f"{safe_name(name)}.json"


image_path = env_image.image_path
store_image = env_image.store_image


def read_manifest(paths: RuntimePaths, name: str) -> dict[str, Any] | None:
    """The manifest of ``name``, or None when it is missing, unreadable or not its own."""
    return _load(manifest_path(paths, name), name)


def _load(path: Path, name: str | None = None) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("image_sha256"), str):
        return None
    if name is not None and data.get("name") != name:
        return None
    return data


def _manifests(paths: RuntimePaths) -> list[tuple[Path, dict[str, Any] | None]]:
    if not paths.environments_dir.is_dir():
        return []
    return [
        (path, _load(path))
        for path in sorted(paths.environments_dir.glob("*.json"))
        if not path.name.startswith(".")
    ]


def _image_ok(paths: RuntimePaths, manifest: dict[str, Any]) -> Path | None:
    """The manifest's image if it is present with the recorded size (the cheap check)."""
    path = image_path(paths, manifest["image_sha256"])
    try:
        size = path.stat().st_size
    except OSError:
        return None
    return path if size == manifest.get("image_size") else None


def _current(spec: EnvironmentSpec, guest_digest: str) -> dict[str, str]:
    """What an up-to-date manifest of ``spec`` records (else the image is stale)."""
    return {
        "tree_key": rootfs.tree_key(spec.packages),
        "guest_files_digest": guest_digest,
        "image_revision": rootfs.IMAGE_REVISION,
    }


def info_of(
    paths: RuntimePaths, spec: EnvironmentSpec, guest_digest: str | None = None
) -> EnvironmentInfo:
    manifest = read_manifest(paths, spec.name)
    image = _image_ok(paths, manifest) if manifest else None
    if manifest is None or image is None:
        return EnvironmentInfo(
            spec.name, spec.description, False, None, None, None, None, spec.packages
        )
    digest = guest_digest or rootfs.guest_files_digest(rootfs.guest_files())
    current = _current(spec, digest)
    if was_imported(manifest):  # no package set: only the agent can be stale
        current = {k: v for k, v in current.items() if k != "tree_key"}
    stale = any(manifest.get(key) != value for key, value in current.items())
    return EnvironmentInfo(
        spec.name,
        spec.description,
        True,
        manifest["image_sha256"],
        manifest["image_size"],
        image,
        manifest.get("built_at"),
        spec.packages,
        stale,
        source_of(manifest),
    )


def source_of(manifest: dict[str, Any]) -> dict[str, Any]:
    source = manifest.get("source")
    if isinstance(source, dict):
        return source
    return {"kind": "debootstrap", "suite": manifest.get("suite"), "mirror": manifest.get("mirror")}


def was_imported(manifest: dict[str, Any]) -> bool:
    """True for an image made from an OCI image (imported here or pulled as such)."""
    return str(manifest.get("tree_key", "")).startswith("import:")


def spec_of(paths: RuntimePaths, name: str) -> EnvironmentSpec | None:
    """The catalog entry of ``name``, else one made from an installed custom environment's
    manifest (what it was built or imported from), else None."""
    spec = get_spec_or_none(name)
    if spec is not None:
        return spec
    manifest = read_manifest(paths, name)
    if manifest is None:
        return None
    packages = manifest.get("packages", ())
    return EnvironmentSpec(
        name,
        str(manifest.get("description", "")),
        tuple(p for p in packages if isinstance(p, str)),
    )


# --- public operations ----------------------------------------------------------------


def list_environments(paths: RuntimePaths) -> list[EnvironmentInfo]:
    """Every catalog environment, installed or not, then installed ones not in it."""
    digest = rootfs.guest_files_digest(rootfs.guest_files())
    rows = [info_of(paths, spec, digest) for spec in ENVIRONMENTS]
    names = {spec.name for spec in ENVIRONMENTS}
    for _path, manifest in _manifests(paths):
        if manifest is None or manifest.get("name") in names:
            continue
        spec = spec_of(paths, str(manifest.get("name")))
        if spec is not None:
            rows.append(info_of(paths, spec, digest))
    return rows


def list_one(paths: RuntimePaths, name: str) -> EnvironmentInfo:
    """The row of one environment (catalog or installed custom one)."""
    spec = spec_of(paths, name)
    if spec is None:
        raise unknown_environment(name)
    return info_of(paths, spec)


def inspect_environment(paths: RuntimePaths, name: str) -> dict[str, object]:
    """The full manifest plus ``installed`` (and a hint when it is not installed)."""
    spec = spec_of(paths, name)
    manifest = read_manifest(paths, name)
    if spec is None and manifest is None:
        raise unknown_environment(name)
    image = _image_ok(paths, manifest) if manifest else None
    if manifest is None or image is None:
        source: dict[str, Any] = manifest or {}
        if spec is not None:
            source = {"description": spec.description, "packages": spec.packages}
        result: dict[str, object] = {
            "name": name,
            "description": str(source.get("description", "")),
            "packages": list(source.get("packages", ())),
            "installed": False,
            "hint": f"run `pyro env pull {name}`",
        }
        if manifest is not None:
            result["problem"] = "the manifest exists but its image is missing or truncated"
        return result
    result = dict(manifest)
    result["installed"] = True
    result["image_path"] = str(image)
    if spec is not None:
        result["stale"] = info_of(paths, spec).stale
    return result


def verify_environment(paths: RuntimePaths, name: str, *, deep: bool = True) -> list[str]:
    """Problems with ``name``'s image (empty when it is sound): missing image, size or
    sha256 mismatch, e2fsck errors. ``deep=False`` checks presence and size only."""
    spec = get_spec_or_none(name)
    manifest = read_manifest(paths, name)
    if manifest is None:
        if spec is None:
            raise unknown_environment(name)
        if manifest_path(paths, name).exists():
            return [f"the manifest of {name} is unreadable (run `pyro env pull {name}`)"]
        return [f"{name} is not installed (run `pyro env pull {name}`)"]
    path = image_path(paths, manifest["image_sha256"])
    if not path.is_file():
        return [f"image missing: {path}"]
    problems = []
    size = path.stat().st_size
    if size != manifest.get("image_size"):
        expected = manifest.get("image_size")
        problems.append(f"size mismatch: {path} is {size} bytes, the manifest says {expected}")
    if not deep:
        return problems
    if not problems:
        actual = sha256_file(path)
        if actual != manifest["image_sha256"]:
            problems.append(f"sha256 mismatch: {path} hashes to {actual}")
    try:
        rootfs.check_ext4(path)
    except ToolFailed as exc:
        problems.append(f"e2fsck found errors in {path}: {exc.stderr_tail or exc.message}")
    return problems


def image_for(paths: RuntimePaths, name: str) -> Path:
    """The installed image of ``name`` (cheap check), or RuntimeMissing naming the fix."""
    manifest = read_manifest(paths, name)
    if manifest is None:
        if get_spec_or_none(name) is None:
            raise unknown_environment(name)
        raise RuntimeMissing(
            f"environment {name} is not installed", hint=f"run `pyro env pull {name}`"
        )
    image = _image_ok(paths, manifest)
    if image is None:
        raise RuntimeMissing(
            f"the image of environment {name} is missing or truncated",
            hint=f"run `pyro env pull {name}`",
        )
    return image


def prune(paths: RuntimePaths) -> dict[str, object]:
    """Remove unreferenced images, leftovers of interrupted builds, unreadable manifests,
    rootfs trees the current catalog does not use and .deb files no such tree holds."""
    removed: list[str] = []
    freed = 0

    def drop(path: Path) -> None:
        nonlocal freed
        freed += rootfs.remove_path(path)
        removed.append(str(path))

    if not paths.cache_dir.exists():
        return {"removed": removed, "bytes_freed": 0}
    paths.ensure()
    with build_lock(paths, _quiet):
        for path, size in remove_temps(paths):
            removed.append(str(path))
            freed += size
        referenced = set()
        for path, manifest in _manifests(paths):
            if manifest is None:
                drop(path)
            else:
                referenced.add(manifest["image_sha256"])
        for image in sorted(paths.images_dir.iterdir()):
            if not (image.suffix == ".ext4" and image.stem in referenced):
                drop(image)
        keys = {rootfs.tree_key(spec.packages) for spec in ENVIRONMENTS}
        kept: dict[str, str] = {}
        for entry in sorted(paths.rootfs_trees_dir.iterdir()):
            meta = _load_meta(entry) if entry.name in keys else None
            if meta is None:
                drop(entry)
            else:
                kept.update(meta.get("installed", {}))
        for path in _oci_leftovers(paths, referenced):
            drop(path)
        debs = rootfs.deb_cache_dir(paths)
        if debs.is_dir():
            wanted = {_deb_prefix(name, version) for name, version in kept.items()}
            for deb in sorted(debs.glob("*.deb")):
                if not any(deb.name.startswith(prefix) for prefix in wanted):
                    drop(deb)
    return {"removed": removed, "bytes_freed": freed}


def write_manifest(paths: RuntimePaths, name: str, manifest: dict[str, Any]) -> None:
    """Install an environment: its manifest, written last (atomically, synced)."""
    write_json_atomic(manifest_path(paths, name), manifest)
    manifest_path(paths, name).chmod(0o644)  # mkstemp made it 0600
    rootfs.fsync_dir(paths.environments_dir)


@contextlib.contextmanager
def build_lock(paths: RuntimePaths, progress: Progress) -> Iterator[None]:
    """One build or prune at a time per cache dir (flock; released if the process dies)."""
    paths.environments_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.environments_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress("waiting for another environment build or prune to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remove_temps(paths: RuntimePaths) -> list[tuple[Path, int]]:
    """Leftovers of interrupted builds. Only called with the build lock held, so nothing
    matching is in use."""
    patterns = (
        (paths.work_dir, f"{BUILD_PREFIX}*"),
        (paths.rootfs_trees_dir, ".partial-*"),
        (paths.images_dir, ".tmp-*"),
        (paths.environments_dir, ".*.tmp*"),  # jsonfile's temp names
    )
    removed = []
    for directory, pattern in patterns:
        if directory.is_dir():
            for path in sorted(directory.glob(pattern)):
                removed.append((path, rootfs.remove_path(path)))
    return removed


def get_spec_or_none(name: str) -> EnvironmentSpec | None:
    try:
        return get_spec(name)
    except NotFound:
        return None


def _oci_leftovers(paths: RuntimePaths, images: set[str]) -> list[Path]:
    """Everything under downloads/oci but the zstd blobs of installed images (kept so a
    publish needs no new compression): layer caches, partial downloads, upload sessions."""
    oci = paths.downloads_dir / "oci"
    if not oci.is_dir():
        return []
    keep: set[Path] = set()
    for record in sorted((oci / "compressed").glob("*.json")):
        data = _load_json(record)
        if record.stem in images and isinstance(data, dict) and isinstance(data.get("digest"), str):
            keep |= {record, oci / "blobs" / "sha256" / data["digest"].removeprefix("sha256:")}
    found = [p for p in sorted(oci.rglob("*")) if p.is_file() or p.is_symlink()]
    return [p for p in found if p not in keep and p.name != "locations.json"]


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _load_meta(entry: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and (entry / "tree").is_dir() else None


def _deb_prefix(name: str, version: str) -> str:
    return f"{name.split(':')[0]}_{version.replace(':', '%3a')}_"
