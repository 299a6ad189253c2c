"""The fallback guest kernel: Debian's packaged cloud kernel plus a small initramfs.

The package is downloaded and unpacked, never installed. Its ``/boot/vmlinuz-*`` is the
bzImage (QEMU); the uncompressed ELF ``vmlinux`` (Firecracker, QEMU PVH) is cut out of
it: the payload is an LZ4 legacy stream that the ``lz4`` program decompresses. The
virtio drivers are modules, loaded by the initramfs that ``initramfs.py`` builds.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from pyro_mcp.errors import BuildError, ToolFailed
from pyro_mcp.runtime.digests import sha256_json
from pyro_mcp.runtime.host_tools import require, run
from pyro_mcp.runtime.initramfs import BUSYBOX_APPLETS, INIT_SCRIPT, WANTED_MODULES, build_initramfs
from pyro_mcp.runtime.kernel_artifact import (
    KernelArtifact,
    Progress,
    artifact_dir,
    artifact_from_metadata,
    build_lock,
    cached_artifact,
    file_record,
    install_staged,
    now,
    quiet,
    scratch_dir,
    verify_artifact,
    write_metadata,
)
from pyro_mcp.runtime.kernel_images import (
    bzimage_problems,
    elf_file_end,
    elf_header_problems,
    lz4_legacy_streams,
)
from pyro_mcp.runtime.kernel_packages import (
    ResolvedPackage,
    download_package,
    resolve_package,
    unpack_deb,
)
from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.runtime.pins import CLOUD_KERNEL_PACKAGE, CLOUD_KERNEL_VERSION

# Bump when the steps change in a way that changes the output.
CLOUD_BUILDER_REVISION = 1

# The initramfs's /init is a busybox script; Debian's static busybox runs it.
BUSYBOX_PACKAGE = "busybox-static"


def cloud_recipe_sha256() -> str:
    """Digest of how the initramfs is made (script, module list, applets)."""
    return sha256_json(
        {
            "init": INIT_SCRIPT,
            "modules": list(WANTED_MODULES),
            "applets": list(BUSYBOX_APPLETS),
        }
    )


def cloud_cache_key(kernel: ResolvedPackage, busybox: ResolvedPackage) -> str:
    """The cache key of a cloud kernel: both packages' versions and the recipe."""
    return sha256_json(
        {
            "flavor": "cloud",
            "package": kernel.name,
            "version": kernel.version,
            "busybox": [busybox.name, busybox.version],
            "recipe_sha256": cloud_recipe_sha256(),
            "builder": CLOUD_BUILDER_REVISION,
        }
    )


def matches_current_recipe(meta: dict[str, Any]) -> bool:
    """True if a cloud kernel's metadata was made from today's pins and recipe."""
    return (
        meta.get("package") == CLOUD_KERNEL_PACKAGE
        and meta.get("wanted_version") == CLOUD_KERNEL_VERSION
        and meta.get("builder_revision") == CLOUD_BUILDER_REVISION
        and meta.get("recipe_sha256") == cloud_recipe_sha256()
    )


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage whose payload is LZ4-compressed."""
    problems = bzimage_problems(bzimage)
    if problems:
        raise BuildError("; ".join(problems), hint="the cloud kernel package looks damaged")
    for start, end in lz4_legacy_streams(bzimage):
        try:
            result = run(
                ["lz4", "-d", "-c"],
                what="decompress the cloud kernel",
                input_bytes=bzimage[start:end],
            )
        except ToolFailed:
            continue  # magic bytes by chance, not a stream: try the next one
        data = result.stdout
        if elf_header_problems(data):
            continue
        return data[: elf_file_end(data)]
    raise BuildError(
        "found no LZ4-compressed ELF kernel inside the bzImage",
        hint="the pinned cloud kernel is no longer LZ4-compressed; update kernel_cloud.py",
    )


def _single(paths: list[Path], what: str) -> Path:
    if len(paths) != 1:
        raise BuildError(
            f"expected one {what} in the package, found {len(paths)}",
            hint=f"check CLOUD_KERNEL_PACKAGE in pins.py ({CLOUD_KERNEL_PACKAGE})",
        )
    return paths[0]


def fetch_cloud_kernel(paths: RuntimePaths, *, progress: Progress = quiet) -> KernelArtifact:
    """Fetch (or return the cached) Debian cloud kernel, its vmlinux and an initramfs.

    Raises HostToolMissing (install the named package) or BuildError (names the step).
    """
    started = time.monotonic()
    paths.ensure()
    progress(f"resolving {CLOUD_KERNEL_PACKAGE} {CLOUD_KERNEL_VERSION}")
    kernel = resolve_package(CLOUD_KERNEL_PACKAGE, CLOUD_KERNEL_VERSION, paths.downloads_dir)
    if not kernel.pinned:
        progress(
            f"{CLOUD_KERNEL_PACKAGE} {CLOUD_KERNEL_VERSION} is not available; "
            f"using {kernel.version}"
        )
    busybox = resolve_package(BUSYBOX_PACKAGE, None, paths.downloads_dir)
    key = cloud_cache_key(kernel, busybox)
    with build_lock(paths, "cloud", progress):
        cached = cached_artifact(paths, "cloud", key, progress)
        if cached is not None:
            return cached
        for program in ("lz4", "dpkg-deb", "apt-get"):
            require(program)
        kernel_deb = download_package(kernel, paths.downloads_dir, progress)
        busybox_deb = download_package(busybox, paths.downloads_dir, progress)
        with scratch_dir(paths, "cloud", key) as scratch:
            progress(f"unpacking {kernel_deb.name}")
            unpack_deb(kernel_deb, scratch / "kernel")
            unpack_deb(busybox_deb, scratch / "busybox")
            vmlinuz = _single(sorted((scratch / "kernel/boot").glob("vmlinuz-*")), "vmlinuz")
            config = _single(sorted((scratch / "kernel/boot").glob("config-*")), "config")
            release = vmlinuz.name.removeprefix("vmlinuz-")
            module_root = scratch / "kernel/lib/modules" / release
            if not module_root.is_dir():
                raise BuildError(
                    f"{kernel_deb.name} has no modules for {release}",
                    hint=f"check CLOUD_KERNEL_PACKAGE in pins.py ({CLOUD_KERNEL_PACKAGE})",
                )
            busybox_bin = scratch / "busybox/bin/busybox"
            if not busybox_bin.is_file():
                raise BuildError(
                    f"{busybox_deb.name} has no bin/busybox",
                    hint=f"delete {busybox_deb} so it is downloaded again",
                )

            target = artifact_dir(paths, "cloud", key)
            staging = scratch / target.name
            staging.mkdir()
            progress("extracting vmlinux from the bzImage")
            shutil.copyfile(vmlinuz, staging / "bzImage")
            (staging / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
            shutil.copyfile(config, staging / "config")
            progress("building the initramfs")
            modules = build_initramfs(busybox_bin, module_root, staging / "initramfs.cpio")
            names = ("vmlinux", "bzImage", "initramfs.cpio", "config")
            meta: dict[str, Any] = {
                "flavor": "cloud",
                "package": kernel.name,
                "version": kernel.version,
                "wanted_version": kernel.wanted,
                "pinned": kernel.pinned,
                "key": key,
                "builder_revision": CLOUD_BUILDER_REVISION,
                "recipe_sha256": cloud_recipe_sha256(),
                "busybox": busybox.to_dict(),
                "modules": modules,
                "release": release,
                "build_seconds": round(time.monotonic() - started, 3),
                "created_at": now(),
                "vmlinux": "vmlinux",
                "bzimage": "bzImage",
                "initramfs": "initramfs.cpio",
                "config": "config",
                "files": {name: file_record(staging / name) for name in names},
            }
            write_metadata(staging, meta)
            problems = verify_artifact(artifact_from_metadata(staging, meta))
            if problems:
                raise BuildError(
                    "the cloud kernel failed its checks: " + "; ".join(problems),
                    hint="the pinned package may have changed format; report this",
                )
            install_staged(staging, target)
    progress(f"fetched {target.name} ({release}) in {time.monotonic() - started:.0f} s")
    return artifact_from_metadata(target, meta)
