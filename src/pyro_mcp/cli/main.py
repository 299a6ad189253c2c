"""The ``pyro`` command line, generated from the operation registry.

Each operation's CLI words, flags, help and choices come from its declaration in
:mod:`pyro_mcp.api`. Every command takes ``--json``: one JSON document on stdout (the same
dict the SDK returns), errors as ``{"error": ..., "message": ...}``, and the progress of a
long operation as JSON events on stderr, one per line.

A command line builds the parser of the one command it names, importing only that
operation's module: :mod:`pyro_mcp.cli.index` (generated from the registry, checked by a
test) says which module declares each command and lists every command's one-line help for
``pyro --help`` and the groups' help (``pyro workspace --help``).
"""

from __future__ import annotations

import os
import sys

from pyro_mcp import __version__
from pyro_mcp.errors import InvalidArgument, PyroError

TYPE_CHECKING = False  # typing itself is not imported: `pyro --version` needs none of it
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from typing import Any

    from pyro_mcp.api.registry import Operation


class _ProgressPrinter:
    """Phase messages of long operations, with elapsed time, on stderr: text lines, or
    with ``--json`` one event per line (``{"event": "progress", "elapsed_s", "message"}``)
    so a program reading stderr can follow the phases."""

    def __init__(self, as_json: bool = False) -> None:
        import time

        self.started = time.monotonic()
        self.as_json = as_json

    def __call__(self, message: str) -> None:
        import json
        import time

        elapsed = time.monotonic() - self.started
        if self.as_json:
            event = {"event": "progress", "elapsed_s": round(elapsed, 1), "message": message}
            print(json.dumps(event), file=sys.stderr, flush=True)
        else:
            print(f"[{elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)


def _arguments(op: Operation, namespace: argparse.Namespace) -> dict[str, Any]:
    from pyro_mcp.api.registry import Surface

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
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["--version"]:  # what argparse would print, without building a parser
        print(f"pyro-mcp {__version__}")
        return 0
    try:
        return _main(args)
    except BrokenPipeError:
        import signal

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
    import signal

    def interrupt(signum: int, _frame: object) -> None:
        for each in (signal.SIGINT, *signums):  # the way out itself is not interrupted
            signal.signal(each, signal.SIG_IGN)
        raise Signalled(signum)

    for signum in signums:
        signal.signal(signum, interrupt)


def _main(argv: list[str]) -> int:
    import json
    import signal

    from pyro_mcp.cli.parser import parse_command_line

    cluster, argv = _cluster_option(argv)
    namespace = parse_command_line(argv)
    if getattr(namespace, "mcp_serve", False):
        from pyro_mcp.mcp_server import serve

        serve(namespace.profile, namespace.http, namespace.root, namespace.cluster or cluster)
        return 0
    if getattr(namespace, "serve_http", False):
        from pathlib import Path

        from pyro_mcp.serve.app import serve as serve_http

        def given(value: str | None) -> Path | None:
            return None if value is None else Path(value)

        serve_http(
            namespace.listen,
            profile=namespace.profile,
            roots=namespace.root,
            token_file=given(namespace.token_file),
            insecure=namespace.insecure,
            tls_cert=given(namespace.tls_cert),
            tls_key=given(namespace.tls_key),
        )
        return 0
    from pyro_mcp.api.context import Context
    from pyro_mcp.api.display import printable, printable_text
    from pyro_mcp.api.registry import Surface

    op: Operation = namespace.operation
    as_json: bool = namespace.json
    _interrupt_on(signal.SIGTERM, signal.SIGHUP)
    ctx = Context(progress=_ProgressPrinter(as_json))
    if not as_json:
        ctx.output = _write_live
    try:
        if cluster:
            from pyro_mcp.cluster import connect

            ctx.remote = connect(cluster).dispatch
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
    elif isinstance(result, dict) and result.get("content_only"):
        from pyro_mcp.workspace.content import content_bytes

        sys.stdout.buffer.write(content_bytes(result))  # the file's bytes, as `cat` prints
        sys.stdout.flush()
    else:
        from pyro_mcp.cli.render import render_text

        text = render_text(op.name, result)
        if text:
            # A command's own output went to stdout; pyro's notes about it go to stderr.
            print(text, file=sys.stderr if op.exit_code_key else sys.stdout)
    if op.exit_code_key is not None and isinstance(result, dict):
        return int(result[op.exit_code_key]) & 0xFF
    return 0


def _cluster_option(argv: list[str]) -> tuple[str | None, list[str]]:
    """The cluster a command runs on (``--cluster ADDRESS`` before the command, else
    ``$PYRO_CLUSTER``; None: this host), and the command line without that option."""
    import os

    if argv[:1] == ["--cluster"] and len(argv) > 1:
        return argv[1], argv[2:]
    if argv[:1] and argv[0].startswith("--cluster="):
        return argv[0].removeprefix("--cluster="), argv[1:]
    return os.environ.get("PYRO_CLUSTER") or None, argv


def _write_live(stream: str, data: bytes) -> None:
    """Live command output straight to our own stdout/stderr."""
    target = sys.stderr if stream == "stderr" else sys.stdout
    target.buffer.write(data)
    target.flush()


if __name__ == "__main__":
    raise SystemExit(main())
