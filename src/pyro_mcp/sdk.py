"""The Python SDK: ``from pyro_mcp import Pyro``.

Every method of :class:`Pyro` is generated from an operation in :mod:`pyro_mcp.api`: same
name as declared there, the keyword arguments the operation offers the SDK (the CLI's own
``--id-only``, ``--stdin`` and the like are not among them), same docstring. Every
argument is checked against its declaration: a value of the wrong type or out of its
range is an InvalidArgument naming it, as on the CLI and over MCP. Results are plain
JSON-able dicts, exactly what the CLI prints with ``--json`` and what MCP tools return.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyro_mcp.api import Context, Operation, all_operations
from pyro_mcp.api.context import ProgressFn
from pyro_mcp.api.registry import Surface
from pyro_mcp.runtime.paths import RuntimePaths, runtime_paths


class Pyro:
    """A handle on this host's pyro runtime.

    ``cache_dir`` overrides ``PYRO_CACHE_DIR``; ``progress`` receives phase messages of
    long operations (environment builds, kernel builds).
    """

    def __init__(
        self, *, cache_dir: str | Path | None = None, progress: ProgressFn | None = None
    ) -> None:
        self._paths = RuntimePaths(Path(cache_dir)) if cache_dir else runtime_paths()
        self._progress = progress

    def _context(self) -> Context:
        ctx = Context(paths=self._paths)
        if self._progress is not None:
            ctx.progress = self._progress
        return ctx

    def create_server(
        self, *, profile: str | None = None, roots: list[str | Path] | None = None
    ) -> Any:
        """The MCP server (pyro-mcp 3.x's ``Pyro.create_server``): an ``MCPServer`` of the
        MCP SDK on this handle's runtime cache; ``profile`` and ``roots`` as for
        ``pyro mcp serve`` (default ``workspace-full``, the current directory)."""
        from pyro_mcp.server import create_server

        return create_server(profile, roots=roots, paths=self._paths)

    def __getattr__(self, name: str) -> Any:  # only reached for names not generated
        raise AttributeError(f"Pyro has no operation {name!r}")


# pyro-mcp 3.x's names of methods that are named after their operations here; each is
# the same method under a second name.
COMPAT_METHODS = {
    "status_workspace": "workspace_status",
    "logs_workspace": "workspace_logs",
    "status_service": "service_status",
    "logs_service": "service_logs",
}


def _method(op: Operation) -> Callable[..., Any]:
    def method(self: Pyro, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop("self")
        return op.call(self._context(), Surface.SDK, **arguments)

    hints = typing.get_type_hints(op.func)
    params = [
        inspect.Parameter(
            param.name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=param.default,
            annotation=hints[param.python_name],
        )
        for param in op.params_on(Surface.SDK)
    ]
    signature = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *params]
    )
    method.__name__ = op.sdk
    method.__qualname__ = f"Pyro.{op.sdk}"
    method.__doc__ = op.doc
    method.__signature__ = signature  # type: ignore[attr-defined]
    return method


for _op in all_operations():
    setattr(Pyro, _op.sdk, _method(_op))
for _old, _new in COMPAT_METHODS.items():
    setattr(Pyro, _old, getattr(Pyro, _new))
