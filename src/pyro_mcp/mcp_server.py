"""The MCP server, generated from the operation registry.

Each operation whose profiles include the served profile becomes one tool: its name, its
docstring as the description, its MCP parameters (with their help and the rules of
:mod:`pyro_mcp.api.validation`) as the JSON schema; arguments are checked by
``Operation.call``, as on every surface. The MCP SDK is imported here and nowhere else
(its major version is pinned in pyproject.toml). Operations block, so they run in worker
threads, never on the server's event loop; their progress phases become MCP progress
notifications (and log lines on stderr). Over stdio, stdout carries the protocol and
nothing else.
"""

from __future__ import annotations

import contextlib
import inspect
import ipaddress
import logging
import os
import signal
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.from_thread
import anyio.to_thread
from mcp.server.mcpserver import Context as MCPContext
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from pydantic import ConfigDict, Field, WithJsonSchema

from pyro_mcp import __version__
from pyro_mcp.api import Context, Operation, all_operations
from pyro_mcp.api.context import HostPathPolicy
from pyro_mcp.api.display import printable, printable_text
from pyro_mcp.api.lifecycle import discard_owned_vms
from pyro_mcp.api.registry import Param, Surface
from pyro_mcp.api.validation import json_schema
from pyro_mcp.errors import PyroError
from pyro_mcp.mcp_profiles import DEFAULT_PROFILE, PROFILES

ContextFactory = Callable[[], Context]
log = logging.getLogger(__name__)


def operations_for(profile: str) -> list[Operation]:
    """The operations a profile exposes as tools."""
    if profile not in PROFILES:
        raise ValueError(f"unknown MCP profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return [op for op in all_operations() if profile in op.profiles]


def _annotation(param: Param) -> Any:
    # The value reaches the operation as the client sent it: its type and bounds are
    # checked by Operation.call, as for every surface (one rule, one message). The
    # schema tells the client the same rules.
    return Annotated[Any, WithJsonSchema(json_schema(param)), Field(description=param.arg.help)]


def _tool(op: Operation, make_context: ContextFactory) -> Callable[..., Any]:
    async def tool(**kwargs: Any) -> dict[str, Any]:
        mcp_ctx: MCPContext = kwargs.pop("mcp_ctx")
        ctx = make_context()
        steps = 0

        def progress(message: str) -> None:
            nonlocal steps
            steps += 1
            log.info("%s: %s", op.name, message)
            with contextlib.suppress(Exception):
                anyio.from_thread.run(mcp_ctx.report_progress, steps, None, message)

        ctx.progress = progress
        try:
            result = await anyio.to_thread.run_sync(lambda: op.call(ctx, Surface.MCP, **kwargs))
        except PyroError as exc:
            raise ToolError(printable_text(f"{exc.code}: {exc}")) from exc
        return dict(printable(result))

    parameters = [
        inspect.Parameter(
            param.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=inspect.Parameter.empty if param.required else param.default,
            annotation=_annotation(param),
        )
        for param in op.params_on(Surface.MCP)
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
    ops = operations_for(profile)
    tools = [
        _refuse_unknown_arguments(
            Tool.from_function(_tool(op, make_context), name=op.name, description=op.doc)
        )
        for op in ops
    ]
    return MCPServer(
        name="pyro-mcp",
        version=__version__,
        instructions=(
            "Disposable, hardware-isolated Linux microVMs. Tools: "
            + "; ".join(f"{op.name}: {op.summary}" for op in ops)
        ),
        tools=tools,
    )


def _refuse_unknown_arguments(tool: Tool) -> Tool:
    """Make the tool reject arguments it does not take (the SDK drops them silently).

    A misspelt option (``timeout`` for ``timeout_seconds``) must be an error the model
    can read, not a call that quietly runs with the default.
    """
    loose = tool.fn_metadata.arg_model
    strict = types.new_class(
        loose.__name__,
        (loose,),
        exec_body=lambda ns: ns.update(model_config=ConfigDict(extra="forbid")),
    )
    tool.fn_metadata.arg_model = strict
    tool.parameters = tool.fn_metadata.arg_model.model_json_schema(by_alias=True)
    return tool


def confined_context(roots: Sequence[str | Path]) -> ContextFactory:
    """Contexts whose host paths (seed, sync, export) must lie under ``roots``."""
    policy = HostPathPolicy.confined_to(roots)

    def make() -> Context:
        return Context(host_paths=policy)

    return make


def serve(
    profile: str = DEFAULT_PROFILE,
    http: str | None = None,
    roots: Sequence[str | Path] | None = None,
) -> None:
    """Serve over stdio, or over streamable HTTP at ``HOST:PORT`` (path ``/mcp``).

    Over stdio the SDK points fd 1 at stderr while it serves, so stray output (ours or a
    child process's) can never corrupt the protocol; logs and progress go to stderr.
    """
    address = None if http is None else _parse_address(http)
    # An MCP client names host paths on our behalf: confine them (default: the cwd).
    server = build_server(profile, make_context=confined_context(roots or [Path.cwd()]))
    if address is None:
        # A stdio client ends us with SIGTERM (SIGKILL later): kill the VMs of calls in
        # flight first, or they would outlive us. (uvicorn handles SIGTERM for HTTP by
        # waiting for calls in flight; anything left is discarded at exit.)
        signal.signal(signal.SIGTERM, _discard_and_exit)
        server.run("stdio")
        return
    host, port = address
    if not _is_loopback(host):
        log.warning(
            "serving MCP on %s, not a loopback address: anyone who reaches it can run "
            "commands in VMs on this host",
            host,
        )
    server.run("streamable-http", host=host, port=port)


def _discard_and_exit(signum: int, _frame: object) -> None:
    discard_owned_vms()
    os._exit(128 + signum)


def _parse_address(http: str) -> tuple[str, int]:
    host, _, port = http.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:8000
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SystemExit(f"pyro: error: --http takes HOST:PORT (e.g. 127.0.0.1:8000), got {http!r}")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
