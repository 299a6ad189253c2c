"""Many callers at once on real guests: every answer reaches the caller that asked, and
no attach stalls."""

from __future__ import annotations

import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pyro_mcp.api import Context
from pyro_mcp.api.operations import workspace_content as wc
from pyro_mcp.api.operations import workspaces as ws

pytestmark = pytest.mark.guest

WORKSPACES = 5
EXECS = 2000
CALLERS = 20  # four at a time on each workspace: each exec attaches on its own


def test_2000_concurrent_execs_over_5_workspaces_each_get_their_own_output(
    ws_ctx: Context,
) -> None:
    ids = [ws.workspace_create(ws_ctx, "debian:12")["id"] for _ in range(WORKSPACES)]
    wrong: list[str] = []
    failed: list[str] = []
    slowest = [0.0]
    lock = threading.Lock()

    def one(index: int) -> None:
        token = secrets.token_hex(8)
        started = time.monotonic()
        try:
            result = wc.workspace_exec(
                ws_ctx, ids[index % WORKSPACES], ["echo", token], timeout_seconds=60
            )
        except Exception as exc:  # counted, not raised: the test reports them all
            with lock:
                failed.append(f"{type(exc).__name__}: {exc}")
            return
        with lock:
            slowest[0] = max(slowest[0], time.monotonic() - started)
            if result["stdout"] != token + "\n" or result["exit_code"] != 0:
                wrong.append(f"{token} -> {result['stdout']!r} exit {result['exit_code']}")

    with ThreadPoolExecutor(CALLERS) as pool:
        list(pool.map(one, range(EXECS)))
    print(f"\n{EXECS} execs over {WORKSPACES} workspaces: slowest {slowest[0]:.2f} s")
    assert failed == [] and wrong == []
