"""The REST API: one route per operation of the served profile, generated from the
registry.

``POST /api/v1/<tool>`` takes the MCP tool's arguments as one JSON object and answers the
operation's result (the MCP tool's structured content), or the error as every surface
gives it (``{"error", "message", "hint"}``) with the HTTP status its kind calls for.
``POST /api/v1/<tool>/stream`` runs the same call and answers server-sent events as it
goes: ``progress`` (phases, and a heartbeat while a command runs), ``output`` (a command's
stdout and stderr as they arrive) and, last, ``result`` or ``error``. A stream route also
takes what only such a caller can use (``follow`` of ``service_logs``: the lines as the
service writes them, until it exits). A client that goes
away stops what the call ran, as a cancelled MCP request does.
"""

from __future__ import annotations

import codecs
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pyro_mcp.api.cancellable import run_cancellable
from pyro_mcp.api.context import Context
from pyro_mcp.api.display import printable
from pyro_mcp.api.hints import for_mcp
from pyro_mcp.api.registry import Operation, Surface
from pyro_mcp.api.validation import check_names
from pyro_mcp.errors import (
    AgentUnavailable,
    Cancelled,
    Conflict,
    Expired,
    GuestError,
    InvalidArgument,
    InvalidState,
    NetworkUnavailable,
    NotFound,
    OperationTimeout,
    OutsideRoot,
    ProtocolViolation,
    PyroError,
    RuntimeMissing,
    TooLarge,
)

PREFIX = "/api/v1"
MAX_REQUEST_BYTES = 96 << 20  # a file written as text or base64 (64 MiB at most) in JSON
# The status of each kind of error (the first class that matches, so subclasses first).
STATUS: tuple[tuple[type[PyroError], int], ...] = (
    (Expired, 410),
    (NotFound, 404),
    (InvalidArgument, 400),
    (OutsideRoot, 403),
    (InvalidState, 409),
    (Conflict, 409),
    (TooLarge, 413),
    (OperationTimeout, 504),
    (RuntimeMissing, 503),
    (NetworkUnavailable, 503),
    (AgentUnavailable, 502),
    (ProtocolViolation, 502),
    (GuestError, 502),
    (Cancelled, 499),
)
ContextFactory = Callable[[], Context]


def status_of(exc: PyroError) -> int:
    """The HTTP status a REST client gets for ``exc`` (500: any other kind)."""
    return next((status for kind, status in STATUS if isinstance(exc, kind)), 500)


def routes(ops: list[Operation], make_context: ContextFactory, profile: str) -> list[Route]:
    """A call route and a stream route for each of ``ops``."""
    made: list[Route] = []
    for op in ops:
        made.append(
            Route(f"{PREFIX}/{op.name}", _caller(op, make_context, profile), methods=["POST"])
        )
        made.append(
            Route(
                f"{PREFIX}/{op.name}/stream", _streamer(op, make_context, profile), methods=["POST"]
            )
        )
    return made


def told(exc: PyroError, profile: str, op: Operation | None = None) -> dict[str, str]:
    """``exc`` as a REST client reads it: the commands its message and hint name told as
    the operations to call (their routes are named by them), as MCP clients read them."""
    told = exc.to_dict()
    told["message"] = for_mcp(exc.message, profile, op)
    if exc.hint:
        told["hint"] = for_mcp(exc.hint, profile, op)
    return {key: printable(value) for key, value in told.items()}


def _error(exc: PyroError, profile: str, op: Operation) -> JSONResponse:
    return JSONResponse(told(exc, profile, op), status_code=status_of(exc))


async def arguments_of(
    request: Request, op: Operation, profile: str, *, streamed: bool = False
) -> dict[str, Any]:
    """The request's JSON object of arguments, checked for size, shape and names (those
    of its MCP tool, and for a ``streamed`` call those of its stream route; the values
    are checked by the operation, as on every surface)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_REQUEST_BYTES):
        raise TooLarge(f"a request body is at most {MAX_REQUEST_BYTES} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_REQUEST_BYTES:
                raise TooLarge(f"a request body is at most {MAX_REQUEST_BYTES} bytes")
    except ClientDisconnect as exc:
        raise Cancelled("the client went away before its request was read") from exc
    if not body.strip():
        arguments: Any = {}
    else:
        try:
            arguments = json.loads(body)
        except ValueError as exc:
            raise InvalidArgument(
                f"{op.name}: the request body is not JSON ({exc})",
                hint="send one JSON object of arguments, e.g. {}",
            ) from exc
    if not isinstance(arguments, dict):
        raise InvalidArgument(
            f"{op.name}: the request body must be a JSON object of arguments, "
            f"not {type(arguments).__name__}"
        )
    check_names(
        op.name, arguments, op.stream_params(profile) if streamed else op.mcp_params(profile)
    )
    return arguments


def _caller(op: Operation, make_context: ContextFactory, profile: str) -> Callable[[Request], Any]:
    async def call(request: Request) -> Response:
        try:
            arguments = await arguments_of(request, op, profile)
            ctx = make_context()
            result = await _run(op, ctx, arguments, Surface.MCP)
        except PyroError as exc:
            return _error(exc, profile, op)
        return JSONResponse(printable(result))

    return call


async def _run(op: Operation, ctx: Context, arguments: dict[str, Any], via: Surface) -> Any:
    """``op`` called in a worker thread, stopped if its client goes away."""
    return await run_cancellable(lambda: op.call(ctx, via, **arguments), ctx)


def _streamer(
    op: Operation, make_context: ContextFactory, profile: str
) -> Callable[[Request], Any]:
    async def stream(request: Request) -> Response:
        try:
            arguments = await arguments_of(request, op, profile, streamed=True)
        except PyroError as exc:
            return _error(exc, profile, op)
        return StreamingResponse(
            _events(op, make_context(), arguments, profile),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    return stream


async def _events(
    op: Operation, ctx: Context, arguments: dict[str, Any], profile: str
) -> AsyncIterator[str]:
    """The call's events as server-sent events, its result or error last."""
    sender, receiver = anyio.create_memory_object_stream[tuple[str, Any]](256)
    token = anyio.lowlevel.current_token()

    def emit(event: str, data: Any) -> None:  # from the operation's thread
        # Waits while the client is slow to read; once it has gone, events are dropped
        # (the call is being cancelled meanwhile).
        with contextlib.suppress(
            anyio.BrokenResourceError, anyio.ClosedResourceError, RuntimeError
        ):
            anyio.from_thread.run(sender.send, (event, data), token=token)

    decoders = {
        name: codecs.getincrementaldecoder("utf-8")("replace") for name in ("stdout", "stderr")
    }

    def output(stream: str, data: bytes) -> None:
        text = decoders[stream].decode(data)
        if text:
            emit("output", {"stream": stream, "text": text})

    ctx.progress = lambda message: emit("progress", {"message": message})
    ctx.heartbeat = ctx.progress
    ctx.output = output

    async def run() -> None:
        async with sender:
            try:
                result = await _run(op, ctx, arguments, Surface.MCP | Surface.STREAM)
            except PyroError as exc:
                await sender.send(("error", {**told(exc, profile, op), "status": status_of(exc)}))
            else:
                await sender.send(("result", result))

    async with anyio.create_task_group() as group:
        group.start_soon(run)
        async with receiver:
            async for event, data in receiver:
                yield f"event: {event}\ndata: {json.dumps(printable(data), default=str)}\n\n"
