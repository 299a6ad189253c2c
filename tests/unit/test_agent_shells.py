"""PTY shells of the guest agent, served over a socketpair."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyro_mcp.errors import GuestError
from pyro_mcp.guest.client import AgentClient
from pyro_mcp.guest_agent import ops_shells


@pytest.fixture
def client(agent_client: AgentClient) -> Iterator[AgentClient]:
    yield agent_client
    ops_shells.close_all()


def _refused(code: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> GuestError:
    with pytest.raises(GuestError) as caught:
        call(*args, **kwargs)
    assert caught.value.guest_code == code, caught.value.message
    return caught.value


def _read_until(
    client: AgentClient, shell_id: str, cursor: int, wanted: Callable[[str], bool]
) -> tuple[str, int]:
    """Read (plain) from ``cursor`` until the text read so far satisfies ``wanted``."""
    text = ""
    deadline = time.monotonic() + 15
    while True:
        got = client.shell_read(shell_id, cursor, plain=True, wait_for_idle_ms=100)
        text += got["output"]
        cursor = got["next_cursor"]
        if wanted(text):
            return text, cursor
        assert time.monotonic() < deadline, f"never saw what was wanted in {text!r}"


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.split("\n")]


def test_a_shell_runs_commands_and_survives_ctrl_c(client: AgentClient) -> None:
    opened = client.shell_open(cwd="/", cols=100, rows=40)
    shell_id = opened["shell_id"]
    assert opened["pid"] > 0 and (opened["cols"], opened["rows"]) == (100, 40)

    client.shell_write(shell_id, "cd /tmp && pwd")
    text, cursor = _read_until(client, shell_id, 0, lambda t: "/tmp" in _lines(t))
    assert "\x1b" not in text and "\r\n" not in text  # plain

    client.shell_write(shell_id, "stty size")
    _, cursor = _read_until(client, shell_id, cursor, lambda t: "40 100" in _lines(t))
    assert client.shell_resize(shell_id, cols=132, rows=50)["cols"] == 132
    client.shell_write(shell_id, "stty size")
    _, cursor = _read_until(client, shell_id, cursor, lambda t: "50 132" in _lines(t))

    def foreground() -> int:
        (info,) = [s for s in client.shell_list() if s["shell_id"] == shell_id]
        return int(info["foreground_pgid"])

    def running(pgid: int) -> bytes:
        try:
            return Path(f"/proc/{pgid}/cmdline").read_bytes()
        except OSError:
            return b""

    assert foreground() == opened["pid"]  # idle: the shell itself
    assert client.shell_write(shell_id, "sleep 100")["complete"]
    deadline = time.monotonic() + 15
    while not running(foreground()).startswith(b"sleep\0"):  # exec'd in the foreground
        assert time.monotonic() < deadline
        time.sleep(0.02)
    signalled = client.shell_signal(shell_id)
    assert signalled["signal"] == "INT" and signalled["pgid"] != opened["pid"]
    client.shell_write(shell_id, 'echo aft""er')  # the echo of the typed line never matches
    _, cursor = _read_until(client, shell_id, cursor, lambda t: "after" in _lines(t))
    assert client.shell_read(shell_id, cursor)["alive"]


def test_cursors_read_only_new_output(client: AgentClient) -> None:
    shell_id = client.shell_open()["shell_id"]
    client.shell_write(shell_id, "echo one-$((1+1))")
    _, cursor = _read_until(client, shell_id, 0, lambda t: "one-2" in _lines(t))
    client.shell_write(shell_id, "echo three-$((1+2))")
    newer, _ = _read_until(client, shell_id, cursor, lambda t: "three-3" in _lines(t))
    assert "one-2" not in newer
    raw = client.shell_read(shell_id, cursor, max_chars=5)
    assert raw["cursor"] == cursor and raw["next_cursor"] == cursor + 5 and raw["more"]
    assert not raw["truncated"]


def test_output_beyond_the_buffer_is_dropped_and_flagged(
    client: AgentClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ops_shells, "BUFFER_CAP", 4096)
    shell_id = client.shell_open()["shell_id"]
    client.shell_write(shell_id, "head -c 20000 /dev/zero | tr '\\0' a; echo; echo do''ne")
    _read_until(client, shell_id, 0, lambda t: "done" in _lines(t))
    got = client.shell_read(shell_id, 0)
    assert got["truncated"] and got["cursor"] > 0
    assert got["end"] - got["cursor"] <= 4096


def test_exit_close_and_refusals(client: AgentClient) -> None:
    shell_id = client.shell_open()["shell_id"]
    assert shell_id in {shell["shell_id"] for shell in client.shell_list()}
    error = _refused("too_large", client.shell_write, shell_id, "x" * (70 << 10))
    assert "65536" in error.message
    _refused("not_found", client.shell_read, "shell-nope")
    _refused("not_found", client.shell_write, "shell-nope", "ls")
    _refused("invalid_argument", client.shell_signal, shell_id, "NOPE")

    client.shell_write(shell_id, "exit 7")
    deadline = time.monotonic() + 15
    while client.shell_read(shell_id)["alive"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.shell_read(shell_id)["exit_code"] == 7
    assert (
        "exited with code 7"
        in _refused("invalid_state", client.shell_write, shell_id, "ls").message
    )

    other = client.shell_open()["shell_id"]
    closed = client.shell_close(other)
    assert closed["closed"]
    error = _refused("invalid_state", client.shell_write, other, "ls")
    assert other in error.message and "closed" in error.message
    _refused("invalid_state", client.shell_read, other)
    assert other not in {shell["shell_id"] for shell in client.shell_list()}
    client.shell_close(shell_id)


def test_plain_strips_terminal_control_sequences() -> None:
    raw = "\x1b]0;title\x07\x1b[?2004h\x1b[1;32mgreen\x1b[0m\r\r\nnext\x1b(Bline\x1b=\r\n"
    assert ops_shells.strip_controls(raw) == "green\nnextline\n"
    assert ops_shells._utf8_cut("é".encode()[:1]) == 0
    assert ops_shells._utf8_cut(b"ab" + "€".encode()[:2]) == 2
    assert ops_shells._utf8_cut("a€".encode()) == 4
