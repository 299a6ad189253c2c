"""Work inside a workspace: exec, files, patches, export, sync.

Everything here goes through an attached agent, confined to ``/workspace`` in the guest
(the agent resolves symlinks itself, so an escape through a link is refused where the
links are). Every write pyro acknowledges is on the workspace disk before the call returns
(the agent fsyncs the file, or flushes the filesystem once at the end of a call that
writes several). Diff, checkpoints and reset are in :mod:`checkpoints`.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from pyro_mcp.errors import GuestError, InvalidArgument, NotFound, TooLarge
from pyro_mcp.guest.answers import Answer
from pyro_mcp.guest.client import command_fields, data_deadline
from pyro_mcp.workspace import secret_delivery
from pyro_mcp.workspace.paths import WORKSPACE_ROOT, guest_path
from pyro_mcp.workspace.store import CommandRecord

if TYPE_CHECKING:
    from pathlib import Path

    from pyro_mcp.storage.host_files import HostPath
    from pyro_mcp.workspace import exporting
    from pyro_mcp.workspace.lifecycle import Workspaces

OutputFn = Callable[[str, bytes], None]
MAX_FILE_BYTES = 64 << 20  # file read/write through the API
DEFAULT_READ_BYTES = 1 << 20
TAIL_BYTES = 4096
SYNC_MAX_BYTES = 2 << 30
SYNC_MAX_ENTRIES = 100_000
SKIPPED_NAMES = 100  # an export names at most this many of the entries it left out


# --- exec -------------------------------------------------------------------------------


def exec_command(
    workspaces: Workspaces,
    ref: str,
    command: str | list[str],
    *,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    secret_env: list[str] | dict[str, str] | None = None,
    timeout_seconds: float = 300.0,
    output_cap_bytes: int = 1 << 20,
    output: OutputFn | None = None,
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """Run a command in the workspace; its exit code is data, and it is journaled.
    Setting ``cancel`` kills the command in the guest (Cancelled; nothing is journaled).

    ``command`` is a shell command line (``/bin/sh -lc``) or an argv list; ``secret_env``
    maps workspace secrets into its environment (InvalidArgument, before it runs, for a
    secret the workspace does not have). Its output, its journal entry and the result
    show the secrets' values as ``***``."""
    how = command_fields(command)
    if timeout_seconds <= 0:
        raise InvalidArgument("timeout_seconds must be positive")
    directory = guest_path(cwd) if cwd else WORKSPACE_ROOT
    mapping = secret_delivery.env_mapping(workspaces.store, ref, secret_env, env_keys=env or {})
    started = time.time()
    with workspaces.agent(ref, "exec") as agent:
        record = workspaces.store.get(ref)
        hide = agent.redactor.value if agent.redactor else _as_is
        result = agent.exec(
            **how,
            cwd=directory,
            env=env,
            secret_env=mapping,
            timeout_s=timeout_seconds,
            output_cap=output_cap_bytes,
            on_output=output,
            cancel=cancel,
        )
    workspaces.store.journal_command(
        CommandRecord(
            id=None,
            workspace_id=record.id,
            argv=hide(how.get("argv")),
            shell=hide(how.get("shell")),
            cwd=hide(directory),
            env_keys=sorted({*(env or {}), *(mapping or {})}),
            started_at=started,
            duration_ms=result.duration_ms,
            exit_code=result.exit_code,
            timed_out=result.timed_out,
            signal=result.signal,
            stdout_tail=result.stdout[-TAIL_BYTES:].decode("utf-8", "replace"),
            stderr_tail=result.stderr[-TAIL_BYTES:].decode("utf-8", "replace"),
            stdout_bytes=result.stdout_bytes,
            stderr_bytes=result.stderr_bytes,
        )
    )
    return {
        "workspace_id": record.id,
        "command": hide(command),
        "cwd": hide(directory),
        **result.to_dict(),
    }


def _as_is(value: Any) -> Any:
    return value


# --- files ------------------------------------------------------------------------------


def list_files(workspaces: Workspaces, ref: str, path: str, recursive: bool) -> dict[str, Any]:
    target = guest_path(path)
    with workspaces.agent(ref, "file list") as agent:
        entries, info = agent.list_dir(WORKSPACE_ROOT, target, recursive=recursive)
    return {**info, "path": target, "entries": entries}


def read_file(workspaces: Workspaces, ref: str, path: str, max_bytes: int) -> dict[str, Any]:
    if not 0 < max_bytes <= MAX_FILE_BYTES:
        raise InvalidArgument(f"max_bytes must be between 1 and {MAX_FILE_BYTES}")
    target = guest_path(path)
    with workspaces.agent(ref, "file read") as agent:
        data, info = agent.get_file(target, max_bytes=max_bytes, root=WORKSPACE_ROOT)
    return {
        "path": target,
        "size": info.get("size"),
        "mode": info.get("mode"),
        "truncated": bool(info.get("truncated")),
        **content_fields(data),
    }


def write_file(
    workspaces: Workspaces, ref: str, path: str, data: bytes, mode: int = 0o644
) -> dict[str, Any]:
    if len(data) > MAX_FILE_BYTES:
        raise TooLarge(f"{len(data)} bytes is more than the {MAX_FILE_BYTES}-byte limit")
    target = guest_path(path)
    if target == WORKSPACE_ROOT:
        raise InvalidArgument("cannot write to /workspace itself: name a file in it")
    with workspaces.agent(ref, "file write", changes=True) as agent:
        info = agent.put_file(target, data, mode=mode, mkdirs=True, root=WORKSPACE_ROOT)
    return {"path": target, "size": info.get("size"), "mode": info.get("mode")}


def delete_file(workspaces: Workspaces, ref: str, path: str, recursive: bool) -> dict[str, Any]:
    target = guest_path(path)
    if target == WORKSPACE_ROOT:
        raise InvalidArgument("cannot delete /workspace itself")
    with workspaces.agent(ref, "file delete", changes=True) as agent:
        info = agent.remove_paths(WORKSPACE_ROOT, [target], recursive=recursive)
    return {"path": target, **info}


# --- patch ------------------------------------------------------------------------------


def apply_patch(workspaces: Workspaces, ref: str, patch_text: str) -> dict[str, Any]:
    """Apply a unified diff to /workspace: every hunk or none."""
    from pyro_mcp.workspace.patching import plan_patch

    modes: dict[str, int] = {}
    with workspaces.agent(ref, "patch apply", changes=True) as agent:

        def read(relative: str) -> bytes | None:
            try:
                data, info = agent.get_file(
                    guest_path(relative), max_bytes=MAX_FILE_BYTES, root=WORKSPACE_ROOT
                )
            except GuestError as exc:
                if exc.guest_code == "not_found":
                    return None
                raise
            if info.get("truncated"):
                raise TooLarge(f"{relative} is larger than {MAX_FILE_BYTES} bytes: not patched")
            mode = info.get("mode")
            modes[relative] = mode if isinstance(mode, int) and 0 <= mode <= 0o7777 else 0o644
            return data

        plan = plan_patch(patch_text, read)  # raises before anything is written
        for relative, data in plan.writes.items():
            mode = plan.modes.get(relative, modes.get(relative, 0o644))
            agent.put_file(
                guest_path(relative), data, mode=mode, mkdirs=True, root=WORKSPACE_ROOT, sync=False
            )
        if plan.deletes:
            agent.remove_paths(WORKSPACE_ROOT, [guest_path(p) for p in plan.deletes], sync=False)
        agent.fs_sync(WORKSPACE_ROOT)  # one flush for the whole patch, before the answer
    return plan.summary()


# --- export and sync --------------------------------------------------------------------


def export(
    workspaces: Workspaces, ref: str, path: str, output: Path | HostPath, *, force: bool = False
) -> dict[str, Any]:
    """Copy a file or directory out of /workspace to a host path (an empty directory
    too). Device nodes, fifos and sockets are left out: the result counts them
    (``skipped``) and names the first hundred (``skipped_paths``)."""
    from pyro_mcp.workspace import exporting
    from pyro_mcp.workspace.seeds import DEFAULT_MAX_BYTES  # an export holds what a seed may

    target = guest_path(path)
    with workspaces.agent(ref, "export") as agent:
        kind = _kind(agent, target)
        deadline = data_deadline(DEFAULT_MAX_BYTES)
        with agent.archive_stream(WORKSPACE_ROOT, target, timeout_s=deadline) as call:
            # The tar streams from the guest into the extraction: never whole in memory.
            chunks = (data for _stream, _offset, data in call)
            result = exporting.extract_export(chunks, output, force=force, kind=kind)
            answer = Answer("archive_get", call.result()[0])
    # Device nodes, fifos and sockets have no place in an export: say which were left out.
    result["skipped"] = answer.integer("skipped", 0, 1 << 62, 0)
    result["skipped_paths"] = answer.names("skipped_paths", most=SKIPPED_NAMES)
    return result


def _kind(agent: Any, target: str) -> exporting.ExportKind:
    """Whether ``target`` is a directory or a file (what the export will hold)."""
    try:
        agent.list_dir(WORKSPACE_ROOT, target, max_entries=1, timeout_s=30)
    except GuestError as exc:
        if exc.guest_code == "not_a_directory":
            return "file"
        raise
    return "dir"


def sync_push(
    workspaces: Workspaces, ref: str, source: Path | HostPath, dest: str
) -> dict[str, Any]:
    """Copy a host directory or archive into /workspace (at ``dest``)."""
    from pyro_mcp.storage.host_files import HostPath

    target = guest_path(dest)
    with workspaces.agent(ref, "sync push", changes=True) as agent:
        return agent.archive_put(
            WORKSPACE_ROOT,
            target,
            _tar_chunks(HostPath.of(source)),
            max_bytes=SYNC_MAX_BYTES,
            max_entries=SYNC_MAX_ENTRIES,
        )


def _tar_chunks(source: HostPath) -> Iterator[bytes]:
    """A host archive as is, or a host directory packed as a tar as it is read; both
    opened through descriptors (under the caller's root), never by name again."""
    from pyro_mcp.storage import host_files
    from pyro_mcp.workspace import tar_output

    fd = host_files.open_source(source, "sync source")
    try:
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
        if kind == stat.S_IFDIR:
            os.close(fd)
            fd = -1
            yield from tar_output.directory_tar(
                source, max_entries=SYNC_MAX_ENTRIES, max_bytes=SYNC_MAX_BYTES
            )
            return
        if kind != stat.S_IFREG:
            raise NotFound(f"{source} is neither a directory nor an archive")
        while chunk := os.read(fd, 1 << 20):
            yield chunk
    finally:
        if fd >= 0:
            os.close(fd)


def content_fields(data: bytes) -> dict[str, str]:
    """A file's bytes as a result carries them: ``encoding`` utf-8 and the text when they
    are UTF-8 text (no NUL in the first 8 KiB), else ``base64`` and its encoding. Nothing
    is lost either way: :func:`content_bytes` gives the bytes back."""
    if b"\x00" not in data[:8192]:
        try:
            return {"encoding": "utf-8", "content": data.decode("utf-8")}
        except UnicodeDecodeError:
            pass
    import base64

    return {"encoding": "base64", "content": base64.b64encode(data).decode()}


def content_bytes(result: dict[str, Any]) -> bytes:
    """The bytes of a result made by :func:`content_fields`."""
    if result.get("encoding") == "base64":
        import base64

        return base64.b64decode(result["content"], validate=True)
    return str(result["content"]).encode("utf-8")
