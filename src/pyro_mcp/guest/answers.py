"""What the guest agent answers, read as what it is: the word of a guest that may be hostile.

:class:`Answer` reads a call's result field by field, each checked for its type and range;
:class:`ExecResult` is how a command ended, as read from an ``exec`` answer;
:func:`manifest_line` reads one line of a manifest stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pyro_mcp.errors import ProtocolViolation


@dataclass
class ExecResult:
    """How a command in the guest ended."""

    exit_code: int
    """The command's exit status; 128+N when killed by signal N; 127: program not found."""
    stdout: bytes
    """Captured standard output (at most ``output_cap`` bytes)."""
    stderr: bytes
    """Captured standard error (at most ``output_cap`` bytes)."""
    timed_out: bool = False
    """True when the command ran past its timeout and was killed."""
    signal: str | None = None
    """Name of the signal that ended the command, if any."""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration_ms: float = 0.0
    """Time the command ran in the guest, in milliseconds."""
    stdout_bytes: int = 0
    """All the standard output the command produced, kept or not (bytes)."""
    stderr_bytes: int = 0
    """All the standard error the command produced, kept or not (bytes)."""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The outcome as every surface reports it (output decoded as UTF-8)."""
        return {
            "exit_code": self.exit_code,
            "stdout": self.stdout.decode("utf-8", "replace"),
            "stderr": self.stderr.decode("utf-8", "replace"),
            "timed_out": self.timed_out,
            "signal": self.signal,
            "stdout_truncated": self.stdout_truncated,
            "stderr_truncated": self.stderr_truncated,
            "duration_ms": self.duration_ms,
        }


class Answer:
    """The result value of a call, read field by field as what it is: the agent's word.

    A field of the wrong type or out of its range is a ProtocolViolation naming the
    operation, the field and the value, never a crash further on (an ``exit_code`` of
    ``"x"``, an infinite duration). Absent optional fields take their default.
    """

    def __init__(self, op: str, value: dict[str, Any]) -> None:
        self.op = op
        self.value = value

    def _bad(self, name: str, wanted: str) -> ProtocolViolation:
        shown = repr(self.value.get(name))[:60]
        return ProtocolViolation(
            f"{self.op}: the guest agent answered {name}={shown}, not {wanted}"
        )

    def integer(self, name: str, low: int, high: int, default: int | None = None) -> int:
        item = self.value.get(name, default)
        if type(item) is not int or not low <= item <= high:  # bool is not an int here
            raise self._bad(name, f"an integer from {low} to {high}")
        return item

    def number(self, name: str, default: float) -> float:
        item = self.value.get(name, default)
        if isinstance(item, bool) or not isinstance(item, int | float) or not 0 <= item < 1e15:
            raise self._bad(name, "a finite number >= 0")
        return float(item)

    def flag(self, name: str) -> bool:
        item = self.value.get(name, False)
        if not isinstance(item, bool):
            raise self._bad(name, "true or false")
        return item

    def text(self, name: str) -> str | None:
        item = self.value.get(name)
        if item is not None and (not isinstance(item, str) or len(item) > 64):
            raise self._bad(name, "a short string or null")
        return item

    def names(self, name: str, most: int) -> list[str]:
        """A list of at most ``most`` file names (absent: empty)."""
        item = self.value.get(name, [])
        if (
            not isinstance(item, list)
            or len(item) > most
            or not all(isinstance(n, str) and 0 < len(n) <= 4096 for n in item)
        ):
            raise self._bad(name, f"a list of at most {most} names")
        return item


def manifest_line(line: bytes) -> dict[str, Any]:
    """One line of a manifest stream: a JSON object, or a ProtocolViolation."""
    try:
        item = json.loads(line)
    except ValueError as exc:
        raise ProtocolViolation(f"the guest sent a manifest line that is not JSON: {exc}") from exc
    if not isinstance(item, dict):
        raise ProtocolViolation("the guest sent a manifest line that is not an object")
    return item
