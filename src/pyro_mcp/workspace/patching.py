"""Apply a unified diff in memory, every hunk or none.

:func:`parse_patch` reads plain ``---``/``+++`` diffs and git-style ones (``diff --git``
headers, ``new file mode``/``deleted file mode``/``old mode``/``new mode``, renames and
copies, C-quoted names), including files created from or deleted to ``/dev/null``,
several files in one patch and ``\\ No newline at end of file``. Text around the sections
(a commit message, ``index`` lines) is skipped, as patch(1) does.

:func:`plan_patch` applies every hunk to the files' current bytes (``read_file(path)``,
None when the file does not exist) and returns the resulting contents without writing
anything; the caller writes them. A hunk is placed where its header says, or at the
nearest offset where its context and removed lines match exactly (like patch(1), but
without fuzz). When a hunk matches nowhere, :class:`PatchError` names the file, the hunk
(1-based), its ``@@`` header and the first line that did not match at its expected place.

Paths are confined: ``a/``/``b/`` prefixes are stripped, then absolute paths and ``..``
are refused (OutsideRoot). Binary patches and symlinks (mode 120000) are refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyro_mcp.errors import InvalidArgument, TooLarge
from pyro_mcp.workspace.manifest import check_relative_path

DEFAULT_MAX_PATCH_BYTES = 16 << 20
DEV_NULL = "/dev/null"

_HUNK = re.compile(r"@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_GIT_EXTENDED = (
    "old mode ",
    "new mode ",
    "deleted file mode ",
    "new file mode ",
    "similarity index ",
    "dissimilarity index ",
    "rename from ",
    "rename to ",
    "copy from ",
    "copy to ",
    "index ",
)
_ESCAPES = {"n": b"\n", "t": b"\t", '"': b'"', "\\": b"\\", "a": b"\a", "b": b"\b", "f": b"\f"}
_ESCAPES.update({"r": b"\r", "v": b"\v"})


class PatchError(InvalidArgument):
    """A patch is malformed or does not apply; nothing was written.

    ``path``, ``hunk`` (1-based, 0 when not about a hunk) and ``header`` say where.
    """

    code = "patch_failed"

    def __init__(self, message: str, *, path: str = "", hunk: int = 0, header: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.hunk = hunk
        self.header = header

    def to_dict(self) -> dict[str, str]:
        data = super().to_dict()
        if self.path:
            data["path"] = self.path
        if self.hunk:
            data["hunk"] = str(self.hunk)
            data["header"] = self.header
        return data


# --- parsing ----------------------------------------------------------------------------


@dataclass
class Hunk:
    """One ``@@`` block: the lines it expects (old) and the lines it leaves (new)."""

    old_start: int
    old_len: int
    new_start: int
    new_len: int
    lines: list[tuple[str, bytes]] = field(default_factory=list)
    """``(" " | "-" | "+", line)``; a line keeps its ``\\n`` unless marked as the last."""

    @property
    def header(self) -> str:
        return f"@@ -{self.old_start},{self.old_len} +{self.new_start},{self.new_len} @@"

    @property
    def old_lines(self) -> list[bytes]:
        return [text for kind, text in self.lines if kind != "+"]

    @property
    def new_lines(self) -> list[bytes]:
        return [text for kind, text in self.lines if kind != "-"]


@dataclass
class FilePatch:
    """The part of a patch about one file."""

    old_path: str | None
    """The file before (None: created from /dev/null)."""
    new_path: str | None
    """The file after (None: deleted to /dev/null)."""
    hunks: list[Hunk] = field(default_factory=list)
    old_mode: int | None = None
    new_mode: int | None = None
    """File mode the patch gives the file (``0o100755``), from git headers."""
    copy: bool = False
    binary: bool = False
    git: bool = False
    """A ``diff --git`` section: different old and new names mean a rename or copy."""

    @property
    def path(self) -> str:
        return self.new_path or self.old_path or ""


def _lines(text: str) -> list[str]:
    # Only "\n" ends a line; an unterminated last line of the patch counts as terminated.
    parts = text.split("\n")
    if parts and parts[-1] == "":
        parts.pop()
    return [part + "\n" for part in parts]


def _unquote(text: str) -> tuple[str, str]:
    """A C-quoted name at the start of ``text`` (which starts with '"'), and the rest."""
    out = bytearray()
    i = 1
    while i < len(text):
        ch = text[i]
        if ch == '"':
            return out.decode("utf-8", "surrogateescape"), text[i + 1 :]
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt in _ESCAPES:
                out += _ESCAPES[nxt]
                i += 2
                continue
            if re.fullmatch(r"[0-7]{3}", text[i + 1 : i + 4]):
                out.append(int(text[i + 1 : i + 4], 8) & 0xFF)
                i += 4
                continue
        out += ch.encode("utf-8")
        i += 1
    raise PatchError(f"unterminated quoted name in patch: {text.strip()!r}")


def _header_name(raw: str) -> str | None:
    """The name on a ``---``/``+++`` line (after the marker): unquoted, without a
    timestamp; None for /dev/null."""
    raw = raw.rstrip("\n").rstrip("\r")
    name = _unquote(raw)[0] if raw.startswith('"') else raw.split("\t", 1)[0]
    return None if name == DEV_NULL else name


def _git_names(rest: str) -> tuple[str, str] | None:
    """The two names of a ``diff --git`` line (after the marker), when they can be told."""
    rest = rest.rstrip("\n").rstrip("\r")
    if rest.startswith('"'):
        first, tail = _unquote(rest)
        tail = tail.lstrip(" ")
        second = _unquote(tail)[0] if tail.startswith('"') else tail
        return first, second
    # Unquoted names may hold spaces: "a/X b/X" with both names the same is the usual case.
    length = (len(rest) - 1) // 2
    first, second = rest[:length], rest[length + 1 :]
    if first.startswith("a/") and second.startswith("b/") and first[2:] == second[2:]:
        return first, second
    if " b/" in rest:
        first, second = rest.split(" b/", 1)
        return first, "b/" + second
    return None


def _strip_prefix(name: str | None, prefix: str) -> str | None:
    if name is not None and name.startswith(prefix):
        return name[len(prefix) :]
    return name


def _clean_path(name: str | None) -> str | None:
    if name is None:
        return None
    while name.startswith("./"):
        name = name[2:]
    return check_relative_path(name, what="patch path")


def _mode(text: str, line: str) -> int:
    try:
        return int(text.strip(), 8)
    except ValueError as exc:
        raise PatchError(f"bad mode in patch line {line.strip()!r}") from exc


def parse_patch(patch_text: str) -> list[FilePatch]:
    """The file sections of a unified diff, in order; PatchError if it is malformed,
    OutsideRoot for a path that escapes."""
    lines = _lines(patch_text)
    files: list[FilePatch] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("diff --git "):
            section, i = _parse_git_section(lines, i)
            files.append(section)
        elif line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            old = _header_name(line[4:])
            new = _header_name(lines[i + 1][4:])
            if old and new and old.startswith("a/") and new.startswith("b/"):
                old, new = old[2:], new[2:]
            elif old is None and new and new.startswith("b/"):
                new = new[2:]
            elif new is None and old and old.startswith("a/"):
                old = old[2:]
            section = FilePatch(_clean_path(old), _clean_path(new))
            i = _parse_hunks(lines, i + 2, section)
            files.append(section)
        else:
            i += 1  # commit messages, "Only in" lines, blank lines: not ours to judge
    return files


def _parse_git_section(lines: list[str], i: int) -> tuple[FilePatch, int]:
    header = lines[i]
    names = _git_names(header[len("diff --git ") :])
    old = _strip_prefix(names[0], "a/") if names else None
    new = _strip_prefix(names[1], "b/") if names else None
    section = FilePatch(old, new, git=True)
    created = deleted = False
    i += 1
    while i < len(lines) and lines[i].startswith(_GIT_EXTENDED):
        line = lines[i]
        value = line.split(" ", 2)[-1].rstrip("\n")
        if line.startswith("new file mode "):
            created = True
            section.new_mode = _mode(line[len("new file mode ") :], line)
        elif line.startswith("deleted file mode "):
            deleted = True
            section.old_mode = _mode(line[len("deleted file mode ") :], line)
        elif line.startswith("old mode "):
            section.old_mode = _mode(line[len("old mode ") :], line)
        elif line.startswith("new mode "):
            section.new_mode = _mode(line[len("new mode ") :], line)
        elif line.startswith(("rename from ", "copy from ")):
            section.old_path = _header_name(value)
            section.copy = line.startswith("copy")
        elif line.startswith(("rename to ", "copy to ")):
            section.new_path = _header_name(value)
        i += 1
    if i < len(lines) and lines[i].startswith(("Binary files ", "GIT binary patch")):
        section.binary = True
        i += 1
    if i + 1 < len(lines) and lines[i].startswith("--- ") and lines[i + 1].startswith("+++ "):
        old_name = _header_name(lines[i][4:])
        new_name = _header_name(lines[i + 1][4:])
        section.old_path = _strip_prefix(old_name, "a/")
        section.new_path = _strip_prefix(new_name, "b/")
        i += 2
    if created:
        section.old_path = None
    if deleted:
        section.new_path = None
    if section.old_path is None and section.new_path is None:
        raise PatchError(f"cannot tell which file this patch section is about: {header.strip()!r}")
    section.old_path = _clean_path(section.old_path)
    section.new_path = _clean_path(section.new_path)
    return section, _parse_hunks(lines, i, section)


def _parse_hunks(lines: list[str], i: int, section: FilePatch) -> int:
    """Read the ``@@`` blocks starting at ``lines[i]`` into ``section``; the next index."""
    while i < len(lines) and lines[i].startswith("@@ "):
        header = lines[i]
        match = _HUNK.match(header)
        number = len(section.hunks) + 1
        if match is None:
            raise PatchError(
                f"{section.path}: hunk #{number} has a malformed header {header.strip()!r}",
                path=section.path,
                hunk=number,
                header=header.strip(),
            )
        a, b, c, d = match.groups()
        hunk = Hunk(int(a), int(b) if b is not None else 1, int(c), int(d) if d is not None else 1)
        i += 1
        old_seen = new_seen = 0
        while old_seen < hunk.old_len or new_seen < hunk.new_len:
            if i >= len(lines):
                raise PatchError(
                    f"{section.path}: hunk #{number} {hunk.header} ends before its "
                    f"{hunk.old_len} old and {hunk.new_len} new lines",
                    path=section.path,
                    hunk=number,
                    header=hunk.header,
                )
            line = lines[i]
            kind, text = (" ", "\n") if line == "\n" else (line[0], line[1:])
            if kind == "\\":
                _no_newline(hunk)
            elif kind in (" ", "-", "+"):
                hunk.lines.append((kind, text.encode("utf-8", "surrogateescape")))
                old_seen += kind != "+"
                new_seen += kind != "-"
            else:
                raise PatchError(
                    f"{section.path}: hunk #{number} {hunk.header} has a line that is not "
                    f"context, removal or addition: {line.rstrip()!r}",
                    path=section.path,
                    hunk=number,
                    header=hunk.header,
                )
            i += 1
        if old_seen != hunk.old_len or new_seen != hunk.new_len:
            raise PatchError(
                f"{section.path}: hunk #{number} {hunk.header} does not match its line counts",
                path=section.path,
                hunk=number,
                header=hunk.header,
            )
        while i < len(lines) and lines[i].startswith("\\"):
            _no_newline(hunk)
            i += 1
        section.hunks.append(hunk)
    return i


def _no_newline(hunk: Hunk) -> None:
    """``\\ No newline at end of file``: the line before it has no line end."""
    if hunk.lines:
        kind, text = hunk.lines[-1]
        hunk.lines[-1] = (kind, text.removesuffix(b"\n"))


# --- applying ---------------------------------------------------------------------------


@dataclass
class PatchPlan:
    """What applying a patch would do. Nothing is written until the caller writes it."""

    writes: dict[str, bytes] = field(default_factory=dict)
    """Path -> its whole new content, for every created or modified file."""
    deletes: list[str] = field(default_factory=list)
    """Files to remove."""
    modes: dict[str, int] = field(default_factory=dict)
    """Permission bits the patch sets (new files, ``new mode``); other files keep theirs."""
    created: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    hunks: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "files": len(self.created) + len(self.modified) + len(self.deletes),
            "created": list(self.created),
            "modified": list(self.modified),
            "deleted": list(self.deletes),
            "hunks": self.hunks,
        }


def split_bytes_lines(data: bytes) -> list[bytes]:
    """Lines of ``data``, each keeping its ``\\n`` (the last may have none)."""
    parts = data.split(b"\n")
    lines = [part + b"\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def apply_hunks(path: str, content: bytes, hunks: list[Hunk]) -> bytes:
    """``content`` with every hunk applied; PatchError naming the first that does not fit.

    Each hunk is searched for outward from where its header (shifted by the offset the
    previous hunk was found at) puts it, never before the end of the previous hunk.
    """
    lines = split_bytes_lines(content)
    out: list[bytes] = []
    done = 0  # lines of the original consumed so far
    offset = 0
    for number, hunk in enumerate(hunks, 1):
        old = hunk.old_lines
        nominal = hunk.old_start if hunk.old_len == 0 else hunk.old_start - 1
        expected = nominal + offset
        found = _find(lines, old, expected, done)
        if found is None:
            raise _mismatch(path, number, hunk, lines, max(expected, done))
        out.extend(lines[done:found])
        out.extend(hunk.new_lines)
        done = found + len(old)
        offset = found - nominal
    out.extend(lines[done:])
    return b"".join(out)


def _find(lines: list[bytes], old: list[bytes], expected: int, lowest: int) -> int | None:
    highest = len(lines) - len(old)
    if highest < lowest:
        return None
    expected = min(max(expected, lowest), highest)
    for distance in range(max(expected - lowest, highest - expected) + 1):
        for start in (expected - distance, expected + distance):
            if lowest <= start <= highest and lines[start : start + len(old)] == old:
                return start
    return None


def _mismatch(path: str, number: int, hunk: Hunk, lines: list[bytes], at: int) -> PatchError:
    where = f"{path}: hunk #{number} {hunk.header} does not apply"
    for index, wanted in enumerate(hunk.old_lines):
        line_no = at + index
        have = lines[line_no] if line_no < len(lines) else None
        if have != wanted:
            shown = _show(wanted)
            if have is None:
                detail = f"expected {shown} at line {line_no + 1}, but the file ends first"
            else:
                detail = f"expected {shown} at line {line_no + 1}, found {_show(have)}"
            break
    else:
        detail = "its context is found only before an earlier hunk"
    return PatchError(f"{where}: {detail}", path=path, hunk=number, header=hunk.header)


def _show(line: bytes) -> str:
    text = line.decode("utf-8", "replace")
    if text.endswith("\n"):
        return repr(text[:-1])
    return repr(text) + " (no newline at end)"


def plan_patch(
    patch_text: str,
    read_file: Callable[[str], bytes | None],
    *,
    max_patch_bytes: int = DEFAULT_MAX_PATCH_BYTES,
) -> PatchPlan:
    """Apply ``patch_text`` in memory and return the planned writes and deletions.

    ``read_file(path)`` returns a file's current bytes, or None when it does not exist; it
    is called once per path. All or nothing: any problem raises before a plan exists —
    PatchError (a hunk that does not apply, creating a file that exists, changing one that
    does not, a binary or symlink patch, a malformed patch), OutsideRoot for an escaping
    path, TooLarge when the patch exceeds ``max_patch_bytes`` (UTF-8).
    """
    if len(patch_text.encode("utf-8", "surrogateescape")) > max_patch_bytes:
        raise TooLarge(f"the patch is larger than {max_patch_bytes} bytes")
    sections = parse_patch(patch_text)
    if not sections:
        raise PatchError("no file changes found: the patch has no ---/+++ or diff --git sections")
    original: dict[str, bytes | None] = {}
    state: dict[str, bytes | None] = {}

    def current(path: str) -> bytes | None:
        if path not in state:
            original[path] = read_file(path)
            state[path] = original[path]
        return state[path]

    plan = PatchPlan()
    for section in sections:
        _apply_section(section, current, state, plan)
    for path, content in state.items():
        before = original[path]
        if content is None:
            if before is not None:
                plan.deletes.append(path)
            continue
        plan.writes[path] = content
        (plan.created if before is None else plan.modified).append(path)
    for path in list(plan.modes):
        if path not in plan.writes:
            del plan.modes[path]
    return plan


def _apply_section(
    section: FilePatch,
    current: Callable[[str], bytes | None],
    state: dict[str, bytes | None],
    plan: PatchPlan,
) -> None:
    path = section.path
    if section.binary:
        raise PatchError(f"{path}: binary patches cannot be applied", path=path)
    if any(
        mode is not None and mode & 0o170000 == 0o120000
        for mode in (section.old_mode, section.new_mode)
    ):
        raise PatchError(f"{path}: symlink patches (mode 120000) are not supported", path=path)
    plan.hunks += len(section.hunks)
    old_path, new_path = section.old_path, section.new_path
    if old_path == new_path and not section.hunks and section.new_mode is None:
        return  # a git header with nothing to do (an unchanged mode, an index line)
    if old_path is None:
        assert new_path is not None  # parse_patch never yields a section with neither
        if current(new_path) is not None:
            raise PatchError(
                f"{new_path}: the patch creates it, but it already exists", path=new_path
            )
        state[new_path] = apply_hunks(new_path, b"", section.hunks)
        plan.modes[new_path] = (section.new_mode or 0o100644) & 0o7777
        return
    if not section.git and new_path is not None:
        if new_path != old_path:
            # Plain diff (``diff -u x.orig x``): the names differ but one file is meant,
            # the one that exists, as patch(1) decides.
            old_path = new_path = new_path if current(new_path) is not None else old_path
        hunks = section.hunks
        created = hunks and all(h.old_start == h.old_len == 0 for h in hunks)
        if created and current(new_path) is None:  # ``diff -N``: made from an empty side
            state[new_path] = apply_hunks(new_path, b"", hunks)
            plan.modes[new_path] = 0o644
            return
        if hunks and all(h.new_start == h.new_len == 0 for h in hunks):
            new_path = None  # ``diff -N``: removed to an empty side
    content = current(old_path)
    if content is None:
        raise PatchError(f"{old_path}: the patch changes it, but it does not exist", path=old_path)
    result = apply_hunks(old_path, content, section.hunks)
    if new_path is None:
        if result:
            raise PatchError(
                f"{old_path}: the patch deletes it, but it holds content the patch does not remove",
                path=old_path,
            )
        state[old_path] = None
        return
    if new_path != old_path:
        if current(new_path) is not None:
            raise PatchError(
                f"{new_path}: the patch renames or copies onto an existing file", path=new_path
            )
        if not section.copy:
            state[old_path] = None
    state[new_path] = result
    if section.new_mode is not None:
        plan.modes[new_path] = section.new_mode & 0o7777
