"""The local side of OCI transfers, under ``downloads/oci`` in the runtime cache::

    blobs/sha256/<hex>              verified blobs (compressed rootfs, layers, configs)
    blobs/sha256/<hex>.partial      a download in progress (resumed by the next pull)
    uploads/<key>.json              an upload session in progress (resumed by the next publish)
    compressed/<image sha256>.json  which blob is the zstd form of an installed image
    locations.json                  which repositories of which registry hold a blob
                                    (for cross-repository mounts)

Everything here can be deleted at any time; ``pyro env prune`` does.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pyro_mcp.errors import IntegrityError
from pyro_mcp.runtime.digests import sha256_file
from pyro_mcp.runtime.jsonfile import read_json, write_json_atomic
from pyro_mcp.runtime.oci.reference import check_digest
from pyro_mcp.runtime.paths import RuntimePaths

MAX_LOCATIONS = 64  # repositories remembered per blob


def oci_dir(paths: RuntimePaths) -> Path:
    return paths.downloads_dir / "oci"


def blob_path(paths: RuntimePaths, digest: str) -> Path:
    """Where a verified blob lives (the digest is checked, so it is never a path)."""
    hex_digest = check_digest(digest, what="blob digest").removeprefix("sha256:")
    directory = oci_dir(paths) / "blobs" / "sha256"
    directory.mkdir(parents=True, exist_ok=True)
    return directory / hex_digest


def partial_path(paths: RuntimePaths, digest: str) -> Path:
    return blob_path(paths, digest).with_suffix(".partial")


def session_path(paths: RuntimePaths, registry: str, repository: str, digest: str) -> Path:
    key = hashlib.sha256(f"{registry}|{repository}|{digest}".encode()).hexdigest()[:32]
    return oci_dir(paths) / "uploads" / f"{key}.json"


def compressed_for(paths: RuntimePaths, image_sha256: str) -> dict[str, Any] | None:
    """The recorded zstd blob of an image (digest, size), if its file is still here."""
    data = read_json(oci_dir(paths) / "compressed" / f"{image_sha256}.json")
    if not isinstance(data, dict) or not isinstance(data.get("digest"), str):
        return None
    return data


def record_compressed(paths: RuntimePaths, image_sha256: str, digest: str, size: int) -> None:
    directory = oci_dir(paths) / "compressed"
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / f"{image_sha256}.json", {"digest": digest, "size": size})


def known_repositories(paths: RuntimePaths, registry: str, digest: str) -> list[str]:
    data = read_json(oci_dir(paths) / "locations.json")
    if not isinstance(data, dict):
        return []
    repos = dict(data.get(registry) or {}).get(digest) or []
    return [r for r in repos if isinstance(r, str)]


def remember(paths: RuntimePaths, registry: str, repository: str, digests: list[str]) -> None:
    """Note that ``repository`` of ``registry`` holds these blobs."""
    path = oci_dir(paths) / "locations.json"
    data = read_json(path)
    data = data if isinstance(data, dict) else {}
    per_registry = data.setdefault(registry, {})
    for digest in digests:
        repos = [r for r in per_registry.get(digest, []) if r != repository]
        per_registry[digest] = [repository, *repos][:MAX_LOCATIONS]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)


def install_blob(partial: Path, final: Path) -> None:
    """A verified download becomes the blob (rename, then the directory is synced)."""
    os.replace(partial, final)
    fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def digest_of(path: Path) -> tuple[str, int]:
    return "sha256:" + sha256_file(path), path.stat().st_size


def dumps(document: dict[str, Any]) -> bytes:
    """The canonical bytes of a JSON document we publish (the same input, the same digest)."""
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def json_document(body: bytes, what: str) -> dict[str, Any]:
    """A JSON object from a bounded document, or IntegrityError naming it."""
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise IntegrityError(f"{what} is not JSON") from exc
    if not isinstance(data, dict):
        raise IntegrityError(f"{what} is not a JSON object")
    return data
