"""The ``pyro`` command tree and its parser, generated from the operation registry.

Each operation's CLI words, flags, help and choices come from its declaration in
:mod:`pyro_mcp.api`. A command line builds the parser of the one command it names, and so
imports only that operation's module: :mod:`pyro_mcp.cli.index` (generated from the
registry, checked by a test) says which module declares each command and holds every
command's one-line help, for the listings of ``pyro --help`` and ``pyro workspace --help``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from pyro_mcp import __version__
from pyro_mcp.cli.index import COMMANDS

if TYPE_CHECKING:
    from pyro_mcp.api.registry import Operation, Param

DESCRIPTION = "Disposable, hardware-isolated Linux machines for coding agents."
# A group's line in its parent's listing, where it is not "<word> commands".
GROUP_HELP: dict[tuple[str, ...], str] = {("mcp",): "the MCP server"}


def _terminal_columns() -> int:
    """The width help is wrapped to: $COLUMNS, else the terminal's, else 80 (what
    ``shutil.get_terminal_size`` answers, without importing shutil and the compression
    modules it brings)."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        stdout = sys.__stdout__
        try:
            columns = 0 if stdout is None else os.get_terminal_size(stdout.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class Formatter(argparse.HelpFormatter):
    """argparse's help formatter, its width from :func:`_terminal_columns` (argparse
    makes one for each parser and argument, and would import shutil for the width)."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        width = _terminal_columns() - 2 if width is None else width
        super().__init__(prog, indent_increment, max_help_position, width)


class RawDescriptionFormatter(Formatter, argparse.RawDescriptionHelpFormatter):
    """:class:`Formatter` keeping a description's own line breaks (an operation's doc)."""


class _Unbuilt(Exception):
    """The command line chose a command whose parser was left out."""


class Choices(argparse._SubParsersAction):  # type: ignore[type-arg]
    """The COMMAND choice of a parser or group. Choosing a command that is there only to
    be listed (``unbuilt``: a parser built for another command) raises :class:`_Unbuilt`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unbuilt: set[str] = set()

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs.setdefault("formatter_class", Formatter)
        parser: argparse.ArgumentParser = super().add_parser(name, **kwargs)
        return parser

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if values and values[0] in self.unbuilt:
            raise _Unbuilt(values[0])
        super().__call__(parser, namespace, values, option_string)

    def listed(self, word: str, help_text: str) -> None:
        """``word`` among the choices with its help, its parser not built."""
        self.add_parser(word, help=help_text, add_help=False)
        self.unbuilt.add(word)


class Command:
    """One command of the tree: its words, its one-line help, and how its parser is built
    (``build(choices, word)`` adds it, in full, under ``word``)."""

    def __init__(
        self, words: tuple[str, ...], summary: str, build: Callable[[Choices, str], None]
    ) -> None:
        self.words = words
        self.summary = summary
        self.build = build


def _help(param: Param) -> str:
    """The parameter's help with its default, as the operation applies it (the CLI's
    own default is None: an option not given keeps the operation's)."""
    default = param.default
    if param.required or default is None or isinstance(default, bool) or default == []:
        return param.arg.help
    return f"{param.arg.help} (default: {default})"


def _add_param(parser: argparse.ArgumentParser, param: Param) -> None:
    kwargs: dict[str, Any] = {"help": _help(param)}
    if param.arg.choices:
        kwargs["choices"] = param.arg.choices
    if param.arg.metavar:
        kwargs["metavar"] = param.arg.metavar
    item = str if param.arg.octal else param.item_type  # octal: "644" is read as 0o644
    if param.arg.positional:
        if param.is_list:
            kwargs["nargs"] = "*" if not param.required else "+"
        elif not param.required:
            kwargs["nargs"] = "?"
        kwargs["type"] = item
        parser.add_argument(param.name, **kwargs)
        return
    if param.annotation is bool:
        # a flag turns a default on (--recursive) or, for a default of true, off
        # (--no-newline: declare the flag word as no-...)
        kwargs["action"] = "store_false" if param.default is True else "store_true"
    elif param.is_list:
        kwargs["action"] = "append"
        kwargs["type"] = item
    else:
        kwargs["type"] = item
        kwargs["required"] = param.required
    short = [f"-{param.arg.short}"] if param.arg.short else []
    parser.add_argument(*short, param.cli_flag, dest=param.name, **kwargs)


def _add_operation(choices: Choices, word: str, op: Operation) -> None:
    from pyro_mcp.api.registry import Surface

    command = choices.add_parser(
        word,
        help=op.summary,
        description=op.doc,
        formatter_class=RawDescriptionFormatter,
    )
    for param in op.params_on(Surface.CLI):
        _add_param(command, param)
    command.add_argument("--json", action="store_true", help="print one JSON result")
    command.set_defaults(operation=op)


def _add_mcp_serve(choices: Choices, word: str) -> None:
    from pyro_mcp.mcp_profiles import DEFAULT_PROFILE, PROFILES

    serve = choices.add_parser(word, help=MCP_SERVE.summary)
    serve.add_argument(
        "--profile", choices=PROFILES, default=DEFAULT_PROFILE, help="which tools to expose"
    )
    serve.add_argument(
        "--http", metavar="HOST:PORT", help="serve streamable HTTP at HOST:PORT instead of stdio"
    )
    serve.add_argument(
        "--root",
        action="append",
        metavar="DIR",
        help="host directory MCP clients may name for seeds, sync and export "
        "(repeatable; default: the current directory)",
    )
    serve.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="run every tool call on the pyro nodes of the Ray cluster at ADDRESS "
        "(default: $PYRO_CLUSTER, or this host alone)",
    )
    serve.set_defaults(operation=None, mcp_serve=True)


MCP_SERVE = Command(
    ("mcp", "serve"), "serve pyro's tools over MCP (stdio by default)", _add_mcp_serve
)


def _add_serve(choices: Choices, word: str) -> None:
    from pyro_mcp.mcp_profiles import DEFAULT_PROFILE, PROFILES

    serve = choices.add_parser(
        word,
        help=SERVE.summary,
        description="Serve the REST API (/api/v1, its OpenAPI document at "
        "/api/v1/openapi.json), MCP (/mcp) and the dashboard (/) from one process. Every "
        "route needs the token: generated on the first start (kept mode 0600 in the state "
        "directory, shown once) or read from --token-file.",
    )
    serve.add_argument(
        "--listen",
        default="127.0.0.1:8765",
        metavar="HOST:PORT",
        help="where to listen; an address that is not loopback needs TLS or --insecure "
        "(default: 127.0.0.1:8765)",
    )
    serve.add_argument(
        "--profile",
        choices=PROFILES,
        default=DEFAULT_PROFILE,
        help=f"which operations to serve (default: {DEFAULT_PROFILE})",
    )
    serve.add_argument(
        "--root",
        action="append",
        metavar="DIR",
        help="host directory clients may name for seeds, sync and export "
        "(repeatable; default: the current directory)",
    )
    serve.add_argument("--token-file", metavar="FILE", help="read the token from FILE (mode 0600)")
    serve.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate")
    serve.add_argument("--tls-key", metavar="FILE", help="and this private key")
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback address without TLS (the token then crosses in the clear)",
    )
    serve.set_defaults(operation=None, serve_http=True)


SERVE = Command(("serve",), "serve REST, MCP and the dashboard over HTTP, with a token", _add_serve)


def _operation_command(op: Operation) -> Command:
    return Command(op.cli, op.summary, lambda choices, word: _add_operation(choices, word, op))


def _indexed_command(words: tuple[str, ...], module: str, name: str, summary: str) -> Command:
    """A command of the index: its module is imported only when its parser is built."""

    def build(choices: Choices, word: str) -> None:
        from pyro_mcp.api.registry import OPERATIONS

        importlib.import_module(module)  # registers its operations
        _add_operation(choices, word, OPERATIONS[name])

    return Command(words, summary, build)


def registry_commands() -> list[Command]:
    """Every command, from the registry (importing every operation module)."""
    from pyro_mcp.api.registry import all_operations

    ops = sorted(all_operations(), key=lambda o: o.cli)
    return [*(_operation_command(op) for op in ops), MCP_SERVE, SERVE]


def indexed_commands() -> list[Command]:
    """Every command, from :mod:`pyro_mcp.cli.index` (importing nothing more yet)."""
    return [*(_indexed_command(*entry) for entry in COMMANDS), MCP_SERVE, SERVE]


def command_path(commands: Sequence[Command], argv: Sequence[str]) -> tuple[str, ...]:
    """The words of the command (or group) ``pyro ARGV`` names: the leading words of
    ``argv`` (up to its first option) that are commands or groups of the tree."""
    leaves = {c.words for c in commands}
    groups = _groups(commands)
    path: tuple[str, ...] = ()
    for word in argv:
        if word.startswith("-") or (*path, word) not in leaves | groups:
            break
        path = (*path, word)
        if path in leaves and path not in groups:
            break  # what follows are the command's own arguments
    return path


def _groups(commands: Sequence[Command]) -> set[tuple[str, ...]]:
    """The words of every group (a command may be one too: ``demo`` and ``demo ollama``)."""
    return {c.words[:depth] for c in commands for depth in range(1, len(c.words))}


def build_parser(
    commands: Sequence[Command] | None = None, path: tuple[str, ...] | None = None
) -> argparse.ArgumentParser:
    """The ``pyro`` parser of ``commands`` (default: every operation in the registry).

    ``path`` None builds every command. Otherwise only the command (or the group) those
    words name is built in full. Along the way to a group, every other command and group
    is only listed with its one-line help (choosing one raises :class:`_Unbuilt`); on the
    way to a command nothing else is needed (the words have chosen, and only its own
    parser can help or err), so nothing else is there.
    """
    commands = registry_commands() if commands is None else commands
    parser = argparse.ArgumentParser(
        prog="pyro", description=DESCRIPTION, formatter_class=Formatter
    )
    parser.add_argument("--version", action="version", version=f"pyro-mcp {__version__}")
    parser.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="run the command on the pyro nodes of the Ray cluster at ADDRESS, given before "
        "the command (default: $PYRO_CLUSTER, or this host alone)",
    )
    groups: dict[tuple[str, ...], Choices] = {(): _choices(parser, dest="command")}
    leaves = {command.words for command in commands}
    to_command = path in leaves and path not in _groups(commands)
    for command in sorted(commands, key=lambda c: c.words):  # a command before its group
        words = command.words
        for depth in range(1, len(words) + 1):
            prefix, word, parent = words[:depth], words[depth - 1], groups[words[: depth - 1]]
            leaf = depth == len(words)
            if path is not None and prefix != path[:depth]:
                if word not in parent.choices and not to_command:
                    parent.listed(word, command.summary if leaf else _group_help(prefix))
                break
            if leaf:
                command.build(parent, word)
            elif prefix not in groups:
                if word in parent.choices:  # a command that is a group too: its own below it
                    groups[prefix] = _choices(parent.choices[word], required=False)
                else:
                    groups[prefix] = _choices(parent.add_parser(word, help=_group_help(prefix)))
    return parser


def _choices(parser: argparse.ArgumentParser, *, required: bool = True, **kwargs: Any) -> Choices:
    metavar = "COMMAND" if required else "[COMMAND]"  # a command that is a group too
    action = parser.add_subparsers(action=Choices, metavar=metavar, required=required, **kwargs)
    return cast(Choices, action)


def _group_help(prefix: tuple[str, ...]) -> str:
    """A group's line in its parent's listing."""
    return GROUP_HELP.get(prefix, f"{prefix[-1]} commands")


def parse_command_line(argv: Sequence[str]) -> argparse.Namespace:
    """``argv`` parsed by a parser built only for the command it names (so one command
    costs the import of its own operation module); any other command line by them all."""
    commands = indexed_commands()
    try:
        return build_parser(commands, command_path(commands, argv)).parse_args(argv)
    except _Unbuilt:
        return build_parser(commands).parse_args(argv)
