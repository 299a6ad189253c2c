"""When the guest agent restarts, the host gives up only the calls it really lost.

A relay stands for the VM's agent port: the host stays connected to it while the agent
behind it dies and a new one takes the port (as a virtio-serial port does)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from pyro_mcp.errors import AgentUnavailable
from pyro_mcp.guest.client import AgentClient
from pyro_mcp.guest_agent.agent import Agent


class Port:
    """The host's end stays; the agent behind the port can be replaced."""

    def __init__(self) -> None:
        self.host, self._port = socket.socketpair()
        self._agent_end: socket.socket | None = None
        self._lock = threading.Lock()
        self.hold_agent_output = threading.Event()  # agent -> host bytes wait while set
        self._held: list[bytes] = []
        threading.Thread(target=self._host_to_agent, daemon=True).start()
        self.start_agent(restarted=False)

    def start_agent(self, *, restarted: bool) -> None:
        relay_end, guest = socket.socketpair()
        agent = Agent(guest.fileno(), poweroff=lambda: None)
        with self._lock:
            self._agent_end = relay_end
        threading.Thread(target=self._agent_to_host, args=(relay_end,), daemon=True).start()
        if restarted:
            agent.announce_restart()
        threading.Thread(target=self._serve, args=(agent, guest), daemon=True).start()

    @staticmethod
    def _serve(agent: Agent, guest: socket.socket) -> None:
        agent.serve()
        guest.close()

    def kill_agent(self) -> None:
        """The agent dies: what it was doing is gone, bytes sent meanwhile are dropped."""
        with self._lock:
            end, self._agent_end = self._agent_end, None
        assert end is not None
        end.shutdown(socket.SHUT_RDWR)
        end.close()

    def release_agent_output(self) -> None:
        self.hold_agent_output.clear()
        with self._lock:
            held, self._held = self._held, []
        for data in held:
            self._port.sendall(data)

    def _host_to_agent(self) -> None:
        while data := self._port.recv(1 << 16):
            with self._lock:
                end = self._agent_end
            if end is not None:
                with contextlib.suppress(OSError):
                    end.sendall(data)

    def _agent_to_host(self, end: socket.socket) -> None:
        try:
            while data := end.recv(1 << 16):
                with self._lock:
                    if self.hold_agent_output.is_set():
                        self._held.append(data)
                        continue
                self._port.sendall(data)
        except OSError:
            return


@pytest.fixture
def port() -> Iterator[tuple[Port, AgentClient]]:
    relay = Port()
    client = AgentClient(relay.host)
    client.hello()
    yield relay, client
    client.close()


def test_a_call_in_flight_when_the_agent_dies_is_lost_and_says_so(
    port: tuple[Port, AgentClient],
) -> None:
    relay, client = port
    failure: list[BaseException] = []

    def long_call() -> None:
        try:
            client.exec(["sleep", "20"], timeout_s=60)
        except AgentUnavailable as exc:
            failure.append(exc)

    worker = threading.Thread(target=long_call)
    worker.start()
    time.sleep(0.3)
    relay.kill_agent()
    relay.start_agent(restarted=True)
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert [str(e) for e in failure] == ["the guest agent restarted; this call was lost with it"]
    assert client.exec(["echo", "after"]).stdout == b"after\n"


def test_a_call_sent_after_the_restart_is_answered_even_if_the_notice_comes_later(
    port: tuple[Port, AgentClient],
) -> None:
    relay, client = port
    relay.kill_agent()
    relay.hold_agent_output.set()  # the new agent's notice is still on its way...
    relay.start_agent(restarted=True)
    answers: list[bytes] = []
    worker = threading.Thread(target=lambda: answers.append(client.exec(["echo", "hi"]).stdout))
    worker.start()  # ...when the host sends its next call, which the new agent gets
    time.sleep(0.5)
    relay.release_agent_output()
    worker.join(timeout=10)
    assert answers == [b"hi\n"]


def test_a_hello_lost_with_an_agent_that_restarted_is_asked_again(
    port: tuple[Port, AgentClient],
) -> None:
    relay, client = port
    relay.kill_agent()  # what the host sends now is dropped: the port is closed
    answered: list[str] = []
    worker = threading.Thread(target=lambda: answered.append(client.hello()["session"]))
    worker.start()
    time.sleep(0.3)
    relay.start_agent(restarted=True)
    worker.join(timeout=15)
    assert answered == [client.session]
    assert client.exec(["echo", "on"]).stdout == b"on\n"
