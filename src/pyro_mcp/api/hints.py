"""The ``pyro`` commands an error names, as an MCP client calls them instead.

Errors are written for the CLI: a hint says "run `pyro workspace start ab12`". An MCP
client cannot run a command; it calls a tool. :func:`for_mcp` rewrites each command in
backticks into the tool that does the same (the registry maps ``op.cli`` to ``op.name``)
with its arguments as a JSON object, and flags (`--network-policy egress`) into the
arguments of the operation being called. A command whose tool the served profile lacks
keeps its text, said to be run on the host (and which profile has its tool, if one
does). The CLI's text is never changed: only the MCP server calls this.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Sequence
from typing import Any

from pyro_mcp.api.registry import Operation, Param, Surface, all_operations

_CODE = re.compile(r"(?P<verb>\brun )?`(?P<code>[^`]+)`")
_BARE_COMMAND = re.compile(r"^pyro [a-z]")  # a hint that is a command alone, unquoted


def for_mcp(text: str, profile: str, calling: Operation | None = None) -> str:
    """``text`` with every ``pyro`` command and flag run it names told as MCP tool calls
    in ``profile`` (flags are read as arguments of ``calling``, the tool that failed)."""
    if _BARE_COMMAND.match(text) and "`" not in text:
        text = f"`{text}`"
    commands = {op.cli: op for op in all_operations()}

    def rewrite(match: re.Match[str]) -> str:
        verb, code = match.group("verb") or "", match.group("code")
        words = _split(code)
        if words and words[0] == "pyro":
            told = _command(words[1:], commands, profile)
        elif words and words[0].startswith("--") and calling is not None:
            arguments = _arguments(calling, words, profile)
            told = None if arguments is None else f"`{_json(arguments)}`"
        else:
            told = None
        if told is None:
            return match.group(0)
        if told.startswith("`"):  # a tool to call: "call `workspace_start` (arguments: ...)"
            return ("call " if verb else "") + told
        return f"{verb}`{code}`{told}"  # the command stays, with where it can be done

    return _CODE.sub(rewrite, text)


def _command(
    words: Sequence[str], commands: dict[tuple[str, ...], Operation], profile: str
) -> str | None:
    """The tool call for ``pyro WORDS``; or, when ``profile`` lacks its tool, the note to
    put after the command; None for words that are no pyro command."""
    for length in range(len(words), 0, -1):
        op = commands.get(tuple(words[:length]))
        if op is not None:
            break
    else:
        return None
    if profile not in op.profiles:
        if op.profiles:
            elsewhere = ", ".join(sorted(op.profiles))
            return f" on the host, or `{op.name}` in MCP profile {elsewhere}"
        return " on the host"
    arguments = _arguments(op, words[length:], profile)
    if not arguments:  # none given, or words the tool cannot take: name the tool alone
        return f"`{op.name}`"
    return f"`{op.name}` (arguments: `{_json(arguments)}`)"


def _arguments(op: Operation, words: Sequence[str], profile: str) -> dict[str, Any] | None:
    """CLI words (positionals, then ``--flag [value]``) as ``op``'s MCP arguments; None
    if a word is not one its tool in ``profile`` takes."""
    offered = {param.name: param for param in op.mcp_params(profile)}
    positionals = [p for p in op.params_on(Surface.CLI) if p.arg.positional]
    flags = {p.cli_flag: p for p in op.params_on(Surface.CLI)}
    arguments: dict[str, Any] = {}
    queue = list(words)
    while queue:
        word = queue.pop(0)
        if word.startswith("--"):
            param = flags.get(word)
            if param is None or param.name not in offered:
                return None
            if param.annotation is bool:
                arguments[param.name] = True
                continue
            if not queue:
                return None
            word = queue.pop(0)
        else:
            if not positionals:
                return None
            param = positionals[0]
            if not param.is_list:  # a list positional takes every word left
                positionals.pop(0)
            if param.name not in offered:
                return None
        value = _value(param, word)
        if param.is_list:
            arguments.setdefault(param.name, []).append(value)
        else:
            arguments[param.name] = value
    return arguments


def _value(param: Param, word: str) -> Any:
    if param.item_type in (int, float):
        try:
            return param.item_type(word)
        except ValueError:
            return word
    return word


def _split(code: str) -> list[str]:
    try:
        return shlex.split(code)
    except ValueError:  # an unbalanced quote: not a command to rewrite
        return []


def _json(arguments: dict[str, Any]) -> str:
    return json.dumps(arguments, ensure_ascii=False)
