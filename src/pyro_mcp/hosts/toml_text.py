"""A small TOML writer, and the edit of one table in a file people write by hand.

Codex's ``config.toml`` carries the user's comments and layout, so pyro does not rewrite
it from a parsed copy: it replaces the text of ``[mcp_servers.pyro]`` and its subtables
(or appends them) and leaves every other line as it was. The result is parsed again and
must equal the old document with only that table changed; anything else (the table
defined inline or with dotted keys elsewhere) is refused rather than guessed at.
"""

from __future__ import annotations

import datetime
import json
import re
import tomllib
from collections.abc import Sequence
from typing import Any

from pyro_mcp.errors import InvalidState

BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
HEADER = re.compile(r"\s*\[")


def key(name: str) -> str:
    return name if BARE_KEY.fullmatch(name) else _string(name)


def _string(text: str) -> str:
    # A JSON string is a TOML basic string, except TOML wants \u escapes for DEL too.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def value(item: Any) -> str:
    """``item`` as a TOML value (inline tables and arrays for nested data)."""
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, int | float):
        return repr(item) if item == item and abs(item) != float("inf") else _special(item)
    if isinstance(item, str):
        return _string(item)
    if isinstance(item, datetime.date | datetime.time):
        return item.isoformat()
    if isinstance(item, list | tuple):
        return "[" + ", ".join(value(each) for each in item) + "]"
    if isinstance(item, dict):
        return "{ " + ", ".join(f"{key(k)} = {value(v)}" for k, v in item.items()) + " }"
    raise TypeError(f"no TOML form for {type(item).__name__}")


def _special(number: float) -> str:
    if number != number:
        return "nan"
    return "inf" if number > 0 else "-inf"


def table(path: Sequence[str], content: dict[str, Any]) -> str:
    """``content`` as the table ``[path]``, its tables as subtables after it."""
    head = "[" + ".".join(key(part) for part in path) + "]\n"
    plain = [f"{key(k)} = {value(v)}\n" for k, v in content.items() if not isinstance(v, dict)]
    text = head + "".join(plain)
    for name, sub in content.items():
        if isinstance(sub, dict):
            text += "\n" + table([*path, name], sub)
    return text


def _header_path(line: str) -> tuple[str, ...] | None:
    """The key path of a table header line (``[a."b"]``, ``[[a.b]]``), else None."""
    if not HEADER.match(line):
        return None
    text = line.strip()
    text = text[2:] if text.startswith("[[") else text[1:]
    parts: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in " \t.":
            i += 1
        elif ch in "\"'":
            end = text.find(ch, i + 1)
            while ch == '"' and end > 0 and text[end - 1] == "\\":
                end = text.find(ch, end + 1)
            if end < 0:
                return None
            quoted = text[i : end + 1]
            parts.append(tomllib.loads(f"k = {quoted}")["k"])
            i = end + 1
        elif ch == "]":
            return tuple(parts)
        else:
            match = BARE_KEY.match(text, i)
            if match is None:
                return None
            parts.append(match.group())
            i = match.end()
    return None


def replace_table(text: str, path: Sequence[str], content: dict[str, Any], source: str) -> str:
    """``text`` with the table at ``path`` (and its subtables) set to ``content``: in
    place of the first of them, or appended. ``source`` names the file in errors.

    Errors: InvalidState when the result would not be the same document with only that
    table changed (the table is written in a form this edit does not touch).
    """
    prefix = tuple(path)
    lines = text.splitlines(keepends=True)
    kept: list[str] = []
    at: int | None = None
    skipping = False
    for line in lines:
        header = _header_path(line)
        if header is not None:
            skipping = header[: len(prefix)] == prefix
            if skipping and at is None:
                at = len(kept)
        if not skipping:
            kept.append(line)
    block = table(prefix, content)
    if at is None:
        if kept and not kept[-1].endswith("\n"):
            kept[-1] += "\n"
        if kept and kept[-1].strip():
            kept.append("\n")
        kept.append(block)
    else:
        kept.insert(at, block + ("\n" if at < len(kept) else ""))
    result = "".join(kept)
    expected = tomllib.loads(text)
    cursor: Any = expected
    for part in prefix[:-1]:
        cursor = cursor.setdefault(part, {}) if isinstance(cursor, dict) else None
    same = isinstance(cursor, dict)
    if same:
        cursor[prefix[-1]] = content
        try:
            same = tomllib.loads(result) == expected
        except tomllib.TOMLDecodeError:
            same = False
    if not same:
        dotted = ".".join(prefix)
        raise InvalidState(
            f"{source}: {dotted} is written in a form pyro does not edit (an inline table "
            "or dotted keys under another table)",
            hint=f"write it as a [{dotted}] table or remove it, then run again; "
            "`pyro host print-config codex` shows the entry",
        )
    return result
