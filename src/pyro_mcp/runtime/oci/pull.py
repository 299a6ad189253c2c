"""Pull an environment artifact from a registry (anonymously) and install it.

In order, each step checked before the next is taken:

1. the manifest (bounded, its digest checked against the registry's claim);
2. the config (bounded, digest-checked, :func:`~pyro_mcp.runtime.oci.artifact.check_config`),
   which must carry this pyro's guest agent, else :class:`OtherAgent` (the caller builds
   locally instead);
3. the rootfs blob, streamed into ``<digest>.partial`` and hashed on the way; a pull that
   was killed goes on from where it stopped (``Range``);
4. decompressed into a sparse image in the work dir, hashed on the way and held to the
   size the config names (a decompression bomb stops there), then ``e2fsck -fn``;
5. image stored, manifest written last: until then nothing is installed.

The capabilities the artifact claims are kept as ``published_capabilities``; the lock
claims only what this host proves itself (``pyro env pull`` proves it after installing).
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import zstandard

from pyro_mcp.errors import IntegrityError, RegistryError
from pyro_mcp.runtime import environments, rootfs
from pyro_mcp.runtime.oci import artifact, blobs
from pyro_mcp.runtime.oci.blobs import json_document
from pyro_mcp.runtime.oci.reference import Reference
from pyro_mcp.runtime.oci.registry import (
    DOCKER_LIST,
    OCI_INDEX,
    RegistryClient,
)
from pyro_mcp.runtime.oci.transfer import Progress
from pyro_mcp.runtime.paths import RuntimePaths

BLOCK = 1 << 20
_ZEROS = bytes(BLOCK)


class OtherAgent(RegistryError):
    """The artifact was built with another guest agent (another pyro version)."""

    code = "other_agent"


def pull_artifact(
    paths: RuntimePaths,
    name: str,
    ref: Reference,
    *,
    progress: Progress,
    insecure: bool = False,
    expect_tree_key: str | None = None,
) -> dict[str, Any]:
    """Install environment ``name`` from ``ref``; returns what was moved and how long it took."""
    started = time.monotonic()
    client = RegistryClient(ref.registry, api_host=ref.api_host, insecure=insecure)
    where = str(ref)
    progress(f"pulling {name} from {ref}")
    body, media_type, manifest_digest = client.get_manifest(ref)
    document = json_document(body, f"the manifest of {where}")
    if media_type in (OCI_INDEX, DOCKER_LIST) or "manifests" in document:
        raise IntegrityError(
            f"{where} is an image index (a container image?), not a pyro environment",
            hint="an ordinary container image becomes an environment with `pyro env import`",
        )
    config_desc, layer_desc = artifact.check_manifest(document, where)
    config_bytes = client.get_small_blob(
        ref.repository, config_desc["digest"], artifact.CONFIG_MAX_BYTES, f"the config of {where}"
    )
    config = artifact.check_config(json_document(config_bytes, "the config"), name, where)
    ours = rootfs.guest_files_digest(rootfs.guest_files())
    if config["guest_files_digest"] != ours or config["image_revision"] != rootfs.IMAGE_REVISION:
        raise OtherAgent(
            f"{where} was built by pyro {config.get('pyro_version')} with another guest agent "
            "than this pyro's"
        )
    if expect_tree_key is not None and config["tree_key"] != expect_tree_key:
        raise OtherAgent(f"{where} was built from another package set than this pyro's {name}")
    image_sha = config["image"]["sha256"]
    image_size = config["image"]["size"]
    layer_digest, layer_size = layer_desc["digest"], layer_desc["size"]
    downloaded = 0
    blob = blobs.blob_path(paths, layer_digest)
    needed = layer_size + image_size // 4
    try:
        if not (blob.is_file() and blob.stat().st_size == layer_size):
            partial = blobs.partial_path(paths, layer_digest)
            before = partial.stat().st_size if partial.exists() else 0
            client.download_blob(
                ref.repository,
                layer_digest,
                layer_size,
                partial,
                what=f"{name} rootfs",
                progress=progress,
            )
            downloaded = layer_size - before
            blobs.install_blob(partial, blob)
        work = Path(
            tempfile.mkdtemp(
                prefix=f"{environments.BUILD_PREFIX}{environments.safe_name(name)}-",
                dir=paths.work_dir,
            )
        )
        try:
            image = work / "image.ext4"
            progress(f"decompressing the image ({image_size >> 20} MiB)")
            try:
                actual = decompress_sparse(blob, image, image_size)
            except IntegrityError:
                blob.unlink(missing_ok=True)  # its bytes are not the image: never again
                raise
            if actual != image_sha:
                blob.unlink(missing_ok=True)
                raise IntegrityError(
                    f"the image in {where} hashes to {actual}, not the {image_sha} its config "
                    "names; refused (the download was removed)"
                )
            progress("checking the image (e2fsck -fn)")
            rootfs.check_ext4(image)
            stat = image.stat()
            fs_free = rootfs.free_bytes(image)
            final = environments.store_image(paths, image, image_sha)
        finally:
            rootfs.remove_path(work)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise rootfs.out_of_space(f"pull {name}", paths.cache_dir, needed) from exc
        raise
    blobs.record_compressed(paths, image_sha, layer_digest, layer_size)
    blobs.remember(paths, ref.registry, ref.repository, [config_desc["digest"], layer_digest])
    seconds = round(time.monotonic() - started, 2)
    source = {
        "kind": "registry",
        "reference": where,
        "manifest_digest": manifest_digest,
        "config_digest": config_desc["digest"],
        "layer_digest": layer_digest,
        "layer_size": layer_size,
    }
    manifest = {
        "schema": environments.MANIFEST_SCHEMA,
        **{key: config[key] for key in artifact.CARRIED if key in config},
        "image_sha256": image_sha,
        "image_size": stat.st_size,
        "image_allocated": stat.st_blocks * 512,
        "image_free": fs_free,
        "image_file": final.name,
        "source": source,
        "published_by": config.get("pyro_version"),
        "published_capabilities": sorted(config["capabilities"]),
        "kernel_reference": config.get("kernel"),
        "pulled_at": rootfs.utc_now(),
        "pull_seconds": seconds,
    }
    if "source" in config:
        manifest["origin"] = config["source"]
    environments.write_manifest(paths, name, manifest)
    progress(f"{name} installed from {where} in {seconds} s ({downloaded >> 20} MiB downloaded)")
    return {**source, "bytes_downloaded": downloaded, "seconds": seconds}


def decompress_sparse(blob: Path, image: Path, size: int) -> str:
    """Decompress a zstd blob into a sparse file of exactly ``size`` bytes; its sha256.

    All-zero blocks are seeked over, not written. More output than ``size``, less, or a
    corrupt frame is an IntegrityError.
    """
    hasher = hashlib.sha256()
    written = 0
    try:
        with open(blob, "rb") as source, open(image, "wb") as out:
            reader = zstandard.ZstdDecompressor().stream_reader(source)
            while True:
                block = reader.read(BLOCK)
                if not block:
                    break
                written += len(block)
                if written > size:
                    raise IntegrityError(
                        f"the image decompresses to more than the {size} bytes its config names"
                    )
                hasher.update(block)
                if block == _ZEROS[: len(block)]:
                    out.seek(len(block), os.SEEK_CUR)
                else:
                    out.write(block)
            out.truncate(written)
            out.flush()
            os.fsync(out.fileno())
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"the image blob is not valid zstd: {exc}") from exc
    if written != size:
        raise IntegrityError(f"the image decompresses to {written} bytes, not the {size} named")
    return hasher.hexdigest()
