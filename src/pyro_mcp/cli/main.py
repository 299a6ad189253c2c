"""The ``pyro`` command line, generated from the operation registry.

Each operation's CLI words, flags, help and choices come from its declaration in
:mod:`pyro_mcp.api`. Every command takes ``--json``: one JSON document on stdout (the same
dict the SDK returns), errors as ``{"error": ..., "message": ...}``, and the progress of a
long operation as JSON events on stderr, one per line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from pyro_mcp import __version__
from pyro_mcp.api import Context, Operation, all_operations
from pyro_mcp.api.display import printable, printable_text
from pyro_mcp.api.registry import Param, Surface
from pyro_mcp.cli.render import render_text
from pyro_mcp.errors import InvalidArgument, PyroError


def _flag(param: Param) -> str:
    return "--" + (param.arg.flag or param.name.replace("_", "-"))


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
    parser.add_argument(_flag(param), dest=param.name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro",
        description="Disposable, hardware-isolated Linux machines for coding agents.",
    )
    parser.add_argument("--version", action="version", version=f"pyro-mcp {__version__}")
    groups: dict[tuple[str, ...], argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    groups[()] = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parsers: dict[tuple[str, ...], argparse.ArgumentParser] = {(): parser}
    for op in sorted(all_operations(), key=lambda o: o.cli):
        for depth in range(1, len(op.cli)):
            prefix = op.cli[:depth]
            if prefix not in parsers:
                sub = groups[prefix[:-1]].add_parser(prefix[-1], help=f"{prefix[-1]} commands")
                parsers[prefix] = sub
                groups[prefix] = sub.add_subparsers(metavar="COMMAND", required=True)
        command = groups[op.cli[:-1]].add_parser(
            op.cli[-1],
            help=op.summary,
            description=op.doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for param in op.params_on(Surface.CLI):
            _add_param(command, param)
        command.add_argument("--json", action="store_true", help="print one JSON result")
        command.set_defaults(operation=op)
    _add_mcp_commands(groups[()])
    return parser


def _add_mcp_commands(root: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from pyro_mcp.mcp_profiles import DEFAULT_PROFILE, PROFILES

    mcp = root.add_parser("mcp", help="the MCP server")
    sub = mcp.add_subparsers(metavar="COMMAND", required=True)
    serve = sub.add_parser("serve", help="serve pyro's tools over MCP (stdio by default)")
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
    serve.set_defaults(operation=None, mcp_serve=True)


class _ProgressPrinter:
    """Phase messages of long operations, with elapsed time, on stderr: text lines, or
    with ``--json`` one event per line (``{"event": "progress", "elapsed_s", "message"}``)
    so a program reading stderr can follow the phases."""

    def __init__(self, as_json: bool = False) -> None:
        self.started = time.monotonic()
        self.as_json = as_json

    def __call__(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        if self.as_json:
            event = {"event": "progress", "elapsed_s": round(elapsed, 1), "message": message}
            print(json.dumps(event), file=sys.stderr, flush=True)
        else:
            print(f"[{elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)


def _arguments(op: Operation, namespace: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for param in op.params_on(Surface.CLI):
        value = getattr(namespace, param.name)
        if param.is_list and value == []:
            value = None
        if value is None and not param.optional and not param.required:
            continue  # keep the operation's own default
        values[param.name] = value
    return values


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # Whoever read our output went away (`pyro workspace list --json | head`): stop
        # quietly, as a tool killed by SIGPIPE does. Point stdout at /dev/null so the
        # interpreter's last flush does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE


class Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: unwound like Ctrl-C, so what the command started (a
    one-shot VM) is stopped on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupt_on(*signums: int) -> None:
    def interrupt(signum: int, _frame: object) -> None:
        for each in (signal.SIGINT, *signums):  # the way out itself is not interrupted
            signal.signal(each, signal.SIG_IGN)
        raise Signalled(signum)

    for signum in signums:
        signal.signal(signum, interrupt)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    namespace = parser.parse_args(argv)
    if getattr(namespace, "mcp_serve", False):
        from pyro_mcp.mcp_server import serve

        serve(namespace.profile, namespace.http, namespace.root)
        return 0
    op: Operation = namespace.operation
    as_json: bool = namespace.json
    _interrupt_on(signal.SIGTERM, signal.SIGHUP)
    ctx = Context(progress=_ProgressPrinter(as_json))
    if not as_json:
        ctx.output = _write_live
    try:
        result = printable(op.call(ctx, Surface.CLI, **_arguments(op, namespace)))
    except PyroError as exc:
        if as_json:
            print(json.dumps(printable(exc.to_dict()), indent=2))
        else:
            print(f"pyro: error: {printable_text(exc.message)}", file=sys.stderr)
            if exc.hint:
                print(f"  hint: {printable_text(exc.hint)}", file=sys.stderr)
            tail = getattr(exc, "stderr_tail", "")
            if tail:
                print("  --- output (tail) ---\n" + printable_text(tail), file=sys.stderr)
        return 2 if isinstance(exc, InvalidArgument) else 1
    except KeyboardInterrupt as exc:
        # What the operation ran was stopped on the way out (a one-shot VM discarded).
        signum = exc.signum if isinstance(exc, Signalled) else signal.SIGINT
        print(f"pyro: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        text = render_text(op.name, result)
        if text:
            # A command's own output went to stdout; pyro's notes about it go to stderr.
            exact = isinstance(result, dict) and result.get("content_only")
            end = "" if exact else "\n"  # --content-only prints the file's bytes as they are
            print(text, end=end, file=sys.stderr if op.exit_code_key else sys.stdout)
    if op.exit_code_key is not None and isinstance(result, dict):
        return int(result[op.exit_code_key]) & 0xFF
    return 0


def _write_live(stream: str, data: bytes) -> None:
    """Live command output straight to our own stdout/stderr."""
    target = sys.stderr if stream == "stderr" else sys.stdout
    target.buffer.write(data)
    target.flush()


if __name__ == "__main__":
    raise SystemExit(main())
