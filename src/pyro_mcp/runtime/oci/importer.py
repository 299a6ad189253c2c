"""``pyro env import NAME``: any linux/amd64 OCI image as an environment.

From a registry (``--from REF``, pulled anonymously unless credentials are configured),
an OCI layout directory (``--oci-layout DIR``) or a ``docker save`` archive
(``--docker-archive FILE.tar``):

1. the image's manifest (an index is narrowed to linux/amd64), config and layers, each
   bounded and digest-checked (:mod:`~pyro_mcp.runtime.oci.layout`); registry layers
   are cached as blobs, and a killed download resumes;
2. the layers applied in order onto an empty tree (:mod:`~pyro_mcp.runtime.oci.layers`:
   whiteouts, opaque directories, owners, modes, xattrs, hard links; nothing ever written
   through a symlink or outside the tree);
3. refused, naming what is missing, unless the image can run the agent (its own
   ``python3`` with the standard library, ``/bin/sh``: :mod:`~.guest_needs`);
4. pyro's /etc files, init and agent added, packed with ``mke2fs -d`` (no loop mounts) and
   installed like any environment: manifest last.
"""

from __future__ import annotations

import errno
import tempfile
import time
from pathlib import Path
from typing import Any

from pyro_mcp.errors import InvalidArgument
from pyro_mcp.runtime import env_image, env_obtain, environments, rootfs
from pyro_mcp.runtime.digests import sha256_json
from pyro_mcp.runtime.oci import blobs, layout
from pyro_mcp.runtime.oci.blobs import json_document
from pyro_mcp.runtime.oci.credentials import find_credentials
from pyro_mcp.runtime.oci.guest_needs import link_local_python, missing_for_agent
from pyro_mcp.runtime.oci.layers import apply_layers
from pyro_mcp.runtime.oci.reference import Reference
from pyro_mcp.runtime.oci.registry import (
    DOCKER_LIST,
    MANIFEST_MAX_BYTES,
    OCI_INDEX,
    RegistryClient,
)
from pyro_mcp.runtime.oci.transfer import Progress
from pyro_mcp.runtime.paths import RuntimePaths

MAX_LAYERS = 256


def import_environment(
    paths: RuntimePaths,
    name: str,
    *,
    reference: Reference | None = None,
    oci_layout: Path | None = None,
    docker_archive: Path | None = None,
    tag: str | None = None,
    insecure: bool = False,
    progress: Progress,
) -> environments.EnvironmentInfo:
    env_obtain.check_name(name)
    if environments.get_spec_or_none(name) is not None:
        raise InvalidArgument(f"{name} is a catalog environment; import under another name")
    sources = [s for s in (reference, oci_layout, docker_archive) if s is not None]
    if len(sources) != 1:
        raise InvalidArgument("name exactly one of --from, --oci-layout, --docker-archive")
    started = time.monotonic()
    paths.ensure()
    with environments.build_lock(paths, progress):
        environments.remove_temps(paths)
        work = Path(
            tempfile.mkdtemp(
                prefix=f"{environments.BUILD_PREFIX}{environments.safe_name(name)}-",
                dir=paths.work_dir,
            )
        )
        try:
            if reference is not None:
                what = str(reference)
                image = fetch_image(paths, reference, insecure=insecure, progress=progress)
            elif oci_layout is not None:
                what = f"the OCI layout {oci_layout}"
                image = layout.read_oci_layout(oci_layout, tag=tag)
            else:
                assert docker_archive is not None
                what = f"the docker archive {docker_archive}"
                image = layout.read_docker_archive(docker_archive, work / "archive")
            layout.check_platform(image.config, what=what)
            root = work / "root"
            root.mkdir(mode=0o755)
            progress(f"applying {len(image.layers)} layers of {what}")
            apply_layers(image.layers, root, progress=progress)
            if link_local_python(root):
                progress("linked /usr/bin/python3 to the image's /usr/local/bin/python3")
            missing = missing_for_agent(root)
            if missing:
                raise InvalidArgument(
                    f"{what} cannot run the pyro guest agent: {'; '.join(missing)}",
                    hint="the agent runs on the image's own python3; install python3 in it",
                )
            rootfs.remove_path(work / "archive")  # the tree is all we need now
            rootfs.set_guest_etc(root)
            files = rootfs.guest_files()
            guest_digest = rootfs.guest_files_digest(files)
            progress("adding the guest init and agent")
            rootfs.add_guest_files(root, files)
            layer_digests = [layer.digest for layer in image.layers]
            tree_key = "import:" + sha256_json(layer_digests)
            seed = sha256_json(
                {"tree": tree_key, "guest": guest_digest, "image": rootfs.IMAGE_REVISION}
            )
            packed = env_image.pack_and_store(paths, root, work, seed, progress)
            installed = rootfs.read_dpkg_status(root)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise rootfs.out_of_space(f"import {name}", paths.work_dir, None) from exc
            raise
        finally:
            rootfs.remove_path(work)
        source: dict[str, Any] = {
            "kind": "import",
            "from": what,
            "manifest_digest": image.manifest_digest,
            "layers": layer_digests,
        }
        manifest = {
            "schema": environments.MANIFEST_SCHEMA,
            "name": name,
            "description": f"imported from {what}",
            "packages": [],
            "installed_packages": installed,
            **packed,
            "tree_key": tree_key,
            "guest_files_digest": guest_digest,
            "guest_files": [f.path for f in files],
            "image_revision": rootfs.IMAGE_REVISION,
            "built_at": rootfs.utc_now(),
            "build_seconds": round(time.monotonic() - started, 1),
            "image_config": _config_summary(image.config),
            "source": source,
        }
        environments.write_manifest(paths, name, manifest)
    progress(f"{name} imported from {what} ({packed['image_size'] >> 20} MiB image)")
    info = environments.list_one(paths, name)
    return info


def _config_summary(config: dict[str, Any]) -> dict[str, Any]:
    """What the manifest keeps of the image config (bounded: the config is hostile)."""
    inner = config.get("config") if isinstance(config.get("config"), dict) else {}
    assert isinstance(inner, dict)
    env = [e for e in inner.get("Env") or [] if isinstance(e, str)][:64]
    return {
        "os": config.get("os"),
        "architecture": config.get("architecture"),
        "env": [e[:1024] for e in env],
    }


def fetch_image(
    paths: RuntimePaths, ref: Reference, *, insecure: bool, progress: Progress
) -> layout.LocalImage:
    """An image's linux/amd64 manifest, config and layers from a registry, cached as
    verified blobs (a killed download resumes from its ``.partial``)."""
    client = RegistryClient(
        ref.registry,
        api_host=ref.api_host,
        credentials=find_credentials(ref.registry),
        insecure=insecure,
    )
    body, media_type, digest = client.get_manifest(ref)
    manifest = json_document(body, f"the manifest of {ref}")
    for _depth in range(4):
        if media_type not in (OCI_INDEX, DOCKER_LIST) and "manifests" not in manifest:
            break
        chosen = layout.select_platform(manifest, what=str(ref))
        pinned = Reference(ref.registry, ref.repository, None, chosen["digest"])
        body, media_type, digest = client.get_manifest(pinned)
        manifest = json_document(body, f"the manifest of {pinned}")
    config_desc = manifest.get("config")
    layers = manifest.get("layers")
    if not isinstance(config_desc, dict) or not isinstance(layers, list):
        raise InvalidArgument(f"{ref} is not an image manifest (no config or layers)")
    if len(layers) > MAX_LAYERS:
        raise InvalidArgument(f"{ref} has {len(layers)} layers; pyro takes at most {MAX_LAYERS}")
    config = json_document(
        client.get_small_blob(
            ref.repository, str(config_desc.get("digest")), MANIFEST_MAX_BYTES, "the config"
        ),
        f"the config of {ref}",
    )
    layout.check_platform(config, what=str(ref))
    local: list[layout.Layer] = []
    for index, descriptor in enumerate(layers, 1):
        if not isinstance(descriptor, dict):
            raise InvalidArgument(f"{ref}: layer {index} is not a descriptor")
        layer_digest = str(descriptor.get("digest"))
        size = descriptor.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= 64 << 30:
            raise InvalidArgument(f"{ref}: layer {index} has a bad size {size!r}")
        path = blobs.blob_path(paths, layer_digest)
        if not (path.is_file() and path.stat().st_size == size):
            partial = blobs.partial_path(paths, layer_digest)
            client.download_blob(
                ref.repository,
                layer_digest,
                size,
                partial,
                what=f"layer {index}/{len(layers)}",
                progress=progress,
            )
            blobs.install_blob(partial, path)
        local.append(layout.Layer(path, layer_digest, str(descriptor.get("mediaType")), size))
    return layout.LocalImage(config=config, layers=tuple(local), manifest_digest=digest)
