"""AsyncPyro: the same operations as Pyro, awaited; cancelling the awaiting task kills
the guest command (the cancel is sent before the cancellation reaches the caller). On a
served workspace (tests/unit/served_workspace.py: the real store and guest agent, no
VM), where a command's processes are this host's, so a test can see them end."""

from __future__ import annotations

import asyncio
import os
import select

import pytest
from tests.unit.served_workspace import ServedWorkspace, served_workspace

from pyro_mcp import AsyncPyro, NotFound, Pyro

__all__ = ["served_workspace"]  # the fixture, imported for the tests below


def test_an_awaited_call_returns_what_pyro_returns(served_workspace: ServedWorkspace) -> None:
    wid = served_workspace.id

    async def both() -> tuple[object, object]:
        pyro = AsyncPyro()
        ran = await pyro.exec_workspace(wid, ["sh", "-c", "echo async; exit 4"])
        listed = await pyro.list_workspaces()
        return ran, listed

    ran, listed = asyncio.run(both())
    assert (ran["exit_code"], ran["stdout"], ran["workspace_id"]) == (4, "async\n", wid)  # type: ignore[index]
    assert Pyro().workspace_logs(wid)["commands"][-1]["exit_code"] == 4  # journaled, as ever
    assert listed == Pyro().list_workspaces()


def test_an_error_is_raised_in_the_awaiting_task(served_workspace: ServedWorkspace) -> None:
    with pytest.raises(NotFound, match="no workspace 'nothing-here'"):
        asyncio.run(AsyncPyro().workspace_status("nothing-here"))


def test_a_cancelled_call_kills_the_guest_command_and_journals_nothing(
    served_workspace: ServedWorkspace,
) -> None:
    root = served_workspace.root
    command = "echo $$ > started.pid; exec sleep 600"

    async def cancel_once_started() -> None:
        task = asyncio.create_task(AsyncPyro().exec_workspace(served_workspace.id, command))
        while not (root / "started.pid").exists() or not (root / "started.pid").read_text():
            await asyncio.sleep(0.01)  # the command runs: its shell wrote its pid
        task.cancel()
        await task

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(cancel_once_started())
    pid = int((root / "started.pid").read_text())
    assert _ends_within(pid, 120), "the guest command outlived its cancelled call"
    assert Pyro().workspace_logs(served_workspace.id)["commands"] == []  # nothing journaled


def _ends_within(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` ends within ``seconds``: the cancel reaches the guest
    after the call has given up, and ``sleep 600`` left alone would outlast the wait
    five times over (a wait, not a measure of how fast)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], seconds)  # readable: it has ended
        return bool(readable)
    finally:
        os.close(fd)
