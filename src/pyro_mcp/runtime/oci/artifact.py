"""What a pyro environment looks like as an OCI artifact.

An OCI image manifest (``artifactType`` :data:`ARTIFACT_TYPE`) with

- a config blob (:data:`CONFIG_TYPE`, canonical JSON): the environment's name, package
  list, image digest and size, the guest agent's digest and pyro version, a reference to
  the kernel it was proven with (flavor, cache key, release: the kernel itself is built
  on each host from the same pins), and the capabilities proven on the publishing host,
  each with the artifact digests its check ran against;
- one layer (:data:`ROOTFS_TYPE`): the ext4 image, zstd-compressed.

The config's bytes depend only on the environment, so publishing it again gives the same
digests and moves no bytes. Everything in a pulled config is checked by
:func:`check_config` before a byte of the image is fetched.
"""

from __future__ import annotations

import re
from typing import Any

from pyro_mcp import __version__
from pyro_mcp.errors import IntegrityError
from pyro_mcp.runtime.lock import CAPABILITIES
from pyro_mcp.runtime.oci.reference import check_digest

ARTIFACT_TYPE = "application/vnd.pyro-mcp.environment.v1"
CONFIG_TYPE = "application/vnd.pyro-mcp.environment.config.v1+json"
ROOTFS_TYPE = "application/vnd.pyro-mcp.environment.rootfs.v1.ext4+zstd"
CONFIG_SCHEMA = 1
CONFIG_MAX_BYTES = 1 << 20
IMAGE_MAX_BYTES = 64 << 30
_SHA_HEX = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")

# The manifest fields an installed environment's manifest shares with its artifact.
CARRIED = (
    "name",
    "description",
    "packages",
    "guest_packages",
    "installed_packages",
    "tree_key",
    "guest_files_digest",
    "guest_files",
    "image_revision",
    "builder_revision",
    "mke2fs_options",
    "suite",
    "mirror",
    "built_at",
    "build_seconds",
    "debootstrap_seconds",
    "source",
)


def make_config(
    manifest: dict[str, Any], kernel: dict[str, Any], proven: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The config blob of an installed environment (``manifest``) and its proofs."""
    carried = {key: manifest[key] for key in CARRIED if key in manifest}
    if isinstance(carried.get("source"), dict) and carried["source"].get("kind") == "registry":
        carried.pop("source")  # where we pulled it from is not part of what it is
    return {
        "schema": CONFIG_SCHEMA,
        **carried,
        "image": {"sha256": manifest["image_sha256"], "size": manifest["image_size"]},
        "pyro_version": __version__,
        "kernel": {key: kernel.get(key) for key in ("flavor", "key", "release", "version")},
        "capabilities": {
            name: {
                "artifacts": proof["artifacts"],
                "checked_at": proof.get("checked_at"),
                "detail": proof.get("detail", ""),
            }
            for name, proof in sorted(proven.items())
            if proof.get("proven")
        },
    }


def make_manifest(name: str, config: tuple[str, int], layer: tuple[str, int]) -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config[0], "size": config[1]},
        "layers": [
            {
                "mediaType": ROOTFS_TYPE,
                "digest": layer[0],
                "size": layer[1],
                "annotations": {"org.opencontainers.image.title": "rootfs.ext4.zst"},
            }
        ],
        "annotations": {"dev.pyro-mcp.environment": name},
    }


def check_manifest(manifest: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config descriptor, rootfs descriptor) of a pyro artifact's manifest, or
    IntegrityError saying why it is not one."""
    config = manifest.get("config")
    layers = manifest.get("layers")
    if not isinstance(config, dict) or config.get("mediaType") != CONFIG_TYPE:
        kind = config.get("mediaType") if isinstance(config, dict) else None
        raise IntegrityError(
            f"{where} is not a pyro environment (its config is {kind!r})",
            hint="an ordinary container image becomes an environment with `pyro env import`",
        )
    if not isinstance(layers, list) or len(layers) != 1 or not isinstance(layers[0], dict):
        raise IntegrityError(f"{where}: a pyro environment has exactly one layer")
    layer = layers[0]
    if layer.get("mediaType") != ROOTFS_TYPE:
        raise IntegrityError(f"{where}: its layer is {layer.get('mediaType')!r}, not a rootfs")
    for descriptor, what, limit in ((config, "config", CONFIG_MAX_BYTES), (layer, "rootfs", 0)):
        check_digest(descriptor.get("digest"), what=f"{where}: the {what} digest")
        size = descriptor.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise IntegrityError(f"{where}: the {what} size {size!r} is not a positive integer")
        if size > (limit or IMAGE_MAX_BYTES):
            raise IntegrityError(f"{where}: the {what} is {size} bytes, more than pyro accepts")
    return config, layer


def check_config(config: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    """Validate a pulled config (names, digests, sizes, proofs); returns it."""
    if config.get("schema") != CONFIG_SCHEMA:
        raise IntegrityError(f"{where}: config schema {config.get('schema')!r} is not supported")
    if config.get("name") != name:
        raise IntegrityError(
            f"{where} holds environment {config.get('name')!r}, not {name!r}; refused"
        )
    image = config.get("image")
    if not isinstance(image, dict) or not _SHA_HEX.match(str(image.get("sha256", ""))):
        raise IntegrityError(f"{where}: the config names no valid image sha256")
    size = image.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= IMAGE_MAX_BYTES:
        raise IntegrityError(f"{where}: the image size {size!r} is not acceptable")
    for key in ("guest_files_digest", "tree_key", "image_revision"):
        if not isinstance(config.get(key), str) or len(config[key]) > 128:
            raise IntegrityError(f"{where}: the config's {key} is missing or malformed")
    packages = config.get("packages", [])
    if not isinstance(packages, list) or not all(isinstance(p, str) for p in packages):
        raise IntegrityError(f"{where}: the config's package list is malformed")
    capabilities = config.get("capabilities")
    if not isinstance(capabilities, dict):
        raise IntegrityError(f"{where}: the config lists no capabilities")
    named = config.get("kernel")
    kernel: dict[str, Any] = named if isinstance(named, dict) else {}
    for capability, proof in capabilities.items():
        if capability not in CAPABILITIES or not isinstance(proof, dict):
            raise IntegrityError(f"{where}: unknown capability claim {capability!r}")
        artifacts = proof.get("artifacts")
        if not isinstance(artifacts, dict):
            raise IntegrityError(f"{where}: the claim {capability} names no artifacts")
        if artifacts.get(f"env:{name}") != image["sha256"]:
            raise IntegrityError(
                f"{where}: its claim {capability} was proven against another image than the "
                "one it carries; refused"
            )
        kernel_key = f"kernel-{kernel.get('flavor')}"
        if kernel_key in artifacts and artifacts[kernel_key] != kernel.get("key"):
            raise IntegrityError(
                f"{where}: its claim {capability} was proven with another kernel than the one "
                "it names; refused"
            )
    if "vm_boot" not in capabilities or "guest_exec" not in capabilities:
        raise IntegrityError(
            f"{where}: the artifact does not claim vm_boot and guest_exec; an environment is "
            "published only once it booted and ran a command"
        )
    if not _NAME.match(name):
        raise IntegrityError(f"{where}: {name!r} is not an environment name")
    return config
