"""Host side of the guest protocol: one connection, many concurrent calls.

A reader thread takes frames off the socket and hands each to the call it belongs to, so
calls from several threads run at once and output streams back while a command runs.

The guest is untrusted, so every call is bounded here, whatever the agent does:

- a deadline for the whole call (``timeout_s``) and for silence (``idle_s``: the agent
  sends a keepalive for every call that runs long, so a stalled agent is noticed);
- each call buffers at most ``QUEUE_BYTES`` of frames its caller has not taken yet; past
  that the reader stops reading the link (back-pressure on the guest), so a flood costs
  the host no memory;
- caps on what is kept (exec output, file reads) are enforced here, not trusted to the
  guest; a stream that asks for more than it gave is refused;
- frames of another session (a dead client's late answers), damaged frames and
  unsolicited frames never reach a call they do not belong to.

Lower-level failures become :class:`AgentUnavailable` (the link dropped: the VM or its
agent died), :class:`ProtocolViolation` (the agent broke the protocol),
:class:`GuestError` (the agent refused the call) or :class:`OperationTimeout`.
Never make a call from inside an ``on_data`` callback: the reader may be waiting for that
callback's call to drain.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyro_mcp.errors import (
    AgentUnavailable,
    Cancelled,
    GuestError,
    InvalidArgument,
    OperationTimeout,
    ProtocolViolation,
    PyroError,
    TooLarge,
)
from pyro_mcp.guest import protocol as p
from pyro_mcp.guest.redaction import CallRedaction, Redactor
from pyro_mcp.guest.shell_reads import read_redacted

DataFn = Callable[[str, bytes], None]
Chunk = tuple[str, int | None, bytes]  # (stream, offset when sparse, bytes)
Upload = bytes | tuple[int, bytes]  # a chunk to send, or (offset, chunk) for a sparse file

CALL_TIMEOUT_S = 60.0  # the deadline of a call that names none
# A command's timeout is kept by the guest's clock; the host waits this much longer (a
# guest clock up to 10 % slow, and the time to send the result) before its own guard fires.
HOST_GUARD_FACTOR = 1.1
HOST_GUARD_MARGIN_S = 10.0
CANCEL_POLL_S = 0.1  # how soon a call notices that its caller gave up
RESYNC_S = 30.0  # for a restarted agent to say which calls reached it
IDLE_S = 30.0  # silence (no frame, not even a keepalive) after which a call has stalled
IDLE_ENV = "PYRO_AGENT_IDLE_S"  # overrides IDLE_S (a slow host may want more)
STALL_S = 0.5  # an idle link with a partial frame is checked for a torn frame this often
QUEUE_BYTES = 16 << 20  # frames one call may hold that its caller has not taken
BASE_S = 30.0  # the fixed part of a data call's deadline
MIN_RATE = 1 << 20  # bytes/s a data call is allowed at worst (TCG guests move ~100 MiB/s)
LINK_RECV = 1 << 20
# Uploads go in large frames: the agent reads each straight into place, and every frame
# costs it a header, a dispatch and an allocation (dear under emulation).
UPLOAD_CHUNK = 1 << 20
MAX_STREAM_BYTES = 1 << 62  # what a command's output count may claim


def idle_from_env() -> float:
    """``IDLE_S``, or ``$PYRO_AGENT_IDLE_S`` when set to a positive number of seconds."""
    text = os.environ.get(IDLE_ENV)
    try:
        value = float(text) if text else IDLE_S
    except ValueError:
        return IDLE_S
    return value if 0 < value < 86400 else IDLE_S


def data_deadline(size: int) -> float:
    """Seconds a call moving ``size`` bytes may take."""
    return BASE_S + max(0, size) / MIN_RATE


@dataclass
class ExecResult:
    """How a command in the guest ended."""

    exit_code: int
    """The command's exit status; 128+N when killed by signal N; 127: program not found."""
    stdout: bytes
    """Captured standard output (at most ``output_cap`` bytes)."""
    stderr: bytes
    """Captured standard error (at most ``output_cap`` bytes)."""
    timed_out: bool = False
    """True when the command ran past its timeout and was killed."""
    signal: str | None = None
    """Name of the signal that ended the command, if any."""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration_ms: float = 0.0
    """Time the command ran in the guest, in milliseconds."""
    stdout_bytes: int = 0
    """All the standard output the command produced, kept or not (bytes)."""
    stderr_bytes: int = 0
    """All the standard error the command produced, kept or not (bytes)."""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The outcome as every surface reports it (output decoded as UTF-8)."""
        return {
            "exit_code": self.exit_code,
            "stdout": self.stdout.decode("utf-8", "replace"),
            "stderr": self.stderr.decode("utf-8", "replace"),
            "timed_out": self.timed_out,
            "signal": self.signal,
            "stdout_truncated": self.stdout_truncated,
            "stderr_truncated": self.stderr_truncated,
            "duration_ms": self.duration_ms,
        }


def command_fields(command: str | Sequence[str]) -> dict[str, Any]:
    """How the agent runs ``command`` (``exec`` and ``service_start``): a string through
    ``/bin/sh -lc`` (as pyro-mcp 3.x did), a list as the argv. InvalidArgument when there
    is nothing to run."""
    if isinstance(command, str):
        if not command.strip():
            raise InvalidArgument("command is empty: give a shell command line or an argv")
        return {"shell": command}
    if not command:
        raise InvalidArgument("command is empty: give the program to run after --")
    return {"argv": list(command)}


def _given(**values: Any) -> dict[str, Any]:
    """Call arguments without the ones left unset (None, or an empty env)."""
    return {key: value for key, value in values.items() if value is not None and value != {}}


_LOST = "lost"  # marker: the link dropped or the agent restarted


class _Default:
    """The client's own idle limit (``AgentClient.idle_s``), as opposed to None (none)."""


DEFAULT = _Default()


class _Pending:
    """The frames of one call waiting for its caller, bounded by bytes."""

    def __init__(self) -> None:
        self._items: deque[p.Frame | p.Damaged | str] = deque()
        self._bytes = 0
        self._closed = False
        self._cond = threading.Condition()
        self.terminal = False  # a result or error frame has arrived

    def put(self, item: p.Frame | p.Damaged | str) -> None:
        """Queue ``item``; blocks the reader while the caller is ``QUEUE_BYTES`` behind."""
        size = len(item.payload) if isinstance(item, p.Frame) else 0
        with self._cond:
            while self._bytes > QUEUE_BYTES and not self._closed and isinstance(item, p.Frame):
                self._cond.wait(1.0)
            if self._closed:
                return
            if isinstance(item, p.Frame) and item.t in (p.RESULT, p.ERROR):
                self.terminal = True
            self._items.append(item)
            self._bytes += size
            self._cond.notify_all()

    def get(self, timeout: float | None) -> p.Frame | p.Damaged | str | None:
        """The next item, or None when ``timeout`` passed first."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            if not self._items:
                return None
            item = self._items.popleft()
            if isinstance(item, p.Frame):
                self._bytes -= len(item.payload)
            self._cond.notify_all()
            return item

    def close(self, *, lost: bool = False) -> None:
        """Drop what is queued and never block the reader again: the caller is gone, or
        (``lost``) the connection is, and a waiting caller is told so."""
        with self._cond:
            self._closed = True
            self._items.clear()
            self._bytes = 0
            if lost:
                self._items.append(_LOST)
            self._cond.notify_all()


def host_guard_s(timeout_s: float) -> float:
    """How long the host waits for a command the guest times out after ``timeout_s``."""
    return timeout_s * HOST_GUARD_FACTOR + HOST_GUARD_MARGIN_S


class CallStream:
    """One call in flight whose data frames its caller takes as they arrive.

    Iterate for ``(stream, offset, bytes)`` chunks (keepalives are not shown); when the
    iteration ends, ``value`` and ``payload`` hold the result. Leaving early (``close``,
    or the ``with`` block) cancels the call in the guest.
    """

    def __init__(
        self,
        client: AgentClient,
        ident: int,
        op: str,
        pending: _Pending,
        timeout_s: float,
        idle_s: float | None,
        cancel: threading.Event | None = None,
        redaction: CallRedaction | None = None,
    ) -> None:
        self._client = client
        self.id = ident
        self.op = op
        self._redaction = redaction  # secrets shown as *** (set by the client's redactor)
        self.received: dict[str, int] = {}  # bytes per stream as the guest sent them
        self._pending = pending
        self._timeout_s = timeout_s
        self._deadline = time.monotonic() + timeout_s
        self._idle_s = idle_s
        self._heard = time.monotonic()  # when the agent last sent anything for this call
        self._cancel = cancel  # set by the caller to give up: the call is cancelled
        self.value: dict[str, Any] | None = None
        self.payload = b""
        self.done = False
        self.expired = False  # its whole-call deadline passed (not a stall)

    def __iter__(self) -> Iterator[Chunk]:
        while not self.done:
            frame = self._next()
            if frame.t == p.DATA:
                stream = str(frame.header.get("stream", ""))
                if stream == p.BEAT:
                    continue
                offset = frame.header.get("offset")
                if offset is not None and (
                    not isinstance(offset, int) or isinstance(offset, bool) or offset < 0
                ):
                    self.close()
                    raise ProtocolViolation(f"{self.op}: the guest sent a bad offset {offset!r}")
                data = bytes(frame.payload)  # (a copy is cheap on the host)
                self.received[stream] = self.received.get(stream, 0) + len(data)
                if self._redaction is not None:
                    data = self._redaction.chunk(stream, data)
                yield stream, offset, data
            elif frame.t == p.RESULT:
                value = frame.header.get("value")
                self.value = value if isinstance(value, dict) else {}
                self.payload = bytes(frame.payload)
                self._finish()
                if self._redaction is not None:
                    self.value = self._redaction.result(self.value)
                    for stream, rest in self._redaction.flush():
                        yield stream, None, rest
            elif frame.t == p.ERROR:
                self._finish()
                message = str(frame.header.get("message", "guest error"))
                if self._redaction is not None:
                    message = self._redaction.message(message)
                raise GuestError(
                    message[:4096], guest_code=str(frame.header.get("code", "error"))[:64]
                )

    def result(self) -> tuple[dict[str, Any], bytes]:
        """Drain the call (dropping data) and return its result value and payload."""
        for _ in self:
            pass
        return self.value or {}, self.payload

    def _next(self) -> p.Frame:
        while True:
            now = time.monotonic()
            if self._cancel is not None and self._cancel.is_set():
                self.close()
                raise Cancelled(f"guest operation {self.op} was cancelled")
            left = self._deadline - now
            if left <= 0:
                self.expired = True
                self.close()
                raise OperationTimeout(
                    f"guest operation {self.op} took longer than {self._timeout_s:g} s"
                )
            wait = left
            if self._idle_s is not None:
                quiet = now - self._heard
                if quiet >= self._idle_s:
                    self.close()
                    raise OperationTimeout(
                        f"guest operation {self.op}: the agent sent nothing for "
                        f"{self._idle_s:g} s (it has stalled)"
                    )
                wait = min(wait, self._idle_s - quiet)
            if self._cancel is not None:
                wait = min(wait, CANCEL_POLL_S)
            item = self._pending.get(wait)
            if item is None:
                continue
            self._heard = time.monotonic()
            if isinstance(item, str):
                self._finish()
                raise AgentUnavailable(
                    self._client.closed_reason
                    or "the guest agent restarted; this call was lost with it"
                )
            if isinstance(item, p.Damaged):
                self.close()
                raise ProtocolViolation(
                    f"guest operation {self.op}: a {item.t} frame from the agent was "
                    f"damaged ({item.reason})"
                )
            return item

    def _finish(self) -> None:
        self.done = True
        self._client._forget(self.id, self._pending)

    def close(self) -> None:
        """Stop waiting; cancel the call in the guest if it has not ended."""
        if not self.done:
            self._finish()
            self._client.cancel(self.id)

    def __enter__(self) -> CallStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AgentClient:
    """A connection to the guest agent over a connected stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._closed: str | None = None
        self.session: str | None = None
        self.hello_info: dict[str, Any] = {}
        self.idle_s = idle_from_env()
        self.dropped = 0  # frames of other sessions or unknown calls, ignored
        # The workspace's secrets: what the guest sends back shows them as *** (see
        # guest.redaction); None: nothing to hide.
        self.redactor: Redactor | None = None
        self._reader = threading.Thread(
            target=self._read_loop, daemon=True, name="pyro-agent-reader"
        )
        self._reader.start()

    # -- connection ------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def closed_reason(self) -> str | None:
        return self._closed

    def close(self) -> None:
        if self._closed is None:
            self._closed = "closed by the host"
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            waiting = list(self._pending.values())
        for pending in waiting:  # never leave the reader blocked on a queue nobody drains
            pending.close(lost=True)

    def _read_loop(self) -> None:
        decoder = p.FrameDecoder()
        reason = "the guest agent connection closed"
        buffer = bytearray(LINK_RECV)
        view = memoryview(buffer)
        try:
            while True:
                if decoder.pending:
                    readable, _, _ = select.select([self._sock], [], [], STALL_S)
                    if not readable:
                        self._deliver(decoder.stalled())
                        continue
                target = decoder.target()
                if target is not None:  # the rest of a large frame: straight into place
                    with target:
                        size = self._sock.recv_into(target)
                    if not size:
                        break
                    self._deliver(decoder.filled(size))
                    continue
                size = self._sock.recv_into(buffer)
                if not size:
                    break
                self._deliver(decoder.feed(view[:size]))
        except (OSError, ValueError) as exc:
            if self._closed is None:
                reason = f"the guest agent connection failed: {exc}"
        if self._closed is None:
            self._closed = reason
        self._fail_pending()

    def _deliver(self, items: list[p.Decoded]) -> None:
        for item in items:
            if item.id == 0:
                if isinstance(item, p.Frame) and item.header.get("code") == p.AGENT_RESTARTED:
                    threading.Thread(target=self._resync, daemon=True, name="pyro-resync").start()
                continue
            if isinstance(item, p.Frame) and (
                item.t not in (p.DATA, p.EOF, p.RESULT, p.ERROR)
                or self.session is None
                or item.header.get("s") != self.session
            ):
                self.dropped += 1  # not an answer, or an answer to another session
                continue
            with self._lock:
                pending = self._pending.get(item.id)
            if pending is None:
                self.dropped += 1
                continue
            pending.put(item)

    def _resync(self) -> None:
        """The agent restarted: fail the calls it never received, and only those.

        The channel keeps order, so a question sent after every call made so far is read
        by the new agent after each of those it received: any it does not list (and has
        not answered before its reply) were lost with the old agent.
        """
        ident = next(self._ids)
        pending = _Pending()
        frame = p.Frame(p.CALL, ident, self._call_header("calls_in_flight", {}))
        with self._send_lock:  # no call can be registered but not yet sent meanwhile
            with self._lock:
                asked = dict(self._pending)
                self._pending[ident] = pending
            with contextlib.suppress(AgentUnavailable):  # gone: _read_loop fails them all
                self._write(frame)
        stream = CallStream(self, ident, "calls_in_flight", pending, RESYNC_S, None)
        known: set[int] = set()
        try:
            value, _ = stream.result()
            ids = value.get("ids")
            known = {i for i in ids if isinstance(i, int)} if isinstance(ids, list) else set()
        except PyroError:
            pass  # no answer: none of them can be trusted to come back
        finally:
            stream.close()
        for call_id, waiting in asked.items():
            if call_id not in known:
                waiting.put(_LOST)

    def _fail_pending(self) -> None:
        """Wake every waiting call with a lost-link marker."""
        with self._lock:
            waiting = list(self._pending.values())
        for pending in waiting:
            pending.put(_LOST)

    def _forget(self, ident: int, pending: _Pending) -> None:
        with self._lock:
            if self._pending.get(ident) is pending:
                del self._pending[ident]
        pending.close()

    def _send(self, frame: p.Frame) -> None:
        with self._send_lock:
            self._write(frame)

    def _write(self, frame: p.Frame | bytes) -> None:
        """Send ``frame`` (or a frame already encoded); the caller holds the send lock."""
        if self._closed is not None:
            raise AgentUnavailable(self._closed)
        try:
            self._sock.sendall(frame if isinstance(frame, bytes) else frame.encode())
        except OSError as exc:
            raise AgentUnavailable(f"cannot send to the guest agent: {exc}") from exc

    def _call_header(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        header: dict[str, Any] = {"op": op, "args": args}
        if self.session is not None:  # lets an agent that restarted carry on the session
            header["s"] = self.session
        return header

    # -- calls -----------------------------------------------------------------------
    def stream(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        payload: bytes = b"",
        *,
        input_chunks: Iterable[Upload] | None = None,
        timeout_s: float = CALL_TIMEOUT_S,
        idle_s: float | _Default | None = DEFAULT,
        cancel: threading.Event | None = None,
    ) -> CallStream:
        """Start ``op`` and return its stream of data frames (see :class:`CallStream`).

        ``input_chunks`` are sent as the call's ``file`` stream (bytes, or ``(offset,
        bytes)`` for a sparse file) before this returns; sending stops early when the
        agent has already answered (it refused the input).
        """
        ident = next(self._ids)
        # Too large: refused before anything is sent.
        frame = _call_frame(ident, self._call_header(op, args or {}), payload)
        pending = _Pending()
        idle = self.idle_s if isinstance(idle_s, _Default) else idle_s
        redaction = CallRedaction(self.redactor, op) if self.redactor else None
        stream = CallStream(self, ident, op, pending, timeout_s, idle, cancel, redaction)
        try:
            with self._send_lock:  # registered and sent together (see _resync)
                with self._lock:
                    self._pending[ident] = pending
                self._write(frame)
            if input_chunks is not None:
                self._upload(ident, pending, input_chunks, stream)
        except BaseException:
            stream.close()
            raise
        return stream

    def _upload(
        self, ident: int, pending: _Pending, chunks: Iterable[Upload], stream: CallStream
    ) -> None:
        for item in chunks:
            if pending.terminal:
                return  # the agent answered already (an error): the rest is not wanted
            if time.monotonic() > stream._deadline:
                raise OperationTimeout(f"guest operation {stream.op}: sending its input timed out")
            offset, chunk = item if isinstance(item, tuple) else (None, item)
            for start in range(0, len(chunk), UPLOAD_CHUNK):
                header: dict[str, Any] = {"stream": "file"}
                if offset is not None:
                    header["offset"] = offset + start
                self._send(p.Frame(p.DATA, ident, header, chunk[start : start + UPLOAD_CHUNK]))
        self._send(p.Frame(p.EOF, ident, {"stream": "file"}))

    def call(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        payload: bytes = b"",
        *,
        on_data: DataFn | None = None,
        input_chunks: Iterable[Upload] | None = None,
        timeout_s: float = CALL_TIMEOUT_S,
        idle_s: float | _Default | None = DEFAULT,
    ) -> tuple[dict[str, Any], bytes]:
        """Run one operation in the guest and return its result value and payload.

        ``on_data(stream, bytes)`` receives streamed output. Raises GuestError,
        AgentUnavailable, ProtocolViolation, or OperationTimeout (after cancelling the
        call in the guest).
        """
        with self.stream(
            op, args, payload, input_chunks=input_chunks, timeout_s=timeout_s, idle_s=idle_s
        ) as call:
            for stream, _offset, data in call:
                if on_data is not None:
                    on_data(stream, data)
            return call.value or {}, call.payload

    def cancel(self, ident: int) -> None:
        with contextlib.suppress(AgentUnavailable):
            self._send(p.Frame(p.CANCEL, ident))

    # -- typed helpers ---------------------------------------------------------------
    def hello(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """Start a session (every later answer is tagged with it) and check the version."""
        self.session = secrets.token_hex(8)
        # No idle limit: a booting guest has no agent yet to send keepalives.
        args = {"session": self.session}
        deadline = time.monotonic() + timeout_s
        while True:
            left = max(0.1, deadline - time.monotonic())
            try:
                value, _ = self.call("hello", args, timeout_s=left, idle_s=None)
                break
            except AgentUnavailable:
                # Lost with an agent that restarted as it was sent (a port the new agent
                # opens drops what was waiting on it): hello again, to the new one.
                if self.closed or time.monotonic() >= deadline:
                    raise
        if value.get("protocol") != p.PROTOCOL_VERSION:
            raise AgentUnavailable(
                f"guest agent speaks protocol {value.get('protocol')!r}, host needs "
                f"{p.PROTOCOL_VERSION}: rebuild the environment (`pyro env pull NAME --force`)"
            )
        self.hello_info = value
        return value

    def ping(self, timeout_s: float = 5.0) -> None:
        self.call("ping", timeout_s=timeout_s)

    def exec(
        self,
        argv: list[str] | None = None,
        *,
        shell: str | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        secret_env: dict[str, str] | None = None,
        stdin: bytes = b"",
        timeout_s: float | None = None,
        output_cap: int = 16 << 20,
        on_output: DataFn | None = None,
        cancel: threading.Event | None = None,
    ) -> ExecResult:
        """Run a command; output streams to ``on_output`` and is captured up to the cap.
        Setting ``cancel`` kills the command in the guest and raises Cancelled.

        The cap is enforced here too: the agent stops sending at ``output_cap`` per stream
        and flags the rest truncated, so an agent that sends more is refused at once
        (ProtocolViolation) instead of being read without end.
        """
        args = _given(
            output_cap=output_cap,
            argv=argv,
            shell=shell,
            cwd=cwd,
            env=env,
            secret_env=secret_env,
            timeout_s=timeout_s,
        )
        captured: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        # The guest enforces the command timeout. The host's guard leaves room for the
        # guest's own result (its clock may run a little slow); if it fires all the same,
        # the guest command is cancelled and what it printed is still the result. A
        # command without a timeout is bounded by the agent's keepalives (idle_s).
        wait = host_guard_s(timeout_s) if timeout_s is not None else 7 * 24 * 3600.0
        with self.stream("exec", args, stdin, timeout_s=wait, cancel=cancel) as call:
            try:
                for stream, _offset, data in call:
                    if stream not in captured:
                        continue
                    if call.received.get(stream, 0) > output_cap:  # as sent, not as shown
                        call.close()
                        raise ProtocolViolation(
                            f"exec: the guest sent more {stream} than the {output_cap}-byte cap"
                        )
                    captured[stream].append(data)
                    if on_output is not None:
                        on_output(stream, data)
                value = call.value or {}
            except OperationTimeout:
                if not call.expired:
                    raise
                value = {"exit_code": 128 + 9, "signal": "SIGKILL", "timed_out": True}
                value["timed_out_by"] = "host"
        stdout, stderr = b"".join(captured["stdout"]), b"".join(captured["stderr"])
        sent = {name: call.received.get(name, 0) for name in captured}  # before redaction
        result = Answer("exec", value)
        return ExecResult(
            exit_code=result.integer("exit_code", 0, 255),
            stdout=stdout,
            stderr=stderr,
            timed_out=result.flag("timed_out"),
            signal=result.text("signal"),
            stdout_truncated=result.flag("stdout_truncated"),
            stderr_truncated=result.flag("stderr_truncated"),
            duration_ms=result.number("duration_ms", 0.0),
            stdout_bytes=result.integer(
                "stdout_bytes", sent["stdout"], MAX_STREAM_BYTES, sent["stdout"]
            ),
            stderr_bytes=result.integer(
                "stderr_bytes", sent["stderr"], MAX_STREAM_BYTES, sent["stderr"]
            ),
            details=value,
        )

    def put_file(
        self,
        path: str,
        data: bytes,
        *,
        mode: int = 0o644,
        mkdirs: bool = False,
        root: str | None = None,
        sync: bool = True,
    ) -> dict[str, Any]:
        """Write ``data`` to ``path`` atomically; with ``sync`` it is on the guest's disk
        when this returns (acknowledged means durable)."""
        args: dict[str, Any] = {"path": path, "mode": mode, "mkdirs": mkdirs, "sync": sync}
        if root is not None:
            args["root"] = root
        deadline = data_deadline(len(data))
        if len(data) <= p.CHUNK:
            value, _ = self.call("put_file", args, data, timeout_s=deadline)
        else:
            args["streamed"] = True
            value, _ = self.call("put_file", args, input_chunks=[data], timeout_s=deadline)
        return value

    def put_sparse(
        self,
        path: str,
        extents: Iterable[tuple[int, bytes]],
        size: int,
        *,
        mode: int = 0o644,
        mkdirs: bool = False,
        root: str | None = None,
        sync: bool = True,
    ) -> dict[str, Any]:
        """Write a file of ``size`` bytes from its data ``extents`` ((offset, bytes),
        increasing); the gaps stay holes in the guest."""
        args: dict[str, Any] = {
            "path": path,
            "mode": mode,
            "mkdirs": mkdirs,
            "sync": sync,
            "streamed": True,
            "size": size,
        }
        if root is not None:
            args["root"] = root
        value, _ = self.call("put_file", args, input_chunks=extents, timeout_s=data_deadline(size))
        return value

    def get_file(
        self, path: str, *, max_bytes: int = 64 << 20, root: str | None = None
    ) -> tuple[bytes, dict[str, Any]]:
        """At most ``max_bytes`` of a file (the result says ``truncated``); the cap holds
        whatever the agent sends."""
        chunks: list[bytes] = []
        kept = 0
        with self.file_stream(path, max_bytes=max_bytes, root=root) as call:
            for _stream, _offset, data in call:
                room = max_bytes - kept
                if len(data) > room:
                    chunks.append(data[:room])
                    call.close()  # more than asked for: stop the agent sending
                    info = {"path": path, "truncated": True, "sent": max_bytes}
                    return b"".join(chunks), info
                chunks.append(data)
                kept += len(data)
            value = dict(call.value or {})
        value["truncated"] = bool(value.get("truncated"))
        return b"".join(chunks), value

    def file_stream(
        self, path: str, *, max_bytes: int, root: str | None = None, sparse: bool = False
    ) -> CallStream:
        """A file's content as it streams (``sparse``: each chunk with its offset, holes
        never sent). Callers enforce what they accept."""
        args: dict[str, Any] = {"path": path, "max_bytes": max_bytes, "sparse": sparse}
        if root is not None:
            args["root"] = root
        return self.stream("get_file", args, timeout_s=data_deadline(max_bytes))

    def fs_sync(self, root: str, timeout_s: float = 120.0) -> dict[str, Any]:
        """Flush the filesystem holding ``root`` to its disk (one syncfs)."""
        value, _ = self.call("fs_sync", {"root": root}, timeout_s=timeout_s)
        return value

    def manifest_stream(
        self, root: str, path: str | None = None, hash: bool = True, *, timeout_s: float
    ) -> Generator[dict[str, Any], None, dict[str, Any]]:
        """Every entry under ``root`` (or its subdirectory ``path``) as it arrives: JSON
        objects (still unchecked: the caller validates them), in the agent's order.

        Yields entries; its ``return`` value (``StopIteration.value``) is the agent's
        counts. Lines longer than a frame are a protocol violation.
        """
        args: dict[str, Any] = {"root": root, "hash": hash}
        if path is not None:
            args["path"] = path
        partial = bytearray()
        with self.stream("tree_manifest", args, timeout_s=timeout_s) as call:
            for _stream, _offset, data in call:
                partial.extend(data)
                end = partial.rfind(b"\n")
                if end < 0:
                    if len(partial) > p.MAX_PAYLOAD:
                        call.close()
                        raise ProtocolViolation("tree_manifest: a manifest line is too long")
                    continue
                lines = bytes(partial[:end]).split(b"\n")
                del partial[: end + 1]
                for line in lines:
                    if line:
                        yield _json_line(line)
            if partial.strip():
                yield _json_line(bytes(partial))
            return call.value or {}

    def manifest(
        self, root: str, path: str | None = None, hash: bool = True, *, timeout_s: float = 600.0
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The whole manifest in memory: (entries, counts). For small trees; workspaces
        stream with :meth:`manifest_stream`."""
        entries: list[dict[str, Any]] = []
        stream = self.manifest_stream(root, path, hash, timeout_s=timeout_s)
        while True:
            try:
                entries.append(next(stream))
            except StopIteration as end:
                counts: dict[str, Any] = end.value or {}
                return entries, counts

    def list_dir(
        self,
        root: str,
        path: str | None = None,
        *,
        recursive: bool = False,
        max_entries: int | None = None,
        timeout_s: float = 120.0,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The entries of directory ``path`` (default: root), like a manifest without
        digests, at most ``max_entries`` (guest default 10,000).

        Returns (entries sorted by path, {path, count, truncated}).
        """
        args: dict[str, Any] = {"root": root, "recursive": recursive}
        if path is not None:
            args["path"] = path
        if max_entries is not None:
            args["max_entries"] = max_entries
        value, _ = self.call("list_dir", args, timeout_s=timeout_s)
        entries = value.pop("entries", [])
        if not isinstance(entries, list):
            entries = []
        limit = max_entries or 100_000
        if len(entries) > limit:
            entries, value["truncated"] = entries[:limit], True
        return entries, value

    def remove_paths(
        self,
        root: str,
        paths: Iterable[str],
        *,
        recursive: bool = False,
        missing_ok: bool = False,
        sync: bool = True,
        timeout_s: float = 300.0,
    ) -> dict[str, Any]:
        """Remove files, symlinks and (``recursive``) directories; returns {removed, missing}."""
        args = {
            "root": root,
            "paths": list(paths),
            "recursive": recursive,
            "missing_ok": missing_ok,
            "sync": sync,
        }
        value, _ = self.call("remove_paths", args, timeout_s=timeout_s)
        return value

    def apply_tree(
        self,
        root: str,
        *,
        removes: Iterable[str] = (),
        dirs: Iterable[dict[str, Any]] = (),
        symlinks: Iterable[dict[str, Any]] = (),
        specials: Iterable[dict[str, Any]] = (),
        chmods: Iterable[dict[str, Any]] = (),
        sync: bool = True,
        timeout_s: float = 300.0,
    ) -> dict[str, Any]:
        """Apply structure: removes, then dirs [{path, mode}], symlinks [{path, target}],
        specials [{path, type, mode, rdev}] (fifos and device nodes), then final modes
        (dirs' and chmods [{path, mode}], deepest first)."""
        args = {
            "root": root,
            "removes": list(removes),
            "dirs": list(dirs),
            "symlinks": list(symlinks),
            "specials": list(specials),
            "chmods": list(chmods),
            "sync": sync,
        }
        value, _ = self.call("apply_tree", args, timeout_s=timeout_s)
        return value

    def archive_stream(self, root: str, path: str, *, timeout_s: float) -> CallStream:
        """A tar of ``path`` (file or directory) as it streams; the result value has
        counts and the type of ``path``."""
        return self.stream("archive_get", {"root": root, "path": path}, timeout_s=timeout_s)

    def archive_put(
        self,
        root: str,
        dest: str,
        chunks: Iterable[bytes],
        max_bytes: int,
        max_entries: int,
        *,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Extract a tar (plain, gzip, bzip2 or xz) streamed from ``chunks`` into ``dest``.

        The guest refuses unsafe or oversized archives and then leaves nothing behind;
        what it extracted is on its disk when this returns. Returns {dest, created,
        entries, files, dirs, symlinks, hardlinks, bytes, compression, replaced,
        replaced_count}.
        """
        args = {"root": root, "dest": dest, "max_bytes": max_bytes, "max_entries": max_entries}
        value, _ = self.call(
            "archive_put",
            args,
            input_chunks=chunks,
            timeout_s=timeout_s if timeout_s is not None else data_deadline(max_bytes),
        )
        return value

    # -- services ----------------------------------------------------------------------
    def service_start(
        self,
        name: str,
        argv: list[str] | None = None,
        *,
        shell: str | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        ready: dict[str, Any] | None = None,
        ready_timeout_s: float = 30.0,
        ready_interval_ms: float = 200.0,
        restart: str = "no",
    ) -> dict[str, Any]:
        """Start a supervised service; returns its status (plus ``ready_ms``) once ready.

        ``ready`` is a probe: {type: file, path} | {type: tcp, host?, port} |
        {type: http, url} | {type: command, argv | shell}. GuestError codes:
        invalid_argument, not_found, exists, not_ready, exited_before_ready.
        """
        args = _given(
            name=name,
            ready_timeout_s=ready_timeout_s,
            ready_interval_ms=ready_interval_ms,
            restart=restart,
            argv=argv,
            shell=shell,
            cwd=cwd,
            env=env,
            ready=ready,
        )
        value, _ = self.call("service_start", args, timeout_s=ready_timeout_s + 15.0)
        return value

    def service_list(self, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        value, _ = self.call("service_list", timeout_s=timeout_s)
        services = value.get("services", [])
        return services if isinstance(services, list) else []

    def service_status(self, name: str, timeout_s: float = 30.0) -> dict[str, Any]:
        value, _ = self.call("service_status", {"name": name}, timeout_s=timeout_s)
        return value

    def service_logs(
        self,
        name: str,
        *,
        tail_lines: int = 100,
        all: bool = False,
        stream: str = "both",
        follow: bool = False,
        on_line: Callable[[str, str], None] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """A service's log lines: value["lines"] = [{stream, text}] (stdout's, then stderr's).

        With ``follow`` the lines stream until the service ends (or ``timeout_s``): each
        goes to ``on_line(stream, text)`` if given, else into value["lines"].
        """
        args: dict[str, Any] = {
            "name": name,
            "tail_lines": tail_lines,
            "all": all,
            "stream": stream,
            "follow": follow,
        }
        if not follow:
            value, _ = self.call("service_logs", args, timeout_s=timeout_s or 60.0)
            return value
        partial: dict[str, bytearray] = {}
        lines: list[dict[str, str]] = []

        def emit(source: str, raw: bytes) -> None:
            text = raw.decode("utf-8", "replace").removesuffix("\r")
            if on_line is not None:
                on_line(source, text)
            else:
                lines.append({"stream": source, "text": text})

        def collect(source: str, data: bytes) -> None:
            pending = partial.setdefault(source, bytearray())
            pending.extend(data)
            end = pending.rfind(b"\n")
            if end >= 0:
                for raw in pending[:end].split(b"\n"):
                    emit(source, bytes(raw))
                del pending[: end + 1]

        value, _ = self.call(
            "service_logs", args, on_data=collect, timeout_s=timeout_s or 7 * 24 * 3600.0
        )
        for source, pending in partial.items():
            if pending:
                emit(source, bytes(pending))
        value["lines"] = lines
        return value

    def service_stop(
        self, name: str, signal: str = "TERM", grace_s: float = 10.0
    ) -> dict[str, Any]:
        """Stop a service (signal, then KILL after ``grace_s``); not running is no error."""
        args = {"name": name, "signal": signal, "grace_s": grace_s}
        value, _ = self.call("service_stop", args, timeout_s=grace_s + 30.0)
        return value

    def service_stop_all(self, signal: str = "TERM", grace_s: float = 10.0) -> dict[str, Any]:
        """Stop every running service at once (workspace stop): {stopped: [names], results}."""
        args = {"signal": signal, "grace_s": grace_s}
        value, _ = self.call("service_stop_all", args, timeout_s=grace_s + 30.0)
        return value

    # -- PTY shells --------------------------------------------------------------------
    def shell_open(
        self,
        *,
        cwd: str | None = None,
        cols: int = 120,
        rows: int = 30,
        env: dict[str, str] | None = None,
        secret_env: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Open a login shell on a PTY: {shell_id, pid, ...}."""
        args: dict[str, Any] = _given(cols=cols, rows=rows, cwd=cwd, env=env, secret_env=secret_env)
        value, _ = self.call("shell_open", args, timeout_s=30.0)
        return value

    def shell_read(
        self,
        shell_id: str,
        cursor: int = 0,
        *,
        max_chars: int = 65536,
        plain: bool = False,
        wait_for_idle_ms: int | None = None,
    ) -> dict[str, Any]:
        """Output from byte offset ``cursor``: {output, cursor, next_cursor, truncated,
        alive, exit_code, more, end}. Pass ``next_cursor`` back to read only what is new."""
        args: dict[str, Any] = {
            "shell_id": shell_id,
            "cursor": cursor,
            "max_chars": max_chars,
            "plain": plain,
        }
        if wait_for_idle_ms is not None:
            args["wait_for_idle_ms"] = wait_for_idle_ms
        if self.redactor:
            return read_redacted(self, self.redactor, args, timeout_s=60.0)
        value, _ = self.call("shell_read", args, timeout_s=60.0)
        return value

    def shell_write(self, shell_id: str, input: str, *, newline: bool = True) -> dict[str, Any]:
        """Type ``input`` (plus Enter with ``newline``): {written, complete}."""
        args = {"shell_id": shell_id, "input": input, "newline": newline}
        value, _ = self.call("shell_write", args, timeout_s=30.0)
        return value

    def shell_signal(self, shell_id: str, signal: str = "INT") -> dict[str, Any]:
        """Signal the shell's foreground process group (INT: Ctrl-C)."""
        args = {"shell_id": shell_id, "signal": signal}
        value, _ = self.call("shell_signal", args, timeout_s=30.0)
        return value

    def shell_resize(self, shell_id: str, cols: int, rows: int) -> dict[str, Any]:
        args = {"shell_id": shell_id, "cols": cols, "rows": rows}
        value, _ = self.call("shell_resize", args, timeout_s=30.0)
        return value

    def shell_close(self, shell_id: str) -> dict[str, Any]:
        value, _ = self.call("shell_close", {"shell_id": shell_id}, timeout_s=30.0)
        return value

    def shell_list(self) -> list[dict[str, Any]]:
        value, _ = self.call("shell_list", timeout_s=30.0)
        shells = value.get("shells", [])
        return shells if isinstance(shells, list) else []


def _call_frame(ident: int, header: dict[str, Any], payload: bytes) -> bytes:
    """The encoded ``call`` frame; TooLarge when its arguments do not fit in a frame
    header (a huge argv or environment), before anything is sent."""
    op, args = header["op"], header["args"]
    try:
        return p.Frame(p.CALL, ident, header, payload).encode()
    except p.ProtocolError as exc:
        if len(payload) > p.MAX_PAYLOAD:
            raise  # callers cut their input into frames: this is pyro's own bug
        size = len(json.dumps(args, separators=(",", ":")))
        raise TooLarge(
            f"{op}: its arguments take {size / (1 << 20):.1f} MiB encoded; a call's "
            f"arguments (argv, environment, paths) must fit in {p.MAX_HEADER >> 20} MiB",
            hint="pass large data as a file (file write, sync push) instead",
        ) from exc


class Answer:
    """The result value of a call, read field by field as what it is: the agent's word.

    A field of the wrong type or out of its range is a ProtocolViolation naming the
    operation, the field and the value, never a crash further on (an ``exit_code`` of
    ``"x"``, an infinite duration). Absent optional fields take their default.
    """

    def __init__(self, op: str, value: dict[str, Any]) -> None:
        self.op = op
        self.value = value

    def _bad(self, name: str, wanted: str) -> ProtocolViolation:
        shown = repr(self.value.get(name))[:60]
        return ProtocolViolation(
            f"{self.op}: the guest agent answered {name}={shown}, not {wanted}"
        )

    def integer(self, name: str, low: int, high: int, default: int | None = None) -> int:
        item = self.value.get(name, default)
        if type(item) is not int or not low <= item <= high:  # bool is not an int here
            raise self._bad(name, f"an integer from {low} to {high}")
        return item

    def number(self, name: str, default: float) -> float:
        item = self.value.get(name, default)
        if isinstance(item, bool) or not isinstance(item, int | float) or not 0 <= item < 1e15:
            raise self._bad(name, "a finite number >= 0")
        return float(item)

    def flag(self, name: str) -> bool:
        item = self.value.get(name, False)
        if not isinstance(item, bool):
            raise self._bad(name, "true or false")
        return item

    def text(self, name: str) -> str | None:
        item = self.value.get(name)
        if item is not None and (not isinstance(item, str) or len(item) > 64):
            raise self._bad(name, "a short string or null")
        return item

    def names(self, name: str, most: int) -> list[str]:
        """A list of at most ``most`` file names (absent: empty)."""
        item = self.value.get(name, [])
        if (
            not isinstance(item, list)
            or len(item) > most
            or not all(isinstance(n, str) and 0 < len(n) <= 4096 for n in item)
        ):
            raise self._bad(name, f"a list of at most {most} names")
        return item


def _json_line(line: bytes) -> dict[str, Any]:
    try:
        item = json.loads(line)
    except ValueError as exc:
        raise ProtocolViolation(f"the guest sent a manifest line that is not JSON: {exc}") from exc
    if not isinstance(item, dict):
        raise ProtocolViolation("the guest sent a manifest line that is not an object")
    return item
