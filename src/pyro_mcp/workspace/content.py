"""Work inside a workspace: exec, files, patches, diff, checkpoints, reset, export, sync.

Everything here goes through an attached agent, confined to ``/workspace`` in the guest
(the agent resolves symlinks itself, so an escape through a link is refused where the
links are). File contents of baselines and checkpoints live in the host's blob store, so
a diff or a reset moves only what changed.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pyro_mcp.errors import GuestError, InvalidArgument, NotFound, OutsideRoot, TooLarge
from pyro_mcp.guest.client import AgentClient
from pyro_mcp.workspace import exporting, seeds
from pyro_mcp.workspace.diffing import render_diff
from pyro_mcp.workspace.lifecycle import WORKSPACE_ROOT, Workspaces
from pyro_mcp.workspace.manifest import Entry, compare, validate_manifest
from pyro_mcp.workspace.patching import plan_patch
from pyro_mcp.workspace.store import CommandRecord

OutputFn = Callable[[str, bytes], None]
MAX_FILE_BYTES = 64 << 20  # file read/write through the API
DEFAULT_READ_BYTES = 1 << 20
TAIL_BYTES = 4096
SYNC_MAX_BYTES = 2 << 30
SYNC_MAX_ENTRIES = 100_000
BASELINE = "baseline"


def guest_path(path: str) -> str:
    """``path`` inside /workspace (relative paths are taken from there); refuses escapes."""
    if "\x00" in path:
        raise InvalidArgument("path contains a NUL byte")
    joined = path if path.startswith("/") else posixpath.join(WORKSPACE_ROOT, path)
    normal = posixpath.normpath(joined)
    if normal != WORKSPACE_ROOT and not normal.startswith(WORKSPACE_ROOT + "/"):
        raise OutsideRoot(f"{path} is outside {WORKSPACE_ROOT}")
    return normal


# --- exec -------------------------------------------------------------------------------


def exec_command(
    workspaces: Workspaces,
    ref: str,
    command: list[str],
    *,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    timeout_seconds: float = 300.0,
    output_cap_bytes: int = 1 << 20,
    output: OutputFn | None = None,
) -> dict[str, Any]:
    """Run a command in the workspace; its exit code is data, and it is journaled."""
    if not command:
        raise InvalidArgument("command is empty: give the program to run after --")
    if timeout_seconds <= 0:
        raise InvalidArgument("timeout_seconds must be positive")
    directory = guest_path(cwd) if cwd else WORKSPACE_ROOT
    started = time.time()
    with workspaces.agent(ref, "exec") as agent:
        record = workspaces.store.get(ref)
        result = agent.exec(
            command,
            cwd=directory,
            env=env,
            timeout_s=timeout_seconds,
            output_cap=output_cap_bytes,
            on_output=output,
        )
    workspaces.store.journal_command(
        CommandRecord(
            id=None,
            workspace_id=record.id,
            argv=list(command),
            cwd=directory,
            env_keys=sorted(env or {}),
            started_at=started,
            duration_ms=result.duration_ms,
            exit_code=result.exit_code,
            timed_out=result.timed_out,
            signal=result.signal,
            stdout_tail=result.stdout[-TAIL_BYTES:].decode("utf-8", "replace"),
            stderr_tail=result.stderr[-TAIL_BYTES:].decode("utf-8", "replace"),
            stdout_bytes=int(result.details.get("stdout_bytes", len(result.stdout))),
            stderr_bytes=int(result.details.get("stderr_bytes", len(result.stderr))),
        )
    )
    return {
        "workspace_id": record.id,
        "command": list(command),
        "cwd": directory,
        **result.to_dict(),
    }


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
    text = _as_text(data)
    return {
        "path": target,
        "size": info.get("size"),
        "mode": info.get("mode"),
        "truncated": bool(info.get("truncated")),
        "encoding": "utf-8" if text is not None else "base64",
        "content": text if text is not None else _b64(data),
    }


def write_file(
    workspaces: Workspaces, ref: str, path: str, data: bytes, mode: int = 0o644
) -> dict[str, Any]:
    if len(data) > MAX_FILE_BYTES:
        raise TooLarge(f"{len(data)} bytes is more than the {MAX_FILE_BYTES}-byte limit")
    target = guest_path(path)
    if target == WORKSPACE_ROOT:
        raise InvalidArgument("cannot write to /workspace itself: name a file in it")
    with workspaces.agent(ref, "file write") as agent:
        info = agent.put_file(target, data, mode=mode, mkdirs=True, root=WORKSPACE_ROOT)
    return {"path": target, "size": info.get("size"), "mode": info.get("mode")}


def delete_file(workspaces: Workspaces, ref: str, path: str, recursive: bool) -> dict[str, Any]:
    target = guest_path(path)
    if target == WORKSPACE_ROOT:
        raise InvalidArgument("cannot delete /workspace itself")
    with workspaces.agent(ref, "file delete") as agent:
        info = agent.remove_paths(WORKSPACE_ROOT, [target], recursive=recursive)
    return {"path": target, **info}


# --- patch ------------------------------------------------------------------------------


def apply_patch(workspaces: Workspaces, ref: str, patch_text: str) -> dict[str, Any]:
    """Apply a unified diff to /workspace: every hunk or none."""
    modes: dict[str, int] = {}
    with workspaces.agent(ref, "patch apply") as agent:

        def read(relative: str) -> bytes | None:
            try:
                data, info = agent.get_file(guest_path(relative), root=WORKSPACE_ROOT)
            except GuestError as exc:
                if exc.guest_code == "not_found":
                    return None
                raise
            modes[relative] = int(info.get("mode", 0o644))
            return data

        plan = plan_patch(patch_text, read)  # raises before anything is written
        for relative, data in plan.writes.items():
            mode = plan.modes.get(relative, modes.get(relative, 0o644))
            agent.put_file(guest_path(relative), data, mode=mode, mkdirs=True, root=WORKSPACE_ROOT)
        if plan.deletes:
            agent.remove_paths(WORKSPACE_ROOT, [guest_path(p) for p in plan.deletes])
    return plan.summary()


# --- manifests, diff, checkpoints, reset ------------------------------------------------


# mke2fs makes lost+found on every ext4 disk: it is the filesystem's, not the user's.
FILESYSTEM_OWNED = "lost+found"


def current_manifest(agent: AgentClient) -> list[Entry]:
    entries, _ = agent.manifest(WORKSPACE_ROOT)
    mine = [
        entry
        for entry in entries
        if entry["path"] and entry["path"].split("/")[0] != FILESYSTEM_OWNED
    ]
    return validate_manifest(mine)


def _fetch_blobs(workspaces: Workspaces, agent: AgentClient, manifest: list[Entry]) -> None:
    """Copy into the blob store every file of ``manifest`` it does not have yet."""
    for entry in manifest:
        if entry.type == "file" and entry.sha256 and not workspaces.blobs.has(entry.sha256):
            data, _ = agent.get_file(guest_path(entry.path), root=WORKSPACE_ROOT)
            workspaces.blobs.put_bytes(data)


def _checkpoint_manifest(workspaces: Workspaces, ref: str, name: str) -> list[Entry]:
    record = workspaces.store.get(ref)
    if name == BASELINE:
        if not record.baseline_manifest:
            raise NotFound(f"workspace {record.id} has no baseline")
        sha = record.baseline_manifest
    else:
        sha = workspaces.store.get_checkpoint(record.id, name).manifest
    return validate_manifest(workspaces.blobs.get_manifest(sha))


def diff(workspaces: Workspaces, ref: str, against: str = BASELINE) -> dict[str, Any]:
    """Changes in /workspace since the baseline (or a checkpoint), with unified patches."""
    before = _checkpoint_manifest(workspaces, ref, against)
    with workspaces.agent(ref, "diff") as agent:
        after = current_manifest(agent)
        changes = compare(before, after)

        def read_after(relative: str) -> bytes:
            data, _ = agent.get_file(guest_path(relative), root=WORKSPACE_ROOT)
            return data

        rendered = render_diff(changes, workspaces.blobs.get_bytes, read_after)
    return {"against": against, **rendered}


def create_checkpoint(workspaces: Workspaces, ref: str, name: str) -> dict[str, Any]:
    if name == BASELINE:
        raise InvalidArgument(f"{BASELINE!r} is the seed's checkpoint: choose another name")
    with workspaces.agent(ref, "snapshot create") as agent:
        manifest = current_manifest(agent)
        _fetch_blobs(workspaces, agent, manifest)
    sha = workspaces.blobs.put_manifest([entry.to_dict() for entry in manifest])
    files = [e for e in manifest if e.type == "file"]
    record = workspaces.store.add_checkpoint(
        ref,
        name,
        manifest=sha,
        file_count=len(files),
        total_bytes=sum(e.size for e in files),
    )
    return record.to_dict()


def reset(workspaces: Workspaces, ref: str, name: str = BASELINE) -> dict[str, Any]:
    """Make /workspace exactly the checkpoint (content, modes, symlinks, deletions)."""
    target = _checkpoint_manifest(workspaces, ref, name)
    with workspaces.agent(ref, "reset") as agent:
        current = current_manifest(agent)
        changes = compare(target, current)
        by_path = {e.path: e for e in target}
        removes = [guest_path(p) for p in changes.added + changes.type_changed]
        for batch in _batches(removes):
            agent.remove_paths(WORKSPACE_ROOT, batch, recursive=True, missing_ok=True)
        restore = changes.deleted + changes.type_changed
        dirs = [by_path[p] for p in restore if by_path[p].type == "dir"]
        links = [by_path[p] for p in restore + changes.modified if by_path[p].type == "symlink"]
        for batch in _batches([{"path": guest_path(e.path), "mode": e.mode} for e in dirs]):
            agent.apply_tree(WORKSPACE_ROOT, dirs=batch)
        for batch in _batches([{"path": guest_path(e.path), "target": e.target} for e in links]):
            agent.apply_tree(WORKSPACE_ROOT, symlinks=batch)
        rewrite = [by_path[p] for p in restore + changes.modified if by_path[p].type == "file"]
        for entry in sorted(rewrite, key=lambda e: e.path):
            data = workspaces.blobs.get_bytes(entry.sha256 or "")
            agent.put_file(guest_path(entry.path), data, mode=entry.mode, root=WORKSPACE_ROOT)
        # Rewritten files and recreated dirs already have their modes; fix the rest.
        chmods = [
            {"path": guest_path(p), "mode": by_path[p].mode}
            for p in changes.modified
            if by_path[p].type in ("dir", "file")
            and changes.before[p].mode != changes.after[p].mode
        ]
        # Deepest first across batches too, so a directory gets its final mode last.
        chmods.sort(key=lambda item: -str(item["path"]).count("/"))
        for batch in _batches(chmods):
            agent.apply_tree(WORKSPACE_ROOT, chmods=batch)
        check = compare(target, current_manifest(agent))
    leftover = check.added + check.modified + check.deleted + check.type_changed
    if leftover:
        raise InvalidArgument(f"reset left differences in: {', '.join(leftover[:10])}")
    return {
        "reset_to": name,
        "restored": len(restore) + len(changes.modified),
        "removed": len(changes.added) + len(changes.type_changed),
        "kept": [
            "root disk changes (outside /workspace)",
            "running services and open shells (they live outside /workspace)",
        ],
        "dropped": ["every change under /workspace since the checkpoint"],
    }


# --- export and sync --------------------------------------------------------------------


def export(
    workspaces: Workspaces, ref: str, path: str, output: Path, *, force: bool = False
) -> dict[str, Any]:
    """Copy a file or directory out of /workspace to a host path."""
    target = guest_path(path)
    with workspaces.agent(ref, "export") as agent:
        chunks: list[bytes] = []
        info = agent.archive_get(WORKSPACE_ROOT, target, chunks.append)
    if info.get("type") == "dir":
        return exporting.extract_export(iter(chunks), output, force=force, kind="dir")
    return exporting.extract_export(iter(chunks), output, force=force, kind="file")


def sync_push(workspaces: Workspaces, ref: str, source: Path, dest: str) -> dict[str, Any]:
    """Copy a host directory or archive into /workspace (at ``dest``)."""
    target = guest_path(dest)
    with workspaces.agent(ref, "sync push") as agent:
        return agent.archive_put(
            WORKSPACE_ROOT,
            target,
            _tar_chunks(source),
            max_bytes=SYNC_MAX_BYTES,
            max_entries=SYNC_MAX_ENTRIES,
        )


class _Chunks(io.RawIOBase):
    """A write-only file whose bytes are collected for the caller to send on."""

    def __init__(self) -> None:
        self.pending: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.pending.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data, self.pending = b"".join(self.pending), []
        return data


def _tar_chunks(source: Path) -> Iterator[bytes]:
    """A host archive as is, or a host directory packed as a tar as it is read."""
    if source.is_file():
        with source.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                yield chunk
        return
    if not source.is_dir():
        raise NotFound(f"{source} is neither a directory nor an archive")
    seeds.check_directory(source)  # the same rules as a seed: no links out, no devices
    sink = _Chunks()
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for path in sorted(source.rglob("*")):
            archive.add(str(path), arcname=str(path.relative_to(source)), recursive=False)
            if sum(len(p) for p in sink.pending) >= 1 << 20:
                yield sink.take()
    yield sink.take()


# Arguments travel in a frame header (1 MiB at most): long lists go in batches.
BATCH = 2000


def _batches(items: list[Any]) -> Iterator[list[Any]]:
    for start in range(0, len(items), BATCH):
        yield items[start : start + BATCH]


def _as_text(data: bytes) -> str | None:
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()
