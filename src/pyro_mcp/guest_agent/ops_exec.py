"""The ``exec`` operation: run a command, stream its output, report how it ended.

Arguments (``args`` of the call):

- ``argv`` (list of str) or ``shell`` (str, run as ``/bin/sh -lc``): exactly one.
- ``cwd`` (str), ``env`` (dict of str: merged over the agent's environment).
- ``timeout_s`` (float, > 0): then the whole process group is killed.
- ``output_cap`` (int bytes, per stream): output beyond it is dropped and flagged.
- the call's payload is the command's stdin (closed after it).

Output arrives as ``data`` frames (``stream`` stdout/stderr) while the command runs. The
result: ``exit_code`` (128+N when killed by signal N, 127 when the program is missing),
``signal``, ``timed_out``, ``cancelled``, ``stdout_bytes``/``stderr_bytes`` (all produced),
``stdout_truncated``/``stderr_truncated``, ``duration_ms``, ``pid``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from typing import Any

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


class _Pump(threading.Thread):
    """Copies one pipe into data frames until EOF, keeping at most ``cap`` bytes."""

    def __init__(self, call: Call, stream: str, fd: int, cap: int) -> None:
        super().__init__(daemon=True)
        self.call, self.stream, self.fd, self.cap = call, stream, fd, cap
        self.total = 0
        self.sent = 0

    def run(self) -> None:
        try:
            while chunk := os.read(self.fd, 65536):
                self.total += len(chunk)
                room = self.cap - self.sent
                if room > 0:
                    piece = chunk[:room]
                    self.sent += len(piece)
                    self.call.send_data(self.stream, piece)
        except OSError:
            pass
        finally:
            os.close(self.fd)

    @property
    def truncated(self) -> bool:
        return self.total > self.sent


def run_exec(call: Call) -> tuple[dict[str, Any], bytes]:
    args = call.args
    argv = _command(args)
    env = _environment(args.get("env"))
    cwd = args.get("cwd") or "/"
    timeout = args.get("timeout_s")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise CallError("invalid_argument", "timeout_s must be a positive number")
    cap = args.get("output_cap", DEFAULT_OUTPUT_CAP)
    if not isinstance(cap, int) or cap < 0:
        raise CallError("invalid_argument", "output_cap must be a non-negative integer")
    if not os.path.isdir(cwd):
        raise CallError("not_found", f"working directory {cwd!r} does not exist in the guest")

    started = time.monotonic()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.PIPE if call.payload else subprocess.DEVNULL,
            stdout=out_w, stderr=err_w, start_new_session=True, close_fds=True,
        )
    except (FileNotFoundError, PermissionError) as exc:
        for fd in (out_r, out_w, err_r, err_w):
            os.close(fd)
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        message = f"pyro-agent: {argv[0]}: {'command not found' if code == 127 else exc.strerror}\n"
        call.send_data("stderr", message.encode())
        return _result(code, None, False, False, started, 0, len(message), False, False, 0), b""
    os.close(out_w)
    os.close(err_w)
    pumps = [_Pump(call, "stdout", out_r, cap), _Pump(call, "stderr", err_r, cap)]
    for pump in pumps:
        pump.start()

    def signal_group(signum: int) -> None:
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    call.send_signal = signal_group
    call.on_cancel = lambda: signal_group(signal.SIGKILL)
    if call.payload and proc.stdin is not None:
        threading.Thread(target=_feed_stdin, args=(proc, call.payload), daemon=True).start()

    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        signal_group(signal.SIGKILL)
        proc.wait()
    call.send_signal = None
    # Background children may hold the pipes open: give the pumps a moment, then stop
    # waiting so the call ends with what it has.
    for pump in pumps:
        pump.join(timeout=2.0)
    if any(pump.is_alive() for pump in pumps):
        signal_group(signal.SIGKILL)
        for pump in pumps:
            pump.join(timeout=1.0)
    code = proc.returncode
    signum = -code if code < 0 else None
    return _result(
        128 + signum if signum else code, signum, timed_out, call.cancelled.is_set(), started,
        pumps[0].total, pumps[1].total, pumps[0].truncated, pumps[1].truncated, proc.pid,
    ), b""


def _feed_stdin(proc: subprocess.Popen[bytes], data: bytes) -> None:
    if proc.stdin is None:
        return
    try:
        proc.stdin.write(data)
    except OSError:
        pass
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass


def _result(code: int, signum: int | None, timed_out: bool, cancelled: bool, started: float,
            out_total: int, err_total: int, out_trunc: bool, err_trunc: bool,
            pid: int) -> dict[str, Any]:
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
