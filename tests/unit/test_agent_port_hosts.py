"""A virtio-serial port serves host after host: the agent tells them apart by their hello.

Under QEMU a port's bytes and the news that its host left or came travel to the guest on
separate queues, so the next host's first frames can be read before the end of file of
the host before it. A FIFO stands for the port here: the agent's end stays open while
writers (hosts) come and go, and it reads as end of file while none is there.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pyro_mcp.guest import protocol as p
from pyro_mcp.guest_agent import agent as agent_module
from pyro_mcp.guest_agent.agent import Agent


class _Stop(Exception):
    pass


@dataclass
class Port:
    path: Path
    replies: socket.socket
    back: list[bool]  # what each wait for a host answers, in turn; then it waits for stop
    away_s: float = 0.0  # how long a wait that finds no host takes
    waits: list[float | None] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    host_fd: int | None = None  # the connected host's end

    def wait_for_host(self, timeout_s: float | None) -> bool:
        self.waits.append(timeout_s)
        if self.back:
            back = self.back.pop(0)
            if not back:
                time.sleep(self.away_s)
            return back
        self.stop.wait()
        raise _Stop

    def host_sends(self, *frames: p.Frame) -> None:
        """The connected host writes its frames and leaves."""
        assert self.host_fd is not None
        os.write(self.host_fd, b"".join(frame.encode() for frame in frames))
        os.close(self.host_fd)
        self.host_fd = None

    def answers(self, count: int, timeout_s: float = 10.0) -> dict[int, p.Frame]:
        decoder = p.FrameDecoder()
        found: dict[int, p.Frame] = {}
        deadline = time.monotonic() + timeout_s
        while len(found) < count and time.monotonic() < deadline:
            self.replies.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.replies.recv(1 << 16)
            except TimeoutError:
                break
            for item in decoder.feed(data):
                if isinstance(item, p.Frame) and item.t in (p.RESULT, p.ERROR):
                    found[item.id] = item
        return found


def _serve(back: list[bool], tmp_path: Path, away_s: float = 0.0) -> Iterator[Port]:
    path = tmp_path / "port"
    os.mkfifo(path)
    read_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    os.set_blocking(read_fd, True)
    host_end, guest_end = socket.socketpair()
    port = Port(path, host_end, back, away_s, host_fd=os.open(path, os.O_WRONLY))
    agent = Agent(read_fd, guest_end.fileno(), poweroff=lambda: None)

    def serve() -> None:
        with contextlib.suppress(_Stop):
            agent.serve(wait_for_host=port.wait_for_host)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    yield port
    port.stop.set()
    server.join(10)
    os.close(read_fd)
    host_end.close()
    guest_end.close()


@pytest.fixture
def host_comes_back(tmp_path: Path) -> Iterator[Port]:
    yield from _serve([True], tmp_path)


@pytest.fixture
def host_stays_away(tmp_path: Path) -> Iterator[Port]:
    yield from _serve([False], tmp_path, away_s=0.5)  # the command has started by then


def _hello(ident: int, session: str) -> p.Frame:
    return p.Frame(p.CALL, ident, {"op": "hello", "args": {"session": session}})


def _exec(ident: int, session: str, shell: str) -> p.Frame:
    return p.Frame(p.CALL, ident, {"op": "exec", "args": {"shell": shell}, "s": session})


def test_calls_read_before_the_end_of_file_of_the_host_before_are_answered(
    host_comes_back: Port,
) -> None:
    # The new host's hello and call come first, the old host's end of file after them.
    host_comes_back.host_sends(_hello(1, "b" * 16), _exec(2, "b" * 16, "sleep 0.3; echo served"))
    answers = host_comes_back.answers(2)
    assert sorted(answers) == [1, 2]
    assert answers[1].header["value"]["session"] == "b" * 16
    value = answers[2].header["value"]
    assert (value["exit_code"], value["cancelled"]) == (0, False)
    assert host_comes_back.waits[0] == agent_module.HOST_GRACE_S


def test_the_calls_of_a_host_that_left_for_good_are_cancelled(host_stays_away: Port) -> None:
    started = time.monotonic()
    host_stays_away.host_sends(_hello(1, "a" * 16), _exec(2, "a" * 16, "sleep 60"))
    answers = host_stays_away.answers(2, timeout_s=20)
    assert sorted(answers) == [1, 2]
    assert answers[2].header["value"]["cancelled"] is True
    assert time.monotonic() - started < 20  # not the command's 60 s
    assert host_stays_away.waits == [agent_module.HOST_GRACE_S, None]


def test_a_call_cancelled_before_its_command_starts_runs_nothing(tmp_path: Path) -> None:
    from pyro_mcp.guest_agent.calls import Call, CallError
    from pyro_mcp.guest_agent.ops_exec import run_exec

    marker = tmp_path / "ran"
    call = Call(lambda frame: None, 1, "exec", {"argv": ["touch", str(marker)]}, b"")
    call.cancel()
    with pytest.raises(CallError) as caught:
        run_exec(call)
    assert caught.value.code == "cancelled"
    assert not marker.exists()


def test_a_cancel_action_registered_after_the_cancel_runs_at_once() -> None:
    from pyro_mcp.guest_agent.calls import Call

    call = Call(lambda frame: None, 1, "exec", {}, b"")
    ran: list[str] = []
    call.cancel()
    call.upon_cancel(lambda: ran.append("late"))
    assert ran == ["late"]
