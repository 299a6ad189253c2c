"""Reading a PTY shell's output at a cursor with the workspace's secrets shown as ``***``.

A shell read is a window ``[cursor, next_cursor)`` of the shell's output, and a value may
straddle two windows. So the read asks the agent for up to ``hold`` bytes before the
cursor too (bytes the reader has seen: a value that starts there is found and its rest
shown as ``***``), and gives back a ``next_cursor`` short of an end that could be the
start of a value (the next read begins there), unless the shell has ended. The agent is
asked for the raw output; ``plain`` is applied here, after redaction, and redaction runs
once more on the plain text (a value cut by control sequences is found there too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyro_mcp.guest.client import AgentClient
    from pyro_mcp.guest.redaction import Redactor


def read_redacted(
    client: AgentClient,
    redactor: Redactor,
    args: dict[str, Any],
    *,
    timeout_s: float,
) -> dict[str, Any]:
    """``shell_read`` with ``args`` as the agent takes them, redacted."""
    from pyro_mcp.guest_agent.ops_shells import READ_MAX, strip_controls

    cursor = int(args.get("cursor", 0))
    lead = min(cursor, redactor.hold)
    wanted = dict(args, plain=False, cursor=cursor - lead)
    wanted["max_chars"] = min(READ_MAX, int(args.get("max_chars", 65536)) + lead)
    value, _ = client.call("shell_read", wanted, timeout_s=timeout_s)
    start = value.get("cursor")
    stop = value.get("next_cursor")
    if not isinstance(start, int) or not isinstance(stop, int) or not start <= stop:
        return {**redactor.value(value), "output": ""}  # malformed: show nothing of it
    data = str(value.get("output", "")).encode("utf-8")
    if len(data) != stop - start:
        # Bytes that are not UTF-8 were replaced: offsets no longer line up with the
        # text. Read again from the cursor itself (no bytes before it to look at).
        lead = 0
        again = dict(wanted, cursor=cursor, max_chars=args.get("max_chars", 65536))
        value, _ = client.call("shell_read", again, timeout_s=timeout_s)
        start, stop = int(value.get("cursor", cursor)), int(value.get("next_cursor", cursor))
        data = str(value.get("output", "")).encode("utf-8")
    lead = max(0, min(cursor - start, lead, len(data)))
    end = value.get("end")
    final = not value.get("alive", True) and end == stop
    window = redactor.window(data, lead=lead, final=final)
    text = window.shown.decode("utf-8", "replace")
    if args.get("plain"):
        text = redactor.text(strip_controls(text))
    next_cursor = start + lead + window.consumed
    result = dict(redactor.value(value))
    result.update(
        output=text,
        cursor=start + lead,
        next_cursor=next_cursor,
        truncated=start > cursor,  # output before the cursor asked for was dropped
        # Held-back bytes are not "more": they show once what follows them comes.
        more=bool(value.get("more")),
    )
    return result
