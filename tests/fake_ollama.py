"""A stand-in Ollama server on loopback for ``pyro demo ollama``: its ``/api/chat`` answers
from a script (one reply per request, each a function of the request), and it keeps what
it was sent. Nothing leaves the machine: it listens on 127.0.0.1 only."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# A reply: (HTTP status, body bytes), made from the request's decoded body.
Reply = Callable[[dict[str, Any]], tuple[int, bytes]]


def answer(content: str) -> Reply:
    """The model's final words: no tool call."""
    return lambda _request: _ok({"role": "assistant", "content": content})


def calls(*tool_calls: tuple[str, Any]) -> Reply:
    """The model asks for ``(name, arguments)`` tool calls."""
    asked = [{"function": {"name": name, "arguments": args}} for name, args in tool_calls]
    return lambda _request: _ok({"role": "assistant", "content": "", "tool_calls": asked})


def raw(status: int, body: bytes) -> Reply:
    return lambda _request: (status, body)


def _ok(message: dict[str, Any]) -> tuple[int, bytes]:
    return 200, json.dumps({"model": "m", "message": message, "done": True}).encode()


def tool_results(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The tool messages of a request, their content decoded."""
    return [
        {**m, "content": json.loads(m["content"])}
        for m in request["messages"]
        if m.get("role") == "tool"
    ]


@dataclass
class FakeOllama:
    url: str
    script: list[Reply]
    requests: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


@contextmanager
def fake_ollama(*script: Reply, delay_s: float = 0.0) -> Iterator[FakeOllama]:
    """A server answering ``script``'s replies in turn (HTTP 500 once it runs out)."""
    served = FakeOllama("", list(script))
    stop = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            served.paths.append(self.path)
            served.requests.append(body)
            if delay_s:
                stop.wait(delay_s)
            status, data = (
                served.script.pop(0)(body) if served.script else (500, b'{"error":"script over"}')
            )
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    served.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
