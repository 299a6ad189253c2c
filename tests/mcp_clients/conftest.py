"""MCP clients we did not write, against ``pyro mcp serve``: the official MCP Inspector
(its CLI mode) and the official conformance suite, both from npm at the versions pinned in
tests/npm/mcp-clients/ (``make npm-packages`` installs them). No VM boots: the server runs
with an empty cache and state, so every tool that would boot one fails first.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ROOT / "tests" / "npm" / "mcp-clients"
BIN = CLIENTS / "node_modules" / ".bin"
PROFILE = "workspace-full"  # every MCP tool
SERVE = [sys.executable, "-m", "pyro_mcp.cli.main", "mcp", "serve", "--profile", PROFILE]
STARTUP_S = 60.0  # for the HTTP server to listen (a bound: it takes ~1 s here)


@pytest.fixture(scope="session")
def node_bin() -> Path:
    """tests/npm/mcp-clients/node_modules/.bin, with the clients (and Node.js 22) in it."""
    if not (BIN / "inspector").exists() or not (BIN / "conformance").exists():
        why = f"the MCP clients are not installed in {CLIENTS}: run `make npm-packages`"
        if os.environ.get("CI"):
            pytest.fail(why)  # CI installs them: their absence is a broken setup
        pytest.skip(why)
    return BIN


@pytest.fixture(scope="session")
def served_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the servers keep their (empty) cache, state and run directory, and logs."""
    return tmp_path_factory.mktemp("mcp-clients")


@pytest.fixture(scope="session")
def server_env(served_dir: Path) -> dict[str, str]:
    """The server's environment: this checkout's code, an empty cache, state and run dir."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "PYRO_CACHE_DIR": str(served_dir / "cache"),
        "PYRO_STATE_DIR": str(served_dir / "state"),
        "PYRO_RUN_DIR": str(served_dir / "run"),
    }


@pytest.fixture(scope="session")
def client_env(node_bin: Path, served_dir: Path) -> dict[str, str]:
    """The clients' environment: their own Node.js first on PATH, a private HOME (the
    Inspector keeps a catalog there)."""
    home = served_dir / "home"
    home.mkdir()
    return {**os.environ, "PATH": f"{node_bin}{os.pathsep}{os.environ['PATH']}", "HOME": str(home)}


@pytest.fixture(scope="session")
def http_url(server_env: dict[str, str], served_dir: Path) -> Iterator[str]:
    """``pyro mcp serve --http 127.0.0.1:PORT`` running (one for the session); its URL."""
    port = _free_port()
    log = (served_dir / "server.log").open("w")
    server = subprocess.Popen(
        [*SERVE, "--http", f"127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=server_env,
        cwd=served_dir,
    )
    try:
        _wait_listening(server, port, served_dir / "server.log")
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_listening(server: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited ({server.returncode}): {log.read_text()}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"the server did not listen within {STARTUP_S} s: {log.read_text()}")


@dataclass
class Answer:
    """What the Inspector CLI printed for one method: its exit code, the JSON document on
    stdout (``result`` or ``error``) and stderr."""

    returncode: int
    document: dict[str, Any]
    stderr: str

    @property
    def result(self) -> Any:
        assert "result" in self.document, (self.document, self.stderr)
        return self.document["result"]


@dataclass
class Inspector:
    """``inspector --cli`` against one server: a stdio command, or an HTTP URL."""

    env: dict[str, str]
    target: list[str]
    cwd: Path

    def __call__(self, method: str, *options: str, strict: bool = False) -> Answer:
        argv = [
            str(BIN / "inspector"),
            "--cli",
            "--format",
            "json",
            *(["--strict"] if strict else []),
            *self.target,
            "--method",
            method,
            *options,
        ]
        done = subprocess.run(
            argv, env=self.env, cwd=self.cwd, capture_output=True, text=True, timeout=120
        )
        return Answer(done.returncode, json.loads(done.stdout or "{}"), done.stderr)


@pytest.fixture(params=["stdio", "http"])
def inspector(
    request: pytest.FixtureRequest,
    client_env: dict[str, str],
    server_env: dict[str, str],
    tmp_path: Path,
) -> Inspector:
    """The Inspector CLI against ``pyro mcp serve``, over stdio and over streamable HTTP."""
    if request.param == "http":
        return Inspector(client_env, [request.getfixturevalue("http_url")], tmp_path)
    passed = ["PYTHONPATH", "PYRO_CACHE_DIR", "PYRO_STATE_DIR", "PYRO_RUN_DIR"]
    env_options = [part for name in passed for part in ("-e", f"{name}={server_env[name]}")]
    return Inspector(client_env, [*env_options, *SERVE], tmp_path)
