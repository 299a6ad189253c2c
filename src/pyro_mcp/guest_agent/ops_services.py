"""Services: long-lived processes the agent starts, watches, restarts and stops.

State and logs live under ``<run>/services/<name>/`` (``<run>`` is ``$PYRO_AGENT_RUN_DIR``,
default ``/run/pyro``, a tmpfs in the guest), never in the workspace.

Operations
----------
``service_start`` {name, argv | shell, cwd?, env?, ready?, ready_timeout_s=30,
ready_interval_ms=200, restart="no"|"on-failure"}
    Starts the service in its own session (process group) and returns once it is ready:
    the status below plus ``ready_ms``. ``ready`` is a probe (see :mod:`probes`); without
    one the service is ``running`` at once. Errors: ``invalid_argument``, ``not_found``
    (cwd), ``exists`` (a service of that name is starting, ready or running, or waits to
    be restarted), ``not_ready`` (the probe did not succeed in time: the service was
    stopped, TERM then KILL, and left ``failed``; the message names the probe, the time
    waited, the last probe error and the tail of the logs), ``exited_before_ready`` (the
    message has the exit code and the log tail; a missing program exits 127),
    ``cancelled``. A name whose previous run ended may be started again (``starts``
    counts the starts of the name; ``restarts`` restarts from scratch).
``service_list`` {} -> {services: [status...]}
``service_status`` {name} -> status (``not_found`` for unknown names)
``service_logs`` {name, tail_lines=100, all=false, stream="both"|"stdout"|"stderr",
follow=false}
    -> {name, lines: [{stream, text}], truncated, paths}; stdout's lines, then stderr's.
    With ``follow`` the tail and then new output stream as ``data`` frames (stream
    stdout/stderr, raw bytes) until the service ends or the call is cancelled; the result
    then has no lines but ``ended`` ("exited" or "cancelled") and ``bytes``.
``service_stop`` {name, signal="TERM", grace_s=10}
    Signals the process group, waits ``grace_s`` for it to empty, then KILLs it: the
    status plus ``was_running``, ``stop_signal`` and ``killed`` (escalated to KILL). A
    service that is not running is no error: ``was_running`` is false.
``service_stop_all`` {signal="TERM", grace_s=10} -> {stopped: [names], results: [...]}

Status: ``name, state`` (starting, ready, running, failed, exited, stopped), ``pid``,
``exit_code`` (128+N when killed by signal N; null when unknown), ``signal``,
``started_at`` (epoch seconds), ``restarts`` (automatic restarts of this start),
``starts``, ``command``, ``cwd``, ``probe``, ``last_probe_error``, ``restart``,
``restart_pending``, ``ready_ms``, ``note``, ``logs`` (paths of the two log files).

Restarts: with ``restart="on-failure"`` a service that ends with a non-zero status (or
a signal) after its start succeeded is started again after a backoff (0.5 s, doubling
to 10 s; back to 0.5 s after a run of 10 s or more), and its probe is run again (a
probe timeout counts as a failure). A failing ``service_start`` never restarts.

Logs: the service writes into pipes read by a small *log pump*: a process forked from
the agent (no new interpreter) in its own session, so it outlives an agent restart and
a ``service_stop`` of the service's group; it ends when every writer of the pipes has
gone. It appends to ``stdout.log`` and ``stderr.log``; when one reaches ``LOG_CAP``
bytes its content moves to ``<file>.1`` (the previous ``.1`` is dropped) headed by a
marker line ``[pyro: N bytes of older output dropped]`` counting everything dropped so
far. A flooding service is slowed by the pipe (it waits for the pump), never by the
agent, and its logs never exceed two caps per stream.

State: ``state.json`` in the service's folder is rewritten (atomically) on every change.
A restarted agent reloads every record: a recorded process that still runs (same pid and
the same start time in /proc) is adopted and watched through a pidfd; its exit status
is then unknown (it is no child of the new agent) and it is not restarted. A recorded
process that is gone becomes ``exited`` with a null exit code and a note.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from pyro_mcp.guest_agent import probes
from pyro_mcp.guest_agent.calls import Call, CallError
from pyro_mcp.guest_agent.ops_exec import DEFAULT_PATH

RUN_DIR_ENV = "PYRO_AGENT_RUN_DIR"
DEFAULT_RUN_DIR = "/run/pyro"
LOG_CAP = 1 << 20  # bytes per log file; one older file is kept besides
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"  # compiled on first use (start time)
ACTIVE = ("starting", "ready", "running")
STREAMS = ("stdout", "stderr")
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
STABLE_S = 10.0  # a run this long resets the backoff
NOT_READY_GRACE_S = 2.0  # TERM -> KILL when a probe timed out
PUMP_FLUSH_S = 1.0  # wait this long for the pump to write a finished run's last output
TAIL_LINES = 20  # of each log in error messages
LOGS_VALUE_MAX = 640 << 10  # the lines travel in the result header (1 MiB max)
LINE_MAX = 16 << 10
FOLLOW_POLL_S = 0.1
MARK_PREFIX = b"[pyro: "
MARK_SUFFIX = b" bytes of older output dropped]\n"


def run_dir() -> str:
    return os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR


# --- arguments -------------------------------------------------------------------------


def _bad(message: str) -> CallError:
    return CallError("invalid_argument", message)


def _name(args: dict[str, Any]) -> str:
    name = args.get("name")
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise _bad(
            f"service name {name!r} is invalid: 1-63 characters of letters, digits, "
            "'_', '.' and '-', starting with a letter or digit"
        )
    return name


def _number(args: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = args.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _bad(f"{key} must be a number from {low:g} to {high:g}, not {value!r}")
    return float(value)


def _command(args: dict[str, Any]) -> list[str]:
    argv, shell = args.get("argv"), args.get("shell")
    if (argv is None) == (shell is None):
        raise _bad("a service needs exactly one of argv or shell")
    if shell is not None:
        if not isinstance(shell, str) or not shell.strip():
            raise _bad("shell must be a non-empty string")
        return ["/bin/sh", "-lc", shell]
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and a for a in argv):
        raise _bad("argv must be a non-empty list of non-empty strings")
    return list(argv)


def _extra_env(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and k and "=" not in k and isinstance(v, str) for k, v in value.items()
    ):
        raise _bad("env must map variable names to strings")
    return dict(value)


def base_environment(extra: dict[str, str]) -> dict[str, str]:
    env = {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "xterm"}
    env.update({k: v for k, v in os.environ.items() if k in ("TZ",)})
    env.update(extra)
    return env


def default_cwd() -> str:
    return "/workspace" if os.path.isdir("/workspace") else "/"


def _cwd(value: Any) -> str:
    if value is None:
        return default_cwd()
    if not isinstance(value, str) or not value.startswith("/"):
        raise _bad(f"cwd must be an absolute path, not {value!r}")
    if not os.path.isdir(value):
        raise CallError("not_found", f"working directory {value!r} does not exist in the guest")
    return value


def _signal_number(value: Any, default: str) -> tuple[int, str]:
    name = str(default if value is None else value).upper().removeprefix("SIG")
    number = getattr(signal, f"SIG{name}", None)
    if not isinstance(number, int) or name in ("IGN", "DFL"):
        raise _bad(f"unknown signal {value!r}")
    return number, name


# --- /proc -------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state letter, process group, start time in clock ticks) of a process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return fields[0].decode(), int(fields[2]), int(fields[19])
    except (IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in "ZXx"


def _group_alive(pgid: int) -> bool:
    """Does any live (non-zombie) process belong to process group ``pgid``?"""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return False
    for entry in entries:
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None and stat[1] == pgid and stat[0] not in "ZXx":
                return True
    return False


def _killpg(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


# --- the log pump (runs in a forked process) ----------------------------------------------


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def marker_count(head: bytes) -> tuple[int, int]:
    """(bytes dropped, length of the marker line) of a log starting with a marker."""
    end = head.find(b"\n")
    line = head[: end + 1]
    if end > 0 and line.startswith(MARK_PREFIX) and line.endswith(MARK_SUFFIX):
        digits = line[len(MARK_PREFIX) : -len(MARK_SUFFIX)]
        if digits.isdigit():
            return int(digits), len(line)
    return 0, 0


def marker(dropped: int) -> bytes:
    return MARK_PREFIX + str(dropped).encode() + MARK_SUFFIX


class _LogFile:
    """One capped log: appends, and rotates into ``.1`` with a drop marker."""

    def __init__(self, path: str, cap: int) -> None:
        self.path = path
        self.cap = cap
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self.fd).st_size

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        start = 0
        while start < len(data):
            room = self.cap - self.size
            if room <= 0:
                self.rotate()
                continue
            end = min(len(data), start + room)
            full = end < len(data)
            if full:  # the file fills up: end it after a whole line when one fits
                newline = data.rfind(b"\n", start, end)
                if newline >= 0:
                    end = newline + 1
            _write_all(self.fd, view[start:end])
            self.size += end - start
            start = end
            if full:
                self.rotate()

    def rotate(self) -> None:
        older = self.path + ".1"
        dropped = 0
        try:
            fd = os.open(older, os.O_RDONLY)
        except FileNotFoundError:
            pass
        else:
            try:
                before, marker_len = marker_count(os.read(fd, 128))
                dropped = before + os.fstat(fd).st_size - marker_len
            finally:
                os.close(fd)
        tmp = older + ".tmp"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if dropped:
                _write_all(out, marker(dropped))
            src = os.open(self.path, os.O_RDONLY)
            try:
                while chunk := os.read(src, 1 << 16):
                    _write_all(out, chunk)
            finally:
                os.close(src)
        finally:
            os.close(out)
        os.rename(tmp, older)
        os.ftruncate(self.fd, 0)
        self.size = 0


def _pump(folder: str, pipes: dict[int, str], done_w: int, cap: int) -> None:
    """Copy each pipe into its capped log until every pipe is closed (in the pump)."""
    keep = {*pipes, done_w}
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    keep.add(null)
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)
    logs = {fd: _LogFile(os.path.join(folder, f"{name}.log"), cap) for fd, name in pipes.items()}
    poller = select.poll()
    for fd in pipes:
        poller.register(fd, select.POLLIN)
    open_fds = set(pipes)
    while open_fds:
        for fd, _ in poller.poll():
            try:
                data = os.read(fd, 1 << 16)
            except OSError:
                data = b""
            if data:
                with contextlib.suppress(OSError):  # a full tmpfs: lose output, keep draining
                    logs[fd].write(data)
            else:
                poller.unregister(fd)
                open_fds.discard(fd)


def _start_pump(folder: str, pipes: dict[int, str], done_w: int, cap: int) -> None:
    """Fork the pump (twice: it is nobody's child, init reaps it) in its own session."""
    pid = os.fork()
    if pid == 0:  # the child: only os calls from here, never back into the agent
        gc.disable()  # a finaliser of an inherited object could close a reused fd number
        try:
            os.setsid()
            if os.fork() == 0:
                _pump(folder, pipes, done_w, cap)
        except BaseException:
            pass
        os._exit(0)
    os.waitpid(pid, 0)


def read_log(folder: str, stream: str, older: bool = True) -> bytes:
    data = b""
    names = (f"{stream}.log.1", f"{stream}.log") if older else (f"{stream}.log",)
    for name in names:
        with contextlib.suppress(FileNotFoundError), open(os.path.join(folder, name), "rb") as f:
            data += f.read()
    return data


def split_lines(data: bytes) -> list[str]:
    text = data.decode("utf-8", "replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def tail_lines(folder: str, stream: str, count: int | None) -> list[str]:
    lines = split_lines(read_log(folder, stream, older=True))
    return lines if count is None else lines[-count:] if count else []


LogMarks = dict[str, tuple[tuple[int, int] | None, int]]


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns


def log_marks(folder: str) -> LogMarks:
    """Where each log ends now: what a run writes from here on is its own."""
    marks: LogMarks = {}
    for stream in STREAMS:
        path = os.path.join(folder, f"{stream}.log")
        try:
            size = os.stat(path).st_size
        except OSError:
            size = 0
        marks[stream] = (_file_id(path + ".1"), size)
    return marks


def _output_since(folder: str, stream: str, marks: LogMarks | None) -> bytes:
    mark = marks.get(stream) if marks else None
    path = os.path.join(folder, f"{stream}.log")
    if mark is not None and _file_id(path + ".1") == mark[0]:  # not rotated since
        try:
            with open(path, "rb") as handle:
                handle.seek(mark[1])
                return handle.read()
        except OSError:
            return b""
    return read_log(folder, stream)  # rotated: the run wrote at least a whole file


def log_tail_text(folder: str, marks: LogMarks | None = None, count: int = TAIL_LINES) -> str:
    """The last lines of each log (of the run that began at ``marks``), for messages."""
    parts = []
    for stream in ("stderr", "stdout"):
        lines = split_lines(_output_since(folder, stream, marks))[-count:]
        if lines:
            shown = "\n".join(line[:500] for line in lines)
            parts.append(f"--- last {len(lines)} lines of {stream} ---\n{shown}")
    return "\n".join(parts) if parts else "(the service wrote no output)"


# --- records ---------------------------------------------------------------------------------


class _Run:
    """One process of a service (a start, a restart, or one adopted after an agent restart)."""

    def __init__(
        self,
        pid: int,
        proc: subprocess.Popen[bytes] | None,
        proc_start: int | None,
        pump_done: int | None,
    ) -> None:
        self.pid = pid
        self.proc = proc  # None when adopted: not our child
        self.proc_start = proc_start
        self.pump_done = pump_done  # read end, at EOF once the log pump ended
        self.began = time.monotonic()
        self.exited = threading.Event()
        self.stop_reason: str | None = None  # "stop", "not_ready", "cancelled"


class Service:
    def __init__(self, name: str, folder: str) -> None:
        self.name = name
        self.folder = folder
        self.command: list[str] = []
        self.cwd = "/"
        self.env: dict[str, str] = {}
        self.probe: dict[str, Any] | None = None
        self.ready_timeout_s = 30.0
        self.ready_interval_ms = 200.0
        self.restart = "no"
        self.state = "stopped"
        self.pid: int | None = None
        self.proc_start: int | None = None
        self.exit_code: int | None = None
        self.signal: str | None = None
        self.started_at: float | None = None
        self.restarts = 0
        self.starts = 0
        self.last_probe_error: str | None = None
        self.ready_ms: float | None = None
        self.note: str | None = None
        self.restart_pending = False
        self.failures = 0  # consecutive, for the backoff
        self.armed = False  # its start succeeded: failures restart it (on-failure)
        self.run: _Run | None = None
        self.log_marks: LogMarks | None = None  # where the logs of the latest run begin

    @property
    def busy(self) -> bool:
        return self.state in ACTIVE or self.restart_pending

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "pid": self.pid,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "started_at": self.started_at,
            "restarts": self.restarts,
            "starts": self.starts,
            "command": self.command,
            "cwd": self.cwd,
            "probe": self.probe,
            "last_probe_error": self.last_probe_error,
            "restart": self.restart,
            "restart_pending": self.restart_pending,
            "ready_ms": self.ready_ms,
            "note": self.note,
            "logs": {s: os.path.join(self.folder, f"{s}.log") for s in STREAMS},
        }

    def record(self) -> dict[str, Any]:
        return dict(
            self.status(),
            env=self.env,
            ready_timeout_s=self.ready_timeout_s,
            ready_interval_ms=self.ready_interval_ms,
            proc_start=self.proc_start,
            failures=self.failures,
            armed=self.armed,
        )

    def load(self, data: dict[str, Any]) -> None:
        for key in (
            "command", "cwd", "env", "probe", "ready_timeout_s", "ready_interval_ms",
            "restart", "state", "pid", "proc_start", "exit_code", "signal", "started_at",
            "restarts", "starts", "last_probe_error", "ready_ms", "note",
            "restart_pending", "failures", "armed",
        ):  # fmt: skip
            if key in data:
                setattr(self, key, data[key])


# --- the registry ----------------------------------------------------------------------------


class Registry:
    """Every service of one run directory; one lock guards them all."""

    def __init__(self, root: str) -> None:
        self.root = os.path.join(root, "services")
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.services: dict[str, Service] = {}
        self._load()

    # -- persistence -------------------------------------------------------------------------
    def _save(self, svc: Service) -> None:
        if self.services.get(svc.name) is not svc:
            return  # a record replaced by a new start of the name
        with contextlib.suppress(OSError):  # a full /run must not break supervision
            os.makedirs(svc.folder, mode=0o700, exist_ok=True)
            tmp = os.path.join(svc.folder, "state.json.tmp")
            with open(tmp, "w") as handle:
                json.dump(svc.record(), handle)
            os.replace(tmp, os.path.join(svc.folder, "state.json"))

    def _changed(self, svc: Service) -> None:
        self._save(svc)
        self.changed.notify_all()

    def _load(self) -> None:
        try:
            names = sorted(os.listdir(self.root))
        except OSError:
            return
        with self.lock:
            for name in names:
                folder = os.path.join(self.root, name)
                try:
                    with open(os.path.join(folder, "state.json")) as handle:
                        data = json.load(handle)
                except (OSError, ValueError):
                    continue
                if not isinstance(data, dict) or not re.fullmatch(NAME_PATTERN, name):
                    continue
                svc = Service(name, folder)
                svc.load(data)
                self.services[name] = svc
                self._adopt(svc)

    def _adopt(self, svc: Service) -> None:
        """Take over a record written by an earlier agent."""
        if svc.state in ACTIVE and svc.pid:
            stat = _proc_stat(svc.pid)
            if stat is not None and stat[0] not in "ZXx" and stat[2] == svc.proc_start:
                run = _Run(svc.pid, None, svc.proc_start, None)
                svc.run = run
                svc.armed = True
                if svc.state == "starting":
                    svc.state = "running"
                    svc.note = "adopted after an agent restart while starting: readiness unknown"
                else:
                    svc.note = "adopted after an agent restart"
                threading.Thread(target=self._watch, args=(svc, run), daemon=True).start()
            else:
                svc.state = "exited"
                svc.exit_code = None
                svc.signal = None
                svc.note = "the process ended while the agent was down: exit status unknown"
            self._save(svc)
        elif svc.restart_pending:
            svc.note = "restart resumed after an agent restart"
            threading.Thread(target=self._restart_later, args=(svc, 0.0), daemon=True).start()

    # -- processes ---------------------------------------------------------------------------
    def _launch(self, svc: Service) -> tuple[int, str] | None:
        """Spawn the service (under the lock); None, or (exit code, why) if it cannot run."""
        try:
            return self._spawn(svc)
        except OSError as exc:  # no pipes, no folder...: do not leave it "starting"
            svc.state = "failed"
            svc.note = f"cannot start: {exc}"
            self._changed(svc)
            raise

    def _spawn(self, svc: Service) -> tuple[int, str] | None:
        svc.state = "starting"
        svc.started_at = time.time()
        svc.exit_code = svc.signal = svc.last_probe_error = svc.ready_ms = None
        svc.pid = svc.proc_start = None
        os.makedirs(svc.folder, mode=0o700, exist_ok=True)
        svc.log_marks = log_marks(svc.folder)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            proc = subprocess.Popen(
                svc.command,
                cwd=svc.cwd,
                env=base_environment(svc.env),
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            why = "command not found" if code == 127 else (exc.strerror or str(exc))
            if exc.filename == svc.cwd and not os.path.isdir(svc.cwd):
                code, why = 126, f"working directory {svc.cwd} does not exist"
            line = f"pyro-agent: {svc.command[0]}: {why}\n".encode()
            with (
                contextlib.suppress(OSError),
                open(os.path.join(svc.folder, "stderr.log"), "ab") as handle,
            ):
                handle.write(line)
            svc.state = "failed"
            svc.exit_code = code
            self._changed(svc)
            return code, why
        os.close(out_w)
        os.close(err_w)
        done_r, done_w = os.pipe()
        try:
            _start_pump(svc.folder, {out_r: "stdout", err_r: "stderr"}, done_w, LOG_CAP)
        finally:
            for fd in (out_r, err_r, done_w):
                os.close(fd)
        stat = _proc_stat(proc.pid)
        run = _Run(proc.pid, proc, stat[2] if stat else None, done_r)
        svc.run = run
        svc.pid = proc.pid
        svc.proc_start = run.proc_start
        if svc.probe is None:
            svc.state = "running"
            svc.armed = True
        self._changed(svc)
        threading.Thread(
            target=self._watch, args=(svc, run), daemon=True, name=f"service-{svc.name}"
        ).start()
        return None

    def _watch(self, svc: Service, run: _Run) -> None:
        """Wait for one run to end, record how, and restart it when the policy says so."""
        code: int | None = None
        if run.proc is not None:
            code = run.proc.wait()  # waits for this pid only (exec reaps its own children)
        else:
            _wait_foreign(run.pid)
        if run.pump_done is not None:
            _wait_readable(run.pump_done, PUMP_FLUSH_S)
            os.close(run.pump_done)
        with self.lock:
            run.exited.set()
            if svc.run is not run:
                self.changed.notify_all()
                return
            restart = self._ended(svc, run, code)
            self._changed(svc)
        if restart:
            self._restart_later(svc, time.monotonic() - run.began)

    def _ended(self, svc: Service, run: _Run, code: int | None) -> bool:
        """Record the end of the current run (under the lock); True to restart it."""
        if code is None:
            svc.exit_code = svc.signal = None
            svc.note = "exit status unknown: the process was adopted after an agent restart"
        elif code < 0:
            svc.exit_code = 128 - code
            svc.signal = signal.Signals(-code).name
        else:
            svc.exit_code = code
            svc.signal = None
        if run.stop_reason in ("stop", "cancelled"):
            svc.state = "stopped"
        elif run.stop_reason == "not_ready" or svc.state == "starting":
            svc.state = "failed"
        elif code is None or code == 0:
            svc.state = "exited"
        else:
            svc.state = "failed"
        if svc.state == "failed" and svc.armed and svc.restart == "on-failure":
            svc.restart_pending = True
            return True
        return False

    def _restart_later(self, svc: Service, ran_s: float) -> None:
        """Back off, then start the service again (in the thread of the run that ended)."""
        while True:
            with self.lock:
                if ran_s >= STABLE_S:
                    svc.failures = 0
                svc.failures += 1
                delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** min(svc.failures - 1, 10))
                deadline = time.monotonic() + delay
                while svc.restart_pending and (left := deadline - time.monotonic()) > 0:
                    self.changed.wait(left)
                if not svc.restart_pending:
                    return  # stopped, or started anew, meanwhile
                svc.restart_pending = False
                svc.restarts += 1
                try:
                    failed = self._launch(svc)
                except OSError:
                    failed = (126, "cannot start")
                if failed is not None:
                    svc.restart_pending = True
                    self._changed(svc)
                    ran_s = 0.0
                    continue
                run = svc.run
            if svc.probe is None or run is None:
                return
            outcome, _ = self._await_ready(svc, run, None)
            if outcome == "timeout":
                self._terminate(run, "not_ready", signal.SIGTERM, NOT_READY_GRACE_S)
            return  # an exit restarts it from its watcher

    def _await_ready(self, svc: Service, run: _Run, call: Call | None) -> tuple[str, float]:
        """Probe until ready: ("ready" | "exited" | "timeout" | "cancelled", seconds)."""
        probe = svc.probe
        assert probe is not None
        env = base_environment(svc.env)
        began = run.began
        deadline = began + svc.ready_timeout_s
        interval = svc.ready_interval_ms / 1000
        while True:
            with self.lock:
                if svc.run is not run or run.exited.is_set():
                    return "exited", time.monotonic() - began
                if call is not None and call.cancelled.is_set():
                    return "cancelled", time.monotonic() - began
            error = probes.check(probe, svc.cwd, env, deadline - time.monotonic())
            with self.lock:
                now = time.monotonic()
                if svc.run is not run or run.exited.is_set():
                    return "exited", now - began
                if error is None:
                    svc.state = "ready"
                    svc.armed = True
                    svc.last_probe_error = None
                    svc.ready_ms = round((now - began) * 1000, 1)
                    self._changed(svc)
                    return "ready", now - began
                if error != svc.last_probe_error:
                    svc.last_probe_error = error
                    self._changed(svc)
                if now >= deadline:
                    return "timeout", now - began
                if call is not None and call.cancelled.is_set():
                    return "cancelled", now - began
                self.changed.wait(min(interval, deadline - now))

    def _terminate(self, run: _Run, reason: str, signum: int, grace_s: float) -> bool:
        """Signal the run's process group, wait for it to empty, KILL it after the grace.

        True if it had to be KILLed."""
        with self.lock:
            if run.stop_reason is None:
                run.stop_reason = reason
        _killpg(run.pid, signum)
        deadline = time.monotonic() + grace_s
        while True:
            if run.exited.is_set() and not _group_alive(run.pid):
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with self.lock:
                self.changed.wait(min(0.05, left))
        _killpg(run.pid, signal.SIGKILL)
        run.exited.wait(10.0)
        return True

    # -- operations --------------------------------------------------------------------------
    def get(self, name: str) -> Service:
        with self.lock:
            svc = self.services.get(name)
        if svc is None:
            raise CallError("not_found", f"no service named {name!r}")
        return svc

    def start(self, call: Call) -> dict[str, Any]:
        args = call.args
        name = _name(args)
        command = _command(args)
        env = _extra_env(args.get("env"))
        probe = probes.parse(args.get("ready"))
        timeout = _number(args, "ready_timeout_s", 30.0, 0.1, 86400.0)
        interval = _number(args, "ready_interval_ms", 200.0, 10.0, 60000.0)
        restart = args.get("restart", "no") or "no"
        if restart not in ("no", "on-failure"):
            raise _bad(f"restart must be 'no' or 'on-failure', not {restart!r}")
        cwd = _cwd(args.get("cwd"))
        with self.lock:
            old = self.services.get(name)
            if old is not None and old.busy:
                raise CallError(
                    "exists", f"service {name!r} is already {old.state} (pid {old.pid})"
                )
            svc = Service(name, os.path.join(self.root, name))
            svc.starts = (old.starts if old is not None else 0) + 1
            svc.command, svc.cwd, svc.env, svc.probe = command, cwd, env, probe
            svc.ready_timeout_s, svc.ready_interval_ms, svc.restart = timeout, interval, restart
            self.services[name] = svc
            failed = self._launch(svc)
            run = svc.run
        if failed is not None:
            code, why = failed
            raise CallError(
                "exited_before_ready",
                f"service {name!r} exited with code {code} before it was ready "
                f"({command[0]}: {why})\n{log_tail_text(svc.folder, svc.log_marks)}",
            )
        assert run is not None
        if probe is None:
            with self.lock:
                return dict(svc.status(), ready_ms=0.0)
        call.on_cancel = self._wake
        outcome, waited = self._await_ready(svc, run, call)
        if outcome == "ready":
            with self.lock:
                return svc.status()
        if outcome == "cancelled":
            self._terminate(run, "cancelled", signal.SIGTERM, NOT_READY_GRACE_S)
            raise CallError("cancelled", f"start of service {name!r} cancelled; it was stopped")
        if outcome == "timeout":
            last = svc.last_probe_error
            self._terminate(run, "not_ready", signal.SIGTERM, NOT_READY_GRACE_S)
            raise CallError(
                "not_ready",
                f"service {name!r} was not ready after {waited:.1f} s: "
                f"{probes.describe(probe)} did not succeed (last error: {last}); "
                f"the service was stopped\n{log_tail_text(svc.folder, svc.log_marks)}",
            )
        run.exited.wait(PUMP_FLUSH_S + 1)
        with self.lock:
            how = (
                "was stopped"
                if svc.state == "stopped"
                else f"exited with code {svc.exit_code}"
                + (f" ({svc.signal})" if svc.signal else "")
            )
            last = f", last error: {svc.last_probe_error}" if svc.last_probe_error else ""
        raise CallError(
            "exited_before_ready",
            f"service {name!r} {how} before it was ready ({probes.describe(probe)}{last})\n"
            + log_tail_text(svc.folder, svc.log_marks),
        )

    def _wake(self) -> None:
        with self.lock:
            self.changed.notify_all()

    def stop(self, name: str, signum: int, signame: str, grace_s: float) -> dict[str, Any]:
        svc = self.get(name)
        with self.lock:
            run = svc.run
            if svc.restart_pending:
                svc.restart_pending = False
                svc.state = "stopped"
                svc.note = "stopped while waiting to restart"
                self._changed(svc)
                return dict(svc.status(), was_running=False, restart_cancelled=True)
            if svc.state not in ACTIVE or run is None or run.exited.is_set():
                return dict(svc.status(), was_running=False)
        killed = self._terminate(run, "stop", signum, grace_s)
        with self.lock:
            while svc.run is run and svc.state in ACTIVE:  # the watcher records the end
                if not self.changed.wait(5.0):
                    break
            return dict(svc.status(), was_running=True, stop_signal=signame, killed=killed)

    def stop_all(self, signum: int, signame: str, grace_s: float) -> dict[str, Any]:
        with self.lock:
            names = [svc.name for svc in self.services.values() if svc.busy]
        results: dict[str, dict[str, Any]] = {}

        def stop_one(name: str) -> None:
            results[name] = self.stop(name, signum, signame, grace_s)

        threads = [threading.Thread(target=stop_one, args=(n,), daemon=True) for n in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return {
            "stopped": [n for n in names if results.get(n, {}).get("was_running")],
            "results": [results[n] for n in names if n in results],
        }

    def logs(self, call: Call) -> dict[str, Any]:
        args = call.args
        svc = self.get(_name(args))
        stream = args.get("stream", "both") or "both"
        if stream not in ("both", *STREAMS):
            raise _bad(f"stream must be stdout, stderr or both, not {stream!r}")
        streams = STREAMS if stream == "both" else (stream,)
        everything = bool(args.get("all", False))
        count = args.get("tail_lines", 100)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise _bad("tail_lines must be a non-negative integer")
        paths = {s: os.path.join(svc.folder, f"{s}.log") for s in streams}
        if args.get("follow"):
            return self._follow(call, svc, streams, None if everything else count, paths)
        lines: list[dict[str, str]] = []
        for name in streams:
            for text in tail_lines(svc.folder, name, None if everything else count):
                lines.append({"stream": name, "text": text})
        kept, truncated = _fit(lines)
        return {"name": svc.name, "lines": kept, "truncated": truncated, "paths": paths}

    def _follow(
        self,
        call: Call,
        svc: Service,
        streams: tuple[str, ...],
        count: int | None,
        paths: dict[str, str],
    ) -> dict[str, Any]:
        followers = {name: _Follower(svc.folder, name) for name in streams}
        sent = 0
        for name, follower in followers.items():
            lines = split_lines(follower.snapshot())
            lines = lines if count is None else lines[-count:] if count else []
            if lines:
                data = ("\n".join(lines) + "\n").encode()
                call.send_data(name, data)
                sent += len(data)
        call.on_cancel = self._wake
        ended = "cancelled"
        while not call.cancelled.is_set():
            with self.lock:
                over = not svc.busy
            for name, follower in followers.items():
                data = follower.poll()
                if data:
                    call.send_data(name, data)
                    sent += len(data)
            if over:
                ended = "exited"
                break
            with self.lock:
                if svc.busy and not call.cancelled.is_set():
                    self.changed.wait(FOLLOW_POLL_S)
        return {
            "name": svc.name,
            "lines": [],
            "truncated": False,
            "paths": paths,
            "ended": ended,
            "bytes": sent,
        }


def _wait_foreign(pid: int) -> None:
    """Wait for a process that is not our child to end."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        while _alive(pid):
            _wait_readable(pidfd, 5.0)
    finally:
        os.close(pidfd)


def _wait_readable(fd: int, timeout_s: float) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    with contextlib.suppress(OSError):
        poller.poll(int(timeout_s * 1000))


def _fit(lines: list[dict[str, str]]) -> tuple[list[dict[str, str]], bool]:
    """The newest lines that fit in a result (each cut at LINE_MAX characters)."""
    truncated = False
    budget = LOGS_VALUE_MAX
    kept: list[dict[str, str]] = []
    for item in reversed(lines):
        text = item["text"]
        if len(text) > LINE_MAX:
            text = text[:LINE_MAX] + " [pyro: line cut]"
            truncated = True
        cost = len(json.dumps(text)) + 32
        if cost > budget:
            truncated = True
            break
        budget -= cost
        kept.append({"stream": item["stream"], "text": text})
    kept.reverse()
    return kept, truncated


class _Follower:
    """Reads what a log file gains, across rotations (which move its content into .1)."""

    def __init__(self, folder: str, stream: str) -> None:
        self.path = os.path.join(folder, f"{stream}.log")
        self.older = self.path + ".1"
        self.offset = 0
        self.older_id = self._older_id()

    def _older_id(self) -> tuple[int, int] | None:
        try:
            info = os.stat(self.older)
        except OSError:
            return None
        return info.st_ino, info.st_mtime_ns

    def snapshot(self) -> bytes:
        """Everything kept so far; following starts after it."""
        self.older_id = self._older_id()
        older = current = b""
        with contextlib.suppress(FileNotFoundError), open(self.older, "rb") as handle:
            older = handle.read()
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as handle:
            current = handle.read()
        self.offset = len(current)
        return older + current

    def poll(self) -> bytes:
        out = b""
        older_id = self._older_id()
        if older_id != self.older_id:  # rotated: what we had not read moved into .1
            self.older_id = older_id
            with contextlib.suppress(OSError), open(self.older, "rb") as handle:
                moved = handle.read()
                moved = moved[marker_count(moved[:128])[1] :]
                out += moved[self.offset :]
            self.offset = 0
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                fresh = handle.read(8 << 20)
        except FileNotFoundError:
            fresh = b""
        self.offset += len(fresh)
        return out + fresh


# --- module state: one registry per run directory ----------------------------------------------

_registries: dict[str, Registry] = {}
_registries_lock = threading.Lock()


def registry() -> Registry:
    root = run_dir()
    with _registries_lock:
        found = _registries.get(root)
        if found is None:
            found = _registries[root] = Registry(root)
        return found


Handler = Callable[[Call], tuple[dict[str, Any], bytes]]


def service_start(call: Call) -> tuple[dict[str, Any], bytes]:
    return registry().start(call), b""


def service_list(call: Call) -> tuple[dict[str, Any], bytes]:
    reg = registry()
    with reg.lock:
        return {"services": [svc.status() for _, svc in sorted(reg.services.items())]}, b""


def service_status(call: Call) -> tuple[dict[str, Any], bytes]:
    reg = registry()
    svc = reg.get(_name(call.args))
    with reg.lock:
        return svc.status(), b""


def service_logs(call: Call) -> tuple[dict[str, Any], bytes]:
    return registry().logs(call), b""


def service_stop(call: Call) -> tuple[dict[str, Any], bytes]:
    name = _name(call.args)
    signum, signame = _signal_number(call.args.get("signal"), "TERM")
    grace = _number(call.args, "grace_s", 10.0, 0.0, 3600.0)
    return registry().stop(name, signum, signame, grace), b""


def service_stop_all(call: Call) -> tuple[dict[str, Any], bytes]:
    signum, signame = _signal_number(call.args.get("signal"), "TERM")
    grace = _number(call.args, "grace_s", 10.0, 0.0, 3600.0)
    return registry().stop_all(signum, signame, grace), b""


def handlers() -> dict[str, Handler]:
    """The service operations; also reloads (once) what an earlier agent left running."""
    with contextlib.suppress(OSError):
        registry()
    return {
        "service_start": service_start,
        "service_list": service_list,
        "service_status": service_status,
        "service_logs": service_logs,
        "service_stop": service_stop,
        "service_stop_all": service_stop_all,
    }
