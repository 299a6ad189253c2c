"""A real OCI registry on loopback for the tests: Debian's ``docker-registry``.

:func:`start_registry` runs ``docker-registry serve`` on 127.0.0.1 with a storage dir the
test owns; with ``users`` it takes htpasswd (bcrypt) credentials for every request, with
``read_only`` it serves the storage anonymously and refuses writes. Two instances over one
storage dir are a registry that needs credentials to publish and lets anyone pull.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Registry:
    host: str  # 127.0.0.1:PORT
    storage: Path
    process: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(self.host, timeout=10)
        try:
            connection.request("GET", path, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _config(storage: Path, port: int, auth: Path | None, read_only: bool) -> dict[str, object]:
    config: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
            "maintenance": {
                "uploadpurging": {"enabled": False},
                "readonly": {"enabled": read_only},
            },
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": "pyro-test-secret"},
    }
    if auth is not None:
        config["auth"] = {"htpasswd": {"realm": "pyro-test", "path": str(auth)}}
    return config


def start_registry(
    directory: Path,
    storage: Path,
    *,
    users: dict[str, str] | None = None,
    read_only: bool = False,
) -> Registry:
    directory.mkdir(parents=True, exist_ok=True)
    storage.mkdir(parents=True, exist_ok=True)
    auth = None
    if users:
        auth = directory / "htpasswd"
        lines = [
            f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode()}" for u, p in users.items()
        ]
        auth.write_text("\n".join(lines) + "\n")
    port = free_port()
    config = directory / "config.yml"
    config.write_text(json.dumps(_config(storage, port, auth, read_only)))  # JSON is YAML
    log = directory / "registry.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["docker-registry", "serve", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    registry = Registry(f"127.0.0.1:{port}", storage, process, log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError):
            status, _ = registry.get("/v2/")
            if status in (200, 401):
                return registry
        time.sleep(0.05)
    registry.stop()
    raise RuntimeError(f"docker-registry did not answer: {log.read_text()[-2000:]}")


@contextlib.contextmanager
def registry_pair(directory: Path, users: dict[str, str]) -> Iterator[tuple[Registry, Registry]]:
    """(publishing registry with htpasswd, anonymous read-only one) over one storage."""
    storage = directory / "storage"
    auth = start_registry(directory / "auth", storage, users=users)
    try:
        anonymous = start_registry(directory / "anonymous", storage, read_only=True)
        try:
            yield auth, anonymous
        finally:
            anonymous.stop()
    finally:
        auth.stop()


class ThrottledProxy:
    """A TCP forwarder on 127.0.0.1 to ``upstream`` that sends answers at ``rate`` bytes/s,
    so a test can stop a download halfway."""

    def __init__(self, upstream: str, rate: int) -> None:
        import threading

        self.upstream = upstream
        self.rate = rate
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.host = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        import threading

        self.listener.settimeout(0.2)
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            host, port = self.upstream.rsplit(":", 1)
            server = socket.create_connection((host, int(port)))
            threading.Thread(target=self._pump, args=(client, server, 0), daemon=True).start()
            threading.Thread(
                target=self._pump, args=(server, client, self.rate), daemon=True
            ).start()

    def _pump(self, source: socket.socket, target: socket.socket, rate: int) -> None:
        try:
            while not self.stopped.is_set():
                data = source.recv(64 << 10)
                if not data:
                    break
                target.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.listener.close()
