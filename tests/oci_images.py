"""OCI images made by the tests: an image layout written directly, and pushed to a
registry with our own client (what `skopeo copy` would do)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def write_layout(
    directory: Path, layers: list[bytes | Path], *, arch: str = "amd64", tag: str = "1"
) -> dict[str, str]:
    """An OCI image layout of one linux/``arch`` image, tagged ``tag``. A ``bytes`` layer
    is a tar stream (gzip-compressed here); a ``Path`` layer is a tar or tar.gz file, moved
    in as it is. Returns the manifest's digest and the first layer's."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put_file(path: Path) -> str:
        hasher = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(block)
        os.rename(path, blobs / hasher.hexdigest())
        return "sha256:" + hasher.hexdigest()

    def put(data: bytes) -> str:
        scratch = directory / "scratch"
        scratch.write_bytes(data)
        return put_file(scratch)

    def descriptor(media_type: str, digest: str) -> dict[str, object]:
        size = (blobs / digest.removeprefix("sha256:")).stat().st_size
        return {"mediaType": media_type, "digest": digest, "size": size}

    layer_descriptors = []
    for item in layers:
        if isinstance(item, bytes):
            layer_descriptors.append(descriptor(LAYER_GZIP, put(gzip.compress(item))))
        else:
            gz = item.read_bytes()[:2] == b"\x1f\x8b"
            layer_descriptors.append(descriptor(LAYER_GZIP if gz else LAYER_TAR, put_file(item)))
    config = {"os": "linux", "architecture": arch, "config": {"Env": ["PATH=/usr/bin:/bin"]}}
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": descriptor(
                "application/vnd.oci.image.config.v1+json", put(json.dumps(config).encode())
            ),
            "layers": layer_descriptors,
        }
    ).encode()
    entry = descriptor(MANIFEST, put(manifest))
    entry["platform"] = {"os": "linux", "architecture": arch}
    entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (directory / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    (directory / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return {"manifest": str(entry["digest"]), "layer": str(layer_descriptors[0]["digest"])}


def push_layout(layout: Path, target: str, user: str, token: str) -> None:
    """Push the first image of an OCI layout to ``target`` (HOST:PORT/REPOSITORY:TAG)."""
    from pyro_mcp.runtime.oci import upload
    from pyro_mcp.runtime.oci.credentials import Credentials
    from pyro_mcp.runtime.oci.reference import parse_reference
    from pyro_mcp.runtime.oci.registry import RegistryClient

    ref = parse_reference(target)
    client = RegistryClient(ref.registry, credentials=Credentials(user, token, "test"))
    blobs = layout / "blobs" / "sha256"
    entry = json.loads((layout / "index.json").read_text())["manifests"][0]
    manifest = (blobs / entry["digest"].removeprefix("sha256:")).read_bytes()
    parts = json.loads(manifest)
    for part in [parts["config"], *parts["layers"]]:
        path = blobs / part["digest"].removeprefix("sha256:")
        upload.upload_blob(
            client, ref.repository, path, part["digest"], path.stat().st_size, what="blob"
        )
    client.put_manifest(ref, manifest, MANIFEST)
