"""Results as text a surface can print or serialise.

File names are bytes on Linux; pyro carries them as Python strings decoded with
``surrogateescape`` (lossless: the SDK returns them as they are). JSON and terminals need
real text, so the CLI and the MCP server pass results through :func:`printable`: each byte
that is not UTF-8 is shown as ``\\xNN``.
"""

from __future__ import annotations

from typing import Any


def printable(value: Any) -> Any:
    """``value`` with every string made printable (dicts, lists and tuples walked)."""
    if isinstance(value, str):
        return printable_text(value)
    if isinstance(value, dict):
        return {printable_text(str(k)): printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [printable(item) for item in value]
    return value


def printable_text(text: str) -> str:
    """``text`` unchanged when it is real text, else with its undecodable bytes (the
    surrogates of ``surrogateescape``, or any lone surrogate) written as ``\\xNN``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogateescape" if _escapes_only(text) else "replace")
        return raw.decode("utf-8", "backslashreplace")
    return text


def _escapes_only(text: str) -> bool:
    return all(not 0xD800 <= ord(ch) <= 0xDFFF or 0xDC80 <= ord(ch) <= 0xDCFF for ch in text)
