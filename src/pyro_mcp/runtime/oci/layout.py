"""Images from local sources, in one shape (:class:`LocalImage`): an OCI image layout
directory, or a ``docker save`` archive (classic ``manifest.json``, or the OCI layout that
newer docker versions write inside it).

Both are hostile input: every document is bounded before it is parsed, every blob is
hashed against the digest that names it, a digest must be ``sha256:`` and 64 hex digits
(so it is never a path), and only archive members named by the manifest are extracted,
as regular files, never through ``..``, absolute names or links.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyro_mcp.errors import IntegrityError, InvalidArgument, NotFound
from pyro_mcp.runtime.digests import sha256_file
from pyro_mcp.runtime.oci.blobs import json_document
from pyro_mcp.runtime.oci.reference import check_digest

DOCUMENT_MAX_BYTES = 4 << 20
MAX_DEPTH = 4
LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
)
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


@dataclass(frozen=True)
class Layer:
    path: Path  # the blob (compressed or not)
    digest: str  # sha256:<hex>, verified
    media_type: str
    size: int


@dataclass(frozen=True)
class LocalImage:
    config: dict[str, Any]
    layers: tuple[Layer, ...]  # lowest first
    manifest_digest: str | None


def verify_blob(path: Path, digest: str, *, what: str) -> None:
    check_digest(digest, what=what)
    if "sha256:" + sha256_file(path) != digest:
        raise IntegrityError(f"{what} does not match its digest {digest}; refused")


def _document(path: Path, what: str, digest: str | None = None) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = handle.read(DOCUMENT_MAX_BYTES + 1)
    except FileNotFoundError as exc:
        raise NotFound(f"{what} is missing ({path.name})") from exc
    if len(data) > DOCUMENT_MAX_BYTES:
        raise InvalidArgument(f"{what} is larger than {DOCUMENT_MAX_BYTES} bytes")
    if digest is not None and "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise IntegrityError(f"{what} does not match its digest {digest}; refused")
    return json_document(data, what)


def select_platform(index: dict[str, Any], *, what: str) -> dict[str, Any]:
    """The linux/amd64 descriptor of an image index, or InvalidArgument naming what it has."""
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise InvalidArgument(f"{what}: the index lists no manifests")
    seen = []
    for descriptor in manifests:
        if not isinstance(descriptor, dict):
            continue
        platform = descriptor.get("platform") or {}
        if not isinstance(platform, dict):
            continue
        os_name, arch = platform.get("os"), platform.get("architecture")
        if os_name == "linux" and arch == "amd64":
            check_digest(descriptor.get("digest"), what=f"{what}: a manifest digest")
            return descriptor
        if os_name or arch:
            seen.append(f"{os_name}/{arch}")
    raise InvalidArgument(
        f"{what} has no linux/amd64 image (it has {', '.join(seen) or 'no platforms'}); "
        "pyro runs linux/amd64 guests"
    )


def check_platform(config: dict[str, Any], *, what: str) -> None:
    os_name, arch = config.get("os"), config.get("architecture")
    if (os_name, arch) != ("linux", "amd64"):
        raise InvalidArgument(
            f"{what} is an image for {os_name}/{arch}; pyro runs linux/amd64 guests"
        )


def read_oci_layout(directory: Path, *, tag: str | None = None) -> LocalImage:
    """The image of an OCI layout directory (the one named ``tag`` when there are several)."""
    what = f"the OCI layout {directory}"
    marker = _document(directory / "oci-layout", f"{what}: oci-layout")
    if marker.get("imageLayoutVersion") != "1.0.0":
        raise InvalidArgument(f"{what}: imageLayoutVersion {marker.get('imageLayoutVersion')!r}")
    index = _document(directory / "index.json", f"{what}: index.json")
    descriptor = _pick(index, tag, what)
    for _depth in range(MAX_DEPTH):
        digest = check_digest(descriptor.get("digest"), what=f"{what}: a manifest digest")
        document = _document(_blob(directory, digest), f"{what}: manifest {digest[:19]}", digest)
        if descriptor.get("mediaType") in INDEX_TYPES or "manifests" in document:
            descriptor = select_platform(document, what=what)
            continue
        return _image(directory, document, digest, what)
    raise InvalidArgument(f"{what}: indexes nested deeper than {MAX_DEPTH}")


def _pick(index: dict[str, Any], tag: str | None, what: str) -> dict[str, Any]:
    manifests = [m for m in index.get("manifests") or [] if isinstance(m, dict)]
    if not manifests:
        raise InvalidArgument(f"{what}: index.json lists no manifests")
    if tag is not None:
        named = [
            m
            for m in manifests
            if dict(m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag
        ]
        if not named:
            raise NotFound(f"{what} has no image tagged {tag!r}")
        return named[0]
    if len(manifests) == 1:
        return manifests[0]
    return select_platform(index, what=what)


def _blob(directory: Path, digest: str) -> Path:
    path = directory / "blobs" / "sha256" / digest.removeprefix("sha256:")
    if path.is_symlink():
        raise InvalidArgument(f"blob {digest[:19]} of {directory} is a symlink; refused")
    return path


def _image(directory: Path, manifest: dict[str, Any], digest: str, what: str) -> LocalImage:
    config_desc = manifest.get("config")
    if not isinstance(config_desc, dict):
        raise InvalidArgument(f"{what}: the manifest has no config")
    config_digest = check_digest(config_desc.get("digest"), what=f"{what}: the config digest")
    config = _document(_blob(directory, config_digest), f"{what}: the config", config_digest)
    layers = []
    for index, descriptor in enumerate(manifest.get("layers") or [], 1):
        if not isinstance(descriptor, dict):
            raise InvalidArgument(f"{what}: layer {index} is not a descriptor")
        layer_digest = check_digest(descriptor.get("digest"), what=f"{what}: layer {index}")
        media_type = str(descriptor.get("mediaType"))
        if media_type not in LAYER_TYPES:
            raise InvalidArgument(f"{what}: layer {index} has unknown media type {media_type!r}")
        path = _blob(directory, layer_digest)
        if not path.is_file():
            raise NotFound(f"{what}: layer {index} ({layer_digest[:19]}) is missing")
        verify_blob(path, layer_digest, what=f"{what}: layer {index}")
        layers.append(Layer(path, layer_digest, media_type, path.stat().st_size))
    return LocalImage(config, tuple(layers), digest)


def read_docker_archive(archive: Path, work: Path) -> LocalImage:
    """The image of a ``docker save`` tar; members are extracted into ``work``."""
    what = f"the docker archive {archive}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:") as tar:
            members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
            for name in members:
                if name.startswith("/") or ".." in name.split("/"):
                    raise InvalidArgument(f"{what}: member {name!r} leaves the archive; refused")
            if "index.json" in members and "oci-layout" in members:
                wanted = ["index.json", "oci-layout"]
                wanted += [n for n in members if n.startswith("blobs/sha256/")]
                _extract(tar, members, wanted, work, what)
                return read_oci_layout(work)
            _extract(tar, members, ["manifest.json"], work, what)
            manifest = json.loads((work / "manifest.json").read_bytes()[:DOCUMENT_MAX_BYTES])
            if not isinstance(manifest, list) or len(manifest) != 1:
                raise InvalidArgument(f"{what}: manifest.json must list exactly one image")
            entry = manifest[0]
            config_name, layer_names = entry.get("Config"), entry.get("Layers")
            if not isinstance(config_name, str) or not isinstance(layer_names, list):
                raise InvalidArgument(f"{what}: manifest.json names no config or layers")
            _extract(tar, members, [config_name, *map(str, layer_names)], work, what)
    except (tarfile.TarError, EOFError, ValueError) as exc:
        if isinstance(exc, InvalidArgument):
            raise
        raise IntegrityError(f"{what} is not a readable tar archive: {exc}") from exc
    config = _document(work / config_name, f"{what}: the config")
    layers = []
    for index, name in enumerate(layer_names, 1):
        path = work / str(name)
        digest = "sha256:" + sha256_file(path)
        diff_ids = dict(config.get("rootfs") or {}).get("diff_ids") or []
        is_tar = _magic(path) == "tar"
        if is_tar and len(diff_ids) >= index and diff_ids[index - 1] != digest:
            raise IntegrityError(f"{what}: layer {index} does not match the config's diff_id")
        layers.append(
            Layer(path, digest, "application/vnd.oci.image.layer.v1.tar", path.stat().st_size)
        )
    return LocalImage(config, tuple(layers), None)


def _extract(
    tar: tarfile.TarFile,
    members: dict[str, tarfile.TarInfo],
    names: list[str],
    work: Path,
    what: str,
) -> None:
    for name in names:
        clean = name.removeprefix("./")
        member = members.get(clean)
        if member is None:
            raise NotFound(f"{what}: member {name!r} is missing")
        if clean.startswith("/") or ".." in clean.split("/"):
            raise InvalidArgument(f"{what}: member {name!r} leaves the archive; refused")
        if not member.isreg():
            raise InvalidArgument(f"{what}: member {name!r} is not a regular file; refused")
        target = work / clean
        target.parent.mkdir(parents=True, exist_ok=True)
        source = tar.extractfile(member)
        assert source is not None
        with open(target, "xb") as out:
            shutil.copyfileobj(source, out, 1 << 20)


def _magic(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return "tar"
