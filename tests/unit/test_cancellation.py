"""A caller that gives up stops what its call runs."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from pyro_mcp.api.context import Context
from pyro_mcp.errors import Cancelled, VMError
from pyro_mcp.guest.client import AgentClient


def _running(cmdline: bytes) -> bool:
    for proc in Path("/proc").iterdir():
        try:
            if (proc / "cmdline").read_bytes() == cmdline:
                return True
        except OSError:
            continue
    return False


def test_a_cancelled_exec_kills_its_command_and_raises_cancelled(
    agent_client: AgentClient,
) -> None:
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    with pytest.raises(Cancelled, match="guest operation exec was cancelled"):
        agent_client.exec(["sleep", "37"], timeout_s=60, cancel=cancel)
    deadline = time.monotonic() + 5
    while _running(b"sleep\x0037\x00") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(b"sleep\x0037\x00")  # the in-process agent ran it on this host
    assert agent_client.exec(["echo", "next"]).stdout == b"next\n"


def test_on_cancel_runs_its_action_and_the_block_ends_cancelled() -> None:
    ctx = Context()
    ended = threading.Event()

    def boot() -> None:  # a blocking wait that fails once the VM it waits for is killed
        if not ended.wait(10):
            raise AssertionError("the action never ran")
        raise VMError("the VMM exited while waiting for its agent")

    threading.Timer(0.2, ctx.cancelled.set).start()
    with pytest.raises(Cancelled), ctx.on_cancel(ended.set):
        boot()
    assert ended.is_set()


def test_on_cancel_does_nothing_when_the_caller_stays() -> None:
    ctx = Context()
    called: list[bool] = []
    with ctx.on_cancel(lambda: called.append(True)):
        time.sleep(0.2)
    assert called == []


def test_a_running_command_beats_with_its_time_and_output_so_far(
    agent_client: AgentClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyro_mcp.api import context

    monkeypatch.setattr(context, "HEARTBEAT_S", 0.3)
    beats: list[str] = []
    seen: list[bytes] = []
    ctx = Context(heartbeat=beats.append, output=lambda _stream, data: seen.append(data))
    with ctx.running_command() as output:
        agent_client.exec(["sh", "-c", "echo abc; sleep 1"], on_output=output)
    assert seen == [b"abc\n"]  # passed on as before
    assert beats and beats[-1] == "command running: 1 s, 4 bytes of output"


def test_no_heartbeat_is_sent_where_nobody_asks(agent_client: AgentClient) -> None:
    ctx = Context()
    with ctx.running_command() as output:
        assert output is None
