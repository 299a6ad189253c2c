"""The guest agent's operations, typed: exec, files, trees, archives, services, shells.

:class:`AgentClient` is an :class:`~pyro_mcp.guest.link.AgentLink` (the transport: one
connection, many concurrent calls, every call bounded) with one method per agent
operation. Caps on what is kept (exec output, file reads) are enforced here, not trusted
to the guest, and every answer is read field by field as the agent's word
(:class:`~pyro_mcp.guest.answers.Answer`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import Any

from pyro_mcp.errors import (
    AgentUnavailable,
    InvalidArgument,
    OperationTimeout,
    ProtocolViolation,
)
from pyro_mcp.guest import protocol as p
from pyro_mcp.guest.answers import Answer, ExecResult, manifest_line
from pyro_mcp.guest.link import (
    AgentLink,
    CallStream,
    DataFn,
)
from pyro_mcp.guest.shell_reads import read_redacted

# A command's timeout is kept by the guest's clock; the host waits this much longer (a
# guest clock up to 10 % slow, and the time to send the result) before its own guard fires.
HOST_GUARD_FACTOR = 1.1
HOST_GUARD_MARGIN_S = 10.0
BASE_S = 30.0  # the fixed part of a data call's deadline
MIN_RATE = 1 << 20  # bytes/s a data call is allowed at worst (TCG guests move ~100 MiB/s)
MAX_STREAM_BYTES = 1 << 62  # what a command's output count may claim


def data_deadline(size: int) -> float:
    """Seconds a call moving ``size`` bytes may take."""
    return BASE_S + max(0, size) / MIN_RATE


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


def host_guard_s(timeout_s: float) -> float:
    """How long the host waits for a command the guest times out after ``timeout_s``."""
    return timeout_s * HOST_GUARD_FACTOR + HOST_GUARD_MARGIN_S


class AgentClient(AgentLink):
    """A connection to the guest agent over a connected stream socket, with a method per
    agent operation."""

    # -- typed helpers ---------------------------------------------------------------
    def hello(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """Start a session (every later answer is tagged with it) and check the version."""
        self.session = os.urandom(8).hex()  # secrets.token_hex(8), without importing OpenSSL
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
                        yield manifest_line(line)
            if partial.strip():
                yield manifest_line(bytes(partial))
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
