"""Interactive shells on pseudo-terminals, held by the agent between calls.

A shell is ``/bin/bash -l`` (else ``/bin/sh -l``) on its own PTY, the session leader
with the PTY as its controlling terminal, so job control and Ctrl-C behave as in a
terminal. A reader thread keeps the last ``BUFFER_CAP`` bytes of its output; positions
in that output (cursors) are absolute byte offsets, so a client reads only what is new.
Shells live in the agent's memory: they end with the agent.

``shell_open`` {cwd?, cols=120, rows=30, env?, secret_env?} -> {shell_id, pid, ...}
    (as in shell_list)
    cwd defaults to /workspace if it exists, else /. At most ``MAX_SHELLS`` at once
    (``too_many``).
``shell_read`` {shell_id, cursor=0, max_chars=65536, plain=false, wait_for_idle_ms?}
    -> {shell_id, output, cursor, next_cursor, end, more, truncated, alive, exit_code}.
    ``cursor`` in the result is where ``output`` starts: the one asked for, or the oldest
    byte kept when that was dropped (``truncated``). ``max_chars`` counts bytes, at most
    ``READ_MAX`` (output never ends inside a UTF-8 character while more follows).
    ``plain`` removes terminal control sequences (CSI, OSC, DCS, other ESC sequences,
    BEL) and carriage returns before newlines. ``wait_for_idle_ms`` first waits until no
    output has come for that long, counted from the later of the call and the last
    output (at most ``IDLE_MAX_S``), or the shell ended.
``shell_write`` {shell_id, input, newline=true} -> {shell_id, written, complete}
    ``newline`` appends a carriage return (the Enter key). Over ``WRITE_MAX`` bytes:
    ``too_large``. A shell that ended or was closed: ``invalid_state``. If the shell does
    not take the input within ``WRITE_WAIT_S``, ``complete`` is false.
``shell_signal`` {shell_id, signal="INT"} -> {shell_id, signal, pgid}
    To the terminal's foreground process group (the shell's own group if that is unknown).
``shell_resize`` {shell_id, cols, rows} -> {shell_id, cols, rows}
``shell_close`` {shell_id} -> {shell_id, exit_code, closed}: SIGHUP, KILL after
    ``CLOSE_GRACE_S``, reaped and forgotten.
``shell_list`` {} -> {shells: [{shell_id, pid, foreground_pgid, alive, exit_code, cwd,
    cols, rows, command, created_at, end}]} (``foreground_pgid`` differs from ``pid``
    while a command runs in the foreground)

Unknown ids: ``not_found``; ids of closed shells (the last few hundred): ``invalid_state``.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import select
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from pyro_mcp.guest_agent import ops_secrets
from pyro_mcp.guest_agent.calls import Call, CallError
from pyro_mcp.guest_agent.ops_services import base_environment, default_cwd

MAX_SHELLS = 32
BUFFER_CAP = 1 << 20
WRITE_MAX = 64 << 10
READ_MAX = 128 << 10  # JSON may escape a byte into 6 characters: stays under 1 MiB headers
IDLE_MAX_S = 30.0
WRITE_WAIT_S = 10.0
CLOSE_GRACE_S = 1.0

# Compiled on first use (re caches them): the agent's start time matters.
_CONTROL = (
    r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC ... BEL or ST
    r"|\x1b[P^_X][^\x1b]*(?:\x1b\\)?"  # DCS, PM, APC, SOS ... ST
    r"|\x1b\[[0-?]*[ -/]*[@-~]"  # CSI
    r"|\x1b[ -/]*[0-~]"  # other escapes: charset, keypad mode, ...
    r"|\x1b|\x07"  # a lone ESC (cut sequence) or BEL
)
_CR_NL = r"\r+\n"


def strip_controls(text: str) -> str:
    return re.sub(_CR_NL, "\n", re.sub(_CONTROL, "", text))


def _utf8_cut(data: bytes) -> int:
    """Length of ``data`` without a trailing incomplete UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # the lead byte of the last character (or ASCII)
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 6 else 3 if byte >> 4 == 14 else 4
            return len(data) if need <= back else len(data) - back
    return len(data)


def _take_terminal() -> None:  # in the child, after setsid
    import fcntl
    import termios

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _winsize(fd: int, rows: int, cols: int) -> None:
    import fcntl
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Shell:
    def __init__(self, ident: str, cwd: str, rows: int, cols: int, env: dict[str, str]) -> None:
        self.id = ident
        self.cwd = cwd
        self.rows, self.cols = rows, cols
        self.created_at = time.time()
        self.command = ["/bin/bash", "-l"] if os.access("/bin/bash", os.X_OK) else ["/bin/sh", "-l"]
        self.cond = threading.Condition()
        self.buffer = bytearray()
        self.start = 0  # absolute offset of buffer[0]
        self.last_output = time.monotonic()
        self.eof = False
        self.closed = False
        self.fd_lock = threading.Lock()  # writers; the master fd stays open while held
        master, slave = os.openpty()
        try:
            _winsize(master, rows, cols)
            self.proc = subprocess.Popen(
                self.command,
                cwd=cwd,
                env=env,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                start_new_session=True,
                preexec_fn=_take_terminal,
                close_fds=True,
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        self.master = master
        self._wake_r, self._wake_w = os.pipe()
        self.reader = threading.Thread(target=self._read, daemon=True, name=f"shell-{ident}")
        self.reader.start()

    @property
    def end(self) -> int:
        return self.start + len(self.buffer)

    @property
    def exit_code(self) -> int | None:
        code = self.proc.poll()
        if code is None:
            return None
        return 128 - code if code < 0 else code

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def _read(self) -> None:
        poller = select.poll()
        poller.register(self.master, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                events = poller.poll()
                if any(fd == self._wake_r for fd, _ in events):
                    break
                try:
                    data = os.read(self.master, 1 << 16)
                except BlockingIOError:
                    continue
                except OSError:  # EIO: every holder of the terminal closed it
                    break
                if not data:
                    break
                with self.cond:
                    self.buffer += data
                    excess = len(self.buffer) - BUFFER_CAP
                    if excess > 0:
                        del self.buffer[:excess]
                        self.start += excess
                    self.last_output = time.monotonic()
                    self.cond.notify_all()
        finally:
            with self.cond:
                self.eof = True
                self.cond.notify_all()
            with contextlib.suppress(OSError):
                self.proc.wait()

    def _ended(self) -> CallError:
        if self.closed:
            return CallError("invalid_state", f"shell {self.id} is closed")
        code = self.exit_code
        how = f"exited with code {code}" if code is not None else "lost its terminal"
        return CallError("invalid_state", f"shell {self.id} has {how}")

    def foreground(self) -> int | None:
        """The terminal's foreground process group (the shell's own while it is idle)."""
        with self.fd_lock:
            if self.closed:
                return None
            try:
                return os.tcgetpgrp(self.master)
            except OSError:
                return None

    def info(self) -> dict[str, Any]:
        return {
            "shell_id": self.id,
            "pid": self.proc.pid,
            "foreground_pgid": self.foreground(),
            "alive": self.alive,
            "exit_code": self.exit_code,
            "cwd": self.cwd,
            "cols": self.cols,
            "rows": self.rows,
            "command": self.command,
            "created_at": self.created_at,
            "end": self.end,
        }

    # -- operations ------------------------------------------------------------------------
    def read(
        self, cursor: int, limit: int, plain: bool, idle_s: float | None, call: Call
    ) -> dict[str, Any]:
        with self.cond:
            if idle_s:
                began = time.monotonic()
                deadline = began + IDLE_MAX_S
                while not self.eof and not call.cancelled.is_set():
                    now = time.monotonic()
                    quiet = now - max(self.last_output, began)
                    if quiet >= idle_s or now >= deadline:
                        break
                    self.cond.wait(min(idle_s - quiet, deadline - now))
            truncated = cursor < self.start
            pos = min(max(cursor, self.start), self.end)
            chunk = bytes(self.buffer[pos - self.start : pos - self.start + limit])
            end = self.end
        if pos + len(chunk) < end:
            chunk = chunk[: _utf8_cut(chunk)] or chunk
        text = chunk.decode("utf-8", "replace")
        if plain:
            text = strip_controls(text)
        return {
            "shell_id": self.id,
            "output": text,
            "cursor": pos,
            "next_cursor": pos + len(chunk),
            "end": end,
            "more": pos + len(chunk) < end,
            "truncated": truncated,
            "alive": self.alive,
            "exit_code": self.exit_code,
        }

    def write(self, data: bytes, call: Call) -> dict[str, Any]:
        view = memoryview(data)
        deadline = time.monotonic() + WRITE_WAIT_S
        written = 0
        with self.fd_lock:  # one writer at a time; close() waits for it
            if self.closed or self.eof or not self.alive:
                raise self._ended()
            poller = select.poll()
            poller.register(self.master, select.POLLOUT)
            while view and not call.cancelled.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    count = os.write(self.master, view)
                except BlockingIOError:
                    poller.poll(int(min(left, 0.1) * 1000) + 1)
                    continue
                except OSError as exc:
                    raise CallError("invalid_state", f"shell {self.id}: {exc.strerror}") from exc
                written += count
                view = view[count:]
        return {"shell_id": self.id, "written": written, "complete": not view}

    def signal(self, signum: int) -> int:
        with self.fd_lock:
            if self.closed or not self.alive:
                raise self._ended()
            try:
                pgid = os.tcgetpgrp(self.master)
            except OSError:
                pgid = self.proc.pid
        if pgid <= 0:
            pgid = self.proc.pid
        try:
            os.killpg(pgid, signum)
        except ProcessLookupError as exc:
            raise CallError("invalid_state", f"shell {self.id}: process group gone") from exc
        return pgid

    def resize(self, rows: int, cols: int) -> None:
        with self.fd_lock:
            if self.closed:
                raise self._ended()
            _winsize(self.master, rows, cols)
            self.rows, self.cols = rows, cols

    def close(self) -> int | None:
        with self.fd_lock:
            self.closed = True
            foreground = -1
            with contextlib.suppress(OSError):
                foreground = os.tcgetpgrp(self.master)
        if self.alive:
            for pgid in {foreground, self.proc.pid} - {-1, 0}:
                with contextlib.suppress(OSError):
                    os.killpg(pgid, signal.SIGHUP)
            try:
                self.proc.wait(CLOSE_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5.0)
        os.write(self._wake_w, b"x")
        self.reader.join(5.0)
        with self.fd_lock:
            if not self.reader.is_alive():  # else it still polls them: leak rather than race
                for fd in (self.master, self._wake_r, self._wake_w):
                    os.close(fd)
        with self.cond:
            self.cond.notify_all()
        return self.exit_code


# --- the table of shells ---------------------------------------------------------------------

_shells: dict[str, Shell] = {}
_closed: collections.deque[str] = collections.deque(maxlen=512)
_lock = threading.Lock()


def _int(args: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = args.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CallError("invalid_argument", f"{key} must be an integer {low}-{high}")
    return value


def _get(args: dict[str, Any]) -> Shell:
    ident = args.get("shell_id")
    if not isinstance(ident, str):
        raise CallError("invalid_argument", "shell_id must be a string")
    with _lock:
        shell = _shells.get(ident)
        if shell is None and ident in _closed:
            raise CallError("invalid_state", f"shell {ident} is closed")
    if shell is None:
        raise CallError("not_found", f"no shell {ident}")
    return shell


def shell_open(call: Call) -> tuple[dict[str, Any], bytes]:
    args = call.args
    cols = _int(args, "cols", 120, 1, 1000)
    rows = _int(args, "rows", 30, 1, 1000)
    cwd = args.get("cwd") or default_cwd()
    if not isinstance(cwd, str) or not os.path.isdir(cwd):
        raise CallError("not_found", f"working directory {cwd!r} does not exist in the guest")
    extra = args.get("env") or {}
    if not isinstance(extra, dict) or not all(
        isinstance(k, str) and k and "=" not in k and isinstance(v, str) for k, v in extra.items()
    ):
        raise CallError("invalid_argument", "env must map variable names to strings")
    env = base_environment({"TERM": "xterm-256color", **extra})
    env.update(ops_secrets.resolve(args.get("secret_env")))
    with _lock:
        if len(_shells) >= MAX_SHELLS:
            raise CallError("too_many", f"{MAX_SHELLS} shells are open: close one first")
        ident = "shell-" + os.urandom(4).hex()
        shell = Shell(ident, cwd, rows, cols, env)
        _shells[ident] = shell
    return dict(shell.info(), pid=shell.proc.pid), b""


def shell_read(call: Call) -> tuple[dict[str, Any], bytes]:
    args = call.args
    shell = _get(args)
    cursor = _int(args, "cursor", 0, 0, 1 << 62)
    limit = _int(args, "max_chars", 65536, 1, READ_MAX)
    idle = args.get("wait_for_idle_ms")
    if idle is not None and (
        isinstance(idle, bool) or not isinstance(idle, (int, float)) or idle < 0
    ):
        raise CallError("invalid_argument", "wait_for_idle_ms must be a non-negative number")
    idle_s = None if idle is None else min(float(idle) / 1000, IDLE_MAX_S)

    def wake() -> None:
        with shell.cond:
            shell.cond.notify_all()

    call.upon_cancel(wake)
    return shell.read(cursor, limit, bool(args.get("plain")), idle_s, call), b""


def shell_write(call: Call) -> tuple[dict[str, Any], bytes]:
    args = call.args
    shell = _get(args)
    text = args.get("input")
    if not isinstance(text, str):
        raise CallError("invalid_argument", "input must be a string")
    data = text.encode()
    if args.get("newline", True):
        data += b"\r"
    if len(data) > WRITE_MAX:
        raise CallError(
            "too_large", f"input of {len(data)} bytes exceeds {WRITE_MAX} (write it in parts)"
        )
    return shell.write(data, call), b""


def shell_signal(call: Call) -> tuple[dict[str, Any], bytes]:
    shell = _get(call.args)
    name = str(call.args.get("signal") or "INT").upper().removeprefix("SIG")
    signum = getattr(signal, f"SIG{name}", None)
    if not isinstance(signum, int) or name in ("IGN", "DFL"):
        raise CallError("invalid_argument", f"unknown signal {call.args.get('signal')!r}")
    pgid = shell.signal(signum)
    return {"shell_id": shell.id, "signal": name, "pgid": pgid}, b""


def shell_resize(call: Call) -> tuple[dict[str, Any], bytes]:
    shell = _get(call.args)
    cols = _int(call.args, "cols", shell.cols, 1, 1000)
    rows = _int(call.args, "rows", shell.rows, 1, 1000)
    shell.resize(rows, cols)
    return {"shell_id": shell.id, "cols": cols, "rows": rows}, b""


def shell_close(call: Call) -> tuple[dict[str, Any], bytes]:
    shell = _get(call.args)
    with _lock:
        if _shells.pop(shell.id, None) is None:
            raise CallError("invalid_state", f"shell {shell.id} is closed")
        _closed.append(shell.id)
    code = shell.close()
    return {"shell_id": shell.id, "exit_code": code, "closed": True}, b""


def shell_list(call: Call) -> tuple[dict[str, Any], bytes]:
    with _lock:
        shells = list(_shells.values())
    return {"shells": [shell.info() for shell in shells]}, b""


def close_all() -> None:
    """Close every shell (tests; an agent going away)."""
    with _lock:
        shells = list(_shells.values())
        _shells.clear()
        _closed.extend(shell.id for shell in shells)
    for shell in shells:
        shell.close()


Handler = Callable[[Call], tuple[dict[str, Any], bytes]]


def handlers() -> dict[str, Handler]:
    return {
        "shell_open": shell_open,
        "shell_read": shell_read,
        "shell_write": shell_write,
        "shell_signal": shell_signal,
        "shell_resize": shell_resize,
        "shell_close": shell_close,
        "shell_list": shell_list,
    }
