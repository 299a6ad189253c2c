"""Render the changes between two manifests as a git-style unified diff.

Only changed files are read: ``read_before(sha256)`` fetches an old file's bytes (from the
blob store), ``read_after(path)`` a new file's bytes (from the guest). Mode-only changes
and directories read nothing. A file is *binary* when its first 8 KiB hold a NUL byte or
it is not valid UTF-8; a binary change is reported as ``Binary files a/x and b/x differ``.

The patch text follows git: ``diff --git`` headers, ``new file mode``/``deleted file
mode``/``old mode``/``new mode`` lines, ``/dev/null`` for the missing side, hunks with three
lines of context, ``\\ No newline at end of file``. A symlink is shown as git shows it: a
one-line file (mode ``120000``) holding its target. A type change is a deletion followed
by an addition. Paths with quotes, backslashes or control characters are C-quoted as git
quotes them.

Size caps keep a huge change from flooding a caller: each file's patch keeps whole hunks
up to ``max_file_patch_bytes`` and the whole patch stops at ``max_total_patch_bytes``;
files larger than ``max_read_bytes`` are not read at all. Whatever was cut is flagged
``truncated`` (per file and overall); what is kept still applies cleanly.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pyro_mcp.workspace.manifest import Change, Changes, Entry

DEFAULT_CONTEXT_LINES = 3
DEFAULT_MAX_FILE_PATCH_BYTES = 256 << 10
DEFAULT_MAX_TOTAL_PATCH_BYTES = 2 << 20
DEFAULT_MAX_READ_BYTES = 4 << 20
DEFAULT_MAX_FILES = 10_000
BINARY_SNIFF_BYTES = 8192
NO_NEWLINE = "\\ No newline at end of file\n"


def git_mode(entry: Entry) -> str:
    """The mode git would print for ``entry`` (``100644``, ``100755``, ``120000``...)."""
    if entry.type == "symlink":
        return "120000"
    if entry.type == "dir":
        return "040000"
    return f"{0o100000 | entry.mode:o}"


def quote_path(path: str) -> str:
    """``path`` as git prints it: unchanged, or C-quoted when it holds special characters.

    Bytes that are not UTF-8 (surrogates of ``surrogateescape``) are written as octal
    escapes, as git writes them, so the name parses back to the same bytes.
    """
    if not any(_special(ch) for ch in path):
        return path
    escapes = {'"': '\\"', "\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
    out = []
    for ch in path:
        if ch in escapes:
            out.append(escapes[ch])
        elif 0xDC80 <= ord(ch) <= 0xDCFF:
            out.append(f"\\{ord(ch) - 0xDC00:03o}")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _special(ch: str) -> bool:
    code = ord(ch)
    return ch in '"\\' or code < 0x20 or code == 0x7F or 0xDC80 <= code <= 0xDCFF


def _name(prefix: str, path: str) -> str:
    quoted = quote_path(path)
    if quoted.startswith('"'):
        return '"' + prefix + quoted[1:]
    return prefix + path


def is_binary(data: bytes) -> bool:
    """True for a NUL byte in the first 8 KiB, or bytes that are not valid UTF-8."""
    if b"\x00" in data[:BINARY_SNIFF_BYTES]:
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def split_lines(text: str) -> list[str]:
    """Lines of ``text``, each keeping its ``\\n`` (the last may have none); only ``\\n``
    ends a line, unlike ``str.splitlines``."""
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _range(start: int, length: int) -> str:
    # Unified-diff convention: "-5" for one line, "-4,0" for an empty range after line 4.
    if length == 1:
        return str(start + 1)
    if length == 0:
        return f"{start},0"
    return f"{start + 1},{length}"


def _line(prefix: str, line: str) -> str:
    return prefix + line if line.endswith("\n") else prefix + line + "\n" + NO_NEWLINE


def unified_hunks(old: list[str], new: list[str], context_lines: int) -> list[str]:
    """Each hunk of the diff from ``old`` to ``new`` lines, as text starting with ``@@``."""
    hunks = []
    matcher = difflib.SequenceMatcher(None, old, new)
    for group in matcher.get_grouped_opcodes(context_lines):
        first, last = group[0], group[-1]
        old_range = _range(first[1], last[2] - first[1])
        new_range = _range(first[3], last[4] - first[3])
        body = [f"@@ -{old_range} +{new_range} @@\n"]
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                body.extend(_line(" ", line) for line in old[i1:i2])
                continue
            if tag in ("replace", "delete"):
                body.extend(_line("-", line) for line in old[i1:i2])
            if tag in ("replace", "insert"):
                body.extend(_line("+", line) for line in new[j1:j2])
        hunks.append("".join(body))
    return hunks


@dataclass
class _Rendered:
    text: str = ""
    binary: bool = False
    truncated: bool = False


class _Budget:
    def __init__(self, per_file: int, total: int) -> None:
        self.per_file = per_file
        self.left = total

    def for_file(self) -> int:
        return max(0, min(self.per_file, self.left))


def render_diff(
    changes: Changes | Iterable[Change],
    read_before: Callable[[str], bytes],
    read_after: Callable[[str], bytes],
    *,
    context_lines: int = DEFAULT_CONTEXT_LINES,
    max_file_patch_bytes: int = DEFAULT_MAX_FILE_PATCH_BYTES,
    max_total_patch_bytes: int = DEFAULT_MAX_TOTAL_PATCH_BYTES,
    max_read_bytes: int = DEFAULT_MAX_READ_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
) -> dict[str, Any]:
    """The diff for ``changes`` (a :class:`Changes`, or changes in tree order as they
    stream) as ``{"summary", "files", "files_omitted", "patch", "truncated"}``.

    ``summary`` counts every changed path (directories included). Each item of ``files``
    is ``{"path", "status", "type", "binary", "patch", "mode_change", "truncated"}``:
    ``patch`` is that path's part of the whole patch (None for directories and special
    files, or when the total cap left no room), ``mode_change`` is ``{"old": "100644",
    "new": "100755"}`` or None. ``patch`` at the top is every file's part joined. Byte caps
    count UTF-8 bytes. At most ``max_files`` changes are listed; ``files_omitted`` counts
    the rest (``summary`` still counts them).
    """
    budget = _Budget(max_file_patch_bytes, max_total_patch_bytes)
    files: list[dict[str, Any]] = []
    parts = []
    counts = dict.fromkeys(("added", "modified", "deleted", "type_changed"), 0)
    omitted = 0
    for change in changes.items() if isinstance(changes, Changes) else changes:
        counts[change.status] += 1
        if len(files) >= max_files:
            omitted += 1
            continue
        rendered = _render_change(
            change, read_before, read_after, context_lines, max_read_bytes, budget
        )
        entry = change.after or change.before  # a change always has at least one side
        kind = entry.type if entry else "other"
        patch: str | None = rendered.text or None
        if kind == "dir" and change.status != "type_changed":
            patch = None
        if patch:
            parts.append(patch)
        files.append(
            {
                "path": change.path,
                "status": change.status,
                "type": kind,
                "binary": rendered.binary,
                "patch": patch,
                "mode_change": _mode_change(change),
                "truncated": rendered.truncated,
            }
        )
    return {
        "summary": counts,
        "files": files,
        "files_omitted": omitted,
        "patch": "".join(parts),
        "truncated": omitted > 0 or any(item["truncated"] for item in files),
    }


def _mode_change(change: Change) -> dict[str, str] | None:
    if not change.mode_changed or change.before is None or change.after is None:
        return None
    return {"old": git_mode(change.before), "new": git_mode(change.after)}


def _render_change(
    change: Change,
    read_before: Callable[[str], bytes],
    read_after: Callable[[str], bytes],
    context_lines: int,
    max_read_bytes: int,
    budget: _Budget,
) -> _Rendered:
    old = change.before if change.before and change.before.type in ("file", "symlink") else None
    new = change.after if change.after and change.after.type in ("file", "symlink") else None
    if change.status == "type_changed":
        # git shows a type change as a deletion followed by an addition.
        result = _Rendered()
        for one_old, one_new in ((old, None), (None, new)):
            if one_old is None and one_new is None:
                continue
            part = _render_pair(
                change.path,
                one_old,
                one_new,
                (read_before, read_after),
                context_lines,
                max_read_bytes,
                budget,
            )
            result.text += part.text
            result.binary = result.binary or part.binary
            result.truncated = result.truncated or part.truncated
        return result
    if old is None and new is None:
        return _Rendered()
    return _render_pair(
        change.path, old, new, (read_before, read_after), context_lines, max_read_bytes, budget
    )


def _render_pair(
    path: str,
    old: Entry | None,
    new: Entry | None,
    readers: tuple[Callable[[str], bytes], Callable[[str], bytes]],
    context_lines: int,
    max_read_bytes: int,
    budget: _Budget,
) -> _Rendered:
    a_name, b_name = _name("a/", path), _name("b/", path)
    header = [f"diff --git {a_name} {b_name}\n"]
    if old is None and new is not None:
        header.append(f"new file mode {git_mode(new)}\n")
    elif new is None and old is not None:
        header.append(f"deleted file mode {git_mode(old)}\n")
    elif old is not None and new is not None and git_mode(old) != git_mode(new):
        header.append(f"old mode {git_mode(old)}\n")
        header.append(f"new mode {git_mode(new)}\n")
    result = _Rendered()
    body: list[str] = []
    content_changed = (
        old is None or new is None or (old.sha256, old.target) != (new.sha256, new.target)
    )
    if content_changed:
        old_data = _content(old, path, readers[0], max_read_bytes, before=True)
        new_data = _content(new, path, readers[1], max_read_bytes, before=False)
        if old_data is None or new_data is None:
            result.truncated = True  # too large to read: the header alone says it changed
        elif is_binary(old_data) or is_binary(new_data):
            result.binary = True
            left = a_name if old is not None else "/dev/null"
            right = b_name if new is not None else "/dev/null"
            body.append(f"Binary files {left} and {right} differ\n")
        elif old_data or new_data:
            old_lines = split_lines(old_data.decode("utf-8"))
            new_lines = split_lines(new_data.decode("utf-8"))
            hunks = unified_hunks(old_lines, new_lines, context_lines)
            if hunks:
                # The ---/+++ pair travels with the first hunk: one is useless without the other.
                old_label = a_name if old is not None else "/dev/null"
                new_label = b_name if new is not None else "/dev/null"
                hunks[0] = f"--- {old_label}\n+++ {new_label}\n" + hunks[0]
            body.extend(hunks)
    return _fit(result, header, body, budget)


def _content(
    entry: Entry | None,
    path: str,
    read: Callable[[str], bytes],
    max_read_bytes: int,
    *,
    before: bool,
) -> bytes | None:
    """The bytes of one side (b"" when absent), or None when it is too large to read."""
    if entry is None:
        return b""
    if entry.type == "symlink":
        return (entry.target or "").encode("utf-8", "surrogateescape")
    if entry.size > max_read_bytes:
        return None
    if entry.size == 0:
        return b""
    return read(entry.sha256 or "") if before else read(path)


def _fit(result: _Rendered, header: list[str], body: list[str], budget: _Budget) -> _Rendered:
    """Keep the header and the whole pieces of ``body`` (hunks) that fit this file's share
    of the budget; flag the rest as truncated. A file whose header does not fit gets no
    text at all."""
    room = budget.for_file()
    kept = "".join(header)
    size = len(kept.encode("utf-8"))
    if size > room:
        result.truncated = True
        return result
    for piece in body:
        piece_size = len(piece.encode("utf-8"))
        if size + piece_size > room:
            result.truncated = True
            break
        kept += piece
        size += piece_size
    result.text = kept
    budget.left -= size
    return result
