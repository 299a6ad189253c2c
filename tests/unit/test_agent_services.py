"""Services of the guest agent, served over a socketpair, with a temporary run directory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyro_mcp.errors import GuestError
from pyro_mcp.guest.client import AgentClient
from pyro_mcp.guest_agent import ops_services
from pyro_mcp.guest_agent.agent import Agent


def _serve(sock: socket.socket) -> threading.Thread:
    agent = Agent(sock.fileno(), poweroff=lambda: None)
    thread = threading.Thread(target=agent.serve, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    run = tmp_path / "run"
    monkeypatch.setenv(ops_services.RUN_DIR_ENV, str(run))
    yield run
    # Leave no process behind, whatever the test did.
    ops_services.registry().stop_all(signal.SIGKILL, "KILL", 0.0)


@pytest.fixture
def client(run_dir: Path, agent_client: AgentClient) -> AgentClient:
    return agent_client  # after run_dir: the agent reads its run dir when it is built


def _refused(code: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> GuestError:
    with pytest.raises(GuestError) as caught:
        call(*args, **kwargs)
    assert caught.value.guest_code == code, caught.value.message
    return caught.value


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _eventually(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _texts(value: dict[str, Any], stream: str) -> list[str]:
    return [line["text"] for line in value["lines"] if line["stream"] == stream]


def test_two_services_start_concurrently_and_become_ready(
    client: AgentClient, tmp_path: Path
) -> None:
    port = _free_port()
    flag = tmp_path / "flag"
    results: dict[str, dict[str, Any]] = {}

    def start_web() -> None:
        results["web"] = client.service_start(
            "web",
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
            cwd=str(tmp_path),
            ready={"type": "http", "url": f"http://127.0.0.1:{port}/"},
            ready_timeout_s=20,
        )

    def start_worker() -> None:
        results["worker"] = client.service_start(
            "worker",
            shell=f"echo hello-out; echo hello-err >&2; sleep 0.5; touch {flag}; sleep 1000",
            ready={"type": "file", "path": str(flag)},
            ready_interval_ms=50,
        )

    threads = [threading.Thread(target=start_web), threading.Thread(target=start_worker)]
    for thread in threads:
        thread.start()
    client.ping()  # answered while both wait for readiness
    for thread in threads:
        thread.join(30)
    assert results["web"]["state"] == "ready" and results["worker"]["state"] == "ready"
    assert results["worker"]["ready_ms"] >= 400

    listed = {svc["name"]: svc for svc in client.service_list()}
    assert set(listed) == {"web", "worker"}
    for name in ("web", "worker"):
        status = client.service_status(name)
        assert status["state"] == "ready" and status["pid"] == listed[name]["pid"] > 0
        os.kill(status["pid"], 0)
    assert listed["web"]["probe"] == {"type": "http", "url": f"http://127.0.0.1:{port}/"}

    logs = client.service_logs("worker")
    assert _texts(logs, "stdout") == ["hello-out"] and _texts(logs, "stderr") == ["hello-err"]
    assert [line["stream"] for line in logs["lines"]] == ["stdout", "stderr"]
    web = client.service_logs("web", stream="stderr")
    assert any('"GET / HTTP/1.1" 200' in text for text in _texts(web, "stderr"))
    assert client.service_logs("worker", stream="stdout", tail_lines=0)["lines"] == []
    # Logs and state live in the run directory.
    assert (tmp_path / "run" / "services" / "worker" / "state.json").is_file()


def test_command_probe_and_logs_follow(client: AgentClient, tmp_path: Path) -> None:
    flag = tmp_path / "ok"
    started = client.service_start(
        "cmd",
        shell=f"sleep 0.3; touch {flag}; sleep 1000",
        ready={"type": "command", "shell": f"test -e {flag}"},
        ready_interval_ms=50,
    )
    assert started["state"] == "ready"
    client.service_start(
        "ticker", shell="echo first; for i in 1 2 3; do sleep 0.1; echo tick$i; done; echo bye >&2"
    )
    seen: list[tuple[str, str]] = []
    value = client.service_logs("ticker", follow=True, on_line=lambda s, t: seen.append((s, t)))
    assert value["ended"] == "exited"
    assert [t for s, t in seen if s == "stdout"] == ["first", "tick1", "tick2", "tick3"]
    assert ("stderr", "bye") in seen
    assert client.service_status("ticker")["state"] == "exited"


def test_tcp_probe_on_a_closed_port_fails_with_not_ready(client: AgentClient) -> None:
    port = _free_port()
    error = _refused(
        "not_ready",
        client.service_start,
        "lonely",
        shell="echo waiting for nobody; sleep 1000",
        ready={"type": "tcp", "port": port},
        ready_timeout_s=1.0,
    )
    assert f"tcp probe 127.0.0.1:{port}" in error.message
    assert "refused" in error.message.lower()
    assert "waiting for nobody" in error.message  # the log tail
    status = client.service_status("lonely")
    assert status["state"] == "failed" and "refused" in status["last_probe_error"].lower()
    assert not ops_services._group_alive(status["pid"])  # zombies of orphans may linger here


def test_a_missing_program_or_early_exit_is_exited_before_ready(
    client: AgentClient, tmp_path: Path
) -> None:
    error = _refused("exited_before_ready", client.service_start, "ghost", ["/no/such/program"])
    assert "127" in error.message and "not found" in error.message
    assert client.service_status("ghost")["exit_code"] == 127
    error = _refused(
        "exited_before_ready",
        client.service_start,
        "doomed",
        shell="echo cannot start >&2; exit 3",
        ready={"type": "file", "path": str(tmp_path / "never")},
    )
    assert "code 3" in error.message and "cannot start" in error.message
    status = client.service_status("doomed")
    assert (status["state"], status["exit_code"]) == ("failed", 3)
    # A failed service may be started again under its name.
    again = client.service_start("doomed", shell="sleep 1000")
    assert again["state"] == "running" and again["starts"] == 2


def test_a_flooding_service_keeps_its_logs_under_the_cap(
    client: AgentClient, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cap = 64 << 10
    monkeypatch.setattr(ops_services, "LOG_CAP", cap)
    client.service_start("flood", ["yes", "flood"])
    folder = run_dir / "services" / "flood"
    older = folder / "stdout.log.1"

    def dropped() -> bool:
        return older.exists() and older.read_bytes().startswith(b"[pyro: ")

    _eventually(dropped)
    stopped = client.service_stop("flood", grace_s=2)
    assert stopped["was_running"] and stopped["state"] == "stopped"
    head = older.read_bytes().split(b"\n", 1)[0]
    assert head.endswith(b" bytes of older output dropped]")
    count, marker_len = ops_services.marker_count(older.read_bytes()[:128])
    assert count > 0 and count % len(b"flood\n") == 0  # files end with whole lines
    assert (folder / "stdout.log").stat().st_size <= cap
    assert older.stat().st_size <= cap + marker_len
    assert _texts(client.service_logs("flood", tail_lines=3), "stdout") == ["flood"] * 3


def test_stop_terms_then_kills_and_stopping_twice_is_no_error(
    client: AgentClient, tmp_path: Path
) -> None:
    client.service_start("polite", ["sleep", "1000"])
    stopped = client.service_stop("polite")
    assert stopped["was_running"] and not stopped["killed"]
    assert (stopped["state"], stopped["signal"], stopped["exit_code"]) == (
        "stopped",
        "SIGTERM",
        143,
    )
    armed = tmp_path / "armed"  # ready once TERM is ignored
    client.service_start(
        "stubborn",
        shell=f"trap '' TERM; touch {armed}; sleep 1000",
        ready={"type": "file", "path": str(armed)},
        ready_interval_ms=20,
    )
    began = time.monotonic()
    stopped = client.service_stop("stubborn", grace_s=0.5)
    assert stopped["killed"] and stopped["state"] == "stopped"
    assert time.monotonic() - began >= 0.5
    again = client.service_stop("stubborn")
    assert not again["was_running"] and again["state"] == "stopped"
    _refused("not_found", client.service_stop, "nobody")


def test_duplicates_and_invalid_arguments_are_refused(client: AgentClient) -> None:
    client.service_start("one", ["sleep", "1000"])
    assert "running" in _refused("exists", client.service_start, "one", ["true"]).message
    bad_probes: list[dict[str, Any]] = [
        {"type": "socket", "path": "/x"},
        {"type": "tcp", "port": 0},
        {"type": "tcp", "port": 70000},
        {"type": "tcp"},
        {"type": "http", "url": "https://127.0.0.1/"},
        {"type": "http", "url": "127.0.0.1:80"},
        {"type": "http", "url": "http://127.0.0.1:99999/"},
        {"type": "file"},
        {"type": "command", "argv": []},
        {"type": "command"},
    ]
    for probe in bad_probes:
        error = _refused("invalid_argument", client.service_start, "two", ["true"], ready=probe)
        assert "probe" in error.message
    for name in ("", "-dash", "../up", "a/b", "x" * 64):
        _refused("invalid_argument", client.service_start, name, ["true"])
    _refused("invalid_argument", client.service_start, "two", [])
    _refused("invalid_argument", client.service_start, "two", ["true"], restart="always")
    _refused("invalid_argument", client.call, "service_start", {"name": "two"})
    _refused("not_found", client.service_start, "two", ["true"], cwd="/no/such/dir")
    _refused("not_found", client.service_status, "two")
    _refused("invalid_argument", client.service_logs, "one", stream="stdin")
    _refused("invalid_argument", client.service_stop, "one", signal="NOPE")


def test_on_failure_restarts_count_and_a_stop_ends_them(client: AgentClient) -> None:
    started = client.service_start(
        "crashy", shell="echo run; sleep 0.1; exit 4", restart="on-failure"
    )
    assert started["restarts"] == 0 and started["restart"] == "on-failure"
    _eventually(lambda: client.service_status("crashy")["restarts"] >= 2)
    status = client.service_status("crashy")
    assert status["starts"] == 1
    stopped = client.service_stop("crashy", grace_s=1)
    assert stopped["state"] == "stopped" and not stopped["restart_pending"]
    assert client.service_status("crashy")["state"] == "stopped"
    assert _texts(client.service_logs("crashy"), "stdout").count("run") >= 2
    # A clean exit is not restarted.
    client.service_start("once", shell="exit 0", restart="on-failure")
    _eventually(lambda: client.service_status("once")["state"] == "exited")
    assert client.service_status("once")["restarts"] == 0


def test_stop_all_stops_every_running_service(client: AgentClient) -> None:
    for name in ("a", "b"):
        client.service_start(name, ["sleep", "1000"])
    client.service_start("c", ["true"])
    # c exits by itself at once; wait until the supervisor has seen it, so it is not stopped.
    _eventually(lambda: client.service_status("c")["state"] == "exited")
    done = client.service_stop_all(grace_s=2)
    assert sorted(done["stopped"]) == ["a", "b"]
    assert {svc["state"] for svc in client.service_list() if svc["name"] in "ab"} == {"stopped"}


_AGENT = "import sys; from pyro_mcp.guest_agent.agent import Agent; Agent(int(sys.argv[1])).serve()"


def test_a_restarted_agent_adopts_running_services_from_its_records(run_dir: Path) -> None:
    host, guest = socket.socketpair()
    first = subprocess.Popen(
        [sys.executable, "-c", _AGENT, str(guest.fileno())], pass_fds=[guest.fileno()]
    )
    guest.close()
    old = AgentClient(host)
    old.hello()
    try:
        keeper = old.service_start("keeper", shell="echo kept; sleep 1000")
        goner = old.service_start("goner", ["sleep", "1000"])
        _eventually(lambda: _texts(old.service_logs("keeper"), "stdout") == ["kept"])
    finally:
        first.kill()  # the agent dies; its services live on
        first.wait()
        old.close()
    os.kill(goner["pid"], signal.SIGKILL)
    _eventually(lambda: not ops_services._alive(goner["pid"]))

    host, guest = socket.socketpair()
    thread = _serve(guest)
    new = AgentClient(host)
    new.hello()
    try:
        listed = {svc["name"]: svc for svc in new.service_list()}
        assert listed["keeper"]["state"] == "running"
        assert listed["keeper"]["pid"] == keeper["pid"]
        assert "adopted" in listed["keeper"]["note"]
        assert listed["goner"]["state"] == "exited" and listed["goner"]["exit_code"] is None
        assert "exit status unknown" in listed["goner"]["note"]
        assert _texts(new.service_logs("keeper"), "stdout") == ["kept"]
        _refused("exists", new.service_start, "keeper", ["true"])
        stopped = new.service_stop("keeper", grace_s=2)
        assert stopped["was_running"] and stopped["state"] == "stopped"
        assert not ops_services._alive(keeper["pid"])
    finally:
        new.close()
        thread.join(timeout=10)
        guest.close()
