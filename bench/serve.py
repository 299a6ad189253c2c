"""``pyro serve`` measured (REST rows), and the real ``pyro serve`` process on a free
loopback port that these rows and the tests of tests/serve/ drive."""

from __future__ import annotations

import contextlib
import json
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
LOG_TO_FOLLOW_ROW = ("a service's log line to a `service_logs/stream` follow client", "ms", 1)
TERMINAL_ROW = ("dashboard terminal: a key typed to its echo on the terminal stream", "ms", 1)
REST_NOTES = (
    "httpx keep-alive client, a running workspace; the operation row of the workspace "
    "section is the same call in process",
    "POST /api/v1/workspace_exec/stream of `echo x; sleep 0.2`: until its first `output` event",
    "a service `tail -F`s a file; from the exec appending a line to it returning, to the "
    "line in an `update` of GET /events/workspaces/ID (polled every 250 ms)",
    "the same line, to its `output` event of POST /api/v1/service_logs/stream {follow: true}",
    "POST /api/v1/shell_write of one character (no newline) until the PTY's echo arrives "
    "on GET /events/terminal/ID (the stream xterm.js renders)",
)


def measure_serve(table: Any, cache_dir: Path, run_root: Path, environment: str, n: int) -> None:
    """REST rows: a ``pyro serve`` of this cache, one workspace, ``n`` calls each."""
    import tempfile

    specs = (REST_EXEC_ROW, REST_STREAM_ROW, LOG_TO_SSE_ROW, LOG_TO_FOLLOW_ROW, TERMINAL_ROW)
    rows = [table.row(*spec) for spec in specs]
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
                measure_log_to_events(client, wid, rows[2], rows[3], n)
                measure_terminal_echo(client, wid, rows[4], n)
            finally:
                client.post("/api/v1/workspace_delete", json={"workspace_id": wid})
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure_log_to_events(
    client: httpx.Client, wid: str, dashboard_row: Any, follow_row: Any, n: int
) -> None:
    """From a line written where a service's ``tail -F`` reads, to that line in the
    dashboard's event stream of the workspace, and in a follow stream of its logs."""
    client.post("/api/v1/workspace_exec", json={"workspace_id": wid, "command": "touch /tmp/src"})
    started = client.post(
        "/api/v1/service_start",
        json={"workspace_id": wid, "service_name": "tail", "command": "tail -F /tmp/src"},
    )
    if started.status_code != 200:
        raise RuntimeError(f"service_start: {started.status_code} {started.text[:120]}")
    follow = {"workspace_id": wid, "service_name": "tail", "follow": True, "tail_lines": 0}
    readers = [
        _Marks(client, "GET", f"/events/workspaces/{wid}", None),
        _Marks(client, "POST", "/api/v1/service_logs/stream", follow),
    ]
    time.sleep(1.0)  # both streams are open and have sent what was there before
    for index in range(n):
        mark = f"LINE-{index}"
        call = {"workspace_id": wid, "command": f"echo {mark} >> /tmp/src"}
        client.post("/api/v1/workspace_exec", json=call)
        written = time.perf_counter()
        for reader, row in zip(readers, (dashboard_row, follow_row), strict=True):
            at = reader.wait(mark, timeout=10)
            if at is not None:
                row.add((at - written) * 1000)
    client.post(
        "/api/v1/service_stop", json={"workspace_id": wid, "service_name": "tail"}
    )  # ends the follow stream


class _Marks:
    """A stream read in a thread, noting when each ``LINE-N`` mark first arrived."""

    def __init__(self, client: httpx.Client, method: str, url: str, body: Any) -> None:
        import threading

        self.arrived: dict[str, float] = {}
        self.seen = threading.Condition()
        self.thread = threading.Thread(
            target=self._read, args=(client, method, url, body), daemon=True
        )
        self.thread.start()

    def _read(self, client: httpx.Client, method: str, url: str, body: Any) -> None:
        with (
            contextlib.suppress(httpx.HTTPError),
            client.stream(method, url, json=body, timeout=None) as events,
        ):  # it ends when the client is closed under it
            for line in events.iter_lines():
                for mark in re.findall(r"LINE-\d+", line):
                    with self.seen:
                        self.arrived.setdefault(mark, time.perf_counter())
                        self.seen.notify_all()

    def wait(self, mark: str, timeout: float) -> float | None:
        with self.seen:
            self.seen.wait_for(lambda: mark in self.arrived, timeout=timeout)
            return self.arrived.get(mark)


def measure_terminal_echo(client: httpx.Client, wid: str, row: Any, n: int) -> None:
    """From typing one character into the dashboard terminal's shell to its echo arriving
    on the terminal's event stream."""
    import threading

    chunks: list[tuple[float, str]] = []
    opened = threading.Event()
    shell: dict[str, str] = {}
    done = threading.Event()

    def read() -> None:
        with (
            contextlib.suppress(httpx.HTTPError),
            client.stream("GET", f"/events/terminal/{wid}", timeout=None) as events,
        ):
            event = ""
            for line in events.iter_lines():
                if done.is_set():
                    return
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: ") and event == "opened":
                    shell.update(json.loads(line.removeprefix("data: ")))
                    opened.set()
                elif line.startswith("data: ") and event == "output":
                    chunks.append((time.perf_counter(), json.loads(line[6:])["text"]))

    threading.Thread(target=read, daemon=True).start()
    if not opened.wait(30):
        return
    time.sleep(1.0)  # the prompt has come
    for index in range(n):
        key = "abcdefghijklmnopqrstuvwxyz"[index % 26]
        seen = len(chunks)
        write = {"workspace_id": wid, "shell_id": shell["shell_id"], "input": key}
        started = time.perf_counter()
        client.post("/api/v1/shell_write", json={**write, "append_newline": False})
        deadline = started + 10
        while time.perf_counter() < deadline:
            echoed = [at for at, text in chunks[seen:] if key in text]
            if echoed:
                row.add((echoed[0] - started) * 1000)
                break
            time.sleep(0.002)
    done.set()
