"""The MCP server, generated from the operation registry.

Each operation whose profiles include the served profile becomes one tool: its name, its
docstring as the description, its title and hints (read-only, destructive, idempotent,
open-world: the operation's :class:`~pyro_mcp.api.registry.Effects`) as its annotations,
its MCP parameters (with their help and the rules of :mod:`pyro_mcp.api.validation`) as
the JSON schema; arguments are checked by ``Operation.call``, as on every surface, after
their names (an unknown or missing one is an error listing what the tool takes). The
MCP SDK is imported here and nowhere else (its major version is pinned in
pyproject.toml). Operations block, so they run in worker threads, never on the server's
event loop; their progress phases become MCP progress notifications, and their log
lines (on stderr) also go to a client that asked for them with ``logging/setLevel``.
Errors name tools, not CLI commands (:func:`pyro_mcp.api.hints.for_mcp`). The server
advertises only what it serves: tools and logging, no prompts or resources. Over stdio,
stdout carries the protocol and nothing else, and every request gets an answer
(:func:`stdio_verdict`).
"""

from __future__ import annotations

import contextlib
import fcntl
import inspect
import io
import json
import logging
import os
import signal
import threading
import types
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, BinaryIO, cast, get_args

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp.server.connection import allowed_log_levels
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context as MCPContext
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.server.stdio import stdio_server
from mcp.shared.message import SessionMessage
from mcp_types import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    PARSE_ERROR,
    EmptyResult,
    ErrorData,
    JSONRPCError,
    LoggingLevel,
    LoggingMessageNotification,
    LoggingMessageNotificationParams,
    SetLevelRequestParams,
    ToolAnnotations,
    jsonrpc_message_adapter,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ConfigDict, Field, WithJsonSchema

from pyro_mcp import __version__
from pyro_mcp.api import Context, Operation, all_operations
from pyro_mcp.api.cancellable import run_cancellable
from pyro_mcp.api.context import Dispatch, HostPathPolicy
from pyro_mcp.api.display import printable, printable_text
from pyro_mcp.api.hints import for_mcp
from pyro_mcp.api.lifecycle import discard_owned_vms
from pyro_mcp.api.registry import Param, Surface
from pyro_mcp.api.result_shapes import output_schema
from pyro_mcp.api.validation import check_names, json_schema
from pyro_mcp.errors import PyroError
from pyro_mcp.mcp_profiles import DEFAULT_PROFILE, PROFILES
from pyro_mcp.runtime.loopback import is_loopback_host, parse_address
from pyro_mcp.runtime.paths import RuntimePaths

ContextFactory = Callable[[], Context]
# pyro-mcp 3.x's tool names for operations named otherwise here: the same tool twice.
COMPAT_TOOLS = {"vm_list_environments": "env_list"}
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


def _tool(op: Operation, make_context: ContextFactory, profile: str) -> Callable[..., Any]:
    async def tool(**kwargs: Any) -> dict[str, Any]:
        mcp_ctx: MCPContext = kwargs.pop("mcp_ctx")
        ctx = make_context()
        steps = 0
        loop = anyio.lowlevel.current_token()  # progress may come from any thread

        def progress(message: str) -> None:
            nonlocal steps
            steps += 1
            log.info("%s: %s", op.name, message)
            with contextlib.suppress(Exception):
                anyio.from_thread.run(mcp_ctx.report_progress, steps, None, message, token=loop)

        ctx.progress = progress
        ctx.heartbeat = progress
        client_log = _ClientLog(mcp_ctx.request_context, loop)

        def work() -> Any:
            with client_log.forwarding():
                return op.call(ctx, Surface.MCP, **kwargs)

        try:
            # A client that cancels the request or ends its session stops what it ran.
            result = await run_cancellable(work, ctx)
        except PyroError as exc:
            raise ToolError(error_text(exc, profile, op)) from exc
        return dict(printable(result))

    parameters = [
        inspect.Parameter(
            param.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=inspect.Parameter.empty if param.required else param.default,
            annotation=_annotation(param),
        )
        for param in op.mcp_params(profile)
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


def error_text(exc: PyroError, profile: str, op: Operation | None = None) -> str:
    """How an MCP client reads ``exc``: its code and message, and the commands they name
    told as the tools of ``profile`` to call (the CLI keeps its own text)."""
    text = str(exc)  # the message, the hint in parentheses, then any tail (console, stderr)
    head = exc.message + (f" ({exc.hint})" if exc.hint else "")
    if text.startswith(head):  # never rewrite a tail: it is the guest's or a tool's text
        told = for_mcp(exc.message, profile, op)
        if exc.hint:
            told += f" ({for_mcp(exc.hint, profile, op)})"
        text = told + text[len(head) :]
    return printable_text(f"{exc.code}: {text}")


def build_server(
    profile: str = DEFAULT_PROFILE, *, make_context: ContextFactory = Context
) -> MCPServer:
    """An MCP server exposing the tools of ``profile``."""
    ops = operations_for(profile)
    tools = [_operation_tool(op, make_context, profile) for op in ops]
    if profile == "workspace-full":  # where pyro-mcp 3.x had them
        by_name = {op.name: op for op in ops}
        tools += [
            _operation_tool(by_name[target], make_context, profile, alias=alias)
            for alias, target in COMPAT_TOOLS.items()
            if target in by_name
        ]
    server = MCPServer(
        name="pyro-mcp",
        version=__version__,
        instructions=(
            "Disposable, hardware-isolated Linux microVMs. Tools: "
            + "; ".join(f"{op.name}: {op.summary}" for op in ops)
        ),
        tools=tools,
        subscriptions=False,  # its tools never change, and it has no resources
    )
    _advertise_only_what_it_serves(server)
    return server


class OperationTool(Tool):
    """A tool that checks the names of its arguments before the SDK validates them: an
    unknown one or a missing required one is an ``invalid_argument`` error listing every
    parameter the tool takes (pydantic's report would name only the field)."""

    offered: tuple[Any, ...] = Field(default=(), exclude=True)  # its Params
    profile: str = Field(default=DEFAULT_PROFILE, exclude=True)

    async def run(
        self, arguments: dict[str, Any], context: Any, convert_result: bool = False
    ) -> Any:
        try:
            check_names(self.name, arguments, self.offered)
        except PyroError as exc:
            # The SDK's own prefix for a tool's error, as on every other error result.
            text = f"Error executing tool {self.name}: {error_text(exc, self.profile)}"
            raise ToolError(text) from exc
        return await super().run(arguments, context, convert_result)


def _operation_tool(
    op: Operation, make_context: ContextFactory, profile: str, *, alias: str | None = None
) -> Tool:
    """The tool of ``op`` (under pyro-mcp 3.x's ``alias`` when given: the same tool)."""
    tool = cast(
        OperationTool,
        OperationTool.from_function(  # made by its class (mcp 2.x)
            _tool(op, make_context, profile),
            name=alias or op.name,
            title=None if op.effects is None else op.effects.title,
            description=op.doc if alias is None else f"pyro-mcp 3.x's name for {op.name}. {op.doc}",
            annotations=_annotations(op),
        ),
    )
    # The schema of its declared result (the SDK would derive a bare object from the
    # wrapper's `dict[str, Any]`, which stays the model results are validated with).
    tool.fn_metadata.output_schema = output_schema(op)
    tool.offered = op.mcp_params(profile)
    tool.profile = profile
    return _refuse_unknown_arguments(tool)


def _annotations(op: Operation) -> ToolAnnotations | None:
    """The operation's declared effects as MCP tool annotations (every hint explicit:
    the protocol's defaults, e.g. destructive, are not what most tools here do)."""
    effects = op.effects
    if effects is None:
        return None
    return ToolAnnotations(
        title=effects.title,
        read_only_hint=effects.read_only,
        destructive_hint=effects.destructive,
        idempotent_hint=effects.idempotent,
        open_world_hint=effects.open_world,
    )


def _refuse_unknown_arguments(tool: Tool) -> Tool:
    """Publish a schema that refuses arguments the tool does not take
    (``additionalProperties: false``), and validate with it.

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


# Methods the SDK answers whatever the server holds; answered, they make the server
# advertise prompts and resources it does not have (and hosts show empty menus for them).
_UNSERVED = (
    "prompts/list",
    "prompts/get",
    "resources/list",
    "resources/read",
    "resources/templates/list",
)


def _advertise_only_what_it_serves(server: MCPServer) -> None:
    """Serve (and so advertise) tools and logging only: a client asking for prompts or
    resources gets Method not found, as for any method a server lacks."""
    lowlevel = server._lowlevel_server
    for method in _UNSERVED:
        # The SDK derives capabilities from its handler table (mcp 2.x) and has no call
        # to drop a handler.
        lowlevel._request_handlers.pop(method, None)
    lowlevel.add_request_handler("logging/setLevel", SetLevelRequestParams, _set_log_level)


# --- logging: the server's log lines to a client that asks for them ---------------------
#
# A client sets the least severe level it wants with logging/setLevel (per connection;
# until then nothing is sent, and stderr has every line as before). From then on, the
# records a tool call logs (pyro_mcp's loggers, from the thread running the operation)
# at that level or above reach it as notifications/message on the call's own stream. At
# protocol 2026-07-28, where setLevel is gone, each request asks for its level in _meta.

MCP_LEVELS: tuple[LoggingLevel, ...] = get_args(LoggingLevel)  # least severe first
_PYTHON_LEVELS: dict[int, LoggingLevel] = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}
_LEVEL_KEY = "pyro_mcp.log_level"


def mcp_level(levelno: int) -> LoggingLevel:
    """The MCP (syslog) level of a Python logging level: the highest one it reaches."""
    reached = [name for number, name in _PYTHON_LEVELS.items() if levelno >= number]
    return reached[-1] if reached else "debug"


def _connection_state(request: ServerRequestContext[Any, Any]) -> dict[str, Any]:
    # Connection.state is the SDK's per-connection scratch space; a request's session
    # reaches its connection only privately (mcp 2.x).
    connection = getattr(request.session, "_connection", None)
    state = getattr(connection, "state", None)
    return state if isinstance(state, dict) else {}


async def _set_log_level(
    request: ServerRequestContext[Any, Any], params: SetLevelRequestParams
) -> EmptyResult:
    _connection_state(request)[_LEVEL_KEY] = params.level
    return EmptyResult()


def wanted_levels(request: ServerRequestContext[Any, Any]) -> frozenset[str]:
    """The log levels the client of ``request`` wants for it (none until it asks)."""
    if request.protocol_version in MODERN_PROTOCOL_VERSIONS:
        return allowed_log_levels(request.protocol_version, request.meta)
    floor = _connection_state(request).get(_LEVEL_KEY)
    return frozenset(MCP_LEVELS[MCP_LEVELS.index(floor) :]) if floor in MCP_LEVELS else frozenset()


class _ClientLog(logging.Handler):
    """While one call's operation runs, sends the pyro_mcp records its thread logs at the
    levels the client wants as log notifications of that call."""

    def __init__(self, request: ServerRequestContext[Any, Any], loop: Any) -> None:
        super().__init__()
        self.request = request
        self.loop = loop
        self.levels = wanted_levels(request)
        self.thread: int | None = None

    @contextlib.contextmanager
    def forwarding(self) -> Iterator[None]:
        if not self.levels:
            yield
            return
        self.thread = threading.get_ident()
        root = logging.getLogger("pyro_mcp")
        root.addHandler(self)
        try:
            yield
        finally:
            root.removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        level = mcp_level(record.levelno)
        if record.thread != self.thread or level not in self.levels:
            return
        notification = LoggingMessageNotification(
            params=LoggingMessageNotificationParams(
                level=level, logger=record.name, data=printable_text(record.getMessage())
            )
        )
        send = self.request.session.send_notification
        with contextlib.suppress(Exception):  # a client gone is no reason to fail the call
            anyio.from_thread.run(send, notification, self.request.request_id, token=self.loop)


def confined_context(
    roots: Sequence[str | Path], paths: RuntimePaths | None = None, remote: Dispatch | None = None
) -> ContextFactory:
    """Contexts whose host paths (seed, sync, export) must lie under ``roots`` (and whose
    runtime cache is ``paths``, default the configured one; whose calls go to ``remote``,
    a cluster, when given)."""
    policy = HostPathPolicy.confined_to(roots)

    def make() -> Context:
        if paths is None:
            return Context(host_paths=policy, remote=remote)
        return Context(paths=paths, host_paths=policy, remote=remote)

    return make


def serve(
    profile: str = DEFAULT_PROFILE,
    http: str | None = None,
    roots: Sequence[str | Path] | None = None,
    cluster: str | None = None,
) -> None:
    """Serve over stdio, or over streamable HTTP at ``HOST:PORT`` (path ``/mcp``); with
    ``cluster`` (a Ray address), every tool call runs on the cluster's pyro nodes.

    Over stdio the SDK points fd 1 at stderr while it serves, so stray output (ours or a
    child process's) can never corrupt the protocol; logs and progress go to stderr.
    """
    address = None if http is None else parse_address(http, flag="--http")
    # An MCP client names host paths on our behalf: confine them (default: the cwd).
    remote = None
    if cluster is not None:
        from pyro_mcp.cluster import connect

        remote = connect(cluster).dispatch
    make_context = confined_context(roots or [Path.cwd()], remote=remote)
    server = build_server(profile, make_context=make_context)
    if address is None:
        # A stdio client ends us with SIGTERM (SIGKILL later): kill the VMs of calls in
        # flight first, or they would outlive us. (uvicorn handles SIGTERM for HTTP by
        # waiting for calls in flight; anything left is discarded at exit.)
        signal.signal(signal.SIGTERM, _discard_and_exit)
        anyio.run(_serve_stdio, server)
        return
    host, port = address
    if not is_loopback_host(host):
        log.warning(
            "serving MCP on %s, not a loopback address: anyone who reaches it can run "
            "commands in VMs on this host",
            host,
        )
    server.run("streamable-http", host=host, port=port)


# --- stdio: every request gets an answer ----------------------------------------------
#
# The SDK's stdio reader drops a line it cannot parse as a JSON-RPC message, so a
# request whose params are not an object, or that holds a lone surrogate (which its
# strict JSON parser refuses), would never be answered and its client would wait
# forever. Lines are checked before the SDK sees them: those it would drop are answered
# here with the JSON-RPC error they call for (the HTTP transport already does this).


async def _serve_stdio(server: MCPServer) -> None:
    """``server.run("stdio")``, with the lines the SDK would drop answered."""
    refusals, answers = anyio.create_memory_object_stream[SessionMessage](64)
    with _claimed_stdin() as wire:
        lines = anyio.wrap_file(io.TextIOWrapper(wire, encoding="utf-8", errors="replace"))
        checked = _checked_lines(lines, refusals)
        async with (
            stdio_server(stdin=checked) as (read_stream, write_stream),  # type: ignore[arg-type]
            anyio.create_task_group() as group,
        ):
            group.start_soon(_forward, answers, write_stream)
            # What MCPServer.run_stdio_async does, with our stdin (mcp 2.x).
            lowlevel = server._lowlevel_server
            await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())
            group.cancel_scope.cancel()


async def _checked_lines(
    lines: AsyncIterable[str], refusals: MemoryObjectSendStream[SessionMessage]
) -> AsyncIterator[str]:
    async for line in lines:
        verdict = stdio_verdict(line)
        if verdict is PASS:
            yield line
        elif isinstance(verdict, JSONRPCError):
            await refusals.send(SessionMessage(verdict))


async def _forward(answers: MemoryObjectReceiveStream[SessionMessage], write_stream: Any) -> None:
    async for answer in answers:
        await write_stream.send(answer)


@contextlib.contextmanager
def _claimed_stdin() -> Iterator[BinaryIO]:
    """The protocol's stdin, on a private descriptor; fd 0 reads /dev/null meanwhile, so
    nothing an operation starts can take the client's bytes (what the SDK does itself
    when it opens stdin)."""
    private = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        # Never closed: a reader thread may still block on it when serving ends.
        yield os.fdopen(private, "rb", buffering=0, closefd=False)
    finally:
        os.dup2(private, 0)


PASS = object()  # the SDK takes the line
DROP = object()  # nothing to answer (a notification or a response that is malformed)


def stdio_verdict(line: str) -> object:
    """What to do with one line from a stdio client: PASS it to the SDK, DROP it, or the
    JSONRPCError to answer it with (parse error, invalid request, invalid params)."""
    if not line.strip():
        return DROP
    try:
        jsonrpc_message_adapter.validate_json(line, by_name=False)
        return PASS
    except ValueError:
        pass
    try:
        message = json.loads(line, parse_constant=_no_constant)
    except ValueError:
        return _error(None, PARSE_ERROR, "Parse error: the line is not a JSON document")
    if not isinstance(message, dict):
        return _error(None, INVALID_REQUEST, "Invalid Request: a message is a JSON object")
    ident = message.get("id")
    if "id" not in message or "method" not in message:
        return DROP  # a notification or a response: JSON-RPC answers neither
    if isinstance(ident, bool) or not isinstance(ident, int | str):
        return _error(None, INVALID_REQUEST, "Invalid Request: id must be a string or an integer")
    surrogate = _lone_surrogate(message)
    if surrogate is not None:
        where, code = surrogate
        return _error(
            ident,
            INVALID_PARAMS if where.startswith("params") else INVALID_REQUEST,
            f"Invalid params: {where} holds a lone surrogate (U+{code:04X}), which is not "
            "Unicode text",
        )
    params = message.get("params")
    if params is not None and not isinstance(params, dict):
        kinds = {list: "an array", str: "a string", bool: "a boolean"}
        shown = kinds.get(type(params), "a number")
        return _error(
            ident, INVALID_REQUEST, f"Invalid Request: params must be an object, got {shown}"
        )
    return _error(ident, INVALID_REQUEST, "Invalid Request: not a JSON-RPC 2.0 request")


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _lone_surrogate(value: Any, where: str = "") -> tuple[str, int] | None:
    """The first string (key or value) in ``value`` holding a lone surrogate: its place
    (``params.arguments.text``) and the surrogate."""
    if isinstance(value, str):
        for char in value:
            if 0xD800 <= ord(char) <= 0xDFFF:
                return where or "the message", ord(char)
        return None
    items: Iterable[tuple[Any, Any]] = ()
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((f"[{index}]", item) for index, item in enumerate(value))
    for key, item in items:
        place = f"{where}{key}" if str(key).startswith("[") else f"{where}.{key}".lstrip(".")
        found = _lone_surrogate(key, place) if isinstance(key, str) else None
        found = found or _lone_surrogate(item, place)
        if found is not None:
            return found
    return None


def _error(ident: int | str | None, code: int, message: str) -> JSONRPCError:
    return JSONRPCError(jsonrpc="2.0", id=ident, error=ErrorData(code=code, message=message))


def _discard_and_exit(signum: int, _frame: object) -> None:
    discard_owned_vms()
    os._exit(128 + signum)
