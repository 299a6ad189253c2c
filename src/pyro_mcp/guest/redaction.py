"""Secret values replaced by ``***`` in what comes back from a guest (host side only).

One :class:`Redactor` per workspace holds its secret values (in memory, for the length of
a call) and is the one mechanism every output path goes through:

- :meth:`Redactor.text` / :meth:`Redactor.data` for a whole string or byte string;
- :meth:`Redactor.value` for a JSON-like result (every string in it, keys too);
- :meth:`Redactor.stream` for output that arrives in chunks: a value split across two
  chunks is still found, because the end of a chunk that could be the start of a value
  (at most ``len(longest value) - 1`` bytes) is held back until the next chunk or the end;
- :meth:`Redactor.window` for reads at a cursor (PTY shells), the same rule over reads.

The guest may print anything, so redaction is done here, never trusted to the agent.
It finds the literal value only: a process that holds a secret can always print it
transformed (base64, reversed, one character per line). See docs/security.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MASK = "***"
MASK_BYTES = MASK.encode()


class Redactor:
    """Replaces each of ``values`` (non-empty strings) with ``***``."""

    def __init__(self, values: Iterable[str]) -> None:
        # Longest first: where one value is the start of another, the longer one wins.
        unique = sorted({v for v in values if v}, key=lambda v: (-len(v), v))
        self._texts = tuple(unique)
        self._encoded = tuple(v.encode("utf-8") for v in unique)
        self._text_re = re.compile("|".join(map(re.escape, unique))) if unique else None
        self._data_re = re.compile(b"|".join(map(re.escape, self._encoded))) if unique else None
        self.hold = max((len(v) for v in self._encoded), default=1) - 1

    def __bool__(self) -> bool:
        return bool(self._texts)

    def text(self, text: str) -> str:
        if self._text_re is None:
            return text
        return self._text_re.sub(MASK, text)

    def data(self, data: bytes) -> bytes:
        if self._data_re is None:
            return data
        return self._data_re.sub(MASK_BYTES, data)

    def value(self, value: Any) -> Any:
        """``value`` with every string in it (dict keys included) redacted."""
        if self._text_re is None:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.value(k): self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(item) for item in value]
        return value

    def stream(self) -> StreamRedactor:
        """A redactor for one stream of chunks (feed each, then flush at the end)."""
        return StreamRedactor(self)

    def split(self, data: bytes) -> tuple[bytes, int]:
        """``data`` redacted as far as it is safe to show, and how many bytes at its end
        were held back: the longest tail (after the last value found) that is the start
        of a value, since the next bytes may complete it."""
        if self._data_re is None:
            return data, 0
        matches = list(self._data_re.finditer(data))
        last_end = matches[-1].end() if matches else 0
        held = self._held(data, last_end)
        cut = len(data) - held
        out = bytearray()
        position = 0
        for match in matches:
            out += data[position : match.start()] + MASK_BYTES
            position = match.end()
        out += data[position:cut]
        return bytes(out), held

    def _held(self, data: bytes, start: int) -> int:
        longest = min(self.hold, len(data) - start)
        for size in range(longest, 0, -1):
            tail = data[len(data) - size :]
            if any(value.startswith(tail) for value in self._encoded):
                return size
        return 0

    def window(self, data: bytes, *, lead: int, final: bool) -> Window:
        """A read at a cursor: ``data`` starts ``lead`` bytes before the cursor (bytes
        the reader has seen, read again so a value that starts there is found), and
        ``final``: nothing will follow (the output ended). What to show from the cursor
        on, and how many bytes of ``data`` (from the cursor) it stands for."""
        if self._data_re is None:
            return Window(data[lead:], len(data) - lead)
        matches = list(self._data_re.finditer(data))
        last_end = matches[-1].end() if matches else 0
        held = 0 if final else self._held(data, max(last_end, lead))
        cut = len(data) - held
        out = bytearray()
        position = lead
        for match in matches:
            if match.end() <= lead:
                continue  # shown (as ***) by the read before
            out += data[position : max(position, match.start())] + MASK_BYTES
            position = match.end()
        out += data[position:cut] if position < cut else b""
        return Window(bytes(out), max(cut, position) - lead)


@dataclass(frozen=True)
class Window:
    shown: bytes
    consumed: int  # bytes from the cursor the reader may move past


class StreamRedactor:
    """Chunks in, redacted chunks out, with the start of a possible value carried over."""

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self._carry = b""

    def feed(self, chunk: bytes) -> bytes:
        shown, held = self._redactor.split(self._carry + chunk)
        data = self._carry + chunk
        self._carry = data[len(data) - held :] if held else b""
        return shown

    def flush(self) -> bytes:
        """What was held back, once the stream has ended (it completed no value)."""
        rest, self._carry = self._carry, b""
        return self._redactor.data(rest)


def redact_lines(redactor: Redactor, lines: list[Any]) -> list[Any]:
    """Log lines ``[{stream, text}]`` redacted as the text of each stream, so a value
    that spans lines (a key file) is found too. Such a value becomes one ``***`` line:
    the lines after it move up, and the lines it freed are left empty at the end."""
    if not redactor:
        return lines
    by_stream: dict[str, list[int]] = {}
    for index, line in enumerate(lines):
        if isinstance(line, dict) and isinstance(line.get("text"), str):
            by_stream.setdefault(str(line.get("stream")), []).append(index)
    result = [redactor.value(line) for line in lines]
    for indexes in by_stream.values():
        # Each line ended with a newline (the log was cut at them): a value that ends
        # with one, as a key file does, is found with it.
        joined = "".join(lines[i]["text"] + "\n" for i in indexes)
        redacted = redactor.text(joined)
        if redacted == joined:
            continue
        parts = redacted.removesuffix("\n").split("\n")
        # A value with newlines collapses to one *** line: the lines it spanned go empty.
        parts += [""] * (len(indexes) - len(parts))
        for i, text in zip(indexes, parts, strict=False):
            result[i] = {**result[i], "text": text}
    return result


# Calls whose results the host acts on as file names and metadata, kept as the guest
# sent them (file contents are the workspace's data, not output: see docs/security.md);
# ``shell_read`` is redacted at its cursor (``shell_reads.read_redacted``).
UNREDACTED_RESULTS = frozenset(
    {
        "get_file",
        "put_file",
        "list_dir",
        "tree_manifest",
        "apply_tree",
        "remove_paths",
        "archive_get",
        "archive_put",
        "fs_sync",
        "shell_read",
    }
)
OUTPUT_STREAMS = frozenset({"stdout", "stderr"})


class CallRedaction:
    """What one call to the agent shows its caller: process output streams redacted as
    they arrive (``stdout``/``stderr``: exec, followed service logs), its result (but
    for the calls above) and any error message."""

    def __init__(self, redactor: Redactor, op: str) -> None:
        self._redactor = redactor
        self._op = op
        self._streams: dict[str, StreamRedactor] = {}

    def chunk(self, stream: str, data: bytes) -> bytes:
        if stream not in OUTPUT_STREAMS:
            return data
        return self._streams.setdefault(stream, self._redactor.stream()).feed(data)

    def flush(self) -> list[tuple[str, bytes]]:
        """What each stream held back, now that the call has ended."""
        rest = [(name, stream.flush()) for name, stream in self._streams.items()]
        return [(name, data) for name, data in rest if data]

    def result(self, value: dict[str, Any]) -> dict[str, Any]:
        if self._op in UNREDACTED_RESULTS:
            return value
        lines = value.get("lines")
        redacted = dict(self._redactor.value(value))
        if isinstance(lines, list):
            redacted["lines"] = redact_lines(self._redactor, lines)
        return redacted

    def message(self, text: str) -> str:
        return self._redactor.text(text)
