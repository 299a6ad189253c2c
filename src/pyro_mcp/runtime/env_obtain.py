"""Obtaining an environment: a pull of its OCI artifact from a registry, or a local
debootstrap build (a catalog entry, or ``pyro env build NAME --from BASE --packages …``).

The catalog, the image store and the manifests this installs into are
:mod:`pyro_mcp.runtime.environments`; a build holds its build lock, writes the image
first and the manifest last.
"""

from __future__ import annotations

import errno
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from pyro_mcp.errors import BuildError, InvalidArgument, RegistryUnreachable
from pyro_mcp.runtime import env_image, rootfs
from pyro_mcp.runtime.digests import sha256_json
from pyro_mcp.runtime.environments import (
    BUILD_PREFIX,
    MANIFEST_SCHEMA,
    EnvironmentInfo,
    Progress,
    build_lock,
    get_spec,
    get_spec_or_none,
    info_of,
    read_manifest,
    remove_temps,
    safe_name,
    source_of,
    spec_of,
    unknown_environment,
    was_imported,
    write_manifest,
)
from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.runtime.pins import DEBIAN_MIRROR, DEBIAN_SUITE, EnvironmentSpec


def _quiet(_message: str) -> None:
    return None


def pull_environment(
    paths: RuntimePaths, name: str, *, progress: Progress = _quiet, force: bool = False
) -> EnvironmentInfo:
    """:func:`obtain` without its report."""
    return obtain(paths, name, progress=progress, force=force)[0]


def obtain(
    paths: RuntimePaths,
    name: str,
    *,
    progress: Progress = _quiet,
    force: bool = False,
    build: bool = False,
    registry: str | None = None,
    insecure: bool = False,
) -> tuple[EnvironmentInfo, dict[str, Any]]:
    """Make ``name`` installed: (its row, how it was obtained this time).

    Returns at once when it is installed and current. Otherwise, when a registry is
    configured (``registry``, the catalog entry's own source, else ``$PYRO_REGISTRY``),
    pulls the artifact from it; when none is, when it cannot be reached, or when its
    artifact carries another guest agent, builds locally and says why (a catalog entry or
    a custom build only: an imported environment can only come from a registry). ``build``
    skips the registry; ``force`` rebuilds even a current one, debootstrap included.
    Only the cheap check (image present with its recorded size) is done for an installed
    one; the full digest and e2fsck are :func:`verify_environment`'s job.
    """
    spec = spec_of(paths, name)
    ref = _registry_ref(name, spec, registry)
    if spec is None and ref is None:
        raise unknown_environment(name)
    paths.ensure()
    if spec is not None and not force:
        info = info_of(paths, spec)
        if info.installed and not info.stale:
            return info, {"kind": "installed"}
    with build_lock(paths, progress):
        if spec is not None and not force:  # another process may have built it meanwhile
            info = info_of(paths, spec)
            if info.installed and not info.stale:
                return info, {"kind": "installed"}
        remove_temps(paths)
        report = _pull_or_build(paths, name, spec, ref, progress, force, build, insecure)
    final = spec_of(paths, name)
    assert final is not None  # installed just now
    return info_of(paths, final), report


def _registry_ref(name: str, spec: EnvironmentSpec | None, registry: str | None) -> Any:
    from pyro_mcp.runtime.oci import reference

    if registry:
        return reference.environment_reference(name, registry)
    if spec is not None and spec.source:
        return reference.parse_reference(spec.source, what=f"the catalog source of {name}")
    base = reference.configured_registry()
    return reference.environment_reference(name, base) if base else None


def _pull_or_build(
    paths: RuntimePaths,
    name: str,
    spec: EnvironmentSpec | None,
    ref: Any,
    progress: Progress,
    force: bool,
    build: bool,
    insecure: bool,
) -> dict[str, Any]:
    from pyro_mcp.runtime.oci.pull import OtherAgent, pull_artifact

    manifest = read_manifest(paths, name)
    buildable = spec is not None and (manifest is None or not was_imported(manifest))
    why = "--build asked for a local build"
    if not build and ref is not None:
        try:
            expect = rootfs.tree_key(spec.packages) if buildable and spec else None
            return pull_artifact(
                paths, name, ref, progress=progress, insecure=insecure, expect_tree_key=expect
            )
        except (RegistryUnreachable, OtherAgent) as exc:
            if not buildable:
                raise
            why = exc.message
    elif not build:
        why = "no registry is configured (PYRO_REGISTRY)"
    if not buildable or spec is None:
        raise InvalidArgument(
            f"{name} was imported from an OCI image and cannot be built locally",
            hint=f"import it again with `pyro env import {name} --from …`",
        )
    progress(f"{why}; building {name} locally")
    started = time.monotonic()
    _build(
        paths, spec, progress, fresh_tree=force, source=source_of(manifest) if manifest else None
    )
    return {"kind": "debootstrap", "why": why, "seconds": round(time.monotonic() - started, 1)}


def build_custom(
    paths: RuntimePaths,
    name: str,
    base: str,
    packages: list[str],
    *,
    progress: Progress = _quiet,
) -> EnvironmentInfo:
    """``pyro env build NAME --from BASE --packages …``: a Debian environment with the
    catalog entry ``base``'s packages plus ``packages`` (debootstrap, like the catalog's)."""
    check_name(name)
    if get_spec_or_none(name) is not None:
        raise InvalidArgument(f"{name} is a catalog environment; choose another name")
    parent = get_spec(base)
    extra = sorted({check_package(p) for p in packages})
    if not extra:
        raise InvalidArgument("--packages names no package", hint="e.g. --packages curl,jq")
    spec = EnvironmentSpec(
        name,
        f"{parent.description}; plus {', '.join(extra)}",
        tuple(sorted(set(parent.packages) | set(extra))),
    )
    paths.ensure()
    with build_lock(paths, progress):
        remove_temps(paths)
        source = {"kind": "debootstrap", "from": base, "extra_packages": extra}
        _build(paths, spec, progress, source=source)
    return info_of(paths, spec)


_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,63})?$")
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]{0,99}$")


def check_name(name: str) -> str:
    """A name a custom environment may have (``repository[:tag]``, registry-safe)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidArgument(
            f"{name!r} is not a valid environment name",
            hint="lowercase letters, digits and . _ - with an optional :tag, e.g. myteam:1",
        )
    return name


def check_package(package: str) -> str:
    if not isinstance(package, str) or not _PACKAGE.match(package):
        raise InvalidArgument(f"{package!r} is not a Debian package name")
    return package


def _build(
    paths: RuntimePaths,
    spec: EnvironmentSpec,
    progress: Progress,
    *,
    fresh_tree: bool = False,
    source: dict[str, Any] | None = None,
) -> None:
    started = time.monotonic()
    files = rootfs.guest_files()
    guest_digest = rootfs.guest_files_digest(files)
    needed: int | None = rootfs.DEBOOTSTRAP_SPACE_HINT  # for the out-of-space message
    try:
        tree = rootfs.ensure_tree(paths, spec.packages, progress, force=fresh_tree)
        work = Path(
            tempfile.mkdtemp(prefix=f"{BUILD_PREFIX}{safe_name(spec.name)}-", dir=paths.work_dir)
        )
        try:
            root = work / "root"
            progress("adding the guest init and agent")
            rootfs.stage_root(tree.path, root, files)
            seed = sha256_json(
                {"tree": tree.key, "guest": guest_digest, "image": rootfs.IMAGE_REVISION}
            )
            packed = env_image.pack_and_store(paths, root, work, seed, progress)
            needed = None
            manifest = {
                "schema": MANIFEST_SCHEMA,
                "name": spec.name,
                "description": spec.description,
                "packages": list(spec.packages),
                "guest_packages": list(rootfs.GUEST_PACKAGES),
                "installed_packages": tree.installed,
                **packed,
                "tree_key": tree.key,
                "tree_reused": tree.reused,
                "debootstrap_seconds": round(tree.seconds, 1),
                "guest_files_digest": guest_digest,
                "guest_files": [f.path for f in files],
                "builder_revision": rootfs.BUILDER_REVISION,
                "image_revision": rootfs.IMAGE_REVISION,
                "suite": DEBIAN_SUITE,
                "mirror": DEBIAN_MIRROR,
                "built_at": rootfs.utc_now(),
                "build_seconds": round(time.monotonic() - started, 1),
                "source": {
                    **(source or {}),
                    "kind": "debootstrap",
                    "suite": DEBIAN_SUITE,
                    "mirror": DEBIAN_MIRROR,
                },
            }
            write_manifest(paths, spec.name, manifest)
            size = packed["image_size"] // rootfs.MIB
            progress(f"{spec.name} installed: {packed['image_file']} ({size} MiB)")
        finally:
            rootfs.remove_path(work)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            where = Path(exc.filename).parent if exc.filename else paths.cache_dir
            raise rootfs.out_of_space(f"build {spec.name}", where, needed) from exc
        raise BuildError(f"building {spec.name} failed: {exc}") from exc
