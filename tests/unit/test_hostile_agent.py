"""The host stays bounded and correct against an agent that lies (tests/hostile_agent.py),
served in-process over a socketpair. The same agent runs in real guests in
tests/guest/test_hostile_guest.py."""

from __future__ import annotations

import math
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.hostile_agent import HostileAgent, reset_mode
from tests.unit.conftest import InProcessAgent

from pyro_mcp.errors import OperationTimeout, ProtocolViolation
from pyro_mcp.guest import protocol as p
from pyro_mcp.guest.client import AgentClient
from pyro_mcp.guest.link import QUEUE_BYTES


@pytest.fixture
def hostile() -> Iterator[AgentClient]:
    reset_mode()
    served = InProcessAgent(HostileAgent)
    yield served.client
    served.close()


def _mode(client: AgentClient, mode: str, **options: object) -> None:
    client.call("hostile_mode", {"mode": mode, **options}, timeout_s=10)


def test_an_exec_that_floods_past_its_cap_is_refused_at_once_in_bounded_memory(
    hostile: AgentClient,
) -> None:
    _mode(hostile, "flood_exec")
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolViolation, match="more stdout than the 1048576-byte cap"):
            hostile.exec(["true"], output_cap=1 << 20, timeout_s=60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < QUEUE_BYTES + (8 << 20)  # one call's queue and what it kept
    _mode(hostile, "honest")
    assert hostile.exec(["echo", "still", "fine"]).stdout == b"still fine\n"


def test_a_file_read_gets_at_most_what_it_asked_for(hostile: AgentClient) -> None:
    _mode(hostile, "flood_file", flood_bytes=128 << 20)
    data, info = hostile.get_file("/etc/hostname", max_bytes=10)
    assert data == b"y" * 10 and info["truncated"] is True
    _mode(hostile, "honest")
    hostile.ping()


def test_a_stalled_agent_fails_each_call_within_its_idle_deadline(hostile: AgentClient) -> None:
    _mode(hostile, "stall")
    # The idle limit ends each call, not its deadline (which would say "took longer than 30 s").
    with pytest.raises(OperationTimeout, match="sent nothing for 1 s"):
        hostile.call("exec", {"argv": ["sleep", "30"]}, timeout_s=30, idle_s=1)
    with pytest.raises(OperationTimeout, match="sent nothing for 1 s"):
        hostile.call("get_file", {"path": "/etc/hostname"}, timeout_s=30, idle_s=1)


def test_keepalives_keep_a_silent_long_command_alive(hostile: AgentClient) -> None:
    from pyro_mcp.guest_agent import agent

    assert agent.BEAT_S < 7  # the host's idle deadline below is longer than one beat
    value, _ = hostile.call("exec", {"argv": ["sleep", "8"]}, timeout_s=60, idle_s=7)
    assert value["exit_code"] == 0


def test_a_torn_frame_fails_its_call_and_later_calls_get_through(hostile: AgentClient) -> None:
    _mode(hostile, "tear")
    outcome: list[BaseException] = []

    def torn_call() -> None:
        try:
            hostile.call("exec", {"argv": ["true"]}, timeout_s=30)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=torn_call)
    worker.start()
    time.sleep(0.5)  # the torn half frame is on the link now
    assert hostile.exec(["echo", "after"]).stdout == b"after\n"
    worker.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], ProtocolViolation)
    assert "damaged" in str(outcome[0])
    hostile.ping()


def test_a_dead_clients_late_answer_never_completes_a_new_clients_call() -> None:
    """A virtio-serial port is reused: the next client talks on the same byte stream."""
    reset_mode()
    host, guest = socket.socketpair()
    agent = HostileAgent(guest.fileno(), poweroff=lambda: None)
    threading.Thread(target=agent.serve, daemon=True).start()
    # The first client says hello and starts a command, then dies without reading.
    dead = [
        p.Frame(p.CALL, 1, {"op": "hello", "args": {"session": "dead0000dead0000"}}),
        p.Frame(p.CALL, 2, {"op": "exec", "args": {"shell": "sleep 0.3; echo late"}}),
    ]
    host.sendall(b"".join(frame.encode() for frame in dead))
    client = AgentClient(host)
    try:
        client.hello()  # call 1 of the new client
        # Call 2 of the new client runs while the dead client's call 2 finishes.
        result = client.exec(shell="sleep 1; echo mine")
        assert result.stdout == b"mine\n"
        assert client.dropped >= 1  # the dead client's answers, ignored
    finally:
        client.close()
        guest.close()


def test_sparse_data_going_backwards_or_claiming_a_huge_size_is_refused(
    hostile: AgentClient, tmp_path: Path
) -> None:
    from pyro_mcp.errors import InvalidArgument, TooLarge
    from pyro_mcp.workspace import checkpoints
    from pyro_mcp.workspace.blobs import BlobStore

    store = BlobStore(tmp_path / "blobs")
    budget = checkpoints._Budget(checkpoints.MAX_CHECKPOINT_BYTES)
    _mode(hostile, "bad_offsets")
    with pytest.raises(InvalidArgument, match="comes after offset"):
        checkpoints.fetch_blob(hostile, store, "f", budget)
    _mode(hostile, "huge_size", size=1 << 60)
    with pytest.raises(TooLarge):
        checkpoints.fetch_blob(hostile, store, "f", budget)
    assert list(store) == [] and list(store.tmp_dir.iterdir()) == []


def test_a_manifest_without_end_stops_at_the_entry_limit_and_leaves_no_spool(
    hostile: AgentClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyro_mcp.errors import TooLarge
    from pyro_mcp.workspace import checkpoints
    from pyro_mcp.workspace.blobs import BlobStore

    monkeypatch.setenv("PYRO_MAX_MANIFEST_ENTRIES", "20000")
    store = BlobStore(tmp_path / "blobs")
    _mode(hostile, "flood_manifest")
    with pytest.raises(TooLarge, match="more than 20000 entries"):
        checkpoints.spool_current(store, hostile)
    assert list(store.tmp_dir.iterdir()) == []
    _mode(hostile, "honest")
    hostile.ping()


def test_a_consumer_that_falls_behind_holds_back_the_link_not_host_memory(
    hostile: AgentClient,
) -> None:
    _mode(hostile, "flood_file", flood_bytes=256 << 20)
    call = hostile.file_stream("/etc/hostname", max_bytes=1 << 40)
    time.sleep(1.0)  # the agent floods; nobody reads the stream
    queued = call._pending._bytes
    assert queued <= QUEUE_BYTES + p.MAX_PAYLOAD
    call.close()  # leaving early cancels the call and frees the reader
    _mode(hostile, "honest")
    hostile.ping()


def test_a_guest_that_keeps_a_timeout_late_still_gives_a_timed_out_result(
    hostile: AgentClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyro_mcp.guest import client

    monkeypatch.setattr(client, "HOST_GUARD_MARGIN_S", 0.5)
    _mode(hostile, "slow_clock", factor=1000)
    result = hostile.exec(["sh", "-c", "echo started; exec sleep 60"], timeout_s=1)
    assert result.timed_out is True
    assert (result.exit_code, result.signal, result.stdout) == (137, "SIGKILL", b"started\n")
    assert _wait_gone(b"sleep\x0060\x00")  # the host's guard cancelled it in the guest


def _wait_gone(cmdline: bytes, within_s: float = 10.0) -> bool:
    """Whether no process with ``cmdline`` is left (the in-process agent runs its commands
    on this host), waiting up to ``within_s`` for a kill to take effect."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        left = []
        for proc in Path("/proc").iterdir():
            try:
                left.append((proc / "cmdline").read_bytes() == cmdline)
            except OSError:
                continue
        if not any(left):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize(
    ("lie", "message"),
    [
        ({"exit_code": "x"}, "exit_code='x', not an integer from 0 to 255"),
        ({"exit_code": math.inf}, "exit_code=inf, not an integer from 0 to 255"),
        ({"exit_code": True}, "exit_code=True, not an integer from 0 to 255"),
        ({"duration_ms": math.inf}, "duration_ms=inf, not a finite number >= 0"),
        ({"duration_ms": math.nan}, "duration_ms=nan, not a finite number >= 0"),
        ({"stdout_bytes": "x"}, "stdout_bytes='x', not an integer from 7 to 4611686018427387904"),
        ({"stdout_bytes": 1}, "stdout_bytes=1, not an integer from 7 to 4611686018427387904"),
        ({"timed_out": "no"}, "timed_out='no', not true or false"),
        ({"signal": 9}, "signal=9, not a short string or null"),
    ],
)
def test_an_exec_result_that_lies_about_a_field_is_a_protocol_violation_naming_it(
    hostile: AgentClient, lie: dict[str, object], message: str
) -> None:
    _mode(hostile, "lie_exec", value=lie)
    with pytest.raises(ProtocolViolation) as caught:
        hostile.exec(["echo", "honest"])  # 7 bytes of stdout: it cannot claim fewer
    assert caught.value.message == f"exec: the guest agent answered {message}"
    _mode(hostile, "honest")
    assert hostile.exec(["echo", "fine"]).stdout == b"fine\n"


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("path", 5, "manifest path must be a non-empty string, got 5"),
        ("path", "../escape", "manifest path '../escape' contains '..'"),
        ("mode", "0644", "mode must be an integer in [0, 4095]"),
    ],
)
def test_a_manifest_entry_that_lies_is_a_protocol_violation(
    hostile: AgentClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    field: str,
    value: object,
    reason: str,
) -> None:
    from pyro_mcp.workspace import checkpoints
    from pyro_mcp.workspace.blobs import BlobStore

    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_text("a\n")
    monkeypatch.setattr(checkpoints, "WORKSPACE_ROOT", str(tree))
    store = BlobStore(tmp_path / "blobs")
    _mode(hostile, "lie_entry", field=field, value=value)
    with pytest.raises(ProtocolViolation) as caught:
        checkpoints.spool_current(store, hostile)
    assert caught.value.message.startswith("the guest agent sent a bad manifest entry: ")
    assert reason in caught.value.message
    assert list(store.tmp_dir.iterdir()) == []
