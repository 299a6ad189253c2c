"""An environment's ext4 image: packed from a staged root, checked, stored by digest.

One path for every source of an environment (a debootstrap build, an imported OCI
image): :func:`pack_and_store` sizes the image from the tree, packs it with ``mke2fs -d``
(growing it if mke2fs runs out of room), checks it with ``e2fsck -fn``, hashes it and
moves it to ``images/<sha256>.ext4`` (:func:`store_image`, also used by registry pulls).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from pyro_mcp.errors import ToolFailed
from pyro_mcp.runtime import host_tools, rootfs
from pyro_mcp.runtime.paths import RuntimePaths

Progress = rootfs.Progress


def image_path(paths: RuntimePaths, sha256: str) -> Path:
    return paths.images_dir / f"{sha256}.ext4"


def pack_and_store(
    paths: RuntimePaths, root: Path, work: Path, seed: str, progress: Progress
) -> dict[str, Any]:
    """Pack ``root`` into a stored image; the image fields of an environment manifest."""
    tree_size = rootfs.measure(root)
    size = rootfs.image_size_for(tree_size)
    needed = tree_size.data_bytes + 64 * rootfs.MIB
    rootfs.check_space("pack the ext4 image", work, needed)
    image = work / "image.ext4"
    progress(f"packing {size // rootfs.MIB} MiB ext4 image")
    try:
        for attempt in range(3):
            try:
                options = rootfs.pack_ext4(root, image, size=size, seed=seed)
                break
            except ToolFailed as exc:
                if attempt == 2 or not rootfs.image_too_small(exc):
                    raise
                size = -(-size * 3 // 2 // (16 * rootfs.MIB)) * 16 * rootfs.MIB
                progress(f"image too small; packing again with {size // rootfs.MIB} MiB")
        progress("checking the image (e2fsck -fn) and hashing it")
        rootfs.check_ext4(image)
        sha = rootfs.file_sha256_and_sync(image)
        stat = image.stat()
        fs_free = rootfs.free_bytes(image)
        final = store_image(paths, image, sha)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise rootfs.out_of_space("pack the ext4 image", work, needed) from exc
        raise
    return {
        "image_sha256": sha,
        "image_size": stat.st_size,
        "image_allocated": stat.st_blocks * 512,
        "image_free": fs_free,
        "image_file": final.name,
        "mke2fs_options": options,
    }


def store_image(paths: RuntimePaths, image: Path, sha: str) -> Path:
    """Move a finished image to ``images/<sha>.ext4`` (atomically) and return that path."""
    final = image_path(paths, sha)
    if final.is_file() and final.stat().st_size == image.stat().st_size:
        image.unlink()  # these very bytes are stored already
        return final
    image.chmod(0o444)
    try:
        os.rename(image, final)
    except OSError as exc:
        if exc.errno != errno.EXDEV:  # work and images dirs on different file systems
            raise
        tmp = paths.images_dir / f".tmp-{sha[:16]}-{os.getpid()}.ext4"
        host_tools.run(
            ["cp", "--sparse=always", "--", str(image), str(tmp)], what="store the image"
        )
        os.replace(tmp, final)
    rootfs.fsync_dir(paths.images_dir)
    return final
