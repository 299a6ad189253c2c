"""The Python SDK: ``from pyro_mcp import Pyro, AsyncPyro``.

Every method of :class:`Pyro` is generated from an operation in :mod:`pyro_mcp.api`: same
name as declared there, the keyword arguments the operation offers the SDK (the CLI's own
``--id-only``, ``--stdin`` and the like are not among them), same docstring. Every
argument is checked against its declaration: a value of the wrong type or out of its
range is an InvalidArgument naming it, as on the CLI and over MCP. Results are plain
JSON-able dicts, exactly what the CLI prints with ``--json`` and what MCP tools return;
each is typed by its TypedDict in :mod:`pyro_mcp.api.results`.

:class:`AsyncPyro` has the same methods as coroutines: each runs the operation in a
worker thread (through anyio). Cancelling the awaiting task stops what the operation
runs (the guest command, a one-shot VM) before the cancellation goes on.

Type checkers see the methods through ``pyro_mcp/_sdk_methods.pyi``, generated from the
same registry (:mod:`pyro_mcp.api.stubs`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyro_mcp.api import Context, Operation, all_operations
from pyro_mcp.api.cancellable import run_cancellable
from pyro_mcp.api.context import ProgressFn
from pyro_mcp.api.registry import Surface
from pyro_mcp.api.stubs import SDK_ALIASES, sdk_signature
from pyro_mcp.runtime.paths import RuntimePaths, runtime_paths

if TYPE_CHECKING:  # the methods, as generated (a stub: nothing of it exists at run time)
    from pyro_mcp._sdk_methods import AsyncPyro as AsyncPyroMethods
    from pyro_mcp._sdk_methods import Pyro as PyroMethods
else:
    PyroMethods = AsyncPyroMethods = object


class _Client:
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

    if not TYPE_CHECKING:  # a type checker knows every method: a wrong name is its error

        def __getattr__(self, name: str) -> Any:  # only reached for names not generated
            raise AttributeError(f"{type(self).__name__} has no operation {name!r}")


class Pyro(_Client, PyroMethods):
    """A handle on this host's pyro runtime.

    ``cache_dir`` overrides ``PYRO_CACHE_DIR``; ``progress`` receives phase messages of
    long operations (environment builds, kernel builds).
    """

    def create_server(
        self, *, profile: str | None = None, roots: list[str | Path] | None = None
    ) -> Any:
        """The MCP server (pyro-mcp 3.x's ``Pyro.create_server``): an ``MCPServer`` of the
        MCP SDK on this handle's runtime cache; ``profile`` and ``roots`` as for
        ``pyro mcp serve`` (default ``workspace-full``, the current directory)."""
        from pyro_mcp.server import create_server

        return create_server(profile, roots=roots, paths=self._paths)


class AsyncPyro(_Client, AsyncPyroMethods):
    """A handle on this host's pyro runtime whose methods are coroutines.

    ``cache_dir`` overrides ``PYRO_CACHE_DIR``; ``progress`` receives phase messages of
    long operations, called from the worker thread the operation runs in. Cancelling a
    call (``task.cancel()``, a timeout) stops the guest command or VM it runs, then
    raises the cancellation in the caller.
    """


def _bind(signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The arguments of one call by name (TypeError, as Python gives, for a bad call)."""
    arguments = dict(signature.bind(None, *args, **kwargs).arguments)
    arguments.pop("self")
    return arguments


def _sync_method(op: Operation) -> Callable[..., Any]:
    signature = sdk_signature(op)

    def method(self: Pyro, *args: Any, **kwargs: Any) -> Any:
        return op.call(self._context(), Surface.SDK, **_bind(signature, args, kwargs))

    return _named(method, op, Pyro, signature)


def _async_method(op: Operation) -> Callable[..., Any]:
    signature = sdk_signature(op)

    async def method(self: AsyncPyro, *args: Any, **kwargs: Any) -> Any:
        arguments = _bind(signature, args, kwargs)  # a bad call fails here, in no thread
        ctx = self._context()
        return await run_cancellable(lambda: op.call(ctx, Surface.SDK, **arguments), ctx)

    return _named(method, op, AsyncPyro, signature)


def _named(
    method: Callable[..., Any], op: Operation, owner: type, signature: inspect.Signature
) -> Callable[..., Any]:
    method.__name__ = op.sdk
    method.__qualname__ = f"{owner.__name__}.{op.sdk}"
    method.__doc__ = op.doc
    method.__signature__ = signature  # type: ignore[attr-defined]
    return method


for _op in all_operations():
    setattr(Pyro, _op.sdk, _sync_method(_op))
    setattr(AsyncPyro, _op.sdk, _async_method(_op))
COMPAT_METHODS = SDK_ALIASES
for _old, _new in COMPAT_METHODS.items():
    setattr(Pyro, _old, getattr(Pyro, _new))
    setattr(AsyncPyro, _old, getattr(AsyncPyro, _new))
