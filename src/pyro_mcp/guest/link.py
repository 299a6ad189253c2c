"""The host's end of one agent connection: frames in and out, many concurrent calls.

A reader thread takes frames off the socket and hands each to the call it belongs to, so
calls from several threads run at once and output streams back while a command runs.
:class:`AgentLink` is this transport; :class:`~pyro_mcp.guest.client.AgentClient` adds
the typed operations on top.

The guest is untrusted, so every call is bounded here, whatever the agent does:

- a deadline for the whole call (``timeout_s``) and for silence (``idle_s``: the agent
  sends a keepalive for every call that runs long, so a stalled agent is noticed);
- each call buffers at most ``QUEUE_BYTES`` of frames its caller has not taken yet; past
  that the reader stops reading the link (back-pressure on the guest), so a flood costs
  the host no memory;
- a stream that asks for more than it gave is refused;
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
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from pyro_mcp.errors import (
    AgentUnavailable,
    Cancelled,
    GuestError,
    OperationTimeout,
    ProtocolViolation,
    PyroError,
    TooLarge,
)
from pyro_mcp.guest import protocol as p

if TYPE_CHECKING:
    from pyro_mcp.guest.redaction import CallRedaction, Redactor

DataFn = Callable[[str, bytes], None]
Chunk = tuple[str, int | None, bytes]  # (stream, offset when sparse, bytes)
Upload = bytes | tuple[int, bytes]  # a chunk to send, or (offset, chunk) for a sparse file

CALL_TIMEOUT_S = 60.0  # the deadline of a call that names none
CANCEL_POLL_S = 0.1  # how soon a call notices that its caller gave up
RESYNC_S = 30.0  # for a restarted agent to say which calls reached it
IDLE_S = 30.0  # silence (no frame, not even a keepalive) after which a call has stalled
IDLE_ENV = "PYRO_AGENT_IDLE_S"  # overrides IDLE_S (a slow host may want more)
STALL_S = 0.5  # an idle link with a partial frame is checked for a torn frame this often
QUEUE_BYTES = 16 << 20  # frames one call may hold that its caller has not taken
LINK_RECV = 1 << 20
# Uploads go in large frames: the agent reads each straight into place, and every frame
# costs it a header, a dispatch and an allocation (dear under emulation).
UPLOAD_CHUNK = 1 << 20


def idle_from_env() -> float:
    """``IDLE_S``, or ``$PYRO_AGENT_IDLE_S`` when set to a positive number of seconds."""
    text = os.environ.get(IDLE_ENV)
    try:
        value = float(text) if text else IDLE_S
    except ValueError:
        return IDLE_S
    return value if 0 < value < 86400 else IDLE_S


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


class CallStream:
    """One call in flight whose data frames its caller takes as they arrive.

    Iterate for ``(stream, offset, bytes)`` chunks (keepalives are not shown); when the
    iteration ends, ``value`` and ``payload`` hold the result. Leaving early (``close``,
    or the ``with`` block) cancels the call in the guest.
    """

    def __init__(
        self,
        client: AgentLink,
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


class AgentLink:
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
        redaction = None
        if self.redactor:
            from pyro_mcp.guest.redaction import CallRedaction  # only with secrets to hide

            redaction = CallRedaction(self.redactor, op)
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
