"""The guest agent: serves the pyro protocol on one channel inside the VM.

Stdlib only (plus :mod:`pyro_mcp.guest.protocol`). One reader thread takes frames off the
channel; each call runs in its own thread so a slow command never blocks a ping, and
output streams back as ``data`` frames while a command runs. The same class serves a
socketpair in unit tests.
"""

from __future__ import annotations

import functools
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
    boot_state,
    ops_archive,
    ops_exec,
    ops_files,
    ops_secrets,
    ops_services,
    ops_shells,
    ops_system,
    ops_tree,
    ops_tree_changes,
)
from pyro_mcp.guest_agent.calls import Call, CallError
from pyro_mcp.guest_agent.workers import Workers

AGENT_VERSION = "2.0"
CAPABILITIES = (
    "exec",
    "stream",
    "cancel",
    "kill",
    "put_file",
    "get_file",
    "reidentify",
    "quiesce",
    "shutdown",
    "tree_manifest",
    "list_dir",
    "remove_paths",
    "apply_tree",
    "archive_get",
    "archive_put",
    "fs_sync",
    "calls_in_flight",
    "sparse",
    "specials",
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

BEAT_S = 5.0  # every call in flight gets a keepalive frame this often
HOST_GRACE_S = 2.0  # a port's host gone this long has left: its calls are cancelled
STALL_S = 0.5  # a partial frame idle this long is checked for a torn frame
READ_SIZE = 1 << 20
PAGE = 4096  # a virtio-serial port hands out one page-sized buffer per read


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
        self._done = threading.Event()
        self._workers = Workers()
        self.session: str | None = None
        self.started = time.monotonic()
        self.handlers: dict[str, Handler] = {
            "hello": self._hello,
            "exec": ops_exec.run_exec,
            "kill": self._kill,
            "put_file": ops_files.put_file,
            "get_file": ops_files.get_file,
            "fs_sync": ops_files.fs_sync,
            "reidentify": ops_system.reidentify,
            "quiesce": ops_system.quiesce,
            "shutdown": ops_system.make_shutdown(poweroff),
            "tree_manifest": ops_tree.tree_manifest,
            "list_dir": ops_tree.list_dir,
            "remove_paths": ops_tree_changes.remove_paths,
            "apply_tree": ops_tree_changes.apply_tree,
            "archive_get": ops_archive.archive_get,
            "archive_put": ops_archive.archive_put,
            "secrets_put": ops_secrets.secrets_put,
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
        """Tell the host that this agent replaced one that died. The host then asks which of
        its calls reached this agent (``calls_in_flight``) and gives up only the others."""
        message = "the guest agent restarted; calls in flight were lost"
        self.send(p.Frame(p.ERROR, 0, {"code": p.AGENT_RESTARTED, "message": message}))

    def serve(self, wait_for_host: Callable[[float | None], bool] | None = None) -> None:
        """Read frames until the channel closes.

        A virtio-serial port never closes: it reads as end of file while no host is
        connected, and ``wait_for_host(timeout)`` blocks until one is (True) or the
        timeout passes (False). Its Agent serves every host that comes, each one's
        stream starting with its hello (see ``_between_hosts``).
        """
        decoder = p.FrameDecoder()
        waiter = select.poll()
        waiter.register(self.read_fd, select.POLLIN)
        threading.Thread(target=self._beat, daemon=True, name="pyro-agent-beat").start()
        # One read buffer for the life of the channel: a fresh megabyte per read costs a
        # mapping and its page faults, which emulation makes slow.
        buffer = bytearray(READ_SIZE)
        view = memoryview(buffer)
        reader = functools.partial(_read, self.read_fd)
        whole = False  # the last read filled what it could take: more is likely queued
        try:
            while True:
                # Only a read that came short may be followed by silence; a torn frame
                # is given up when the channel stays quiet (see FrameDecoder.stalled).
                if not whole and decoder.pending and not waiter.poll(int(STALL_S * 1000)):
                    items = decoder.stalled()
                    if not items:
                        continue
                else:
                    if decoder.filling:
                        size, items = decoder.fill(reader)  # straight into place
                    else:
                        size = reader(view)
                        items = decoder.feed(view[:size]) if size else []
                    if not size:  # the end of the channel, or of one host's stay
                        if wait_for_host is None:
                            return
                        self._between_hosts(wait_for_host)
                        decoder = p.FrameDecoder()  # drops what the host that left tore
                        whole = False
                        continue
                    whole = size % PAGE == 0
                for item in items:
                    if isinstance(item, p.Damaged):
                        self._damaged(item)
                    else:
                        self._dispatch(item)
        finally:
            with self._write_lock:
                self._closed = True
            self._done.set()
            for call in self._running():
                call.cancel()

    def _between_hosts(self, wait_for_host: Callable[[float | None], bool]) -> None:
        """The host left: its calls are cancelled, unless a host is back within
        HOST_GRACE_S. The port's bytes and the news of hosts coming and going reach the
        guest on separate queues, so the next host's hello can be read before the end
        of file of the host before it; the calls of that new session must live on (a
        new session's hello cancels the calls of the one before anyway)."""
        if wait_for_host(HOST_GRACE_S):
            return
        session = self.session
        for call in self._running():
            if call.session == session:
                call.cancel()
        wait_for_host(None)

    def _running(self) -> list[Call]:
        with self._calls_lock:
            return list(self._calls.values())

    def _beat(self) -> None:
        """Keepalives: every call that runs long says it is alive, so a host can tell a
        slow call from a stalled agent."""
        while not self._done.wait(BEAT_S):
            for call in self._running():
                try:
                    call.send(p.Frame(p.DATA, call.id, {"stream": p.BEAT}))
                except OSError:
                    return

    def _damaged(self, item: p.Damaged) -> None:
        with self._calls_lock:
            running = self._calls.get(item.id)
        if running is not None:
            running.break_input(item.reason)
        elif item.t == p.CALL:
            message = f"the call frame was damaged in transit ({item.reason})"
            frame = p.Frame(p.ERROR, item.id, {"code": "protocol", "message": message})
            if self.session is not None:
                frame.header["s"] = self.session
            self.send(frame)

    def _dispatch(self, frame: p.Frame) -> None:
        if frame.t == p.CALL:
            op = str(frame.header.get("op", ""))
            args = frame.header.get("args") or {}
            if op == "hello":
                self._new_session(args)
            elif self.session is None and isinstance(frame.header.get("s"), str):
                # A restarted agent carries on the session of the host that was attached.
                self.session = frame.header["s"]
            if op in ("ping", "calls_in_flight"):  # answered inline, in the channel's order
                value = {} if op == "ping" else {"ids": self._ids_in_flight()}
                reply = p.Frame(p.RESULT, frame.id, {"value": value})
                if self.session is not None:
                    reply.header["s"] = self.session
                self.send(reply)
                return
            call = Call(
                self.send,
                frame.id,
                op,
                args if isinstance(args, dict) else {},
                frame.payload,
                self.session,
            )
            with self._calls_lock:
                self._calls[frame.id] = call
            self._workers.submit(lambda: self._run(call))
            return
        with self._calls_lock:
            running = self._calls.get(frame.id)
        if running is None or running.session != self.session:
            return  # late frame for a finished call, or for another session's call
        if frame.t == p.DATA:
            offset = frame.header.get("offset")
            running.feed(frame.payload, offset if isinstance(offset, int) else None)
        elif frame.t == p.EOF:
            running.end_input()
        elif frame.t == p.CANCEL:
            running.cancel()

    def _ids_in_flight(self) -> list[int]:
        """The calls of this session that have not ended: after a restart, what the host
        sent before asking and is not listed here (nor answered already) was lost."""
        return sorted(c.id for c in self._running() if c.session == self.session)

    def _new_session(self, args: Any) -> None:
        """A host said hello: calls of an earlier session on this channel lost their host."""
        session = args.get("session") if isinstance(args, dict) else None
        self.session = session if isinstance(session, str) else None
        for call in self._running():
            if call.session != self.session:
                call.cancel()

    def _run(self, call: Call) -> None:
        try:
            call.send(self._answer(call))
        except OSError:
            pass  # the host went away; nobody is left to answer
        finally:
            with self._calls_lock:
                if self._calls.get(call.id) is call:
                    del self._calls[call.id]

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
            "session": call.session,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "uptime_s": _uptime(),
            "agent_uptime_s": round(time.monotonic() - self.started, 3),
            "mounts": boot_state.mounts(boot_state.REPORTED_MOUNTS),
            "boot_errors": boot_state.boot_errors(),
        }, b""

    def _kill(self, call: Call) -> tuple[dict[str, Any], bytes]:
        target = call.args.get("call_id")
        signame = str(call.args.get("signal", "KILL")).upper().removeprefix("SIG")
        signum = getattr(signal, f"SIG{signame}", None)
        if not isinstance(target, int) or signum is None:
            raise CallError("invalid_argument", "kill needs call_id (int) and a signal name")
        with self._calls_lock:
            victim = self._calls.get(target)
        if victim is None or victim.session != call.session:
            raise CallError("not_found", f"no call {target} is running")
        if victim.send_signal is None:
            raise CallError("invalid_argument", f"call {target} runs no process")
        victim.send_signal(signum)
        return {"signalled": target, "signal": signame}, b""


def _read(fd: int, into: memoryview) -> int:
    """Read into ``into``; 0 at the end of the channel (a read error counts as its end)."""
    try:
        return os.readv(fd, [into])
    except OSError:
        return 0


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
    """Serve one port for the life of the VM: one Agent for every host that connects.

    The port stays open between hosts: closing a virtio-serial port discards what the
    next host may already have sent (its hello), so a reconnect would hang.
    """
    try:
        fd = os.open(path, os.O_RDWR)
        agent = Agent(fd)
        if restarted:  # the port's host may have had calls in flight
            agent.announce_restart()
        agent.serve(wait_for_host=functools.partial(_wait_for_host, fd, _edges(fd)))
    except BaseException:
        import traceback

        traceback.print_exc()
    os._exit(1)  # as when the single port failed: init restarts the whole agent


def _edges(fd: int) -> select.epoll:
    """An edge-triggered wait on the port. While no host is connected the port reads as
    end of file and polls as readable *and* hung up, so a level-triggered wait would
    spin: this one sleeps until the port's state changes (a host connects or writes)."""
    waiter = select.epoll()
    waiter.register(fd, select.EPOLLIN | select.EPOLLET)
    return waiter


def _wait_for_host(fd: int, edges: select.epoll, timeout_s: float | None) -> bool:
    """Block until a host is connected to the port (True) or ``timeout_s`` passes."""
    level = select.poll()
    level.register(fd, select.POLLIN)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        mask = 0
        for _, event in level.poll(0):
            mask |= event
        if not mask & select.POLLHUP:
            return True
        left = 5.0 if deadline is None else min(5.0, deadline - time.monotonic())
        if left <= 0:
            return False
        edges.poll(left)  # wakes on state changes; the timeout is only a safety net


VSOCK_BACKLOG = 64


def serve_vsock() -> None:
    """Serve the agent's vsock port (Firecracker): every host connection at once."""
    family = getattr(socket, "AF_VSOCK", 40)
    cid_any = getattr(socket, "VMADDR_CID_ANY", 0xFFFFFFFF)
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((cid_any, p.AGENT_VSOCK_PORT))
    listener.listen(VSOCK_BACKLOG)
    serve_connections(listener)


def serve_connections(listener: socket.socket) -> None:
    """Accept host connections on ``listener`` forever, each served by its own Agent in
    its own thread, so several host processes work on the VM at once (as each
    virtio-serial port does under QEMU)."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            if listener.fileno() == -1:
                return  # closed: nothing more to serve
            time.sleep(0.1)  # a connection that failed as it came, or no fd to spare
            continue
        threading.Thread(
            target=_serve_connection, args=(conn,), daemon=True, name="pyro-agent-conn"
        ).start()


def _serve_connection(conn: socket.socket) -> None:
    with conn:  # closed once its agent has stopped writing to it (Agent.serve's end)
        Agent(conn.fileno()).serve()


def main() -> None:
    channel = _kernel_args().get("pyro.channel", "virtio-serial")
    if channel == "vsock":
        serve_vsock()
    else:
        serve_virtio_serial()


if __name__ == "__main__":
    main()
