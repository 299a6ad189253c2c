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

    def __getattr__(self, name: str) -> Any:  # only reached for names not generated
        raise AttributeError(f"Pyro has no operation {name!r}")


def _method(op: Operation) -> Callable[..., Any]:
    def method(self: Pyro, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop("self")
        return op.call(self._context(), Surface.SDK, **arguments)

    offered = {param.name for param in op.params_on(Surface.SDK)}
    params = [
        param
        for param in list(inspect.signature(op.func).parameters.values())[1:]
        if param.name in offered
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
