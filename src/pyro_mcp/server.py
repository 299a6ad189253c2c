"""pyro-mcp 3.x's ``pyro_mcp.server``: ``create_server`` and ``main`` for code that
imported them. The server itself is :mod:`pyro_mcp.mcp_server`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyro_mcp.mcp_profiles import DEFAULT_PROFILE
from pyro_mcp.runtime.paths import RuntimePaths


def create_server(
    profile: str | None = None,
    *,
    roots: Sequence[str | Path] | None = None,
    paths: RuntimePaths | None = None,
) -> Any:
    """The MCP server for ``profile`` (default ``workspace-full``, as in pyro-mcp 3.x):
    an ``MCPServer`` of the MCP SDK (run it with ``run()``: stdio). Host paths its
    clients name must lie under ``roots`` (default: the current directory), as with
    ``pyro mcp serve --root``."""
    from pyro_mcp.mcp_server import build_server, confined_context

    make_context = confined_context(roots or [Path.cwd()], paths)
    return build_server(profile or DEFAULT_PROFILE, make_context=make_context)


def main() -> None:
    """Serve the default profile over stdio, as ``pyro mcp serve`` does."""
    from pyro_mcp.mcp_server import serve

    serve(DEFAULT_PROFILE, None, None)
