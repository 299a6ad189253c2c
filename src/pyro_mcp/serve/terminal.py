"""The dashboard's terminal: a PTY shell of a workspace, as long as a page shows it.

``GET /events/terminal/<workspace id>?cols=C&rows=R`` opens a shell (``shell_open``),
sends ``opened`` ({shell_id}) and then the shell's output as it comes, terminal escapes
and all, as ``output`` events ({text}) for xterm.js to render; ``exit`` ({exit_code})
when the shell ends, ``error`` when a read fails. The page types into the shell with the
REST API (``shell_write``, without a newline: each keystroke as typed). The stream owns
its shell: when the page goes away (the stream closes), the shell is closed, so a
reload or a closed tab never leaves shells behind in the guest.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pyro_mcp.errors import InvalidArgument, PyroError
from pyro_mcp.serve.rest import status_of

# How long a read waits for the shell to go quiet: output reaches the page within about
# this long, and an idle shell costs one agent call per this long.
QUIET_MS = 25
READ_CHARS = 64 << 10
DEFAULT_SIZE = (100, 24)  # cols, rows


def routes(call: Callable[..., Any]) -> list[Route]:
    async def terminal(request: Request) -> Response:
        wid = request.path_params["workspace_id"]
        try:
            cols = _size(request, "cols", DEFAULT_SIZE[0])
            rows = _size(request, "rows", DEFAULT_SIZE[1])
            opened = await anyio.to_thread.run_sync(
                lambda: call("shell_open", workspace_id=wid, cols=cols, rows=rows)
            )
        except PyroError as exc:
            return JSONResponse(exc.to_dict(), status_code=status_of(exc))
        return StreamingResponse(
            _follow(request, call, wid, opened["shell_id"]),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    return [Route("/events/terminal/{workspace_id}", terminal, methods=["GET"])]


def _size(request: Request, name: str, default: int) -> int:
    given = request.query_params.get(name)
    if given is None:
        return default
    if not given.isdigit() or not 2 <= int(given) <= 1000:
        raise InvalidArgument(f"{name} must be a whole number from 2 to 1000, not {given!r}")
    return int(given)


async def _follow(
    request: Request, call: Callable[..., Any], wid: str, shell: str
) -> AsyncIterator[str]:
    def event(name: str, data: dict[str, Any]) -> str:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n"

    cursor = 0
    try:
        yield event("opened", {"shell_id": shell})
        while not await request.is_disconnected():

            def read(at: int = cursor) -> Any:
                return call(
                    "shell_read",
                    workspace_id=wid,
                    shell_id=shell,
                    cursor=at,
                    max_chars=READ_CHARS,
                    wait_for_idle_ms=QUIET_MS,
                )

            try:
                got = await anyio.to_thread.run_sync(read)
            except PyroError as exc:
                yield event("error", exc.to_dict())
                return
            if got["output"]:
                yield event("output", {"text": got["output"]})
            cursor = got["next_cursor"]
            if not got["alive"] and not got["more"]:
                yield event("exit", {"exit_code": got["exit_code"]})
                return
    finally:
        with anyio.CancelScope(shield=True), contextlib.suppress(PyroError):
            await anyio.to_thread.run_sync(
                lambda: call("shell_close", workspace_id=wid, shell_id=shell)
            )
