"""Service logs: the log pump that writes them, and the readers that show them.

A service writes into pipes read by a small *log pump*: a process forked from the agent
(no new interpreter) in its own session, so it outlives an agent restart and a
``service_stop`` of the service's group; it ends when every writer of the pipes has gone.
It appends to ``stdout.log`` and ``stderr.log`` in the service's folder; when one reaches
``LOG_CAP`` bytes its content moves to ``<file>.1`` (the previous ``.1`` is dropped)
headed by a marker line ``[pyro: N bytes of older output dropped]`` counting everything
dropped so far. A flooding service is slowed by the pipe (it waits for the pump), never
by the agent, and its logs never exceed two caps per stream.

The readers: ``tail_lines`` (both files of a stream), ``log_marks`` and
``log_tail_text`` (the output of one run, for error messages), ``fit_lines`` (the newest
lines that fit in a result) and ``Follower`` (what a log gains, across rotations).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select

LOG_CAP = 1 << 20  # bytes per log file; one older file is kept besides
STREAMS = ("stdout", "stderr")
TAIL_LINES = 20  # of each log in error messages
LOGS_VALUE_MAX = 640 << 10  # the lines travel in the result header (1 MiB max)
LINE_MAX = 16 << 10
MARK_PREFIX = b"[pyro: "
MARK_SUFFIX = b" bytes of older output dropped]\n"


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


def start_pump(folder: str, pipes: dict[int, str], done_w: int, cap: int) -> None:
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


# --- reading -----------------------------------------------------------------------------


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


def fit_lines(lines: list[dict[str, str]]) -> tuple[list[dict[str, str]], bool]:
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


class Follower:
    """Reads what a log file gains, across rotations (which move its content into .1)."""

    def __init__(self, folder: str, stream: str) -> None:
        self.path = os.path.join(folder, f"{stream}.log")
        self.older = self.path + ".1"
        self.offset = 0
        self.older_id = _file_id(self.older)

    def snapshot(self) -> bytes:
        """Everything kept so far; following starts after it."""
        self.older_id = _file_id(self.older)
        older = current = b""
        with contextlib.suppress(FileNotFoundError), open(self.older, "rb") as handle:
            older = handle.read()
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as handle:
            current = handle.read()
        self.offset = len(current)
        return older + current

    def poll(self) -> bytes:
        out = b""
        older_id = _file_id(self.older)
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
