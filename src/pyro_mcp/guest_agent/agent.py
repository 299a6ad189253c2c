"""The guest agent: serves the pyro protocol on one channel inside the VM.

Stdlib only (plus :mod:`pyro_mcp.guest.protocol`). One reader thread takes frames off the
channel; each call runs in its own thread so a slow command never blocks a ping, and
output streams back as ``data`` frames while a command runs. The same class serves a
socketpair in unit tests.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from pyro_mcp.guest import protocol as p
from pyro_mcp.guest_agent import (
    ops_archive,
    ops_exec,
    ops_files,
    ops_services,
    ops_shells,
    ops_system,
    ops_tree,
)
from pyro_mcp.guest_agent.calls import Call, CallError
from pyro_mcp.guest_agent.workers import Workers

AGENT_VERSION = "1.0"
CAPABILITIES = (
    "exec",
    "stream",
    "cancel",
    "kill",
    "put_file",
    "get_file",
    "reidentify",
    "shutdown",
    "tree_manifest",
    "list_dir",
    "remove_paths",
    "apply_tree",
    "archive_get",
    "archive_put",
    "service_start",
    "service_list",
    "service_status",
    "service_logs",
    "service_stop",
    "service_stop_all",
    "shell_open",
    "shell_read",
    "shell_write",
    "shell_signal",
    "shell_resize",
    "shell_close",
    "shell_list",
)


Handler = Callable[[Call], tuple[dict[str, Any], bytes]]


class Agent:
    """Serves one channel (a file descriptor open for reading and writing)."""

    def __init__(
        self,
        read_fd: int,
        write_fd: int | None = None,
        *,
        poweroff: Callable[[], None] = ops_system.signal_init,
    ) -> None:
        self.read_fd = read_fd
        self.write_fd = read_fd if write_fd is None else write_fd
        self._write_lock = threading.Lock()
        self._calls: dict[int, Call] = {}
        self._calls_lock = threading.Lock()
        self._closed = False
        self._workers = Workers()
        self.started = time.monotonic()
        self.handlers: dict[str, Handler] = {
            "hello": self._hello,
            "exec": ops_exec.run_exec,
            "kill": self._kill,
            "put_file": ops_files.put_file,
            "get_file": ops_files.get_file,
            "reidentify": ops_system.reidentify,
            "shutdown": ops_system.make_shutdown(poweroff),
            "tree_manifest": ops_tree.tree_manifest,
            "list_dir": ops_tree.list_dir,
            "remove_paths": ops_tree.remove_paths,
            "apply_tree": ops_tree.apply_tree,
            "archive_get": ops_archive.archive_get,
            "archive_put": ops_archive.archive_put,
            **ops_services.handlers(),  # also adopts services an earlier agent left running
            **ops_shells.handlers(),
        }

    # -- I/O -----------------------------------------------------------------------
    def send(self, frame: p.Frame) -> None:
        data = memoryview(frame.encode())
        with self._write_lock:
            if self._closed:
                # The channel is gone and its fd number may belong to something else now.
                raise BrokenPipeError("the agent channel is closed")
            while data:
                written = os.write(self.write_fd, data)
                data = data[written:]

    def announce_restart(self) -> None:
        """Tell the host that this agent replaced one that died (its calls are lost)."""
        message = "the guest agent restarted; calls in flight were lost"
        self.send(p.Frame(p.ERROR, 0, {"code": p.AGENT_RESTARTED, "message": message}))

    def serve(self) -> None:
        """Read frames until the channel closes."""
        with os.fdopen(os.dup(self.read_fd), "rb", buffering=0) as stream:
            reader = p.FrameReader(stream)
            try:
                while True:
                    try:
                        frame = reader.read()
                    except p.ChannelClosed:
                        return
                    except p.ProtocolError as exc:
                        message = {"code": "protocol", "message": str(exc)}
                        self.send(p.Frame(p.ERROR, 0, message))
                        continue
                    self._dispatch(frame)
            finally:
                with self._write_lock:
                    self._closed = True
                for call in self._running():
                    call.cancel()

    def _running(self) -> list[Call]:
        with self._calls_lock:
            return list(self._calls.values())

    def _dispatch(self, frame: p.Frame) -> None:
        if frame.t == p.CALL:
            op = str(frame.header.get("op", ""))
            if op == "ping":  # answered inline: the latency floor of the channel
                self.send(p.Frame(p.RESULT, frame.id, {"value": {}}))
                return
            args = frame.header.get("args") or {}
            call = Call(
                self.send, frame.id, op, args if isinstance(args, dict) else {}, frame.payload
            )
            with self._calls_lock:
                self._calls[frame.id] = call
            self._workers.submit(lambda: self._run(call))
            return
        with self._calls_lock:
            running = self._calls.get(frame.id)
        if running is None:
            return  # late frame for a finished call
        if frame.t == p.DATA:
            running.feed(frame.payload)
        elif frame.t == p.EOF:
            running.end_input()
        elif frame.t == p.CANCEL:
            running.cancel()

    def _run(self, call: Call) -> None:
        try:
            self.send(self._answer(call))
        except OSError:
            pass  # the host went away; nobody is left to answer
        finally:
            with self._calls_lock:
                self._calls.pop(call.id, None)

    def _answer(self, call: Call) -> p.Frame:
        handler = self.handlers.get(call.op)
        try:
            if handler is None:
                raise CallError("unknown_op", f"the agent has no operation {call.op!r}")
            value, payload = handler(call)
            return p.Frame(p.RESULT, call.id, {"value": value}, payload)
        except CallError as exc:
            return p.Frame(p.ERROR, call.id, {"code": exc.code, "message": exc.message})
        except OSError as exc:
            message = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
            return p.Frame(p.ERROR, call.id, {"code": "io_error", "message": message})
        except Exception as exc:  # a handler bug must not kill the agent
            message = f"{type(exc).__name__}: {exc}"
            return p.Frame(p.ERROR, call.id, {"code": "internal", "message": message})

    # -- built-in operations -----------------------------------------------------------
    def _hello(self, call: Call) -> tuple[dict[str, Any], bytes]:
        return {
            "protocol": p.PROTOCOL_VERSION,
            "agent_version": AGENT_VERSION,
            "capabilities": list(CAPABILITIES),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "uptime_s": _uptime(),
            "agent_uptime_s": round(time.monotonic() - self.started, 3),
        }, b""

    def _kill(self, call: Call) -> tuple[dict[str, Any], bytes]:
        target = call.args.get("call_id")
        signame = str(call.args.get("signal", "KILL")).upper().removeprefix("SIG")
        signum = getattr(signal, f"SIG{signame}", None)
        if not isinstance(target, int) or signum is None:
            raise CallError("invalid_argument", "kill needs call_id (int) and a signal name")
        with self._calls_lock:
            victim = self._calls.get(target)
        if victim is None:
            raise CallError("not_found", f"no call {target} is running")
        if victim.send_signal is None:
            raise CallError("invalid_argument", f"call {target} runs no process")
        victim.send_signal(signum)
        return {"signalled": target, "signal": signame}, b""


def _uptime() -> float:
    try:
        with open("/proc/uptime") as handle:
            return float(handle.read().split()[0])
    except OSError:
        return -1.0


# --- finding the channel inside the VM -------------------------------------------------


def _kernel_args() -> dict[str, str]:
    try:
        with open("/proc/cmdline") as handle:
            words = handle.read().split()
    except OSError:
        return {}
    return dict(word.split("=", 1) for word in words if "=" in word)


VIRTIO_PORTS = "/sys/class/virtio-ports"


def _virtio_ports(name: str, base: str = VIRTIO_PORTS) -> dict[str, str]:
    """Every virtio-serial port named ``name`` or ``name.<suffix>``: port name -> device."""
    try:
        entries = os.listdir(base)
    except OSError:
        return {}
    found = {}
    for entry in entries:
        try:
            with open(f"{base}/{entry}/name") as handle:
                port = handle.read().strip()
        except OSError:
            continue
        if port == name or port.startswith(name + "."):
            found[port] = f"/dev/{entry}"
    return found


# The driver learns of the host's ports (and their names) one message at a time: keep
# looking for new ones for a while after the first appears.
PORT_SCAN_S = 10.0


def serve_virtio_serial() -> None:
    """Serve every agent port (pyro.agent, pyro.agent.N), each in its own thread.

    Each port carries one host connection at a time, so several host processes can
    talk to the VM at once, one port each. Per-VM state lives at module level in the
    operations (e.g. the digest cache of ops_tree), shared by every port.
    """
    deadline = time.monotonic() + 10
    ports = _virtio_ports(p.AGENT_PORT_NAME)
    while not ports and time.monotonic() < deadline:
        time.sleep(0.01)
        ports = _virtio_ports(p.AGENT_PORT_NAME)
    if not ports:
        raise SystemExit("pyro-agent: no virtio-serial port named " + p.AGENT_PORT_NAME)
    restarted = os.environ.get("PYRO_RESTARTS", "0") != "0"
    serving: set[str] = set()
    first = time.monotonic()
    while True:
        for name, path in sorted(ports.items()):
            if name not in serving:
                serving.add(name)
                threading.Thread(
                    target=_serve_port, args=(path, restarted), name=name, daemon=True
                ).start()
        waited = time.monotonic() - first
        if waited > PORT_SCAN_S:
            break
        time.sleep(0.05 if waited < 1.0 else 0.5)
        ports = _virtio_ports(p.AGENT_PORT_NAME)
    threading.Event().wait()  # the port threads serve until the VM stops


def _serve_port(path: str, restarted: bool) -> None:
    """Serve one port forever: a fresh Agent each time a host connects.

    The port stays open between hosts: closing a virtio-serial port discards what the
    next host may already have sent (its hello), so a reconnect would hang. While no host
    is connected the port reads as end-of-file and polls as readable *and* hung up, so a
    level-triggered wait would spin: an edge-triggered epoll sleeps until the port's state
    changes (a host connects and writes).
    """
    try:
        fd = os.open(path, os.O_RDWR)
        waiter = select.epoll()
        waiter.register(fd, select.EPOLLIN | select.EPOLLET)
        while True:
            agent = Agent(fd)
            if restarted:  # every port's host may have had calls in flight
                agent.announce_restart()
                restarted = False
            agent.serve()
            _wait_for_host(fd, waiter)
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(1)  # as when the single port failed: init restarts the whole agent


def _wait_for_host(fd: int, waiter: select.epoll) -> None:
    """Block until a host is connected and has sent something."""
    level = select.poll()
    level.register(fd, select.POLLIN)
    while True:
        waiter.poll(5.0)  # wakes on state changes; the timeout is only a safety net
        mask = 0
        for _, event in level.poll(0):
            mask |= event
        if mask & select.POLLIN and not mask & select.POLLHUP:
            return


def serve_vsock() -> None:
    family = getattr(socket, "AF_VSOCK", 40)
    cid_any = getattr(socket, "VMADDR_CID_ANY", 0xFFFFFFFF)
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((cid_any, p.AGENT_VSOCK_PORT))
    listener.listen(4)
    while True:
        conn, _ = listener.accept()
        with conn:
            Agent(conn.fileno()).serve()


def main() -> None:
    channel = _kernel_args().get("pyro.channel", "virtio-serial")
    if channel == "vsock":
        serve_vsock()
    else:
        serve_virtio_serial()


if __name__ == "__main__":
    main()
