"""The ``exec`` operation: run a command, stream its output, report how it ended.

Arguments (``args`` of the call):

- ``argv`` (list of str) or ``shell`` (str, run as ``/bin/sh -lc``): exactly one.
- ``cwd`` (str), ``env`` (dict of str: merged over the agent's environment).
- ``secret_env`` ({ENVVAR: secret name}): those secrets' values, from the guest's tmpfs.
- ``timeout_s`` (float, > 0): then the whole process group is killed.
- ``output_cap`` (int bytes, per stream): output beyond it is dropped and flagged.
- the call's payload is the command's stdin (closed after it).

Output arrives as ``data`` frames (``stream`` stdout/stderr) while the command runs. The
result: ``exit_code`` (128+N when killed by signal N, 127 when the program is missing),
``signal``, ``timed_out``, ``cancelled``, ``stdout_bytes``/``stderr_bytes`` (all produced),
``stdout_truncated``/``stderr_truncated``, ``duration_ms``, ``pid``.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from pyro_mcp.guest_agent import ops_secrets
from pyro_mcp.guest_agent.calls import Call, CallError

DEFAULT_OUTPUT_CAP = 16 << 20
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _command(args: dict[str, Any]) -> list[str]:
    argv, shell = args.get("argv"), args.get("shell")
    if (argv is None) == (shell is None):
        raise CallError("invalid_argument", "exec needs exactly one of argv or shell")
    if shell is not None:
        if not isinstance(shell, str):
            raise CallError("invalid_argument", "shell must be a string")
        return ["/bin/sh", "-lc", shell]
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise CallError("invalid_argument", "argv must be a non-empty list of strings")
    return list(argv)


def _environment(extra: Any) -> dict[str, str]:
    env = {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "xterm"}
    env.update({k: v for k, v in os.environ.items() if k in ("TZ",)})
    if extra is not None:
        if not isinstance(extra, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in extra.items()
        ):
            raise CallError("invalid_argument", "env must map strings to strings")
        env.update(extra)
    return env


class _Stream:
    """One output pipe: forwards what arrives as data frames, keeping at most ``cap``."""

    def __init__(self, call: Call, name: str, fd: int, cap: int) -> None:
        self.call, self.name, self.fd, self.cap = call, name, fd, cap
        self.total = 0
        self.sent = 0

    def pump(self) -> bool:
        """Forward what is readable now; False at end of file."""
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        self.total += len(chunk)
        room = self.cap - self.sent
        if room > 0:
            piece = chunk[:room]
            self.sent += len(piece)
            self.call.send_data(self.name, piece)
        return True

    @property
    def truncated(self) -> bool:
        return self.total > self.sent


def run_exec(call: Call) -> tuple[dict[str, Any], bytes]:
    args = call.args
    argv = _command(args)
    env = _environment(args.get("env"))
    env.update(ops_secrets.resolve(args.get("secret_env")))
    cwd = args.get("cwd") or "/"
    timeout = args.get("timeout_s")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise CallError("invalid_argument", "timeout_s must be a positive number")
    cap = args.get("output_cap", DEFAULT_OUTPUT_CAP)
    if not isinstance(cap, int) or cap < 0:
        raise CallError("invalid_argument", "output_cap must be a non-negative integer")
    if not os.path.isdir(cwd):
        raise CallError("not_found", f"working directory {cwd!r} does not exist in the guest")

    if call.cancelled.is_set():  # a cancel that came after this point kills the process
        raise CallError("cancelled", "the call was cancelled before its command started")
    started = time.monotonic()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE if call.payload else subprocess.DEVNULL,
            stdout=out_w,
            stderr=err_w,
            start_new_session=True,
            close_fds=True,
        )
    except (FileNotFoundError, PermissionError) as exc:
        for fd in (out_r, out_w, err_r, err_w):
            os.close(fd)
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        why = "command not found" if code == 127 else exc.strerror
        message = f"pyro-agent: {argv[0]}: {why}\n"
        call.send_data("stderr", message.encode())
        return _result(code, None, False, False, started, 0, len(message), False, False, 0), b""
    os.close(out_w)
    os.close(err_w)

    def signal_group(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    call.send_signal = signal_group
    call.upon_cancel(lambda: signal_group(signal.SIGKILL))
    if call.payload and proc.stdin is not None:
        threading.Thread(target=_feed_stdin, args=(proc, call.payload), daemon=True).start()
    streams = [_Stream(call, "stdout", out_r, cap), _Stream(call, "stderr", err_r, cap)]
    try:
        timed_out = _follow(proc, streams, timeout, signal_group)
    finally:
        call.send_signal = None
        for stream in streams:
            os.close(stream.fd)
    code = proc.returncode
    signum = -code if code < 0 else None
    return _result(
        128 + signum if signum else code,
        signum,
        timed_out,
        call.cancelled.is_set(),
        started,
        streams[0].total,
        streams[1].total,
        streams[0].truncated,
        streams[1].truncated,
        proc.pid,
    ), b""


# After the command exits, background children may keep its pipes open: wait this long
# for them, then end the call with the output so far.
LINGER_S = 1.0


def _follow(
    proc: subprocess.Popen[bytes],
    streams: list[_Stream],
    timeout: float | None,
    signal_group: Callable[[int], None],
) -> bool:
    """Pump output until the command exits and its pipes close; True if it timed out.

    One thread and one poll loop per command: the pipes and a pidfd for the process.
    """
    poller = select.poll()
    by_fd = {stream.fd: stream for stream in streams}
    for fd in by_fd:
        os.set_blocking(fd, False)
        poller.register(fd, select.POLLIN)
    pidfd = os.pidfd_open(proc.pid)
    poller.register(pidfd, select.POLLIN)
    deadline = None if timeout is None else time.monotonic() + timeout
    timed_out = False
    exited_at: float | None = None
    try:
        while by_fd:
            now = time.monotonic()
            if exited_at is not None and now - exited_at > LINGER_S:
                break
            wait = None if deadline is None or timed_out else max(0.0, deadline - now)
            if exited_at is not None:
                wait = LINGER_S if wait is None else min(wait, LINGER_S)
            events = poller.poll(None if wait is None else int(wait * 1000) + 1)
            if not events and deadline is not None and time.monotonic() >= deadline:
                if not timed_out:
                    timed_out = True
                    signal_group(signal.SIGKILL)
                continue
            for fd, _ in events:
                if fd == pidfd:
                    poller.unregister(pidfd)
                    proc.wait()
                    exited_at = time.monotonic()
                elif not by_fd[fd].pump():
                    poller.unregister(fd)
                    del by_fd[fd]
    finally:
        os.close(pidfd)
    if proc.returncode is None:
        proc.wait()
    return timed_out


def _feed_stdin(proc: subprocess.Popen[bytes], data: bytes) -> None:
    if proc.stdin is None:
        return
    try:
        proc.stdin.write(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()


def _result(
    code: int,
    signum: int | None,
    timed_out: bool,
    cancelled: bool,
    started: float,
    out_total: int,
    err_total: int,
    out_trunc: bool,
    err_trunc: bool,
    pid: int,
) -> dict[str, Any]:
    return {
        "exit_code": code,
        "signal": signal.Signals(signum).name if signum else None,
        "timed_out": timed_out,
        "cancelled": cancelled,
        "stdout_bytes": out_total,
        "stderr_bytes": err_total,
        "stdout_truncated": out_trunc,
        "stderr_truncated": err_trunc,
        "duration_ms": round((time.monotonic() - started) * 1000, 3),
        "pid": pid,
    }
