"""A call in flight inside the agent, and the error a handler raises."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from pyro_mcp.guest import protocol as p


class CallError(Exception):
    """Raised by a handler: becomes an ``error`` frame with this code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Call:
    """One call in flight: its input stream, cancel flag and the way to answer.

    Every frame it sends carries ``session``, the session of the host that made it.
    """

    def __init__(
        self,
        send: Callable[[p.Frame], None],
        ident: int,
        op: str,
        args: dict[str, Any],
        payload: p.Bytes,
        session: str | None = None,
    ) -> None:
        self._send = send
        self.id = ident
        self.op = op
        self.args = args
        self.payload = payload
        self.session = session
        self.started = time.monotonic()
        self.cancelled = threading.Event()
        self._on_cancel: Callable[[], None] | None = None
        self._cancel_lock = threading.Lock()
        self.send_signal: Callable[[int], None] | None = None  # set while a process runs
        self._input: list[tuple[int | None, p.Bytes]] = []
        self._input_done = threading.Event()
        self._input_broken: str | None = None
        self._input_ready = threading.Condition()

    @staticmethod
    def temp_name(kind: str) -> str:
        """A name for a temporary file of this call that no other call uses: a random token
        (process ids are shared by every channel, call ids restart on each)."""
        return f".pyro-{kind}-{secrets.token_hex(8)}"

    def send(self, frame: p.Frame) -> None:
        if self.session is not None:
            frame.header["s"] = self.session
        self._send(frame)

    # -- input streamed by the host (large file puts) --------------------------------
    def feed(self, data: p.Bytes, offset: int | None = None) -> None:
        with self._input_ready:
            self._input.append((offset, data))
            self._input_ready.notify()

    def break_input(self, reason: str) -> None:
        """A frame of the input was damaged: the input can no longer be trusted."""
        with self._input_ready:
            self._input_broken = reason
            self._input_ready.notify_all()

    def end_input(self) -> None:
        with self._input_ready:
            self._input_done.set()
            self._input_ready.notify()

    def read_input(self, timeout_s: float = 60.0) -> p.Bytes | None:
        """Next chunk of streamed input; None at the end of the stream."""
        extent = self.read_extent(timeout_s)
        return None if extent is None else extent[1]

    def read_extent(self, timeout_s: float = 60.0) -> tuple[int | None, p.Bytes] | None:
        """Next chunk of streamed input with its offset (None unless the host sends a
        sparse file); None at the end of the stream."""
        with self._input_ready:
            deadline = time.monotonic() + timeout_s
            while not self._input and not self._input_done.is_set():
                if self._input_broken is not None:
                    break
                if self.cancelled.is_set():
                    raise CallError("cancelled", "call cancelled")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CallError("timeout", "no input from the host in time")
                self._input_ready.wait(left)
            if self._input_broken is not None:
                raise CallError("protocol", f"the call's input was damaged: {self._input_broken}")
            return self._input.pop(0) if self._input else None

    # -- output ----------------------------------------------------------------------
    def send_data(self, stream: str, data: bytes) -> None:
        for start in range(0, len(data), p.CHUNK):
            self.send(p.Frame(p.DATA, self.id, {"stream": stream}, data[start : start + p.CHUNK]))

    def upon_cancel(self, action: Callable[[], None]) -> None:
        """Run ``action`` when the call is cancelled, or now if it already was (a cancel
        can come before the operation is ready for it, e.g. before its process starts)."""
        with self._cancel_lock:
            self._on_cancel = action
            already = self.cancelled.is_set()
        if already:
            action()

    def cancel(self) -> None:
        with self._cancel_lock:
            self.cancelled.set()
            action = self._on_cancel
        if action is not None:
            action()
        with self._input_ready:
            self._input_ready.notify_all()
