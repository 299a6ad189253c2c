"""Copy a workspace disk image out to a host path."""

from __future__ import annotations

import os
from pathlib import Path

from pyro_mcp.errors import Conflict, InvalidArgument, NotFound
from pyro_mcp.runtime.host_tools import run


def disk_export(image: Path, output: Path, force: bool = False) -> Path:
    """Copy the disk image to ``output`` (sparse, a reflink where possible), atomically.

    NotFound if the image or the output's directory is missing, Conflict if ``output``
    exists and ``force`` is false, InvalidArgument if ``output`` is the image itself.
    """
    if not image.is_file():
        raise NotFound(f"workspace disk {image} does not exist")
    if not output.parent.is_dir():
        raise NotFound(f"directory {output.parent} does not exist")
    if os.path.lexists(output):
        if output.exists() and output.resolve() == image.resolve():
            raise InvalidArgument(f"{output} is the workspace disk itself")
        if not force:
            raise Conflict(f"{output} already exists", hint="pass force to replace it")
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        run(
            ["cp", "--sparse=always", "--reflink=auto", str(image), str(tmp)],
            what="export the workspace disk",
        )
        tmp.chmod(0o600)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return output
