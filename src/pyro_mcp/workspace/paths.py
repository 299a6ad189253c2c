"""Paths inside a workspace guest: everything pyro touches lies under ``/workspace``."""

from __future__ import annotations

import posixpath

from pyro_mcp.errors import InvalidArgument, OutsideRoot

WORKSPACE_ROOT = "/workspace"


def guest_path(path: str) -> str:
    """``path`` inside /workspace (relative paths are taken from there); refuses escapes."""
    if "\x00" in path:
        raise InvalidArgument("path contains a NUL byte")
    joined = path if path.startswith("/") else posixpath.join(WORKSPACE_ROOT, path)
    normal = posixpath.normpath(joined)
    if normal != WORKSPACE_ROOT and not normal.startswith(WORKSPACE_ROOT + "/"):
        raise OutsideRoot(f"{path} is outside {WORKSPACE_ROOT}")
    return normal
