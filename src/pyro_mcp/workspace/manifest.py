"""Manifests: what a tree holds, entry by entry, and what changed between two of them.

A manifest is a sequence of :class:`Entry` in **tree order**: sorted by the list of a
path's components (:func:`path_key`), which puts every directory right before what is
under it. Paths are relative POSIX paths (``src/main.py``), never absolute, never with
``.``/``..``/empty components. Names are bytes on Linux; here they are Python strings
decoded with ``surrogateescape``, so a name that is not UTF-8 is kept exactly (JSON
carries the surrogates as escapes).

The guest agent streams manifests of ``/workspace`` in tree order, so the host checks them
(:class:`ManifestChecker`) and compares two of them (:func:`compare_streams`) as they
stream, in memory that grows with the tree's depth, not its size.
:func:`manifest_of_directory` produces manifests of host directories (seeds). A manifest
received from a guest is untrusted: every field is checked (:func:`guest_entry`) before
anything on the host uses it.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pyro_mcp.errors import InvalidArgument, OutsideRoot, ProtocolViolation, TooLarge
from pyro_mcp.runtime.digests import sha256_file

EntryType = Literal["file", "dir", "symlink", "fifo", "socket", "chardev", "blockdev"]
ENTRY_TYPES: tuple[EntryType, ...] = (
    "file",
    "dir",
    "symlink",
    "fifo",
    "socket",
    "chardev",
    "blockdev",
)
SPECIAL_TYPES: tuple[EntryType, ...] = ("fifo", "socket", "chardev", "blockdev")
ChangeStatus = Literal["added", "modified", "deleted", "type_changed"]

DEFAULT_MAX_ENTRIES = 100_000  # seeds and host directories
MAX_GUEST_ENTRIES = 2_000_000  # a workspace (npm trees reach a few hundred thousand)
MAX_ENTRIES_ENV = "PYRO_MAX_MANIFEST_ENTRIES"  # overrides it (a larger tree, a smaller host)
STORED_MAX_ENTRIES = 1 << 31  # manifests pyro wrote itself (checked again when read)


def guest_entry_limit() -> int:
    """How many entries a guest's manifest may have: ``$PYRO_MAX_MANIFEST_ENTRIES`` (a
    positive whole number) or ``MAX_GUEST_ENTRIES``."""
    text = os.environ.get(MAX_ENTRIES_ENV, "")
    if not text:
        return MAX_GUEST_ENTRIES
    if not text.isdigit() or int(text) < 1:
        raise InvalidArgument(f"{MAX_ENTRIES_ENV} must be a positive whole number, got {text!r}")
    return int(text)


MAX_PATH_BYTES = 4096  # PATH_MAX on Linux
MAX_NAME_BYTES = 255  # NAME_MAX on ext4

_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIELDS = frozenset({"path", "type", "mode", "size", "mtime_ns", "sha256", "target", "rdev"})


def path_key(path: str) -> list[str]:
    """The sort key of tree order: a path's components (``a`` < ``a/b`` < ``a.txt``)."""
    return path.split("/")


def name_bytes(name: str, what: str = "path") -> bytes:
    """The bytes a name stands for (its surrogates are the bytes that are not UTF-8);
    InvalidArgument for a string that is no file name (other lone surrogates)."""
    try:
        return name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"{what} {name!r} holds characters no file name has") from exc


def check_relative_path(path: object, *, what: str = "path") -> str:
    """``path`` unchanged if it is a clean relative POSIX path, else the reason.

    Raises OutsideRoot for absolute paths and ``..`` components (they would escape the
    tree), InvalidArgument for anything else malformed (empty, ``.`` or empty components,
    NUL bytes, longer than Linux allows). Bytes that are not UTF-8 are allowed, as
    ``surrogateescape`` surrogates. ``what`` names the value in the error.
    """
    if type(path) is not str or not path:
        raise InvalidArgument(f"{what} must be a non-empty string, got {path!r}")
    if "\x00" in path:
        raise InvalidArgument(f"{what} {path!r} contains a NUL byte")
    if path[0] == "/":
        raise OutsideRoot(f"{what} {path!r} is absolute; only relative paths are allowed")
    parts = path.split("/")
    if ".." in parts:
        raise OutsideRoot(f"{what} {path!r} contains '..'")
    if "" in parts or "." in parts:
        raise InvalidArgument(f"{what} {path!r} has an empty or '.' component")
    if path.isascii():  # the common case: one byte per character
        too_long = len(path) > MAX_PATH_BYTES or max(map(len, parts)) > MAX_NAME_BYTES
    else:
        too_long = len(name_bytes(path, what)) > MAX_PATH_BYTES or any(
            len(name_bytes(p)) > MAX_NAME_BYTES for p in parts
        )
    if too_long:
        raise InvalidArgument(f"{what} {path[:80]!r}... is longer than Linux allows")
    return path


@dataclass(frozen=True, slots=True)
class Entry:
    """One thing in a tree."""

    path: str
    """Relative POSIX path inside the tree."""
    type: EntryType
    """``file``, ``dir``, ``symlink``, ``fifo``, ``socket``, ``chardev`` or ``blockdev``."""
    mode: int
    """Permission bits (``0o644``), without the file-type bits."""
    size: int = 0
    """Bytes of content (files), or of the target (symlinks); 0 for directories."""
    mtime_ns: int = 0
    """Last modification, nanoseconds since the epoch."""
    sha256: str | None = None
    """Digest of the content; files only."""
    target: str | None = None
    """What the link points at; symlinks only."""
    rdev: tuple[int, int] | None = None
    """(major, minor) of a device node; devices only."""

    def to_dict(self) -> dict[str, Any]:
        """The wire form: ``sha256`` only for files, ``target`` only for symlinks,
        ``rdev`` only for devices."""
        data: dict[str, Any] = {
            "path": self.path,
            "type": self.type,
            "mode": self.mode,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
        }
        if self.sha256 is not None:
            data["sha256"] = self.sha256
        if self.target is not None:
            data["target"] = self.target
        if self.rdev is not None:
            data["rdev"] = list(self.rdev)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Entry:
        """An Entry from its wire form, every field checked (InvalidArgument/OutsideRoot).

        Unknown fields are refused, so a guest and host that disagree fail loudly.
        """
        if not isinstance(data, Mapping):
            raise InvalidArgument(f"manifest entry must be an object, got {type(data).__name__}")
        unknown = data.keys() - _FIELDS
        if unknown:
            raise InvalidArgument(f"manifest entry has unknown fields: {sorted(unknown)}")
        path = check_relative_path(data.get("path"), what="manifest path")
        kind = data.get("type")
        if kind not in ENTRY_TYPES:
            raise InvalidArgument(f"{path}: type must be one of {list(ENTRY_TYPES)}, got {kind!r}")
        mode = _int_field(data, "mode", path, upper=0o7777)
        size = _int_field(data, "size", path, default=0)
        mtime_ns = _int_field(data, "mtime_ns", path, default=0, lower=-(2**63))
        sha = data.get("sha256")
        target = data.get("target")
        if kind == "file":
            if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
                raise InvalidArgument(f"{path}: a file needs a lowercase hex sha256, got {sha!r}")
        elif sha is not None:
            raise InvalidArgument(f"{path}: only files carry a sha256")
        if kind == "symlink":
            if not isinstance(target, str) or not target or "\x00" in target:
                raise InvalidArgument(f"{path}: a symlink needs a non-empty target string")
            if len(name_bytes(target, f"{path}: target")) > MAX_PATH_BYTES:
                raise InvalidArgument(f"{path}: a symlink target is longer than Linux allows")
        elif target is not None:
            raise InvalidArgument(f"{path}: only symlinks carry a target")
        return cls(path, kind, mode, size, mtime_ns, sha, target, _rdev(data, kind, path))


def _rdev(data: Mapping[str, Any], kind: object, path: str) -> tuple[int, int] | None:
    rdev = data.get("rdev")
    if kind not in ("chardev", "blockdev"):
        if rdev is not None:
            raise InvalidArgument(f"{path}: only devices carry an rdev")
        return None
    if not (
        isinstance(rdev, list | tuple)
        and len(rdev) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 20 for n in rdev)
    ):
        raise InvalidArgument(f"{path}: a device needs rdev [major, minor]")
    return int(rdev[0]), int(rdev[1])


def _int_field(
    data: Mapping[str, Any],
    name: str,
    path: str,
    *,
    default: int | None = None,
    lower: int = 0,
    upper: int = 2**63 - 1,
) -> int:
    value = data.get(name, default)
    if type(value) is not int or not lower <= value <= upper:  # bool is not an int here
        raise InvalidArgument(f"{path}: {name} must be an integer in [{lower}, {upper}]")
    return value


def validate_manifest(raw: object, *, max_entries: int = DEFAULT_MAX_ENTRIES) -> list[Entry]:
    """A checked manifest from untrusted data: a list of entry objects (or of Entry).

    Refuses (InvalidArgument, naming the entry): a non-list, bad entries, duplicate
    paths, an entry below something that is not a directory; OutsideRoot for absolute
    paths or ``..``; TooLarge past ``max_entries``. Returns the entries in tree order.
    """
    if not isinstance(raw, list):
        raise InvalidArgument(f"a manifest must be a list of entries, got {type(raw).__name__}")
    if len(raw) > max_entries:
        raise TooLarge(f"the manifest has {len(raw)} entries, more than the limit {max_entries}")
    return check_manifest(
        item if isinstance(item, Entry) else Entry.from_dict(item) for item in raw
    )


def check_manifest(entries: Iterable[Entry]) -> list[Entry]:
    """``entries`` in tree order, refusing duplicates and entries under non-directories."""
    ordered = sorted(entries, key=lambda e: path_key(e.path))
    checker = ManifestChecker(max_entries=len(ordered))
    for entry in ordered:
        checker.add(entry)
    return ordered


class ManifestChecker:
    """Checks a manifest entry by entry as it streams, in memory that grows with depth.

    Refuses (InvalidArgument, naming the entry) an entry out of tree order or listed
    twice, an entry below something that is not a directory, and (TooLarge) more than
    ``max_entries`` entries. ``count`` says how many passed.
    """

    def __init__(self, *, max_entries: int) -> None:
        self.max_entries = max_entries
        self.count = 0
        self._last: list[str] | None = None
        self._open: list[tuple[list[str], EntryType]] = []  # the chain of ancestors seen

    def add(self, entry: Entry) -> Entry:
        key = path_key(entry.path)
        if self._last is not None and key <= self._last:
            if key == self._last:
                raise InvalidArgument(f"manifest lists {entry.path!r} twice")
            raise InvalidArgument(f"manifest lists {entry.path!r} out of tree order")
        if self.count >= self.max_entries:
            raise TooLarge(
                f"the manifest has more than {self.max_entries} entries",
                hint="a workspace this large cannot be compared or checkpointed",
            )
        while self._open and self._open[-1][0] != key[: len(self._open[-1][0])]:
            self._open.pop()
        if self._open and self._open[-1][1] != "dir":
            parent = "/".join(self._open[-1][0])
            raise InvalidArgument(
                f"manifest lists {entry.path!r} below {parent!r}, which is a {self._open[-1][1]}"
            )
        self._open.append((key, entry.type))
        self._last = key
        self.count += 1
        return entry


def guest_entry(raw: object, checker: ManifestChecker) -> Entry:
    """One entry of a manifest the guest agent streamed, checked in its place.

    A malformed entry (a path that is not a string, a bad field, one out of order) is the
    agent breaking the protocol: ProtocolViolation, saying what is wrong. TooLarge, past
    the entry limit, stays TooLarge.
    """
    try:
        return checker.add(Entry.from_dict(raw))  # type: ignore[arg-type]
    except (InvalidArgument, OutsideRoot) as exc:
        raise ProtocolViolation(
            f"the guest agent sent a bad manifest entry: {exc.message}"
        ) from exc


def entry_type_of(st_mode: int) -> EntryType:
    """The manifest type for an ``os.stat_result.st_mode``."""
    if stat.S_ISREG(st_mode):
        return "file"
    if stat.S_ISDIR(st_mode):
        return "dir"
    if stat.S_ISLNK(st_mode):
        return "symlink"
    if stat.S_ISFIFO(st_mode):
        return "fifo"
    if stat.S_ISSOCK(st_mode):
        return "socket"
    if stat.S_ISCHR(st_mode):
        return "chardev"
    return "blockdev"


def manifest_of_directory(
    root: Path,
    *,
    hash_file: Callable[[Path], str] = sha256_file,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> list[Entry]:
    """The manifest of a host directory, walked without following symlinks.

    ``hash_file`` digests each regular file (pass ``BlobStore.put_file`` to store the
    contents while hashing them). The root itself is not an entry. Raises InvalidArgument
    when ``root`` is not a directory or holds a name that is not UTF-8, TooLarge past
    ``max_entries`` entries.
    """
    if not root.is_dir():
        raise InvalidArgument(f"{root} is not a directory")
    entries: list[Entry] = []
    # os.scandir on a str path gives surrogateescape names: any bytes are kept.
    pending = [""]
    while pending:
        relative = pending.pop()
        with os.scandir(root / relative if relative else root) as listing:
            children = sorted(listing, key=lambda d: d.name)
        for child in children:
            path = f"{relative}/{child.name}" if relative else child.name
            check_relative_path(path)
            info = child.stat(follow_symlinks=False)
            if len(entries) >= max_entries:
                raise TooLarge(f"{root} has more than {max_entries} entries (at {path!r})")
            entries.append(_entry_from_stat(root / path, path, info, hash_file))
            if stat.S_ISDIR(info.st_mode):
                pending.append(path)
    entries.sort(key=lambda e: path_key(e.path))
    return entries


def _entry_from_stat(
    full: Path, path: str, info: os.stat_result, hash_file: Callable[[Path], str]
) -> Entry:
    kind = entry_type_of(info.st_mode)
    mode = stat.S_IMODE(info.st_mode)
    if kind == "file":
        return Entry(path, kind, mode, info.st_size, info.st_mtime_ns, sha256=hash_file(full))
    if kind == "symlink":
        target = os.readlink(full)
        return Entry(path, kind, mode, len(os.fsencode(target)), info.st_mtime_ns, target=target)
    if kind in ("chardev", "blockdev"):
        rdev = (os.major(info.st_rdev), os.minor(info.st_rdev))
        return Entry(path, kind, mode, 0, info.st_mtime_ns, rdev=rdev)
    return Entry(path, kind, mode, 0, info.st_mtime_ns)


# --- comparing -------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One path that differs between two manifests."""

    path: str
    status: ChangeStatus
    before: Entry | None
    """The entry in the older manifest (None when added)."""
    after: Entry | None
    """The entry in the newer manifest (None when deleted)."""

    @property
    def content_changed(self) -> bool:
        """The bytes (files) or the target (symlinks) differ, or the path came or went."""
        if self.before is None or self.after is None or self.status == "type_changed":
            return True
        return (self.before.sha256, self.before.target) != (self.after.sha256, self.after.target)

    @property
    def mode_changed(self) -> bool:
        """Both sides exist with the same type and different permission bits."""
        return (
            self.status == "modified"
            and self.before is not None
            and self.after is not None
            and self.before.type != "symlink"
            and self.before.mode != self.after.mode
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "status": self.status,
            "before": self.before.to_dict() if self.before else None,
            "after": self.after.to_dict() if self.after else None,
        }


@dataclass(frozen=True)
class Changes:
    """What :func:`compare` found: changed paths by kind, each list sorted, plus the
    entries on either side of every changed path (for rendering or restoring)."""

    added: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    """Same type, different content, permission bits or symlink target."""
    deleted: list[str] = field(default_factory=list)
    type_changed: list[str] = field(default_factory=list)
    """A file became a directory, a symlink a file, and so on."""
    before: dict[str, Entry] = field(default_factory=dict)
    """The older manifest's entry of each changed path that it has."""
    after: dict[str, Entry] = field(default_factory=dict)
    """The newer manifest's entry of each changed path that it has."""

    def counts(self) -> dict[str, int]:
        return {
            "added": len(self.added),
            "modified": len(self.modified),
            "deleted": len(self.deleted),
            "type_changed": len(self.type_changed),
        }

    @property
    def total(self) -> int:
        return sum(self.counts().values())

    def items(self) -> list[Change]:
        """Every change with its entries, sorted by path."""
        found: list[Change] = []
        for status in ("added", "modified", "deleted", "type_changed"):
            for path in getattr(self, status):
                found.append(Change(path, status, self.before.get(path), self.after.get(path)))
        return sorted(found, key=lambda c: c.path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.counts(),
            "added": list(self.added),
            "modified": list(self.modified),
            "deleted": list(self.deleted),
            "type_changed": list(self.type_changed),
        }


def compare(before: Sequence[Entry], after: Sequence[Entry]) -> Changes:
    """What changed from ``before`` to ``after``, path by path.

    Directories count too (an added empty directory is an addition). A directory's size
    and every mtime are ignored: only content, permission bits and symlink targets matter
    (a symlink's own mode means nothing on Linux).
    """
    old = sorted(before, key=lambda e: path_key(e.path))
    new = sorted(after, key=lambda e: path_key(e.path))
    changes = Changes()
    for change in compare_streams(old, new):
        getattr(changes, change.status).append(change.path)
        if change.before is not None:
            changes.before[change.path] = change.before
        if change.after is not None:
            changes.after[change.path] = change.after
    return changes


def compare_streams(before: Iterable[Entry], after: Iterable[Entry]) -> Iterator[Change]:
    """What changed from ``before`` to ``after``, both in tree order, as they stream:
    one pass over each (a merge), yielding the changes in tree order."""
    olds, news = iter(before), iter(after)
    a, b = next(olds, None), next(news, None)
    while a is not None or b is not None:
        if b is None or (a is not None and path_key(a.path) < path_key(b.path)):
            assert a is not None
            yield Change(a.path, "deleted", a, None)
            a = next(olds, None)
        elif a is None or path_key(b.path) < path_key(a.path):
            yield Change(b.path, "added", None, b)
            b = next(news, None)
        else:
            if a.type != b.type:
                yield Change(a.path, "type_changed", a, b)
            elif _differs(a, b):
                yield Change(a.path, "modified", a, b)
            a, b = next(olds, None), next(news, None)


def _differs(a: Entry, b: Entry) -> bool:
    if a.type == "symlink":
        return a.target != b.target
    if a.type == "file" and a.sha256 != b.sha256:
        return True
    if a.type in ("chardev", "blockdev") and a.rdev != b.rdev:
        return True
    return a.mode != b.mode
