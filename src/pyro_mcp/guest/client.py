"""Host side of the guest protocol: one connection, many concurrent calls.

A reader thread takes frames off the socket and hands each to the queue of the call it
belongs to, so calls from several threads run at once and output streams back while a
command runs. Lower-level failures become :class:`AgentUnavailable` (the link dropped:
the VM or its agent died) or :class:`GuestError` (the agent refused the call).
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pyro_mcp.errors import AgentUnavailable, GuestError, OperationTimeout
from pyro_mcp.guest import protocol as p

DataFn = Callable[[str, bytes], None]


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


def _given(**values: Any) -> dict[str, Any]:
    """Call arguments without the ones left unset (None, or an empty env)."""
    return {key: value for key, value in values.items() if value is not None and value != {}}


class _Pending:
    def __init__(self) -> None:
        self.frames: queue.Queue[p.Frame | None] = queue.Queue()


class AgentClient:
    """A connection to the guest agent over a connected stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._closed: str | None = None
        self._reader = threading.Thread(
            target=self._read_loop, daemon=True, name="pyro-agent-reader"
        )
        self._reader.start()

    # -- connection ------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed is not None

    def close(self) -> None:
        if self._closed is None:
            self._closed = "closed by the host"
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def _read_loop(self) -> None:
        buffer = p.FrameBuffer()
        reason = "the guest agent connection closed"
        try:
            while True:
                data = self._sock.recv(1 << 20)
                if not data:
                    break
                for frame in buffer.feed(data):
                    if frame.id == 0 and frame.header.get("code") == p.AGENT_RESTARTED:
                        self._fail_pending()
                        continue
                    with self._lock:
                        pending = self._pending.get(frame.id)
                    if pending is not None:
                        pending.frames.put(frame)
        except OSError as exc:
            reason = f"the guest agent connection failed: {exc}"
        except p.ProtocolError as exc:
            reason = f"the guest agent broke the protocol: {exc}"
        if self._closed is None:
            self._closed = reason
        self._fail_pending()

    def _fail_pending(self) -> None:
        """Wake every waiting call with a lost-link marker."""
        with self._lock:
            waiting = list(self._pending.values())
        for pending in waiting:
            pending.frames.put(None)

    def _send(self, frame: p.Frame) -> None:
        data = frame.encode()
        with self._send_lock:
            if self._closed is not None:
                raise AgentUnavailable(self._closed)
            try:
                self._sock.sendall(data)
            except OSError as exc:
                raise AgentUnavailable(f"cannot send to the guest agent: {exc}") from exc

    # -- calls -----------------------------------------------------------------------
    def call(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        payload: bytes = b"",
        *,
        on_data: DataFn | None = None,
        input_chunks: Iterable[bytes] | None = None,
        timeout_s: float | None = None,
    ) -> tuple[dict[str, Any], bytes]:
        """Run one operation in the guest and return its result value and payload.

        ``on_data(stream, bytes)`` receives streamed output; ``input_chunks`` are sent as a
        stream after the call (for large uploads). Raises GuestError, AgentUnavailable,
        or OperationTimeout (after cancelling the call in the guest).
        """
        ident = next(self._ids)
        pending = _Pending()
        with self._lock:
            self._pending[ident] = pending
        try:
            self._send(p.Frame(p.CALL, ident, {"op": op, "args": args or {}}, payload))
            if input_chunks is not None:
                for chunk in input_chunks:
                    for start in range(0, len(chunk), p.CHUNK):
                        self._send(
                            p.Frame(
                                p.DATA, ident, {"stream": "file"}, chunk[start : start + p.CHUNK]
                            )
                        )
                self._send(p.Frame(p.EOF, ident, {"stream": "file"}))
            return self._wait(ident, op, pending, on_data, timeout_s)
        finally:
            with self._lock:
                self._pending.pop(ident, None)

    def _wait(
        self,
        ident: int,
        op: str,
        pending: _Pending,
        on_data: DataFn | None,
        timeout_s: float | None,
    ) -> tuple[dict[str, Any], bytes]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                self.cancel(ident)
                raise OperationTimeout(f"guest operation {op} took longer than {timeout_s} s")
            try:
                frame = pending.frames.get(timeout=left)
            except queue.Empty:
                continue
            if frame is None:
                raise AgentUnavailable(
                    self._closed or "the guest agent restarted; this call was lost with it"
                )
            if frame.t == p.DATA:
                if on_data is not None:
                    on_data(str(frame.header.get("stream", "")), frame.payload)
            elif frame.t == p.RESULT:
                value = frame.header.get("value")
                return (value if isinstance(value, dict) else {}), frame.payload
            elif frame.t == p.ERROR:
                raise GuestError(
                    str(frame.header.get("message", "guest error")),
                    guest_code=str(frame.header.get("code", "error")),
                )

    def cancel(self, ident: int) -> None:
        with contextlib.suppress(AgentUnavailable):
            self._send(p.Frame(p.CANCEL, ident))

    # -- typed helpers ---------------------------------------------------------------
    def hello(self, timeout_s: float | None = 10.0) -> dict[str, Any]:
        value, _ = self.call("hello", timeout_s=timeout_s)
        if value.get("protocol") != p.PROTOCOL_VERSION:
            raise AgentUnavailable(
                f"guest agent speaks protocol {value.get('protocol')}, host needs "
                f"{p.PROTOCOL_VERSION}: rebuild the environment (`pyro env pull NAME --force`)"
            )
        return value

    def ping(self, timeout_s: float | None = 5.0) -> None:
        self.call("ping", timeout_s=timeout_s)

    def exec(
        self,
        argv: list[str] | None = None,
        *,
        shell: str | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        stdin: bytes = b"",
        timeout_s: float | None = None,
        output_cap: int = 16 << 20,
        on_output: DataFn | None = None,
    ) -> ExecResult:
        """Run a command; output streams to ``on_output`` and is captured up to the cap."""
        args = _given(
            output_cap=output_cap, argv=argv, shell=shell, cwd=cwd, env=env, timeout_s=timeout_s
        )
        captured: dict[str, list[bytes]] = {"stdout": [], "stderr": []}

        def collect(stream: str, data: bytes) -> None:
            captured.setdefault(stream, []).append(data)
            if on_output is not None:
                on_output(stream, data)

        # The guest enforces the command timeout; the host allows a margin on top.
        wait = None if timeout_s is None else timeout_s + 10.0
        value, _ = self.call("exec", args, stdin, on_data=collect, timeout_s=wait)
        return ExecResult(
            exit_code=int(value.get("exit_code", -1)),
            stdout=b"".join(captured["stdout"]),
            stderr=b"".join(captured["stderr"]),
            timed_out=bool(value.get("timed_out")),
            signal=value.get("signal"),
            stdout_truncated=bool(value.get("stdout_truncated")),
            stderr_truncated=bool(value.get("stderr_truncated")),
            duration_ms=float(value.get("duration_ms", 0.0)),
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
    ) -> dict[str, Any]:
        args: dict[str, Any] = {"path": path, "mode": mode, "mkdirs": mkdirs}
        if root is not None:
            args["root"] = root
        if len(data) <= p.CHUNK:
            value, _ = self.call("put_file", args, data)
        else:
            args["streamed"] = True
            value, _ = self.call("put_file", args, input_chunks=[data])
        return value

    def get_file(
        self, path: str, *, max_bytes: int | None = None, root: str | None = None
    ) -> tuple[bytes, dict[str, Any]]:
        args: dict[str, Any] = {"path": path}
        if max_bytes is not None:
            args["max_bytes"] = max_bytes
        if root is not None:
            args["root"] = root
        chunks: list[bytes] = []
        value, _ = self.call("get_file", args, on_data=lambda _s, d: chunks.append(d))
        return b"".join(chunks), value

    def manifest(
        self,
        root: str,
        path: str | None = None,
        hash: bool = True,
        *,
        timeout_s: float | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Every entry under ``root`` (or its subdirectory ``path``), symlinks not followed.

        Returns (entries sorted by path, counts). Each entry: path (relative to root),
        type (file/dir/symlink/other), mode, size, mtime_ns, sha256 (files, when
        ``hash``), target (symlinks). Unchanged files are not re-read (guest-side cache).
        """
        import json

        args: dict[str, Any] = {"root": root, "hash": hash}
        if path is not None:
            args["path"] = path
        entries: list[dict[str, Any]] = []
        pending = bytearray()

        def collect(_stream: str, data: bytes) -> None:
            pending.extend(data)
            end = pending.rfind(b"\n")
            if end >= 0:
                entries.extend(json.loads(line) for line in pending[:end].split(b"\n") if line)
                del pending[: end + 1]

        value, _ = self.call("tree_manifest", args, on_data=collect, timeout_s=timeout_s)
        if pending.strip():
            entries.append(json.loads(pending))
        return entries, value

    def list_dir(
        self,
        root: str,
        path: str | None = None,
        *,
        recursive: bool = False,
        max_entries: int | None = None,
        timeout_s: float | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The entries of directory ``path`` (default: root), like ``manifest`` without
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
        return (entries if isinstance(entries, list) else []), value

    def remove_paths(
        self,
        root: str,
        paths: Iterable[str],
        *,
        recursive: bool = False,
        missing_ok: bool = False,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Remove files, symlinks and (``recursive``) directories; returns {removed, missing}."""
        args = {
            "root": root,
            "paths": list(paths),
            "recursive": recursive,
            "missing_ok": missing_ok,
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
        chmods: Iterable[dict[str, Any]] = (),
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Apply structure: removes, then dirs [{path, mode}], symlinks [{path, target}],
        then final modes (dirs' and chmods [{path, mode}], deepest first)."""
        args = {
            "root": root,
            "removes": list(removes),
            "dirs": list(dirs),
            "symlinks": list(symlinks),
            "chmods": list(chmods),
        }
        value, _ = self.call("apply_tree", args, timeout_s=timeout_s)
        return value

    def archive_get(
        self,
        root: str,
        path: str,
        sink: Callable[[bytes], None],
        *,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Stream a tar of ``path`` (file or directory) to ``sink``; returns counts and bytes."""
        value, _ = self.call(
            "archive_get",
            {"root": root, "path": path},
            on_data=lambda _stream, data: sink(data),
            timeout_s=timeout_s,
        )
        return value

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

        The guest refuses unsafe or oversized archives and then leaves nothing behind.
        Returns {dest, created, entries, files, dirs, symlinks, hardlinks, bytes,
        compression, replaced, replaced_count}.
        """
        args = {"root": root, "dest": dest, "max_bytes": max_bytes, "max_entries": max_entries}
        value, _ = self.call("archive_put", args, input_chunks=chunks, timeout_s=timeout_s)
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

    def service_list(self, timeout_s: float | None = 30.0) -> list[dict[str, Any]]:
        value, _ = self.call("service_list", timeout_s=timeout_s)
        services = value.get("services", [])
        return services if isinstance(services, list) else []

    def service_status(self, name: str, timeout_s: float | None = 30.0) -> dict[str, Any]:
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

        With ``follow`` the lines stream until the service ends: each goes to
        ``on_line(stream, text)`` if given, else into value["lines"].
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

        value, _ = self.call("service_logs", args, on_data=collect, timeout_s=timeout_s)
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
        """Stop every running service (workspace stop): {stopped: [names], results}."""
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
    ) -> dict[str, Any]:
        """Open a login shell on a PTY: {shell_id, pid, ...}."""
        args: dict[str, Any] = {"cols": cols, "rows": rows}
        if cwd is not None:
            args["cwd"] = cwd
        if env:
            args["env"] = env
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
