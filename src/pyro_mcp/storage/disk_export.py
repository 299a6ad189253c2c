"""Copy a workspace disk image out to a host path."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pyro_mcp.errors import InvalidArgument, NotFound
from pyro_mcp.storage.host_files import HostPath, copy_sparse, open_destination


def disk_export(image: Path, output: Path | HostPath, force: bool = False) -> Path:
    """Copy the disk image to ``output``, sparsely (blocks shared where the filesystem can),
    atomically; returns the output path.

    ``output`` is a plain path (the caller's own) or a HostPath confined to a root; it is
    reached through directory descriptors (no link is followed below a root). The copy is
    written to a private temporary with a random name next to the output, flushed, and
    moved into place. NotFound if the image or the output's directory is missing,
    InvalidArgument if ``output`` is ``/``, an allowed root or the image itself, Conflict
    if ``output`` exists and ``force`` is false, or if it is anything but a regular file
    (force never replaces a directory, device node, fifo, socket or symlink).
    """
    target = HostPath.of(output)
    try:
        source = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NotFound(f"workspace disk {image} does not exist") from exc
    try:
        info = os.fstat(source)
        if not stat.S_ISREG(info.st_mode):
            raise NotFound(f"workspace disk {image} is not a file")
        with open_destination(target, "disk export output") as dest:
            found = dest.existing()
            if found is not None and (found.st_dev, found.st_ino) == (info.st_dev, info.st_ino):
                raise InvalidArgument(f"{target} is the workspace disk itself")
            dest.check("file", force)
            name, fd = dest.make_temp_file("disk")
            try:
                with dest.translating():
                    try:
                        copy_sparse(source, fd)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    dest.place(dest.fd, name, "file", force)
                    dest.sync()
            finally:
                dest.discard(name)  # the temporary, or the file force replaced
    finally:
        os.close(source)
    return target.path
