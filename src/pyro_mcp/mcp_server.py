"""The MCP server, generated from the operation registry.

Each operation whose profiles include the served profile becomes one tool: its name, its
docstring as the description, its parameters (with their help) as the JSON schema. The
MCP SDK is imported here and nowhere else (its major version is pinned in
pyproject.toml). Operations block, so they run in worker threads, never on the server's
event loop; their progress phases become MCP progress notifications.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Annotated, Any, Literal

import anyio
import anyio.from_thread
import anyio.to_thread
from mcp.server.mcpserver import Context as MCPContext
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from pyro_mcp import __version__
from pyro_mcp.api import Context, Operation, all_operations
from pyro_mcp.api.registry import Param
from pyro_mcp.errors import PyroError
from pyro_mcp.mcp_profiles import DEFAULT_PROFILE, PROFILES

ContextFactory = Callable[[], Context]


def operations_for(profile: str) -> list[Operation]:
    """The operations a profile exposes as tools."""
    if profile not in PROFILES:
        raise ValueError(f"unknown MCP profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return [op for op in all_operations() if profile in op.profiles]


def _annotation(param: Param) -> Any:
    base: Any = param.annotation
    if param.arg.choices:
        base = Literal[param.arg.choices]
    if param.optional:
        base = base | None
    return Annotated[base, Field(description=param.arg.help)]


def _tool(op: Operation, make_context: ContextFactory) -> Callable[..., Any]:
    async def tool(**kwargs: Any) -> dict[str, Any]:
        mcp_ctx: MCPContext = kwargs.pop("mcp_ctx")
        ctx = make_context()
        steps = 0

        def progress(message: str) -> None:
            nonlocal steps
            steps += 1
            with contextlib.suppress(Exception):
                anyio.from_thread.run(mcp_ctx.report_progress, steps, None, message)

        ctx.progress = progress
        try:
            result = await anyio.to_thread.run_sync(lambda: op.call(ctx, **kwargs))
        except PyroError as exc:
            raise ToolError(f"{exc.code}: {exc}") from exc
        return dict(result)

    parameters = [
        inspect.Parameter(
            param.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=inspect.Parameter.empty if param.required else param.default,
            annotation=_annotation(param),
        )
        for param in op.params
    ]
    parameters.append(
        inspect.Parameter("mcp_ctx", inspect.Parameter.KEYWORD_ONLY, annotation=MCPContext)
    )
    annotations = {p.name: p.annotation for p in parameters}
    annotations["return"] = dict[str, Any]
    tool.__signature__ = inspect.Signature(parameters, return_annotation=dict[str, Any])  # type: ignore[attr-defined]
    tool.__annotations__ = annotations
    tool.__name__ = op.name
    tool.__doc__ = op.doc
    return tool


def build_server(
    profile: str = DEFAULT_PROFILE, *, make_context: ContextFactory = Context
) -> MCPServer:
    """An MCP server exposing the tools of ``profile``."""
    server = MCPServer(
        name="pyro-mcp",
        version=__version__,
        instructions=(
            "Disposable Linux microVMs. vm_run boots a fresh VM, runs one command and "
            "discards it; env_list shows the environments."
        ),
    )
    for op in operations_for(profile):
        server.add_tool(_tool(op, make_context), name=op.name, description=op.doc)
    return server


def serve(profile: str = DEFAULT_PROFILE, http: str | None = None) -> None:
    """Serve over stdio, or over streamable HTTP at ``HOST:PORT``."""
    server = build_server(profile)
    if http is None:
        server.run("stdio")
        return
    host, _, port = http.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--http takes HOST:PORT, got {http!r}")
    server.run("streamable-http", host=host, port=int(port))
