"""Reading and rewriting a host's configuration file without losing anything of the user's.

A change is written atomically (a temporary file beside it, then a rename), after a backup
of the previous file (``NAME.pyro.bak``, as private as the file itself). A file reached
through a symlink (dotfiles kept in a repository) is changed where the link points, so the
link stays. The file keeps its mode; one that holds secrets (tokens, API keys, a server's
environment) is made private (0600) if it was not. If the file changes while pyro edits it
(the host rewrote it), pyro reads it again and redoes its change.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyro_mcp.errors import Conflict, InvalidState
from pyro_mcp.runtime.jsonfile import write_text_atomic

BACKUP_SUFFIX = ".pyro.bak"
PRIVATE = 0o600
ATTEMPTS = 3  # reads of a file the host keeps rewriting before giving up
SECRET_KEY = re.compile(r"(?i)(token|secret|passw|api[_-]?key|credential|oauth|authoriz)")
ENV_KEYS = ("env", "environment", "headers", "http_headers")


@dataclass(frozen=True)
class Loaded:
    """A configuration file as read: ``text`` None when it does not exist yet."""

    path: Path  # as named (may be a symlink)
    real: Path  # where its bytes are
    text: str | None
    stamp: tuple[int, int, int] | None  # (inode, size, mtime_ns): was it rewritten since?
    mode: int | None


def _stamp(path: Path) -> tuple[tuple[int, int, int], int] | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns), stat.S_IMODE(info.st_mode)


def load(path: Path) -> Loaded:
    """Read ``path``. Errors: InvalidState when it is not a readable text file."""
    real = Path(os.path.realpath(path))
    found = _stamp(real)
    if found is None:
        return Loaded(path, real, None, None, None)
    if not real.is_file():
        raise InvalidState(f"{path} is not a regular file", hint="move it away and run again")
    try:
        text = real.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidState(f"cannot read {path}: {exc}") from exc
    return Loaded(path, real, text, found[0], found[1])


def parse_json(loaded: Loaded, *, comments: bool = False) -> dict[str, Any]:
    """The JSON object in the file ({} when it does not exist or is blank); ``comments``:
    JSONC (``//`` and ``/* */`` comments, trailing commas), as OpenCode reads it.

    Errors: InvalidState naming the file, line and column of a syntax error, or saying the
    top level is not an object.
    """
    if loaded.text is None or not loaded.text.strip():
        return {}
    text = strip_jsonc(loaded.text) if comments else loaded.text
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidState(
            f"{loaded.path}: line {exc.lineno}, column {exc.colno}: {exc.msg}",
            hint="fix the file (its host cannot read it either), then run again",
        ) from exc
    if not isinstance(data, dict):
        raise InvalidState(f"{loaded.path}: the top level is not a JSON object")
    return data


def parse_toml(loaded: Loaded) -> dict[str, Any]:
    """The TOML document in the file ({} when it does not exist).

    Errors: InvalidState naming the file and the line and column of a syntax error.
    """
    if loaded.text is None:
        return {}
    try:
        return tomllib.loads(loaded.text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidState(
            f"{loaded.path}: {exc}",  # tomllib says "... (at line L, column C)"
            hint="fix the file (its host cannot read it either), then run again",
        ) from exc


def strip_jsonc(text: str) -> str:
    """``text`` with its comments and trailing commas blanked (lines and columns kept)."""
    out: list[str] = []
    comma: int | None = None  # where in ``out`` the last comma stands, until it is followed
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if text.startswith("//", i) or text.startswith("/*", i):
            line = text.startswith("//", i)
            end = text.find("\n" if line else "*/", i + 2)
            end = n if end < 0 else end + (0 if line else 2)
            out.append("".join(c if c == "\n" else " " for c in text[i:end]))
            i = end
            continue
        if ch in "}]" and comma is not None:
            out[comma] = " "
        if not ch.isspace():
            comma = None
        if ch == '"':
            end = i + 1
            while end < n and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            out.append(text[i : end + 1])
            i = end + 1
            continue
        if ch == ",":
            comma = len(out)
        out.append(ch)
        i += 1
    return "".join(out)


def holds_secrets(value: Any) -> bool:
    """Whether a parsed configuration holds what must not be world-readable: a value
    under a key that names a secret, or any server environment or HTTP headers."""
    if isinstance(value, dict):
        for key, item in value.items():
            if item and SECRET_KEY.search(str(key)):
                return True
            if key in ENV_KEYS and isinstance(item, dict) and item:
                return True
            if holds_secrets(item):
                return True
    elif isinstance(value, list):
        return any(holds_secrets(item) for item in value)
    return False


@dataclass(frozen=True)
class Written:
    """What a change did: the file, its backup (None: there was no file) and its mode."""

    path: Path
    backup: Path | None
    mode: int


def edit(
    path: Path,
    change: Callable[[Loaded], tuple[str, bool] | None],
    *,
    new_mode: int,
) -> Written | None:
    """Apply ``change`` to the file: it returns (new text, holds secrets), or None when
    nothing is to change (nothing is written). Errors: Conflict when the file kept
    changing under pyro; InvalidState when it cannot be written."""
    for _attempt in range(ATTEMPTS):
        loaded = load(path)
        result = change(loaded)
        if result is None:
            return None
        text, secret = result
        mode = new_mode if loaded.mode is None else loaded.mode
        if secret:
            mode &= ~0o077
        written = _replace(loaded, text, mode)
        if written is not None:
            return written
    raise Conflict(
        f"{path} kept changing while pyro edited it",
        hint="quit the host (it rewrites the file while it runs) and run again",
    )


def _replace(loaded: Loaded, text: str, mode: int) -> Written | None:
    """Write ``text`` over the file unless it changed since it was read (None then)."""
    target = loaded.real
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        backup = None
        if loaded.text is not None:
            backup = target.with_name(target.name + BACKUP_SUFFIX)
            old_mode = mode if loaded.mode is None else loaded.mode
            _atomic_write(backup, loaded.text, old_mode & mode)
        current = _stamp(target)
        if (current[0] if current else None) != loaded.stamp:
            return None
        _atomic_write(target, text, mode)
    except OSError as exc:
        raise InvalidState(f"cannot write {loaded.path}: {exc}") from exc
    return Written(loaded.path, backup, mode)


def _atomic_write(path: Path, text: str, mode: int) -> None:
    write_text_atomic(path, text, mode=mode)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)
