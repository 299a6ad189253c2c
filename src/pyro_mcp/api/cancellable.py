"""An operation run from async code (the async SDK, the MCP server, the REST API): in a
worker thread, and stopped when the awaiting task is cancelled."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import anyio

from pyro_mcp.api.context import Context

CANCEL_GRACE_S = 30.0  # for a cancelled operation to stop what it started


async def run_cancellable(work: Callable[[], Any], ctx: Context) -> Any:
    """``work()`` in a worker thread; when the awaiting task is cancelled (its caller or
    client gave up), set ``ctx.cancelled`` (the operation stops what it runs: the guest
    command, a one-shot VM) and wait, at most CANCEL_GRACE_S, for it to finish before the
    cancellation goes on."""
    finished = threading.Event()

    def run() -> Any:
        try:
            return work()
        finally:
            finished.set()

    try:
        return await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        ctx.cancelled.set()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(finished.wait, CANCEL_GRACE_S)
        raise
