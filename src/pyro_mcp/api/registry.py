"""The operation registry: every public operation is declared here once.

An operation is a typed function whose first parameter is the :class:`Context`. Its
signature and docstring are the single source for the SDK method on ``Pyro``, the CLI
command and its help, and the MCP tool and its JSON schema. Parameters carry their help
text, the surfaces they belong to and their bounds with ``Annotated[T, Arg("...")]``;
:meth:`Operation.call` checks every argument against them (:mod:`pyro_mcp.api.validation`)
whichever surface it came from.
"""

from __future__ import annotations

import enum
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union, get_args, get_origin

from pyro_mcp.api.context import Context
from pyro_mcp.api.validation import check_arguments

F = TypeVar("F", bound=Callable[..., Any])


class Surface(enum.Flag):
    """Where a parameter can be given: the ``pyro`` CLI, the SDK (``Pyro``), MCP tools,
    and STREAM: a caller that takes a call's output as it comes (the REST API's
    ``/stream`` routes, which otherwise take what the MCP tool takes)."""

    CLI = enum.auto()
    SDK = enum.auto()
    MCP = enum.auto()
    STREAM = enum.auto()


EVERY = Surface.CLI | Surface.SDK | Surface.MCP
CLI_ONLY = Surface.CLI  # how the CLI prints or reads (--id-only, --stdin)
STREAMED = Surface.CLI | Surface.STREAM  # output that keeps coming (--follow)


@dataclass(frozen=True)
class Arg:
    """Help text, surfaces, bounds and CLI spelling of one operation parameter.

    ``surfaces`` must be declared: a parameter that only makes sense at a terminal
    (reading our stdin, printing just an id) must not reach MCP or the SDK.
    ``minimum``/``maximum`` bound a number (every number has both: nan, infinities and
    huge values are refused alike); ``exclusive_minimum`` makes the minimum itself
    invalid. ``sensitive``: it may hold secrets, so no error message shows its value.
    ``path``: a file name, where bytes that are not UTF-8 may stand as
    ``surrogateescape`` characters and an ``os.PathLike`` is taken too. ``octal``: an
    integer given as a string is read in octal, as chmod does (``"0644"``). ``flag``:
    the CLI spelling when the name cannot be it (``from`` is a Python keyword); ``short``
    a one-letter flag beside it (``v`` for ``-v``). ``name``:
    the parameter's one name on every surface (SDK keyword, MCP argument, CLI dest) when
    it is not the Python parameter's own: pyro-mcp 3.x's names (``workspace_id``,
    ``shell_id``, ``output_path``...) are the public ones, while the functions keep
    short local names.
    """

    help: str
    surfaces: Surface = field(kw_only=True)
    positional: bool = False
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    path: bool = False
    octal: bool = False
    mcp_profiles: tuple[str, ...] | None = None  # MCP profiles offering it (None: all)
    sensitive: bool = False
    flag: str | None = None  # the CLI flag's word when it is not the name (``--from``)
    short: str | None = None  # a one-letter CLI flag beside the long one (``-v``)
    name: str | None = None  # the surfaces' name when it is not the Python parameter's


@dataclass(frozen=True)
class Param:
    name: str  # the name every surface uses
    annotation: Any  # the type without Annotated/Optional
    optional: bool  # None is an accepted value
    default: Any  # inspect.Parameter.empty when required
    arg: Arg
    py_name: str = ""  # the operation function's own parameter name (default: name)

    @property
    def python_name(self) -> str:
        return self.py_name or self.name

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    @property
    def cli_flag(self) -> str:
        """The option that gives it on the command line (``--timeout-seconds``)."""
        return "--" + (self.arg.flag or self.name.replace("_", "-"))

    @property
    def arms(self) -> tuple[Any, ...]:
        """The types a value may have (``str | list[str]`` has two), None aside."""
        if get_origin(self.annotation) in (Union, types.UnionType):
            return get_args(self.annotation)
        return (self.annotation,)

    @property
    def is_list(self) -> bool:
        return any(get_origin(arm) in (list, tuple) for arm in self.arms)

    @property
    def item_type(self) -> Any:
        for arm in self.arms:
            if get_origin(arm) in (list, tuple):
                return get_args(arm)[0]
        return self.annotation

    def on(self, surface: Surface) -> bool:
        return bool(self.arg.surfaces & surface)

    def in_profile(self, profile: str) -> bool:
        """Offered by the tool in MCP profile ``profile`` (elsewhere it keeps its default)."""
        return self.arg.mcp_profiles is None or profile in self.arg.mcp_profiles


@dataclass(frozen=True)
class Effects:
    """What a call does, as an MCP host shows it before it lets a model call the tool
    (its tool annotations): a human title and four hints.

    ``read_only``: it changes nothing (on the host, in a VM or a workspace); a read-only
    operation is never destructive and always idempotent. ``destructive``: it may delete
    or overwrite something (files, a workspace, a running process) rather than only add.
    ``idempotent``: calling it again with the same arguments changes nothing more, so a
    retry is safe. ``open_world``: it may reach beyond this host (a registry, Debian's
    mirrors, or a guest that may have a network).
    """

    title: str
    read_only: bool
    destructive: bool
    idempotent: bool
    open_world: bool


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
    effects: Effects | None = None  # what a call does to the host and its VMs (undeclared: None)
    # One of the actions a person takes on a workspace as a whole (stop it, checkpoint
    # it...): the dashboard offers it as a button on the workspace's page.
    workspace_action: bool = False

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.func) or ""

    @property
    def summary(self) -> str:
        return self.doc.splitlines()[0] if self.doc else self.name

    def params_on(self, surface: Surface) -> tuple[Param, ...]:
        """The parameters ``surface`` offers (the others keep their defaults there)."""
        return tuple(param for param in self.params if param.on(surface))

    def mcp_params(self, profile: str) -> tuple[Param, ...]:
        """The parameters its tool offers in MCP profile ``profile``."""
        return tuple(param for param in self.params_on(Surface.MCP) if param.in_profile(profile))

    def stream_params(self, profile: str) -> tuple[Param, ...]:
        """The parameters its stream route offers in profile ``profile``: its MCP tool's
        and those only a caller taking output as it comes can use."""
        return tuple(
            param
            for param in self.params_on(Surface.MCP | Surface.STREAM)
            if param.in_profile(profile)
        )

    def call(self, ctx: Context, via: Surface, /, **arguments: Any) -> Any:
        """Run the operation with ``arguments`` from ``via``, each checked first
        (InvalidArgument naming the parameter: its type, bounds, text)."""
        checked = check_arguments(self, arguments, via)
        if ctx.remote is not None:  # checked here, run where the cluster places it
            return ctx.remote(self, via, dict(arguments), ctx)
        local = {param.name: param.python_name for param in self.params}
        return self.func(ctx, **{local[name]: value for name, value in checked.items()})


OPERATIONS: dict[str, Operation] = {}


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """``T | None`` as (T, True); ``A | B | None`` as (A | B, True); else (it, False)."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) < len(get_args(annotation)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True  # noqa: UP007
    return annotation, False


_COMPILED: dict[str, types.CodeType] = {}  # annotation text -> its code (see _hint)


def _hint(func: Callable[..., Any], name: str) -> Any:
    """The annotation of ``func``'s parameter ``name``, evaluated in its module, as
    ``typing.get_type_hints`` would. Under ``from __future__ import annotations`` it is
    text; operations share most texts (``Annotated[str, WORKSPACE]``), so each is compiled
    once and only the parameters are evaluated (the CLI registers a module's operations to
    run one of them)."""
    hint = func.__annotations__[name]
    if not isinstance(hint, str):
        return hint
    code = _COMPILED.get(hint)
    if code is None:
        code = _COMPILED[hint] = compile(hint, "<annotation>", "eval")
    return eval(code, func.__globals__)


def _params(func: Callable[..., Any]) -> tuple[Param, ...]:
    params: list[Param] = []
    for index, (name, parameter) in enumerate(inspect.signature(func).parameters.items()):
        if index == 0:
            continue  # the Context
        hint = _hint(func, name)
        if get_origin(hint) is not typing.Annotated:
            raise TypeError(f"{func.__name__}.{name}: annotate with Annotated[T, Arg(...)]")
        base, *extras = get_args(hint)
        arg = next((e for e in extras if isinstance(e, Arg)), None)
        if arg is None:
            raise TypeError(f"{func.__name__}.{name}: missing Arg(...) help")
        annotation, optional = _unwrap_optional(base)
        param = Param(arg.name or name, annotation, optional, parameter.default, arg, name)
        if param.item_type in (int, float) and (arg.minimum is None or arg.maximum is None):
            raise TypeError(f"{func.__name__}.{name}: a number needs Arg(minimum=, maximum=)")
        if any(other.name == param.name for other in params):
            raise TypeError(f"{func.__name__}: two parameters are named {param.name!r}")
        params.append(param)
    return tuple(params)


def operation(
    *,
    cli: tuple[str, ...],
    sdk: str,
    profiles: tuple[str, ...] = (),
    progress: bool = False,
    exit_code_key: str | None = None,
    title: str | None = None,
    read_only: bool = False,
    destructive: bool = False,
    idempotent: bool = False,
    open_world: bool = False,
    workspace_action: bool = False,
) -> Callable[[F], F]:
    """Register ``func`` as a public operation named after the function.

    ``title`` and the hints after it declare its :class:`Effects` (an operation without
    a title declares none); ``read_only`` implies idempotent and not destructive.
    ``workspace_action``: an action on one workspace as a whole, offered as a button
    where a person works on it (it takes ``workspace_id`` and has a title).
    """
    if read_only and destructive:
        raise TypeError("an operation is not both read_only and destructive")
    if workspace_action and (title is None or read_only):
        raise TypeError("a workspace action has a title and changes something")
    effects = (
        None
        if title is None
        else Effects(
            title=title,
            read_only=read_only,
            destructive=destructive,
            idempotent=idempotent or read_only,
            open_world=open_world,
        )
    )

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
            effects=effects,
            workspace_action=workspace_action,
        )
        if workspace_action and "workspace_id" not in {p.name for p in OPERATIONS[name].params}:
            raise TypeError(f"workspace action {name} takes no workspace_id")
        return func

    return register


def all_operations() -> list[Operation]:
    """Every registered operation (importing every module of
    :mod:`pyro_mcp.api.operations`, each registering its own on import)."""
    import importlib
    import pkgutil

    import pyro_mcp.api.operations as package

    for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)
    # In the modules' order, then as each declares them: the same list whichever module
    # was imported first (the CLI imports one; a test may import another).
    return sorted(OPERATIONS.values(), key=_declared_at)


def _declared_at(op: Operation) -> tuple[str, int]:
    return op.func.__module__, op.func.__code__.co_firstlineno
