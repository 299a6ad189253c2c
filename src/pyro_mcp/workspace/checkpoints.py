"""Checkpoints of ``/workspace``: compare with one (diff), take one, go back to one (reset).

A checkpoint is a manifest plus the file contents it names, in the workspace's own blob
store. Everything the guest says is untrusted:

- Its manifest streams into a temporary file as it is checked (:class:`ManifestSpool`),
  so a tree of millions of entries, or a guest that never stops sending, costs the host a
  bounded temporary file, never memory.
- A checkpoint records what the host received: each file it lacks is streamed (sparsely:
  holes are never sent) straight into a blob hashed on the host, and the checkpoint names
  that digest and size, whatever the guest's manifest claimed. A digest the guest claims
  is taken only when this workspace's own store holds it.
- A reset checks that every blob it needs is in the store before it changes anything,
  then writes in batches and flushes the workspace disk once (``fs_sync``) before it
  answers: what it reports done survives the VMM being killed.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyro_mcp.errors import GuestError, IntegrityError, InvalidArgument, NotFound, TooLarge
from pyro_mcp.workspace.owned_records import BASELINE as BASELINE  # the one definition
from pyro_mcp.workspace.paths import WORKSPACE_ROOT, guest_path

if TYPE_CHECKING:
    from pyro_mcp.guest.client import AgentClient
    from pyro_mcp.workspace.blobs import BlobStore
    from pyro_mcp.workspace.lifecycle import Workspaces
    from pyro_mcp.workspace.manifest import Change, Entry

# mke2fs makes lost+found on every ext4 disk: it is the filesystem's, not the user's.
FILESYSTEM_OWNED = "lost+found"
MANIFEST_TIMEOUT_S = 3600.0  # a whole tree; the agent's keepalives catch a stall far sooner
MAX_BLOB_BYTES = 64 << 30  # one file of a checkpoint (logical size: holes count)
MAX_CHECKPOINT_BYTES = 64 << 30  # all the files a checkpoint fetches (logical sizes)
BATCH = 2000  # paths per structural call (arguments travel in a 1 MiB frame header)
SMALL_FILE = 256 << 10  # written in one frame; larger files stream their data extents
ARCHIVE_MIN = 8  # this many small files of one batch go in one archive, not one call each


_SPOOL = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


class ManifestSpool:
    """The guest's manifest of ``/workspace``, checked entry by entry and written to a
    temporary file as it streams. Iterate it (as often as needed) for the entries.

    The file is the host's own (in the workspace's private store, written from entries
    already checked), so it holds each entry as a compact list read back unchecked.
    """

    def __init__(self, directory: Path) -> None:
        import tempfile

        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="manifest-", dir=directory)
        self.path = Path(name)
        self._out = os.fdopen(fd, "wb")
        self.count = 0

    def fill(self, agent: AgentClient) -> ManifestSpool:
        from pyro_mcp.workspace.manifest import ManifestChecker, guest_entry, guest_entry_limit

        checker = ManifestChecker(max_entries=guest_entry_limit())
        for raw in agent.manifest_stream(WORKSPACE_ROOT, timeout_s=MANIFEST_TIMEOUT_S):
            entry = guest_entry(raw, checker)
            if entry.path.split("/")[0] == FILESYSTEM_OWNED:
                continue
            fields = (entry.path, entry.type, entry.mode, entry.size, entry.mtime_ns)
            extra = (entry.sha256, entry.target, entry.rdev)
            self._out.write(_SPOOL.encode((*fields, *extra)).encode("ascii") + b"\n")
        self._out.close()
        self.count = checker.count
        return self

    def __iter__(self) -> Iterator[Entry]:
        from pyro_mcp.workspace.manifest import Entry

        with self.path.open("rb") as lines:
            for line in lines:
                path, kind, mode, size, mtime_ns, sha, target, rdev = json.loads(line)
                device = (rdev[0], rdev[1]) if rdev else None
                yield Entry(path, kind, mode, size, mtime_ns, sha, target, device)

    def close(self) -> None:
        if not self._out.closed:
            self._out.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> ManifestSpool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def spool_current(store: BlobStore, agent: AgentClient) -> ManifestSpool:
    """The current manifest of ``/workspace``, spooled (close it when done)."""
    spool = ManifestSpool(store.tmp_dir)
    try:
        return spool.fill(agent)
    except BaseException:
        spool.close()
        raise


def checkpoint_manifest(workspaces: Workspaces, ref: str, name: str) -> str:
    """The manifest digest of checkpoint ``name`` (``baseline``: the seed)."""
    record = workspaces.store.get(ref)
    if name == BASELINE:
        if not record.baseline_manifest:
            raise NotFound(f"workspace {record.id} has no baseline")
        return record.baseline_manifest
    return workspaces.store.get_checkpoint(record.id, name).manifest


# --- diff --------------------------------------------------------------------------------


def diff(workspaces: Workspaces, ref: str, against: str = BASELINE) -> dict[str, Any]:
    """Changes in /workspace since the baseline (or a checkpoint), with unified patches."""
    from pyro_mcp.workspace.diffing import DEFAULT_MAX_READ_BYTES, render_diff
    from pyro_mcp.workspace.manifest import compare_streams

    sha = checkpoint_manifest(workspaces, ref, against)
    store = workspaces.blobs(workspaces.store.get(ref).id)
    with workspaces.agent(ref, "diff") as agent, spool_current(store, agent) as current:

        def read_before(blob: str) -> bytes:
            try:
                return store.get_bytes(blob, max_bytes=DEFAULT_MAX_READ_BYTES)
            except NotFound as exc:
                raise IntegrityError(
                    f"checkpoint {against!r} is damaged: blob {blob} is not in the store",
                    hint="take a new checkpoint to compare with",
                ) from exc

        def read_after(relative: str) -> bytes:
            data, _ = agent.get_file(
                guest_path(relative), max_bytes=DEFAULT_MAX_READ_BYTES, root=WORKSPACE_ROOT
            )
            return data

        changes = compare_streams(store.iter_manifest(sha), current)
        rendered = render_diff(changes, read_before, read_after)
    return {"against": against, **rendered}


# --- taking a checkpoint -----------------------------------------------------------------


class _Budget:
    """What a checkpoint may still fetch (logical bytes)."""

    def __init__(self, total: int) -> None:
        self.left = total

    def take(self, size: int, path: str) -> None:
        self.left -= size
        if self.left < 0:
            raise TooLarge(
                f"the checkpoint would fetch more than {MAX_CHECKPOINT_BYTES} bytes "
                f"(reached at {path!r})",
                hint="remove large files from /workspace, or export them instead",
            )


def fetch_blob(
    agent: AgentClient, store: BlobStore, path: str, budget: _Budget
) -> tuple[str, int] | None:
    """Stream the guest file at ``path`` into the store; (digest the host computed, size).

    Holes are neither sent nor stored. None if the file is gone (or is no longer a regular
    file); TooLarge past the limits; a guest that sends data out of order or more than it
    said is refused.
    """
    with (
        agent.file_stream(
            guest_path(path), max_bytes=MAX_BLOB_BYTES, root=WORKSPACE_ROOT, sparse=True
        ) as call,
        store.writer(max_bytes=MAX_BLOB_BYTES) as blob,
    ):
        try:
            for _stream, offset, data in call:
                if offset is None:
                    raise InvalidArgument(f"the guest sent {path!r} without offsets")
                blob.write_at(offset, data)
        except GuestError as exc:
            if exc.guest_code in ("not_found", "not_a_file"):
                return None
            raise
        value = call.value or {}
        size, total = value.get("sent"), value.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < blob.size:
            raise InvalidArgument(f"the guest's account of {path!r} does not match its data")
        # Sent less than its size: cut at the limit, or shrunk while it was read (a file
        # being rewritten), whose bytes as read are what the checkpoint keeps.
        if size > MAX_BLOB_BYTES or (
            isinstance(total, int) and total > size and size >= MAX_BLOB_BYTES
        ):
            raise TooLarge(f"{path!r} is larger than {MAX_BLOB_BYTES} bytes")
        budget.take(size, path)
        return blob.commit(size), size


def create_checkpoint(workspaces: Workspaces, ref: str, name: str) -> dict[str, Any]:
    """Checkpoint /workspace as ``name``: only files this workspace's store lacks are
    copied out, each stored under the digest the host computed."""
    if name == BASELINE:
        raise InvalidArgument(f"{BASELINE!r} is the seed's checkpoint: choose another name")
    record = workspaces.store.get(ref)
    store = workspaces.blobs(record.id)
    budget = _Budget(MAX_CHECKPOINT_BYTES)
    vanished = fetched = 0
    with (
        store.writing(may_leave_garbage=True),  # an interrupted checkpoint is collected later
        workspaces.agent(ref, "snapshot create", changes=True) as agent,
        spool_current(store, agent) as current,
        store.manifest_writer() as manifest,
    ):
        for entry in current:
            if entry.type == "file" and not store.has(entry.sha256 or ""):
                got = fetch_blob(agent, store, entry.path, budget)
                if got is None:
                    vanished += 1
                    continue
                entry = replace(entry, sha256=got[0], size=got[1])
                fetched += 1
            manifest.add(entry)
        sha = manifest.commit()
        checkpoint = workspaces.store.add_checkpoint(
            record.id,
            name,
            manifest=sha,
            file_count=manifest.files,
            total_bytes=manifest.file_bytes,
        )
    return {**checkpoint.to_dict(), "fetched": fetched, "vanished": vanished}


# --- reset -------------------------------------------------------------------------------


def _needs_content(change: Change) -> bool:
    target = change.before
    if target is None or target.type != "file":
        return False
    return change.status != "modified" or change.content_changed


def _check_blobs(store: BlobStore, changes: Iterator[Change], name: str) -> None:
    for change in changes:
        target = change.before
        if _needs_content(change) and target is not None and not store.has(target.sha256 or ""):
            raise IntegrityError(
                f"checkpoint {name!r} is damaged: the content of {change.path!r} "
                f"(blob {target.sha256}) is not in the store; nothing was changed",
                hint="take a new checkpoint, or reset to another one",
            )


class _Restorer:
    """Applies reset changes in batches: structure first, then the files of the batch."""

    def __init__(self, agent: AgentClient, store: BlobStore) -> None:

        self.agent = agent
        self.store = store
        self.removes: list[str] = []
        self.dirs: list[dict[str, Any]] = []
        self.links: list[dict[str, Any]] = []
        self.specials: list[dict[str, Any]] = []
        self.files: list[Entry] = []
        self.chmods: list[dict[str, Any]] = []
        self.restored = self.removed = self.sockets_skipped = 0

    def add(self, change: Change) -> None:
        target = change.before  # compare(target, current): before is the checkpoint
        if change.status in ("added", "type_changed"):
            self.removes.append(guest_path(change.path))
            self.removed += 1
        if target is None:
            self._flush_if_full()
            return
        self.restored += 1
        path = guest_path(target.path)
        mode_only = target.type == "dir" or not change.content_changed
        if change.status == "modified" and target.type in ("dir", "file") and mode_only:
            self.chmods.append({"path": path, "mode": target.mode})
            self._flush_if_full()
            return
        if target.type == "dir":
            self.dirs.append({"path": path, "mode": target.mode})
        elif target.type == "symlink":
            self.links.append({"path": path, "target": target.target})
        elif target.type == "file":
            self.files.append(target)
        elif target.type == "socket":
            self.sockets_skipped += 1
        else:
            if change.status == "modified":
                self.removes.append(path)  # a device or fifo that differs: made again
            item: dict[str, Any] = {"path": path, "type": target.type, "mode": target.mode}
            if target.rdev is not None:
                item["rdev"] = list(target.rdev)
            self.specials.append(item)
        self._flush_if_full()

    def _flush_if_full(self) -> None:
        waiting = len(self.removes) + len(self.dirs) + len(self.links) + len(self.specials)
        if waiting >= BATCH or len(self.files) >= BATCH:
            self.flush()

    def flush(self) -> None:
        if self.removes:
            self.agent.remove_paths(
                WORKSPACE_ROOT, self.removes, recursive=True, missing_ok=True, sync=False
            )
        if self.dirs or self.links or self.specials:
            self.agent.apply_tree(
                WORKSPACE_ROOT,
                dirs=self.dirs,
                symlinks=self.links,
                specials=self.specials,
                sync=False,
            )
        small = [e for e in self.files if self.store.size(e.sha256 or "") <= SMALL_FILE]
        if len(small) >= ARCHIVE_MIN:  # many small files: one archive, one call
            total = sum(self.store.size(e.sha256 or "") for e in small)
            self.agent.archive_put(
                WORKSPACE_ROOT,
                WORKSPACE_ROOT,
                files_tar(self.store, small),
                max_bytes=total,
                max_entries=len(small) * 2 + 64,  # and the directories the names pass
            )
            sent = {id(e) for e in small}
            self.files = [e for e in self.files if id(e) not in sent]
        for entry in self.files:
            self._write(entry)
        self.removes, self.dirs, self.links, self.specials, self.files = [], [], [], [], []

    def _write(self, entry: Entry) -> None:
        sha, path = entry.sha256 or "", guest_path(entry.path)
        size = self.store.size(sha)
        if size <= SMALL_FILE:
            data = self.store.get_bytes(sha)
            self.agent.put_file(path, data, mode=entry.mode, root=WORKSPACE_ROOT, sync=False)
            return
        size, extents = self.store.extents(sha)
        self.agent.put_sparse(path, extents, size, mode=entry.mode, root=WORKSPACE_ROOT, sync=False)

    def finish(self) -> None:
        self.flush()
        # Deepest first, so a directory gets its final mode after everything inside.
        self.chmods.sort(key=lambda item: -str(item["path"]).count("/"))
        for start in range(0, len(self.chmods), BATCH):
            batch = self.chmods[start : start + BATCH]
            self.agent.apply_tree(WORKSPACE_ROOT, chmods=batch, sync=False)
        self.agent.fs_sync(WORKSPACE_ROOT)


class _Chunks(io.RawIOBase):
    """A write-only file whose bytes are collected for the caller to send on."""

    def __init__(self) -> None:
        self.pending: list[bytes] = []
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.pending.append(bytes(data))
        self.size += len(data)
        return len(data)

    def take(self) -> bytes:
        data, self.pending, self.size = b"".join(self.pending), [], 0
        return data


def files_tar(store: BlobStore, entries: list[Entry]) -> Iterator[bytes]:
    """The contents of ``entries`` (files of a checkpoint) as a tar stream, named by their
    paths, with their modes and mtimes, in chunks of about 1 MiB."""
    import tarfile

    sink = _Chunks()
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for entry in entries:
            sha = entry.sha256 or ""
            info = tarfile.TarInfo(entry.path)
            info.size = store.size(sha)
            info.mode = entry.mode
            info.mtime = entry.mtime_ns / 1e9
            with store.open(sha) as content:
                archive.addfile(info, content)
            if sink.size >= 1 << 20:
                yield sink.take()
    yield sink.take()


def reset(workspaces: Workspaces, ref: str, name: str = BASELINE) -> dict[str, Any]:
    """Make /workspace exactly the checkpoint (content, modes, symlinks, special files,
    deletions). Nothing changes if the checkpoint's contents are not all in the store."""
    from pyro_mcp.workspace.manifest import compare_streams

    sha = checkpoint_manifest(workspaces, ref, name)
    store = workspaces.blobs(workspaces.store.get(ref).id)
    with workspaces.agent(ref, "reset", changes=True) as agent:
        with spool_current(store, agent) as current:
            _check_blobs(store, compare_streams(store.iter_manifest(sha), current), name)
            restorer = _Restorer(agent, store)
            for change in compare_streams(store.iter_manifest(sha), current):
                restorer.add(change)
            restorer.finish()
        with spool_current(store, agent) as after:
            leftover = [
                change.path
                for change in compare_streams(store.iter_manifest(sha), after)
                if not _socket_only(change)
            ]
    if leftover:
        raise InvalidArgument(f"reset left differences in: {', '.join(leftover[:10])}")
    kept = [
        "root disk changes (outside /workspace)",
        "running services and open shells (they live outside /workspace)",
    ]
    if restorer.sockets_skipped:
        kept.append(
            f"{restorer.sockets_skipped} socket(s) of the checkpoint were not made again "
            "(only a process that listens can make one)"
        )
    return {
        "reset_to": name,
        "restored": restorer.restored,
        "removed": restorer.removed,
        "kept": kept,
        "dropped": ["every change under /workspace since the checkpoint"],
    }


def _socket_only(change: Change) -> bool:
    """A difference only a socket makes (reset cannot recreate sockets)."""
    sides = [entry for entry in (change.before, change.after) if entry is not None]
    return any(entry.type == "socket" for entry in sides)
