"""Write :mod:`pyro_mcp.cli.index` from the operation registry: ``make cli-index``.

The CLI reads the index to find the one module a command line needs, so that module is all
it imports; a unit test fails when the index no longer says what the registry does.
"""

from __future__ import annotations

import sys
from pathlib import Path

HEADER = '''"""Which module declares each CLI command, and its one-line help.

Generated from the operation registry by ``make cli-index`` (``python -m
pyro_mcp.cli.make_index``): do not edit. A unit test fails when it is stale.
"""

# (CLI words, the module that declares the operation, the operation, its one-line help)
COMMANDS: tuple[tuple[tuple[str, ...], str, str, str], ...] = ('''
LINE_LENGTH = 100  # ruff's, in pyproject.toml


def entries() -> list[tuple[tuple[str, ...], str, str, str]]:
    """The index as the registry has it: one entry per operation, in CLI-word order."""
    from pyro_mcp.api.registry import all_operations

    ops = sorted(all_operations(), key=lambda op: op.cli)
    return [(op.cli, op.func.__module__, op.name, op.summary) for op in ops]


def source() -> str:
    """The text of ``index.py`` (as ``ruff format`` leaves it)."""
    lines = [HEADER]
    for words, module, name, summary in entries():
        quoted = ", ".join(_quote(word) for word in words) + ("," if len(words) == 1 else "")
        help_line = f"        {_quote(summary)},"
        if len(help_line) > LINE_LENGTH:  # a docstring's first line may be a long one
            help_line += "  # noqa: E501"
        lines += ["    (", f"        ({quoted}),", f"        {_quote(module)},"]
        lines += [f"        {_quote(name)},", help_line, "    ),"]
    return "\n".join([*lines, ")", ""])


def _quote(text: str) -> str:
    """``text`` as a double-quoted Python literal (ruff's preferred quotes)."""
    body = repr(text)
    if body.startswith("'") and '"' not in text:
        body = '"' + body[1:-1].replace("\\'", "'") + '"'
    return body


def main() -> int:
    path = Path(__file__).with_name("index.py")
    path.write_text(source())
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
