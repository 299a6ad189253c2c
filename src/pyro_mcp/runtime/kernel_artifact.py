"""Guest kernels in the cache: the artifact type, its metadata, checks and installation.

Layout: ``kernels_dir/<flavor>-<key[:16]>/`` holds the kernel files and ``kernel.json``.
A directory only ever appears there by an atomic rename of a complete staging directory
from ``work_dir``, so an interrupted build leaves nothing in ``kernels_dir`` at all;
the next build removes its leftovers from ``work_dir``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyro_mcp.errors import BuildError, IntegrityError
from pyro_mcp.runtime.digests import sha256_file
from pyro_mcp.runtime.kernel_images import (
    bzimage_problems,
    initramfs_problems,
    mapped,
    vmlinux_problems,
)
from pyro_mcp.runtime.paths import RuntimePaths

Progress = Callable[[str], None]

METADATA_NAME = "kernel.json"
METADATA_SCHEMA = 1
KERNEL_FLAVORS = ("source", "cloud")

# The cloud kernel's drivers are modules: its initramfs (/init) loads them and mounts
# the root disk named by root=. Naming rdinit keeps that explicit whatever the caller adds.
CLOUD_BOOT_ARGS = ("rdinit=/init",)


def quiet(message: str) -> None:
    del message


@dataclass(frozen=True)
class KernelArtifact:
    """A guest kernel in the cache, as recorded by its ``kernel.json``."""

    flavor: str  # "source" | "cloud"
    package: str  # the Debian package it came from
    version: str  # resolved Debian package version
    pinned: bool  # resolved version == the version pinned in pins.py
    key: str  # full cache key (sha256 hex)
    directory: Path
    vmlinux: Path  # uncompressed ELF with a PVH entry note
    bzimage: Path
    initramfs: Path | None  # cloud only: loads the virtio modules, mounts root=
    files: dict[str, dict[str, Any]]  # file name -> {"sha256": ..., "size": ...}
    release: str  # the guest's `uname -r`
    build_seconds: float

    def to_dict(self) -> dict[str, object]:
        return {
            "flavor": self.flavor,
            "package": self.package,
            "version": self.version,
            "pinned": self.pinned,
            "key": self.key,
            "directory": str(self.directory),
            "vmlinux": str(self.vmlinux),
            "bzimage": str(self.bzimage),
            "initramfs": str(self.initramfs) if self.initramfs else None,
            "files": {name: dict(info) for name, info in self.files.items()},
            "release": self.release,
            "build_seconds": self.build_seconds,
            "boot_args": self.boot_args(),
        }

    def boot_args(self) -> list[str]:
        """Kernel command-line arguments this flavor needs besides root=/init=/console=."""
        return list(CLOUD_BOOT_ARGS) if self.flavor == "cloud" else []


def artifact_dir(paths: RuntimePaths, flavor: str, key: str) -> Path:
    return paths.kernels_dir / f"{flavor}-{key[:16]}"


def read_metadata(directory: Path) -> dict[str, Any] | None:
    """The parsed ``kernel.json`` of ``directory``, or None if absent or unreadable."""
    try:
        data = json.loads((directory / METADATA_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def artifact_from_metadata(directory: Path, meta: dict[str, Any]) -> KernelArtifact:
    """Build the artifact a ``kernel.json`` describes; IntegrityError if malformed."""
    try:
        files = meta["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not an object")
        initramfs = meta.get("initramfs")
        artifact = KernelArtifact(
            flavor=str(meta["flavor"]),
            package=str(meta["package"]),
            version=str(meta["version"]),
            pinned=bool(meta["pinned"]),
            key=str(meta["key"]),
            directory=directory,
            vmlinux=directory / str(meta["vmlinux"]),
            bzimage=directory / str(meta["bzimage"]),
            initramfs=directory / str(initramfs) if initramfs else None,
            files={str(name): dict(info) for name, info in files.items()},
            release=str(meta["release"]),
            build_seconds=float(meta["build_seconds"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(
            f"kernel metadata in {directory} is malformed: {exc}",
            hint=f"delete {directory} and build the kernel again",
        ) from exc
    if directory.name != f"{artifact.flavor}-{artifact.key[:16]}":
        raise IntegrityError(
            f"kernel directory {directory.name} does not match its key {artifact.key[:16]}",
            hint=f"delete {directory} and build the kernel again",
        )
    return artifact


def quick_problems(artifact: KernelArtifact) -> list[str]:
    """Cheap checks (no hashing): every recorded file is present at its recorded size."""
    problems = []
    for name, info in sorted(artifact.files.items()):
        path = artifact.directory / name
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"{name}: missing")
            continue
        if size != info.get("size"):
            problems.append(f"{name}: size {size}, recorded {info.get('size')}")
    for role, path in (("vmlinux", artifact.vmlinux), ("bzImage", artifact.bzimage)):
        if path.name not in artifact.files:
            problems.append(f"{role} file {path.name} is not recorded in the metadata")
    if artifact.initramfs is not None and artifact.initramfs.name not in artifact.files:
        problems.append(f"initramfs {artifact.initramfs.name} is not recorded")
    return problems


def verify_artifact(artifact: KernelArtifact, *, deep: bool = True) -> list[str]:
    """Every problem with ``artifact``: missing files, wrong formats and, if ``deep``,
    sha256 mismatches."""
    problems = quick_problems(artifact)
    for name, info in sorted(artifact.files.items()):
        path = artifact.directory / name
        if not deep or not path.is_file():
            continue
        digest = sha256_file(path)
        if digest != info.get("sha256"):
            problems.append(f"{name}: sha256 {digest} differs from recorded {info.get('sha256')}")
    checks: list[tuple[Path, Callable[[Any], list[str]]]] = [
        (artifact.vmlinux, lambda data: vmlinux_problems(data, require_pvh=True)),
        (artifact.bzimage, bzimage_problems),
    ]
    if artifact.initramfs is not None:
        checks.append((artifact.initramfs, initramfs_problems))
    for path, check in checks:
        if not path.is_file():
            continue
        with mapped(path) as data:
            problems.extend(f"{path.name}: {problem}" for problem in check(data))
    return problems


def file_record(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def write_metadata(staging: Path, meta: dict[str, Any]) -> None:
    """Write ``kernel.json`` (last, after every file it describes) and flush to disk."""
    for name in meta["files"]:
        _fsync(staging / name)
    target = staging / METADATA_NAME
    target.write_text(
        json.dumps({"schema": METADATA_SCHEMA, **meta}, indent=2, sort_keys=True) + "\n"
    )
    _fsync(target)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def install_staged(staging: Path, target: Path) -> None:
    """Atomically move a complete staging directory to its final name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(staging, target)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise BuildError(
                f"{target} appeared while building",
                hint="another process installed the same kernel; retry to use it",
            ) from exc
        raise BuildError(
            f"cannot install the kernel into {target}: {exc}",
            hint="check that the cache directory is writable and on one file system",
        ) from exc
    _fsync(target.parent)


def discard(directory: Path, paths: RuntimePaths) -> None:
    """Remove a bad artifact: first rename it out of kernels_dir, then delete it."""
    paths.work_dir.mkdir(parents=True, exist_ok=True)
    trash = Path(tempfile.mkdtemp(prefix="kernel-trash-", dir=paths.work_dir))
    with suppress(FileNotFoundError):
        os.rename(directory, trash / directory.name)
    shutil.rmtree(trash, ignore_errors=True)


def cached_artifact(
    paths: RuntimePaths, flavor: str, key: str, progress: Progress
) -> KernelArtifact | None:
    """The verified artifact for ``key``, or None; a corrupt one is removed."""
    directory = artifact_dir(paths, flavor, key)
    if not directory.exists():
        return None
    meta = read_metadata(directory)
    problems: list[str]
    artifact = None
    if meta is None:
        problems = ["kernel.json missing or unreadable"]
    else:
        try:
            artifact = artifact_from_metadata(directory, meta)
        except IntegrityError as exc:
            problems = [exc.message]
        else:
            problems = verify_artifact(artifact)
            if artifact.key != key:
                problems.append("metadata key differs from the directory's key")
    if not problems and artifact is not None:
        return artifact
    progress(f"cached kernel {directory.name} is damaged ({'; '.join(problems)}); rebuilding")
    discard(directory, paths)
    return None


@contextmanager
def build_lock(paths: RuntimePaths, flavor: str, progress: Progress) -> Iterator[None]:
    """Serialize builds of one flavor across processes; clear a dead build's leftovers."""
    paths.work_dir.mkdir(parents=True, exist_ok=True)
    lock_path = paths.work_dir / f"kernel-{flavor}.lock"
    with lock_path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another {flavor} kernel build to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            for stale in paths.work_dir.glob(f"kernel-{flavor}-*"):
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
            for trash in paths.work_dir.glob("kernel-trash-*"):
                shutil.rmtree(trash, ignore_errors=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def scratch_dir(paths: RuntimePaths, flavor: str, key: str) -> Iterator[Path]:
    """A temporary build directory in work_dir, removed afterwards (even on Ctrl-C)."""
    paths.work_dir.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix=f"kernel-{flavor}-{key[:16]}-", dir=paths.work_dir))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def installed_artifacts(
    paths: RuntimePaths, flavor: str
) -> list[tuple[dict[str, Any], KernelArtifact]]:
    """(metadata, artifact) for every well-formed ``flavor`` kernel, newest first."""
    found = []
    if not paths.kernels_dir.is_dir():
        return []
    for directory in paths.kernels_dir.glob(f"{flavor}-*"):
        meta = read_metadata(directory)
        if meta is None or meta.get("flavor") != flavor:
            continue
        try:
            artifact = artifact_from_metadata(directory, meta)
        except IntegrityError:
            continue
        found.append((meta, artifact))
    found.sort(key=lambda item: float(item[0].get("created_at", 0.0)), reverse=True)
    return found


def now() -> float:
    return time.time()
