"""The guest agent inside a real VM: concurrency, files, re-identification."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator

import pytest

from pyro_mcp.errors import AgentUnavailable, GuestError, OperationTimeout
from pyro_mcp.guest.client import AgentClient
from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.vmm.base import VM
from pyro_mcp.vmm.launch import build_spec, create_vm, discard_vm, start_owned
from pyro_mcp.vmm.selection import choose_backend

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def booted(runtime: RuntimePaths) -> Iterator[tuple[VM, AgentClient]]:
    choice = choose_backend(runtime)
    spec = build_spec(runtime, environment="debian:12", choice=choice)
    vm = create_vm(runtime, spec, choice)
    try:
        start_owned(vm)
        yield vm, vm.wait_ready(timeout_s=60)
    finally:
        discard_vm(vm)


def test_a_ping_is_answered_while_a_command_runs(booted: tuple[VM, AgentClient]) -> None:
    _, agent = booted
    finished: list[float] = []
    worker = threading.Thread(
        target=lambda: finished.append(agent.exec(["sleep", "2"]).duration_ms)
    )
    worker.start()
    time.sleep(0.3)
    agent.ping()
    assert not finished  # the ping came back while the command still ran
    worker.join()
    assert finished and finished[0] >= 1900


def test_files_round_trip_binary_safe(booted: tuple[VM, AgentClient]) -> None:
    _, agent = booted
    data = os.urandom(3 << 20) + b"\x00\xff" * 100
    agent.put_file("/tmp/blob", data, mode=0o640)
    back, info = agent.get_file("/tmp/blob")
    assert back == data and info["mode"] == 0o640
    digest = agent.exec(["sha256sum", "/tmp/blob"]).stdout.split()[0].decode()
    assert digest == hashlib.sha256(data).hexdigest()


def test_symlink_escapes_are_refused_inside_the_guest(booted: tuple[VM, AgentClient]) -> None:
    _, agent = booted
    agent.exec(["sh", "-c", "mkdir -p /tmp/root && ln -sf /etc /tmp/root/etc"])
    with pytest.raises(GuestError) as caught:
        agent.get_file("/tmp/root/etc/shadow", root="/tmp/root")
    assert caught.value.guest_code == "outside_root"


def test_a_restored_guest_can_be_reidentified(booted: tuple[VM, AgentClient]) -> None:
    _, agent = booted
    before = agent.exec(["sh", "-c", "head -c 16 /dev/urandom | od -An -tx1"]).stdout
    target = time.time_ns() + 3600 * 10**9
    value, _ = agent.call(
        "reidentify",
        {"hostname": "clone-7", "time_ns": target, "seed": os.urandom(32).hex()},
    )
    assert value["reidentified"] == ["clock", "rng", "hostname"]
    assert agent.exec(["hostname"]).stdout == b"clone-7\n"
    guest_now = int(agent.exec(["date", "+%s"]).stdout)
    assert abs(guest_now - target // 10**9) < 30
    after = agent.exec(["sh", "-c", "head -c 16 /dev/urandom | od -An -tx1"]).stdout
    assert after != before


def test_a_killed_agent_is_restarted_and_the_host_learns_of_it(
    booted: tuple[VM, AgentClient],
) -> None:
    _, agent = booted
    old_pid = agent.hello()["pid"]
    with pytest.raises(AgentUnavailable, match="restarted"):
        agent.exec(["sh", "-c", f"kill -9 {old_pid}; sleep 30"], timeout_s=20)
    deadline = time.monotonic() + 20
    while True:
        try:
            hello = agent.hello(timeout_s=2)
            break
        except OperationTimeout:
            assert time.monotonic() < deadline, "the agent did not come back"
    assert hello["pid"] != old_pid
    assert agent.exec(["echo", "back"]).stdout == b"back\n"


def test_guest_time_keeps_pace_with_the_host(booted: tuple[VM, AgentClient]) -> None:
    """A guest `sleep 10` takes 10 s of host time, within 5 % (a TCG guest keeps time by
    the TSC frequency it is given on its command line)."""
    _, agent = booted
    started = time.monotonic()
    agent.exec(["true"], timeout_s=30)
    overhead = time.monotonic() - started
    started = time.monotonic()
    result = agent.exec(["sleep", "10"], timeout_s=60)
    host_s = time.monotonic() - started - overhead
    assert result.exit_code == 0
    assert 9.5 <= host_s <= 10.5, f"guest sleep 10 took {host_s:.2f} s of host time"
