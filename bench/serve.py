"""``pyro serve`` measured (REST rows), and the real ``pyro serve`` process on a free
loopback port that these rows and the tests of tests/serve/ drive."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

START_TIMEOUT_S = 60.0


@dataclass
class Served:
    url: str
    token: str
    state_dir: Path
    root: Path
    process: subprocess.Popen[str]
    stderr_path: Path

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def client(self, **options: object) -> httpx.Client:
        """An HTTP client sending the token."""
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=300, **options)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def pyro_serve(
    work: Path,
    *args: str,
    env: dict[str, str] | None = None,
    state_dir: Path | None = None,
) -> Iterator[Served]:
    """``pyro serve --listen 127.0.0.1:PORT --root WORK/root ARGS``, up and answering."""
    state = state_dir or work / "state"
    root = work / "root"
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    stderr_path = work / f"serve-{port}.log"
    environ = {**os.environ, "PYRO_STATE_DIR": str(state), **(env or {})}
    with stderr_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pyro_mcp.cli.main", "serve", "--listen",
             f"127.0.0.1:{port}", "--root", str(root), *args],
            stdout=log, stderr=log, text=True, env=environ,
        )  # fmt: skip
    url = f"{'https' if '--tls-cert' in args else 'http'}://127.0.0.1:{port}"
    try:
        token = _wait_until_up(process, url, state, stderr_path, args)
        yield Served(url, token, state, root, process, stderr_path)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_up(
    process: subprocess.Popen[str], url: str, state: Path, log: Path, args: tuple[str, ...]
) -> str:
    token_path = Path(args[args.index("--token-file") + 1]) if "--token-file" in args else None
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pyro serve exited {process.returncode}: {log.read_text()}")
        path = token_path or state / "serve" / "token"
        if path.exists() and "Application startup complete" in log.read_text():
            token = path.read_text().strip()
            bearer = {"Authorization": f"Bearer {token}"}
            answer = httpx.get(f"{url}/api/v1/openapi.json", headers=bearer, verify=False)
            if answer.status_code == 200:
                return token
        time.sleep(0.1)
    raise RuntimeError(f"pyro serve did not come up: {log.read_text()}")


# --- the bench rows ------------------------------------------------------------------------

REST_EXEC_ROW = ("REST exec `true` round trip (POST /api/v1/workspace_exec)", "ms", 1)
REST_STREAM_ROW = ("REST exec stream: request to the first output event (`echo`)", "ms", 1)
LOG_TO_SSE_ROW = ("a service's log line to the dashboard's event stream", "ms", 1)
REST_NOTES = (
    "httpx keep-alive client, a running workspace; the operation row of the workspace "
    "section is the same call in process",
    "POST /api/v1/workspace_exec/stream of `echo x; sleep 0.2`: until its first `output` event",
    "a service `tail -F`s a file; from the exec appending a line to it returning, to the "
    "line in an `update` of GET /events/workspaces/ID (polled every 250 ms)",
)


def measure_serve(table: Any, cache_dir: Path, run_root: Path, environment: str, n: int) -> None:
    """REST rows: a ``pyro serve`` of this cache, one workspace, ``n`` calls each."""
    import tempfile

    rows = [table.row(*REST_EXEC_ROW), table.row(*REST_STREAM_ROW), table.row(*LOG_TO_SSE_ROW)]
    for row, note in zip(rows, REST_NOTES, strict=True):
        row.note = note
    work = Path(tempfile.mkdtemp(prefix="pyro-bench-serve-"))
    env = {"PYRO_CACHE_DIR": str(cache_dir), "PYRO_RUN_DIR": str(run_root)}
    try:
        with pyro_serve(work, env=env) as server, server.client() as client:
            made = client.post("/api/v1/workspace_create", json={"environment": environment})
            if made.status_code != 200:
                raise RuntimeError(f"workspace_create: {made.status_code} {made.text[:120]}")
            wid = made.json()["workspace_id"]
            try:
                call = {"workspace_id": wid, "command": ["true"]}
                client.post("/api/v1/workspace_exec", json=call)  # warm, untimed
                for _ in range(n):
                    started = time.perf_counter()
                    answer = client.post("/api/v1/workspace_exec", json=call)
                    if answer.status_code == 200 and answer.json()["exit_code"] == 0:
                        rows[0].add((time.perf_counter() - started) * 1000)
                stream = {"workspace_id": wid, "command": "echo x; sleep 0.2"}
                for _ in range(n):
                    started = time.perf_counter()
                    with client.stream("POST", "/api/v1/workspace_exec/stream", json=stream) as sse:
                        for line in sse.iter_lines():
                            if line == "event: output":
                                rows[1].add((time.perf_counter() - started) * 1000)
                                break
                measure_log_to_events(client, wid, rows[2], n)
            finally:
                client.post("/api/v1/workspace_delete", json={"workspace_id": wid})
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure_log_to_events(client: httpx.Client, wid: str, row: Any, n: int) -> None:
    """From a line written where a service's ``tail -F`` reads, to that line in the
    dashboard's event stream of the workspace."""
    import threading

    client.post("/api/v1/workspace_exec", json={"workspace_id": wid, "command": "touch /tmp/src"})
    started = client.post(
        "/api/v1/service_start",
        json={"workspace_id": wid, "service_name": "tail", "command": "tail -F /tmp/src"},
    )
    if started.status_code != 200:
        raise RuntimeError(f"service_start: {started.status_code} {started.text[:120]}")
    arrived: dict[str, float] = {}
    seen = threading.Condition()
    stop = threading.Event()

    def follow() -> None:
        with client.stream("GET", f"/events/workspaces/{wid}", timeout=None) as events:
            for line in events.iter_lines():
                if stop.is_set():
                    return
                for mark in re.findall(r"LINE-\d+", line):
                    with seen:
                        arrived.setdefault(mark, time.perf_counter())
                        seen.notify_all()

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    for index in range(n):
        mark = f"LINE-{index}"
        call = {"workspace_id": wid, "command": f"echo {mark} >> /tmp/src"}
        client.post("/api/v1/workspace_exec", json=call)
        written = time.perf_counter()
        with seen:
            if seen.wait_for(lambda m=mark: m in arrived, timeout=10):  # type: ignore[misc]
                row.add((arrived[mark] - written) * 1000)
    stop.set()
