"""Reading a workspace disk offline (the ext4 image mounted at ``/workspace`` in the guest;
:mod:`~pyro_mcp.storage.disk_create` makes it).

The offline readers (:func:`disk_stat`, :func:`disk_list`, :func:`disk_read`) look into a
STOPPED workspace's disk with ``debugfs`` opened read-only (:mod:`~pyro_mcp.storage.debugfs`
runs it): the image is never mounted on the host, so a hostile filesystem never meets the
host kernel. Paths are taken inside the disk (``/`` is the disk's root, which the guest sees
as ``/workspace``); a path that climbs above it is refused.

The guest's root owns that disk and can set any inode field, so the readers trust none of
it and stay bounded whatever it holds:

- sizes are checked before anything is read: a symlink over 4095 bytes (Linux's limit) is
  reported, not read; :func:`disk_read` reads at most 64 MiB, and only what it returns;
- every debugfs run has the bounds of :mod:`~pyro_mcp.storage.debugfs` (output capped and
  parsed as it streams in, memory limited), and a listing stops as soon as it passes
  ``max_entries``;
- every call has a deadline (``timeout_s``, 60 s by default) shared by its debugfs runs,
  which are killed when it passes (ToolFailed saying so);
- recursive listing keeps the inodes of the directories it met, so a directory linked
  back to its ancestor is flagged, not followed.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from pyro_mcp.errors import InvalidArgument, NotFound, OutsideRoot, TooLarge, ToolFailed
from pyro_mcp.storage.debugfs import (
    Deadline,
    DebugfsRun,
    format_size,
    frame_commands,
    framed_output,
    from_disk_bytes,
    max_output_for,
    quote_path,
    says_not_found,
    to_disk_bytes,
)

_MIB = 1 << 20

# Bounds of the offline readers (the module docstring says what each guards).
DEFAULT_LIST_MAX_ENTRIES = 10_000
MAX_LIST_ENTRIES = 100_000
READ_TIMEOUT_S = 60.0
MAX_READ_BYTES = 64 * _MIB
SYMLINK_MAX = 4095  # PATH_MAX - 1: the longest target Linux reads or writes
PATH_MAX_BYTES = 4095
LINK_TOO_LONG = (
    "the link's size is {} bytes, more than the 4095 bytes a Linux symlink target can hold: "
    "it was not read"
)
_STAT_BATCH = 1024  # symlinks stat-ed per debugfs run
_CAT_BATCH_BYTES = 4 * _MIB  # bytes of slow symlink targets cat-ed per debugfs run

_STAT = re.compile(rb"Inode: (\d+)\s+Type: ([a-zA-Z ]+?)\s+Mode:\s+(\d+)")
_SIZE = re.compile(rb"\bSize: (\d+)")
_MTIME = re.compile(rb"\s*mtime: 0x([0-9a-f]+)(?::([0-9a-f]+))?")
_FAST_LINK = b'Fast link dest: "'
# ls -p: /inode/mode/uid/gid/name/size/ (size empty for a directory); ids can print < 0.
_LS_LINE = re.compile(rb"/(\d+)/(\d+)/(-?\d+)/(-?\d+)/(.*)/(\d*)/\n")
_LS_HEAD = re.compile(rb"/\d+/\d+/-?\d+/-?\d+/")
_TYPES = {"regular": "file", "directory": "dir", "symlink": "symlink"}
# --- reading offline --------------------------------------------------------------------


class DiskListing(list[dict[str, Any]]):
    """What :func:`disk_list` returns: its entries, sorted by path (a plain list to every
    other use), and ``unlisted``: for each directory that had some, how many of its entries
    were left out because no path can name them (see :func:`disk_list`)."""

    def __init__(
        self, entries: Iterable[dict[str, Any]] = (), unlisted: dict[str, int] | None = None
    ) -> None:
        super().__init__(entries)
        self.unlisted: dict[str, int] = dict(unlisted or {})


def disk_path(path: str) -> str:
    """``path`` as an absolute path inside the disk (``src/x`` -> ``/src/x``).

    OutsideRoot if it climbs above the disk's root; InvalidArgument for NUL bytes or line
    ends, which debugfs commands cannot carry, and for paths longer than 4095 bytes. Names
    that are not UTF-8 are given as :func:`disk_list` returns them (``surrogateescape``).
    """
    if not isinstance(path, str):
        raise InvalidArgument(f"path must be a string, got {path!r}")
    if any(ch in path for ch in "\x00\n\r"):
        raise InvalidArgument(f"path {path!r} contains a NUL byte or a line end")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise OutsideRoot(f"path {path!r} climbs above the root of the workspace disk")
            parts.pop()
            continue
        parts.append(part)
    where = "/" + "/".join(parts)
    try:
        size = len(to_disk_bytes(where))
    except UnicodeEncodeError:
        raise InvalidArgument(f"path {path!r} holds characters no file name can") from None
    if size > PATH_MAX_BYTES:
        raise InvalidArgument(
            f"path {where[:40]!r}... ({size} bytes) is longer than the {PATH_MAX_BYTES} bytes "
            "a path can hold"
        )
    return where


def _decode_mtime(seconds_hex: bytes, extra_hex: bytes | None) -> int:
    seconds = int(seconds_hex, 16)
    if seconds >= 1 << 31:
        seconds -= 1 << 32
    extra = int(extra_hex, 16) if extra_hex else 0
    seconds += (extra & 3) << 32
    return seconds * 1_000_000_000 + (extra >> 2)


class _StatReport:
    """What the readers take from debugfs's ``stat`` report, fed one line piece at a time.

    The inode, type, mode, size and mtime lines come first and only their first match
    counts, so nothing the guest words later (extended attributes) can pose as them. A fast
    symlink's target (``Fast link dest: "..."``) is kept up to its size (at most 4095
    bytes); the report is ``done`` there or at its block list, which can be long.
    """

    def __init__(self) -> None:
        self.head: re.Match[bytes] | None = None
        self.size: int | None = None
        self.mtime_ns: int | None = None
        self.link: bytearray | None = None
        self.done = False

    def feed(self, piece: bytes) -> None:
        if self.done:
            return
        if self.link is not None:
            self._add_link(piece)
        elif piece.startswith(_FAST_LINK):
            self.link = bytearray()
            self._add_link(piece[len(_FAST_LINK) :])
        elif piece.startswith((b"EXTENTS:", b"BLOCKS:")):
            self.done = True
        elif self.head is None:
            self.head = _STAT.match(piece)
        elif self.size is None:
            size = _SIZE.search(piece)
            self.size = int(size.group(1)) if size else None
        elif self.mtime_ns is None and (mtime := _MTIME.match(piece)):
            self.mtime_ns = _decode_mtime(mtime.group(1), mtime.group(2))

    def _add_link(self, piece: bytes) -> None:
        assert self.link is not None
        want = min(self.size or 0, SYMLINK_MAX) + 2  # the target, its closing quote, "\n"
        self.link += piece[: want - len(self.link)]
        self.done = len(self.link) >= want

    def info(self, where: str) -> dict[str, Any]:
        if self.head is None or self.size is None:
            raise ToolFailed(f"cannot read debugfs's report on {where}")
        return {
            "path": where,
            "type": _TYPES.get(self.head.group(2).decode().strip(), "other"),
            "mode": int(self.head.group(3), 8) & 0o7777,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "inode": int(self.head.group(1)),
        }

    def fast_link(self, size: int) -> bytes | None:
        """The fast symlink's target of ``size`` bytes; None if debugfs showed it
        otherwise (a NUL byte in it, say)."""
        assert self.link is not None
        return bytes(self.link[:size]) if self.link[size:] == b'"\n' else None


def _stat(image: Path, where: str, deadline: Deadline) -> dict[str, Any]:
    report = _StatReport()
    with DebugfsRun(
        image, f"reading {where}", deadline, request=f"stat {quote_path(where)}"
    ) as run:
        while not report.done and (piece := run.readline()):
            report.feed(piece)
        if report.head is None:
            errors = run.finish()
            if says_not_found(errors):
                raise NotFound(f"{where} does not exist on the workspace disk")
            raise ToolFailed(
                f"cannot read debugfs's report on {where}", stderr_tail=errors.strip()[-2000:]
            )
    info = report.info(where)
    if info["type"] == "symlink":
        _fill_targets(image, [info], f"reading {where}", deadline, {info["inode"]: report})
    return info


def disk_stat(image: Path, path: str, *, timeout_s: float = READ_TIMEOUT_S) -> dict[str, Any]:
    """``{"path", "type", "mode", "size", "mtime_ns", "inode"}`` of one path on the disk,
    and for a symlink ``"target"``: the target (None, with ``"target_error"`` saying why,
    when it cannot be shown: a size over 4095 bytes, Linux's limit, is never read).

    NotFound if it does not exist. Bounds: ``timeout_s`` for the whole call (ToolFailed
    past it), and those of every debugfs run (see :mod:`~pyro_mcp.storage.debugfs`); the
    report is read only as far as its block list.
    """
    deadline = Deadline(timeout_s)
    return _stat(image, disk_path(path), deadline)


def _no_target(link: dict[str, Any], why: str) -> None:
    link["target"] = None
    link["target_error"] = why


def _fill_targets(
    image: Path,
    links: list[dict[str, Any]],
    doing: str,
    deadline: Deadline,
    reports: dict[int, _StatReport] | None = None,
) -> None:
    """Set ``"target"`` on symlink entries (and ``"target_error"`` when it is None).

    Sizes are checked first: a size over 4095 bytes is not a Linux symlink and is not read.
    Short targets are in the inode (``stat`` shows them, taken from ``reports`` when given),
    longer ones in a data block (``cat`` prints them); both run in batches whose output is
    bounded by the sizes.
    """
    by_inode: dict[int, list[dict[str, Any]]] = {}
    for link in links:
        if link["size"] > SYMLINK_MAX:
            _no_target(link, LINK_TOO_LONG.format(link["size"]))
        else:
            by_inode.setdefault(link["inode"], []).append(link)
    reports = dict(reports or {})
    unknown = [ino for ino in by_inode if ino not in reports]
    for start in range(0, len(unknown), _STAT_BATCH):
        reports.update(_stat_inodes(image, unknown[start : start + _STAT_BATCH], doing, deadline))
    targets: dict[int, bytes | None] = {}
    slow: list[tuple[int, int]] = []
    for ino, same in by_inode.items():
        if reports[ino].link is None:
            slow.append((ino, same[0]["size"]))
        else:
            targets[ino] = reports[ino].fast_link(same[0]["size"])
    batch: list[tuple[int, int]] = []
    batch_bytes = 0
    for ino, size in slow:
        if batch and batch_bytes + size > _CAT_BATCH_BYTES:
            targets.update(_slow_links(image, batch, doing, deadline))
            batch, batch_bytes = [], 0
        batch.append((ino, size))
        batch_bytes += size
    if batch:
        targets.update(_slow_links(image, batch, doing, deadline))
    for ino, same in by_inode.items():
        for link in same:
            raw = targets.get(ino)
            if raw is None:
                _no_target(link, "debugfs could not read the link's target")
            else:
                link["target"] = from_disk_bytes(raw)


def _stat_inodes(
    image: Path, inodes: list[int], doing: str, deadline: Deadline
) -> dict[int, _StatReport]:
    """debugfs's ``stat`` reports on ``inodes``, read in one run."""
    script, marks = frame_commands([f"stat <{ino}>" for ino in inodes])
    reports = [_StatReport() for _ in inodes]
    with DebugfsRun(image, doing, deadline, script=script) as run:
        for index, piece in framed_output(run, marks):
            reports[index].feed(piece)
    return dict(zip(inodes, reports, strict=True))


def _slow_links(
    image: Path, links: list[tuple[int, int]], doing: str, deadline: Deadline
) -> dict[int, bytes | None]:
    """Targets of ``(inode, size)`` symlinks kept in a data block: cat prints exactly the
    target's bytes after echoing the command; anything longer or shorter is None."""
    script, marks = frame_commands([f"cat <{ino}>" for ino, _ in links])
    data = [bytearray() for _ in links]
    echoed = [False] * len(links)
    with DebugfsRun(image, doing, deadline, script=script) as run:
        for index, piece in framed_output(run, marks):
            if not echoed[index]:
                echoed[index] = True  # "debugfs: cat <ino>"
                continue
            size = links[index][1]
            data[index] += piece[: size + 1 - len(data[index])]
    return {
        ino: bytes(got) if len(got) == size else None
        for (ino, size), got in zip(links, data, strict=True)
    }


class _Dir(NamedTuple):
    inode: int
    path: str
    path_bytes: int
    entry: dict[str, Any] | None  # its own entry in the listing (None for the top)


def _ls_entry(piece: bytes, parent: _Dir) -> dict[str, Any] | bool:
    """The entry an ``ls -p`` line shows; False for other lines, True for an entry that no
    path can name: a name holding a line end (its first line starts like an entry, and
    does not end like one), "/" or NUL, or a path over 4095 bytes."""
    match = _LS_LINE.fullmatch(piece)
    if match is None:
        return _LS_HEAD.match(piece) is not None
    ino, mode, _uid, _gid, name, size = match.groups()
    if name in (b".", b"..") or ino == b"0":
        return False  # unused directory slots (lost+found keeps some) show as inode 0
    if not name or b"/" in name or b"\0" in name:
        return True
    if parent.path_bytes + 1 + len(name) > PATH_MAX_BYTES:
        return True
    full_mode = int(mode, 8)
    text = from_disk_bytes(name)
    return {
        "path": f"{parent.path.rstrip('/')}/{text}",
        "name": text,
        "type": _kind_of(full_mode),
        "mode": full_mode & 0o7777,
        "size": int(size) if size else 0,
        "inode": int(ino),
    }


def disk_list(
    image: Path,
    path: str = "/",
    recursive: bool = False,
    *,
    max_entries: int = DEFAULT_LIST_MAX_ENTRIES,
    timeout_s: float = READ_TIMEOUT_S,
) -> DiskListing:
    """The entries of a directory on the disk (all below it when ``recursive``), sorted by
    path; a file's listing is the file itself.

    Each entry is ``{"path", "name", "type", "mode", "size", "inode"}``, with ``"target"``
    for symlinks (as :func:`disk_stat` gives it); ``path`` is absolute inside the disk.
    Names that are not UTF-8 come back decoded with ``surrogateescape`` (``os.fsencode``
    gives back their bytes, and the readers take them as they are).

    A hostile disk can make it neither loop nor give paths that name nothing:

    - a directory met again (a link back to an ancestor, which makes a cycle, or a second
      hard link to a directory; only a tampered disk has either) is still listed, flagged
      ``"repeat_of"``: the path it was first met at, breadth first; its contents are not
      listed again;
    - entries no path can name are left out and counted in the result's ``unlisted``
      (directory path -> count) and in their directory's entry as ``"unlisted"``: names
      holding a line end (debugfs cannot show them), "/" or NUL, and paths over 4095
      bytes. A name crafted to read as several listing lines may instead show as the
      entries it imitates, which the guest could as well have made for real.

    Bounds: at most ``max_entries`` entries (1 to 100,000; left-out ones count too) are
    read: TooLarge as soon as there are more, without reading the rest (list a
    subdirectory, or without ``recursive``). Memory grows with them, at most about 9 KB
    each (a path and a link target of at most 4095 bytes each): some 90 MB at the default
    10,000. ``timeout_s`` bounds the whole call (ToolFailed past it); every debugfs run has
    the bounds :mod:`~pyro_mcp.storage.debugfs` says. NotFound for a missing path.
    """
    if (
        isinstance(max_entries, bool)
        or not isinstance(max_entries, int)
        or not 1 <= max_entries <= MAX_LIST_ENTRIES
    ):
        raise InvalidArgument(
            f"max_entries must be between 1 and {MAX_LIST_ENTRIES}, got {max_entries!r}"
        )
    deadline = Deadline(timeout_s)
    top = _stat(image, disk_path(path), deadline)
    if top["type"] != "dir":
        name = top["path"].rsplit("/", 1)[-1]
        return DiskListing([{k: v for k, v in top.items() if k != "mtime_ns"} | {"name": name}])
    root: str = top["path"]
    doing = f"listing {root}"
    entries: list[dict[str, Any]] = []
    unlisted: dict[str, int] = {}
    left_out = 0
    seen = {top["inode"]: root}
    level = [_Dir(top["inode"], root, len(to_disk_bytes(root.rstrip("/"))), None)]
    while level:
        script, marks = frame_commands([f"ls -l -p <{d.inode}>" for d in level])
        next_level: list[_Dir] = []
        with DebugfsRun(image, doing, deadline, script=script) as run:
            for index, piece in framed_output(run, marks):
                parent = level[index]
                entry = _ls_entry(piece, parent)
                if entry is False:
                    continue
                if entry is True:
                    left_out += 1
                    unlisted[parent.path] = unlisted.get(parent.path, 0) + 1
                    if parent.entry is not None:
                        parent.entry["unlisted"] = unlisted[parent.path]
                else:
                    assert isinstance(entry, dict)
                    entries.append(entry)
                    if entry["type"] == "dir":
                        if entry["inode"] in seen:
                            entry["repeat_of"] = seen[entry["inode"]]
                        elif recursive:
                            seen[entry["inode"]] = entry["path"]
                            size = parent.path_bytes + 1 + len(to_disk_bytes(entry["name"]))
                            next_level.append(_Dir(entry["inode"], entry["path"], size, entry))
                if len(entries) + left_out > max_entries:
                    raise TooLarge(
                        f"{root} holds more than {max_entries} entries",
                        hint="list a subdirectory, or list without recursive",
                    )
        level = next_level
    links = [e for e in entries if e["type"] == "symlink"]
    _fill_targets(image, links, f"reading the symlinks under {root}", deadline)
    return DiskListing(sorted(entries, key=lambda e: e["path"]), unlisted)


def _kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def disk_read(
    image: Path, path: str, max_bytes: int, *, timeout_s: float = READ_TIMEOUT_S
) -> bytes:
    """Up to ``max_bytes`` bytes from the start of a regular file on the disk.

    NotFound for a missing path; InvalidArgument for a directory, a symlink (the message
    names its target) or a special file, and for ``max_bytes`` outside 1 to 64 MiB.
    Bounds: only what is returned is read (debugfs is stopped once it arrived; memory peaks
    at about twice that), and ``timeout_s`` bounds the whole call (ToolFailed past it).
    """
    if (
        isinstance(max_bytes, bool)
        or not isinstance(max_bytes, int)
        or not 1 <= max_bytes <= MAX_READ_BYTES
    ):
        raise InvalidArgument(
            f"max_bytes must be between 1 and {MAX_READ_BYTES} ({format_size(MAX_READ_BYTES)}), "
            f"got {max_bytes!r}"
        )
    deadline = Deadline(timeout_s)
    info = _stat(image, disk_path(path), deadline)
    where = info["path"]
    if info["type"] == "dir":
        raise InvalidArgument(f"{where} is a directory: list it instead")
    if info["type"] == "symlink":
        if info["target"] is None:
            raise InvalidArgument(
                f"{where} is a symbolic link whose target cannot be shown ({info['target_error']})"
            )
        raise InvalidArgument(
            f"{where} is a symbolic link to {info['target']!r}: read its target instead"
        )
    if info["type"] != "file":
        raise InvalidArgument(f"{where} is not a regular file")
    want = min(info["size"], max_bytes)
    if want == 0:
        return b""
    request = f"cat <{info['inode']}>"
    limit = max_output_for(want)
    with DebugfsRun(image, f"reading {where}", deadline, request=request, max_output=limit) as run:
        data = run.read(want)
        if len(data) != want:
            errors = run.finish()
            raise ToolFailed(
                f"debugfs returned {len(data)} of {want} bytes of {where}",
                stderr_tail=errors.strip()[-2000:],
            )
    return data
