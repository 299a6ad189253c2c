"""``pyro mcp serve`` over stdio answers every request, even one the SDK cannot parse.

The server runs as its own process (as an MCP client starts it) with an empty cache and
state, so nothing can boot; each test reads the raw lines it writes, as a client would.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"},
    },
}


class StdioServer:
    def __init__(self, tmp_path: Path) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": str(SRC),
            "PYRO_CACHE_DIR": str(tmp_path / "cache"),
            "PYRO_STATE_DIR": str(tmp_path / "state"),
            "PYRO_RUN_DIR": str(tmp_path / "run"),
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pyro_mcp.cli.main",
                "mcp",
                "serve",
                "--profile",
                "workspace-full",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=tmp_path,
        )
        self.send(json.dumps(INIT))
        assert self.receive()["id"] == 0
        self.send(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode("utf-8", "surrogatepass") + b"\n")
        self.process.stdin.flush()

    def receive(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """The next line the server writes, which must be strict JSON."""
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        assert ready, f"no answer within {timeout_s} s"
        raw = self.process.stdout.readline()
        return dict(json.loads(raw, parse_constant=_not_json))

    def close(self) -> int:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            return self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()


def _not_json(name: str) -> None:
    raise AssertionError(f"the server wrote {name}, which is not JSON")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StdioServer]:
    served = StdioServer(tmp_path_factory.mktemp("stdio"))
    yield served
    assert served.close() == 0  # EOF on stdin ends it cleanly


def _call(ident: int, name: str, arguments: dict[str, Any]) -> str:
    params = {"name": name, "arguments": arguments}
    return json.dumps({"jsonrpc": "2.0", "id": ident, "method": "tools/call", "params": params})


def test_a_lone_surrogate_in_an_argument_gets_an_invalid_params_error(
    server: StdioServer,
) -> None:
    server.send(_call(1, "workspace_status", {"workspace_id": "ws\ud800"}))
    assert server.receive() == {
        "jsonrpc": "2.0",
        "id": 1,
        "error": {
            "code": -32602,
            "message": "Invalid params: params.arguments.workspace_id holds a lone surrogate "
            "(U+D800), which is not Unicode text",
        },
    }


@pytest.mark.parametrize(
    ("params", "kind"), [([1, 2], "an array"), ("x", "a string"), (5, "a number")]
)
def test_params_that_are_not_an_object_get_an_invalid_request_error(
    server: StdioServer, params: object, kind: str
) -> None:
    server.send(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": params}))
    answer = server.receive()
    assert answer["id"] == 2
    assert answer["error"] == {
        "code": -32600,
        "message": f"Invalid Request: params must be an object, got {kind}",
    }


@pytest.mark.parametrize(
    ("line", "code", "message"),
    [
        ('{"jsonrpc": "2.0", "id": ', -32700, "Parse error: the line is not a JSON document"),
        ("[1, 2]", -32600, "Invalid Request: a message is a JSON object"),
    ],
)
def test_a_line_that_is_no_request_gets_an_error_with_a_null_id(
    server: StdioServer, line: str, code: int, message: str
) -> None:
    server.send(line)
    assert server.receive() == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": code, "message": message},
    }


@pytest.mark.parametrize("ttl", ["Infinity", 1e400])
def test_an_infinite_ttl_is_a_tool_error_in_strict_json(server: StdioServer, ttl: object) -> None:
    server.send(_call(3, "workspace_update", {"workspace_id": "ws", "ttl_seconds": ttl}))
    answer = server.receive()  # strict JSON, or receive() fails
    assert answer["id"] == 3 and answer["result"]["isError"] is True
    text = answer["result"]["content"][0]["text"]
    assert text.endswith(
        "invalid_argument: ttl_seconds must be a number greater than 0 and at most 31536000, "
        f"got {'inf' if ttl != 'Infinity' else repr(ttl)}"
    )


def test_the_server_still_answers_after_bad_lines(server: StdioServer) -> None:
    server.send("not json at all")
    assert server.receive()["error"]["code"] == -32700
    server.send(json.dumps({"jsonrpc": "2.0", "id": 4, "method": "tools/list"}))
    answer = server.receive()
    assert answer["id"] == 4
    assert "workspace_exec" in {tool["name"] for tool in answer["result"]["tools"]}
