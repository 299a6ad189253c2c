"""The guest agent, run as a local process thread over a socketpair, speaks the protocol."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pyro_mcp.errors import GuestError, OperationTimeout, TooLarge
from pyro_mcp.guest import protocol as p
from pyro_mcp.guest.client import AgentClient


@pytest.fixture
def client(agent_client: AgentClient) -> AgentClient:
    return agent_client


def test_hello_reports_protocol_version_and_capabilities(client: AgentClient) -> None:
    hello = client.hello()
    assert hello["protocol"] == p.PROTOCOL_VERSION
    assert {"exec", "put_file", "get_file", "reidentify"} <= set(hello["capabilities"])


def test_exec_returns_both_streams_and_the_exit_code(client: AgentClient) -> None:
    result = client.exec(shell="echo out; echo err >&2; exit 3")
    assert (result.stdout, result.stderr, result.exit_code) == (b"out\n", b"err\n", 3)


def test_missing_program_exits_127_with_a_message(client: AgentClient) -> None:
    result = client.exec(["/no/such/program"])
    assert result.exit_code == 127
    assert b"command not found" in result.stderr


def test_output_beyond_the_cap_is_dropped_and_flagged(client: AgentClient) -> None:
    result = client.exec(shell="head -c 100000 /dev/zero", output_cap=1000)
    assert len(result.stdout) == 1000
    assert result.stdout_truncated
    assert result.details["stdout_bytes"] == 100000


def test_timeout_kills_the_command_and_keeps_partial_output(client: AgentClient) -> None:
    result = client.exec(shell="echo started; sleep 30", timeout_s=0.5)
    assert result.timed_out
    assert result.stdout == b"started\n"
    assert result.signal == "SIGKILL"


def test_ping_is_answered_while_a_long_command_runs(client: AgentClient) -> None:
    done: list[float] = []
    worker = threading.Thread(
        target=lambda: done.append(client.exec(shell="sleep 1").duration_ms), daemon=True
    )
    worker.start()
    time.sleep(0.1)
    client.ping()
    assert not done  # the ping came back before the sleep ended
    worker.join()
    assert done and done[0] >= 900


def test_output_streams_while_the_command_runs(client: AgentClient, tmp_path: Path) -> None:
    # The command ends only once the host has seen its first line: without streaming, the
    # host would see nothing before the end, and the command would time out.
    seen = tmp_path / "seen"
    chunks: list[bytes] = []

    def on_output(_stream: str, data: bytes) -> None:
        chunks.append(data)
        seen.touch()

    result = client.exec(
        shell=f"echo one; while [ ! -e {seen} ]; do sleep 0.01; done; echo two",
        on_output=on_output,
        timeout_s=30,
    )
    assert not result.timed_out and result.exit_code == 0
    assert chunks == [b"one\n", b"two\n"]


def test_stdin_reaches_the_command(client: AgentClient) -> None:
    assert client.exec(["cat"], stdin=b"hello\x00world").stdout == b"hello\x00world"


def test_bad_arguments_are_refused_with_a_code(client: AgentClient) -> None:
    with pytest.raises(GuestError) as caught:
        client.call("exec", {"argv": ["true"], "shell": "true"})
    assert caught.value.guest_code == "invalid_argument"
    with pytest.raises(GuestError) as unknown:
        client.call("no_such_op")
    assert unknown.value.guest_code == "unknown_op"


def test_files_round_trip_binary_safe_including_large_streams(
    client: AgentClient, tmp_path: Path
) -> None:
    small = bytes(range(256)) * 4
    large = os.urandom(3 << 20)
    client.put_file(str(tmp_path / "small"), small, mode=0o600)
    client.put_file(str(tmp_path / "large"), large)
    assert client.get_file(str(tmp_path / "small"))[0] == small
    assert (tmp_path / "small").stat().st_mode & 0o777 == 0o600
    data, info = client.get_file(str(tmp_path / "large"))
    assert data == large and info["size"] == len(large) and not info["truncated"]
    head, info = client.get_file(str(tmp_path / "large"), max_bytes=10)
    assert head == large[:10] and info["truncated"]


def test_paths_escaping_the_root_are_refused(client: AgentClient, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret").write_text("s")
    (root / "link").symlink_to(tmp_path / "secret")
    for path in (f"{root}/../secret", f"{root}/link", "/etc/passwd"):
        with pytest.raises(GuestError) as caught:
            client.get_file(path, root=str(root))
        assert caught.value.guest_code == "outside_root"
    with pytest.raises(GuestError):
        client.put_file(f"{root}/link", b"x", root=str(root))
    assert (tmp_path / "secret").read_text() == "s"


def test_a_host_timeout_cancels_the_guest_command(client: AgentClient) -> None:
    with pytest.raises(OperationTimeout):
        client.call("exec", {"shell": "sleep 20"}, timeout_s=0.3)
    client.ping()


def test_kill_signals_a_running_command(client: AgentClient) -> None:
    results = []
    running = threading.Event()

    def run() -> None:
        results.append(
            client.exec(shell="echo up; exec sleep 20", on_output=lambda *_: running.set())
        )

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    assert running.wait(timeout=10)
    # The exec above is call 2 on this fresh connection (hello was call 1).
    client.call("kill", {"call_id": 2, "signal": "INT"})
    worker.join(timeout=5)
    assert results and results[0].signal == "SIGINT"


def test_frames_resynchronise_after_garbage() -> None:
    decoder = p.FrameDecoder()
    frame = p.Frame(p.RESULT, 5, {"value": {}}, b"xyz")
    frames = decoder.feed(b"garbage" + frame.encode()[:7])
    frames += decoder.feed(frame.encode()[7:])
    assert frames == [p.Frame(p.RESULT, 5, {"value": {}}, b"xyz")]
    assert decoder.resyncs == len(b"garbage")


def test_an_oversized_or_forged_prefix_is_skipped_not_trusted() -> None:
    import struct

    decoder = p.FrameDecoder()
    good = p.Frame(p.RESULT, 7, {"value": {}}).encode()
    forged = struct.pack(">4sIII", p.MAGIC, p.MAX_HEADER + 1, 0, 0)
    plausible = struct.pack(">4sIII", p.MAGIC, 2, 0, 12345) + b"{}"  # its CRC is wrong
    assert decoder.feed(forged + plausible + good) == [p.Frame(p.RESULT, 7, {"value": {}})]
    assert decoder.resyncs == len(forged) + len(plausible)


def _frames(*payloads: bytes) -> list[p.Frame]:
    return [p.Frame(p.DATA, n + 1, {"stream": "file"}, data) for n, data in enumerate(payloads)]


def test_frames_decode_whole_in_one_feed_or_one_byte_at_a_time() -> None:
    frames = _frames(b"", b"x" * 100_000, b"PYRO inside a payload", bytes(range(256)))
    wire = b"".join(frame.encode() for frame in frames)
    assert p.FrameDecoder().feed(wire) == frames
    decoder = p.FrameDecoder()
    found: list[p.Decoded] = []
    for index in range(len(wire)):
        found += decoder.feed(wire[index : index + 1])
    assert found == frames and not decoder.pending and decoder.resyncs == 0


def test_a_torn_frame_is_damage_for_its_call_and_the_frames_after_it_arrive() -> None:
    torn, after, later = _frames(b"a" * 5000, b"after", b"b" * 20_000)
    cut = torn.encode()[:3000]  # the sender died mid-write; its successor goes on
    decoder = p.FrameDecoder()
    found = decoder.feed(cut + after.encode())
    found += decoder.feed(later.encode())  # enough bytes to cover what the torn one declared
    assert found == [p.Damaged(p.DATA, 1, "its payload was torn"), after, later]
    assert decoder.damaged == 1 and not decoder.pending


def test_a_torn_frame_that_declared_more_than_will_come_is_given_up_when_idle() -> None:
    torn, after = _frames(b"a" * 100_000, b"after")
    decoder = p.FrameDecoder()
    assert decoder.feed(torn.encode()[:500] + after.encode()) == []  # it waits for the rest
    assert decoder.pending
    assert decoder.stalled() == [
        p.Damaged(p.DATA, 1, "it was cut short (the sender stopped mid-frame)"),
        after,
    ]
    assert not decoder.pending
    assert decoder.stalled() == []  # nothing left to give up


def test_an_incomplete_frame_alone_is_kept_when_idle() -> None:
    (frame,) = _frames(b"z" * 10_000)
    decoder = p.FrameDecoder()
    wire = frame.encode()
    assert decoder.feed(wire[:4000]) == [] and decoder.stalled() == []
    assert decoder.feed(wire[4000:]) == [frame]


def _read_like_a_channel(decoder: p.FrameDecoder, wire: bytes, piece: int) -> list[p.Decoded]:
    """Deliver ``wire`` as a channel would, ``piece`` bytes per read, into the decoder's
    target when it offers one (a large frame read in place)."""
    found: list[p.Decoded] = []
    at = 0
    while at < len(wire):
        target = decoder.target()
        if target is None:
            found += decoder.feed(wire[at : at + piece])
            at += piece
            continue
        with target:
            size = min(piece, len(target), len(wire) - at)
            target[:size] = wire[at : at + size]
        found += decoder.filled(size)
        at += size
    return found


def test_large_frames_are_read_in_place_and_come_out_whole() -> None:
    frames = _frames(b"a" * 300_000, b"small", bytes(range(256)) * 1000, b"")
    wire = b"".join(frame.encode() for frame in frames)
    for piece in (4096, 65536, 1 << 20):
        decoder = p.FrameDecoder()
        assert _read_like_a_channel(decoder, wire, piece) == frames
        assert not decoder.pending


def test_a_large_frame_torn_while_read_in_place_gives_back_what_it_swallowed() -> None:
    torn, after, later = _frames(b"a" * 200_000, b"after", b"b" * 300_000)
    wire = torn.encode()[:100_000] + after.encode() + later.encode()
    found = _read_like_a_channel(p.FrameDecoder(), wire, 4096)
    assert found == [p.Damaged(p.DATA, 1, "its payload was torn"), after, later]


def test_a_large_frame_that_stops_coming_is_given_up_when_a_later_frame_is_in() -> None:
    torn, after = _frames(b"a" * 500_000, b"after")
    decoder = p.FrameDecoder()
    assert _read_like_a_channel(decoder, torn.encode()[:200_000] + after.encode(), 4096) == []
    assert decoder.target() is not None  # still filling the big one
    assert decoder.stalled() == [
        p.Damaged(p.DATA, 1, "it was cut short (the sender stopped mid-frame)"),
        after,
    ]
    assert not decoder.pending


@pytest.mark.parametrize(
    ("call", "size"),
    [
        ({"argv": ["echo", "x" * (3 << 20)]}, "3.0"),
        ({"argv": ["true"], "env": {"BIG": "x" * (2 << 20)}}, "2.0"),
    ],
)
def test_a_call_whose_arguments_do_not_fit_a_frame_is_too_large_and_nothing_is_sent(
    client: AgentClient, call: dict[str, Any], size: str
) -> None:
    with pytest.raises(TooLarge) as caught:
        client.exec(**call)
    assert caught.value.message == (
        f"exec: its arguments take {size} MiB encoded; a call's arguments (argv, "
        "environment, paths) must fit in 1 MiB"
    )
    assert client.exec(["echo", "next"]).stdout == b"next\n"  # the link is as it was
