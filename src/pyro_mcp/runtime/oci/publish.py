"""``pyro env publish``: push an installed environment to a registry as an OCI artifact.

Refused unless the image verifies (sha256 and e2fsck) and this host proved ``vm_boot`` and
``guest_exec`` on it with the installed kernel (see
:func:`pyro_mcp.runtime.lock.environment_capabilities`). Each blob the registry already
has is skipped (``HEAD``); one it holds in another repository we know of is mounted;
the rest is uploaded in chunks, resumably. The manifest goes last, so a tag never names
an incomplete artifact.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import zstandard

from pyro_mcp.errors import IntegrityError, InvalidState, RegistryError, RuntimeMissing
from pyro_mcp.runtime import environments, lock
from pyro_mcp.runtime.oci import artifact, blobs, upload
from pyro_mcp.runtime.oci.credentials import find_credentials
from pyro_mcp.runtime.oci.reference import Reference
from pyro_mcp.runtime.oci.registry import OCI_MANIFEST, RegistryClient, push_scope
from pyro_mcp.runtime.oci.transfer import Progress
from pyro_mcp.runtime.paths import RuntimePaths

ZSTD_LEVEL = 6  # ~3x smaller than the image's data; decompression runs at disk speed
REQUIRED = ("vm_boot", "guest_exec")


def publish_environment(
    paths: RuntimePaths,
    name: str,
    ref: Reference,
    *,
    progress: Progress,
    insecure: bool = False,
) -> dict[str, Any]:
    started = time.monotonic()
    manifest = environments.read_manifest(paths, name)
    if manifest is None:
        raise RuntimeMissing(f"environment {name} is not installed", hint=f"pyro env pull {name}")
    progress(f"verifying {name} (sha256 and e2fsck)")
    problems = environments.verify_environment(paths, name, deep=True)
    if problems:
        raise IntegrityError(f"{name} does not verify; not publishing it: {'; '.join(problems)}")
    components = lock.collect_components(paths, deep=False)
    proven = lock.environment_capabilities(paths, name, components)
    unproven = [f"{c}: {proven[c]['reason']}" for c in REQUIRED if not proven[c]["proven"]]
    if unproven:
        raise InvalidState(
            f"{name}'s capabilities were not proven on this host, so it is not published "
            f"({'; '.join(unproven)})",
            hint=f"run `pyro env prove {name}` (boots it and runs a command), then publish",
        )
    kernels = [k for k in proven["vm_boot"]["artifacts"] if k.startswith("kernel-")]
    kernel = components.get(kernels[0], {}) if kernels else {}
    credentials = find_credentials(ref.registry)
    if credentials is None:
        raise RegistryError(
            f"publishing to {ref.registry} needs credentials",
            hint="set PYRO_REGISTRY_USERNAME and PYRO_REGISTRY_TOKEN (or DOCKERHUB_USERNAME/"
            "DOCKERHUB_TOKEN, or a docker config.json entry)",
        )
    client = RegistryClient(
        ref.registry, api_host=ref.api_host, credentials=credentials, insecure=insecure
    )
    image = environments.image_path(paths, manifest["image_sha256"])
    layer = _compressed(paths, client, ref, manifest, image, progress)
    config = artifact.make_config(manifest, kernel, proven)
    config_bytes = blobs.dumps(config)
    config_path, config_digest = _store_small(paths, config_bytes)
    moves = [
        _push(
            paths, client, ref, config_path, config_digest, len(config_bytes), "config", progress
        ),
        _push(paths, client, ref, layer[2], layer[0], layer[1], f"{name} rootfs", progress),
    ]
    body = blobs.dumps(artifact.make_manifest(name, (config_digest, len(config_bytes)), layer[:2]))
    digest = client.put_manifest(ref, body, OCI_MANIFEST)
    blobs.remember(paths, ref.registry, ref.repository, [config_digest, layer[0]])
    progress(f"published {name} as {ref}@{digest}")
    return {
        "environment": name,
        "reference": str(ref),
        "digest": digest,
        "blobs": moves,
        "bytes_uploaded": sum(m["bytes_uploaded"] for m in moves),
        "compressed_size": layer[1],
        "image_size": manifest["image_size"],
        "capabilities": sorted(config["capabilities"]),
        "seconds": round(time.monotonic() - started, 2),
    }


def _compressed(
    paths: RuntimePaths,
    client: RegistryClient,
    ref: Reference,
    manifest: dict[str, Any],
    image: Path,
    progress: Progress,
) -> tuple[str, int, Path]:
    """(digest, size, file) of the image's zstd blob: the recorded one if its file is
    still here, else made now (and recorded)."""
    sha = manifest["image_sha256"]
    known = blobs.compressed_for(paths, sha)
    if known is not None:
        path = blobs.blob_path(paths, known["digest"])
        if path.is_file() and path.stat().st_size == known["size"]:
            return known["digest"], int(known["size"]), path
    progress(f"compressing the image with zstd (level {ZSTD_LEVEL})")
    directory = blobs.blob_path(paths, "sha256:" + "0" * 64).parent
    tmp = directory / f".compress-{os.getpid()}"
    try:
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1, write_checksum=True)
        with open(image, "rb") as source, open(tmp, "wb") as out:
            compressor.copy_stream(source, out, size=image.stat().st_size)
            out.flush()
            os.fsync(out.fileno())
        digest, size = blobs.digest_of(tmp)
        final = blobs.blob_path(paths, digest)
        blobs.install_blob(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    blobs.record_compressed(paths, sha, digest, size)
    progress(f"compressed {image.stat().st_size >> 20} MiB to {size >> 20} MiB")
    return digest, size, final


def _store_small(paths: RuntimePaths, data: bytes) -> tuple[Path, str]:
    import hashlib

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = blobs.blob_path(paths, digest)
    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        blobs.install_blob(tmp, path)
    return path, digest


def _push(
    paths: RuntimePaths,
    client: RegistryClient,
    ref: Reference,
    path: Path,
    digest: str,
    size: int,
    what: str,
    progress: Progress,
) -> dict[str, Any]:
    """Make ``ref``'s repository hold the blob: present, mounted or uploaded."""
    repository = ref.repository
    move = {"what": what, "digest": digest, "size": size, "bytes_uploaded": 0}
    if client.blob_size(repository, digest, scope=push_scope(repository)) == size:
        progress(f"{what}: the registry has it already")
        return {**move, "action": "present"}
    for source in blobs.known_repositories(paths, ref.registry, digest):
        if source != repository and upload.mount_blob(client, repository, digest, source):
            progress(f"{what}: mounted from {source}")
            return {**move, "action": "mounted", "from": source}
    session = blobs.session_path(paths, ref.registry, repository, digest)
    upload.upload_blob(
        client, repository, path, digest, size, what=what, session=session, progress=progress
    )
    return {**move, "action": "uploaded", "bytes_uploaded": size}
