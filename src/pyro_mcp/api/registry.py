"""The operation registry: every public operation is declared here once.

An operation is a typed function whose first parameter is the :class:`Context`. Its
signature and docstring are the single source for the SDK method on ``Pyro``, the CLI
command and its help, and the MCP tool and its JSON schema. Parameters carry their help
text with ``Annotated[T, Arg("...")]``.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union, get_args, get_origin

from pyro_mcp.api.context import Context

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Arg:
    """Help text and CLI spelling of one operation parameter."""

    help: str
    positional: bool = False
    choices: tuple[str, ...] | None = None
    metavar: str | None = None


@dataclass(frozen=True)
class Param:
    name: str
    annotation: Any  # the type without Annotated/Optional
    optional: bool  # None is an accepted value
    default: Any  # inspect.Parameter.empty when required
    arg: Arg

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    @property
    def is_list(self) -> bool:
        return get_origin(self.annotation) in (list, tuple)

    @property
    def item_type(self) -> Any:
        return get_args(self.annotation)[0] if self.is_list else self.annotation


@dataclass(frozen=True)
class Operation:
    name: str  # MCP tool name, e.g. "env_list"
    func: Callable[..., Any]
    cli: tuple[str, ...]  # CLI words, e.g. ("env", "list")
    sdk: str  # method name on Pyro
    profiles: frozenset[str]  # MCP profiles exposing it; empty: not an MCP tool
    params: tuple[Param, ...] = field(default=())
    progress: bool = False  # reports progress phases while it runs
    exit_code_key: str | None = None  # the CLI exits with this result field (e.g. run)

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.func) or ""

    @property
    def summary(self) -> str:
        return self.doc.splitlines()[0] if self.doc else self.name

    def call(self, ctx: Context, **kwargs: Any) -> Any:
        return self.func(ctx, **kwargs)


OPERATIONS: dict[str, Operation] = {}


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _params(func: Callable[..., Any]) -> tuple[Param, ...]:
    hints = typing.get_type_hints(func, include_extras=True)
    params = []
    for index, (name, parameter) in enumerate(inspect.signature(func).parameters.items()):
        if index == 0:
            continue  # the Context
        hint = hints[name]
        if get_origin(hint) is not typing.Annotated:
            raise TypeError(f"{func.__name__}.{name}: annotate with Annotated[T, Arg(...)]")
        base, *extras = get_args(hint)
        arg = next((e for e in extras if isinstance(e, Arg)), None)
        if arg is None:
            raise TypeError(f"{func.__name__}.{name}: missing Arg(...) help")
        annotation, optional = _unwrap_optional(base)
        params.append(Param(name, annotation, optional, parameter.default, arg))
    return tuple(params)


def operation(
    *,
    cli: tuple[str, ...],
    sdk: str,
    profiles: tuple[str, ...] = (),
    progress: bool = False,
    exit_code_key: str | None = None,
) -> Callable[[F], F]:
    """Register ``func`` as a public operation named after the function."""

    def register(func: F) -> F:
        name = func.__name__
        if name in OPERATIONS:
            raise ValueError(f"operation {name} registered twice")
        if not inspect.getdoc(func):
            raise TypeError(f"operation {name} needs a docstring")
        OPERATIONS[name] = Operation(
            name=name,
            func=func,
            cli=cli,
            sdk=sdk,
            profiles=frozenset(profiles),
            params=_params(func),
            progress=progress,
            exit_code_key=exit_code_key,
        )
        return func

    return register


def all_operations() -> list[Operation]:
    """Every registered operation (importing the modules that declare them)."""
    import pyro_mcp.api.operations  # noqa: F401  (registers on import)

    return list(OPERATIONS.values())
