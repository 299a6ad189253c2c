"""Safe extraction for ``archive_put``: into a staging directory, checked, then placed.

``extract`` unpacks the tar into a fresh staging directory and refuses, as each header
arrives, what could escape or surprise: absolute or ``..`` names, entries under a link
or a file, devices and fifos, hard links to anything but a file of the archive, more
entries or bytes than allowed. ``check_link`` then resolves a symlink as the tree will be
once placed and refuses one that leads outside the root. ``merge`` moves staging into an
existing destination (a directory/file clash refuses before anything moves) and
``finish_dirs`` sets directory modes and mtimes last. The rules and their error codes
are listed in :mod:`ops_archive`.
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import Any

from pyro_mcp.guest_agent import ops_tree as tree
from pyro_mcp.guest_agent.archive_input import HEADER_SLACK, Input
from pyro_mcp.guest_agent.calls import Call, CallError

COPY_CHUNK = 1 << 20
MAX_LINK_HOPS = 40


# --- extraction into staging ----------------------------------------------------------


class Extracted:
    """What the archive put into the staging directory."""

    def __init__(self) -> None:
        self.entries = self.files = self.dirs = self.symlinks = self.hardlinks = self.bytes = 0
        self.dir_meta: dict[str, tuple[int, int]] = {}  # rel -> (mode, mtime_ns), explicit
        self.known_dirs: set[str] = {""}  # every directory in staging, explicit or implied
        self.links: list[tuple[str, str]] = []  # symlinks: (rel, target)


def _member_name(name: str, what: str = "name") -> str:
    """A member name as a clean relative path ("" for the top); refused if it escapes."""
    if name.startswith("/"):
        raise CallError("outside_root", f"archive entry {what} {name!r} is absolute")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise CallError("outside_root", f"archive entry {what} {name!r} has a '..' component")
    return "/".join(parts)


def _ns(mtime: float) -> int:
    return mtime * 1_000_000_000 if isinstance(mtime, int) else round(mtime * 1e9)


def _under_dirs(staging: str, rel: str, done: Extracted, create: bool) -> str:
    """staging/rel once every parent is a directory the archive made (never a link)."""
    parts = rel.split("/")
    for depth in range(1, len(parts)):
        prefix = "/".join(parts[:depth])
        if prefix in done.known_dirs:
            continue
        path = os.path.join(staging, prefix)
        if create and not os.path.lexists(path):
            os.mkdir(path, 0o700)
            done.known_dirs.add(prefix)
            continue
        raise CallError(
            "outside_root",
            f"archive entry {rel} lies under {prefix}, which is not a directory of the "
            "archive (entries are never extracted through a link)",
        )
    return os.path.join(staging, rel)


def _make_room(path: str, rel: str, done: Extracted, for_dir: bool) -> bool:
    """Clear the way for an entry; True if the directory it wants is already there."""
    if rel in done.known_dirs:
        if for_dir:
            return True
        raise CallError("exists", f"archive entry {rel} would replace a directory")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # an earlier entry of the same name: the later one wins
    return False


def _write(tar: Any, member: Any, path: str, mode: int, mtime_ns: int) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    written = 0
    try:
        reader = tar.extractfile(member)
        while reader is not None and (chunk := reader.read(COPY_CHUNK)):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            written += len(chunk)
        os.fchmod(fd, mode)
        os.utime(fd, ns=(mtime_ns, mtime_ns))
    finally:
        os.close(fd)
    return written


def _type_name(member: Any) -> str:
    if member.ischr() or member.isblk():
        return "device node"
    if member.isfifo():
        return "fifo"
    return f"entry of type {member.type!r}"


def extract(
    call: Call, tarfile: Any, source: Input, staging: str, max_bytes: int, max_entries: int
) -> Extracted:
    """Unpack the tar read from ``source`` into ``staging``, checking each entry first."""
    done = Extracted()
    with tarfile.open(fileobj=source, mode="r|") as tar:
        while (member := tar.next()) is not None:
            done.entries += 1
            if done.entries > max_entries:
                raise CallError("too_large", f"the archive has more than {max_entries} entries")
            if call.cancelled.is_set():
                raise CallError("cancelled", "call cancelled")
            rel = _member_name(member.name)
            if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
                raise CallError(
                    "unsupported_member",
                    f"archive entry {member.name} is a {_type_name(member)}; only files, "
                    "directories and links are extracted",
                )
            size = member.size if member.isreg() else 0
            if done.bytes + size > max_bytes:
                raise CallError(
                    "too_large",
                    f"the archive's content exceeds max_bytes={max_bytes} (at {member.name}, "
                    f"{size} bytes)",
                )
            source.allowed = member.offset_data + size + 512 + HEADER_SLACK
            mode, mtime = member.mode & 0o7777, _ns(member.mtime)
            if not rel:
                if not member.isdir():
                    raise CallError("invalid_archive", f"archive entry {member.name!r} has no name")
                done.dir_meta[""] = (mode, mtime)
                continue
            path = _under_dirs(staging, rel, done, create=True)
            if member.isdir():
                if not _make_room(path, rel, done, for_dir=True):
                    os.mkdir(path, 0o700)
                    done.known_dirs.add(rel)
                done.dir_meta[rel] = (mode, mtime)
                done.dirs += 1
            elif member.isreg():
                _make_room(path, rel, done, for_dir=False)
                done.bytes += _write(tar, member, path, mode, mtime)
                done.files += 1
            elif member.issym():
                if not member.linkname or "\x00" in member.linkname:
                    raise CallError("invalid_archive", f"symlink {member.name} has no target")
                _make_room(path, rel, done, for_dir=False)
                os.symlink(member.linkname, path)
                os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
                done.links.append((rel, member.linkname))
                done.symlinks += 1
            else:
                _hard_link(staging, rel, path, member.linkname, done)
    return done


def _hard_link(staging: str, rel: str, path: str, linkname: str, done: Extracted) -> None:
    source_rel = _member_name(linkname, "link target")
    if not source_rel or source_rel == rel:
        raise CallError("invalid_archive", f"hard link {rel} points to {linkname!r}")
    source = _under_dirs(staging, source_rel, done, create=False)
    try:
        info = os.lstat(source)
    except FileNotFoundError:
        raise CallError(
            "invalid_archive", f"hard link {rel} points to {linkname}, not in the archive"
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise CallError(
            "unsupported_member", f"hard link {rel} points to {linkname}, not a regular file"
        )
    _make_room(path, rel, done, for_dir=False)
    os.link(source, path, follow_symlinks=False)
    done.hardlinks += 1


# --- checking and placing -------------------------------------------------------------


def _resolve(path: str, dest: str, staging: str) -> str | None:
    """Where ``path`` leads once staging is merged into dest (None: a symlink loop)."""
    pending = path.split("/")
    pending.reverse()
    resolved = "/"
    hops = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            resolved = os.path.dirname(resolved)
            continue
        candidate = resolved.rstrip("/") + "/" + part
        physical = candidate
        if tree.inside(candidate, dest):
            staged = os.path.join(staging, tree.relative(dest, candidate))
            if os.path.lexists(staged):
                physical = staged
        try:
            target = os.readlink(physical)
        except OSError:  # not a link, or missing: the path goes on as written
            resolved = candidate
            continue
        hops += 1
        if hops > MAX_LINK_HOPS:
            return None
        if target.startswith("/"):
            resolved = "/"
        pending.extend(reversed(target.split("/")))
    return resolved


def check_link(rel: str, target: str, dest: str, staging: str, real_root: str) -> None:
    """Refuse the symlink ``rel`` if, once placed, it leads outside the root."""
    base = os.path.dirname(os.path.join(dest, rel))
    resolved = _resolve(target if target.startswith("/") else f"{base}/{target}", dest, staging)
    if resolved is not None and not tree.inside(resolved, real_root):
        raise CallError(
            "outside_root", f"symlink {rel} -> {target} resolves to {resolved}, outside the root"
        )


def merge(staging: str, dest: str) -> tuple[list[str], set[str]]:
    """Move staging's entries into the existing dest; (replaced paths, merged dirs)."""
    moves: list[tuple[str, bool]] = []
    merged = {""}
    stack = [""]
    while stack:  # plan everything first: a conflict refuses before anything moves
        rel = stack.pop()
        with os.scandir(os.path.join(staging, rel)) as found:
            names = sorted(child.name for child in found)
        for name in names:
            child = f"{rel}/{name}" if rel else name
            staged_dir = stat.S_ISDIR(os.lstat(os.path.join(staging, child)).st_mode)
            try:
                existing = os.lstat(os.path.join(dest, child))
            except FileNotFoundError:
                moves.append((child, False))
                continue
            existing_dir = stat.S_ISDIR(existing.st_mode)
            if staged_dir and existing_dir:
                merged.add(child)
                stack.append(child)
            elif not staged_dir and not existing_dir:
                moves.append((child, True))
            else:
                there = "a directory" if existing_dir else f"a {tree.kind_of(existing.st_mode)}"
                raise CallError("exists", f"{child} is {there} in the destination")
    replaced = []
    for child, replaces in moves:
        os.replace(os.path.join(staging, child), os.path.join(dest, child))
        if replaces:
            replaced.append(child)
    return replaced, merged


def finish_dirs(dest: str, done: Extracted, merged: set[str]) -> None:
    """Directory modes and mtimes, deepest first, once their contents are in place."""
    for rel in sorted(done.known_dirs, key=lambda r: (-r.count("/") - bool(r), r)):
        meta = done.dir_meta.get(rel)
        if meta is None:
            if rel in merged:
                continue  # an existing directory the archive only passes through
            meta = (0o755, -1)
        path = os.path.join(dest, rel) if rel else dest
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                continue
        except FileNotFoundError:
            continue
        os.chmod(path, meta[0])
        if meta[1] >= 0:
            os.utime(path, ns=(meta[1], meta[1]), follow_symlinks=False)
