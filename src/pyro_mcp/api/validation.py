"""Every argument of every operation, checked once from its declaration, for every surface.

:meth:`~pyro_mcp.api.registry.Operation.call` runs :func:`check_arguments` whether the
call came from the CLI, the SDK or an MCP tool, so a bad value gets the same
InvalidArgument, naming the parameter, on each:

- a ``bool`` is True or False (never 1, never ``"true"``);
- an ``int`` is an int and not a bool; a ``float`` is an int or a float; both lie within
  the parameter's declared bounds, so nan, the infinities and huge values are refused by
  one rule that states the range (``timeout_seconds must be a number greater than 0 and
  at most 86400, got nan``);
- a string is real text: it encodes as UTF-8 (no lone surrogates). A path may also hold
  bytes that are not UTF-8 as ``surrogateescape`` characters, as the names pyro returns
  do, and may be given as an ``os.PathLike``;
- a list holds items of its declared type; a parameter typed ``str | list[str]`` takes
  either; a ``dict[str, str]`` is an object whose keys and values are strings; a choice
  is one of the declared values; an octal parameter reads a string as
  octal digits (``"0644"`` is 0o644, as chmod reads it).

A ``sensitive`` parameter (secrets) is never shown in a message, only its type.

:func:`json_schema` describes the same rules to MCP clients.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, get_args, get_origin

from pyro_mcp.errors import InvalidArgument

if TYPE_CHECKING:
    from pyro_mcp.api.registry import Operation, Param, Surface

OCTAL = re.compile(r"(?:0o)?([0-7]{1,6})")
SHOWN_CHARS = 60


class _Mismatch(Exception):
    """The value is not of this type at all (another arm of a union may take it)."""


def check_arguments(op: Operation, arguments: Mapping[str, Any], via: Surface) -> dict[str, Any]:
    """``arguments`` as the operation takes them: each checked against its declaration.

    InvalidArgument for a parameter the operation does not offer on ``via``, a missing
    required one (both listing what it takes: :func:`check_names`), or a value of the
    wrong type, out of its bounds or not valid text.
    """
    offered = op.params_on(via)
    where = f" on the {(via.name or '').lower()} surface"
    check_names(op.name, arguments, offered, where=where, complete=False)
    params = {param.name: param for param in offered}
    checked = {name: check_value(params[name], value) for name, value in arguments.items()}
    check_names(op.name, arguments, offered)
    return checked


def check_names(
    name: str,
    given: Collection[str],
    offered: Sequence[Param],
    *,
    where: str = "",
    complete: bool = True,
) -> None:
    """InvalidArgument if ``given`` names a parameter ``name`` does not offer (with the
    offered one it most looks like) or, when ``given`` is ``complete``, lacks a required
    one; the message lists every parameter it takes, so the caller can fix the call in
    one go."""
    names = [param.name for param in offered]
    unknown = [arg for arg in given if arg not in names]
    missing = [
        param.name for param in offered if complete and param.required and param.name not in given
    ]
    if unknown:
        shown_names = ", ".join(_with_guess(arg, names) for arg in unknown)
        plural = "s" if len(unknown) > 1 else ""
        problem = f"{name} has no parameter{plural} {shown_names}{where}"
    elif missing:
        problem = f"{name} needs {', '.join(missing)}"
    else:
        return
    raise InvalidArgument(f"{problem}; {takes(offered)}")


def takes(offered: Sequence[Param]) -> str:
    """What a call takes, in words: ``it takes workspace, path (required) and text (optional)``."""
    required = [param.name for param in offered if param.required]
    optional = [param.name for param in offered if not param.required]
    if not offered:
        return "it takes no parameters"
    if not optional:
        return f"it takes {', '.join(required)} (required)"
    if not required:
        return f"it takes {', '.join(optional)} (all optional)"
    return f"it takes {', '.join(required)} (required) and {', '.join(optional)} (optional)"


def _with_guess(arg: str, names: Sequence[str]) -> str:
    import difflib  # only an unknown argument needs it

    guess = difflib.get_close_matches(arg, names, n=1)
    return f"{shown(arg)} (did you mean {guess[0]!r}?)" if guess else shown(arg)


def check_value(param: Param, value: Any) -> Any:
    """One argument, checked and normalised (a float parameter gets a float, an octal
    string its integer, a path-like its string)."""
    if value is None:
        if param.optional:
            return None
        raise InvalidArgument(f"{param.name} must be {expected(param)}, got None")
    for arm in param.arms:
        try:
            return _check_arm(param, param.name, arm, value)
        except _Mismatch:
            continue
    raise InvalidArgument(f"{param.name} must be {expected(param)}, got {_shown(param, value)}")


def _check_arm(param: Param, name: str, arm: Any, value: Any) -> Any:
    if get_origin(arm) in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _Mismatch
        item_type = get_args(arm)[0]
        items = []
        for index, item in enumerate(value):
            try:
                items.append(_check_scalar(param, f"{name}[{index}]", item_type, item))
            except _Mismatch:
                raise InvalidArgument(
                    f"{name}[{index}] must be {_scalar_expected(param, item_type)}, "
                    f"got {_shown(param, item)}"
                ) from None
        return items
    return _check_scalar(param, name, arm, value)


def _check_scalar(param: Param, name: str, kind: Any, value: Any) -> Any:
    arg = param.arg
    if kind is bool:
        if not isinstance(value, bool):
            raise _Mismatch
        return value
    if get_origin(kind) is dict:
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise _Mismatch
        for key, item in value.items():
            check_text(f"{name} key", key)
            check_text(f"{name}[{key!r}]", item)
        return dict(value)
    if kind is int or kind is float:
        if arg.octal and isinstance(value, str):
            match = OCTAL.fullmatch(value)
            if match is None:
                raise _Mismatch
            value = int(match.group(1), 8)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Mismatch
        if kind is int and not isinstance(value, int):
            raise _Mismatch
        if not _in_bounds(param, value):
            raise _Mismatch  # the message states the range, as for a wrong type
        return float(value) if kind is float else value
    if kind is str:
        if arg.path and isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise _Mismatch
        check_text(name, value, path=arg.path)
        if arg.choices and value not in arg.choices:
            raise InvalidArgument(
                f"{name} must be one of {', '.join(map(repr, arg.choices))}, got {shown(value)}"
            )
        return value
    raise TypeError(f"{param.name}: no check for values of type {kind!r}")


def _in_bounds(param: Param, value: float) -> bool:
    low, high = param.arg.minimum, param.arg.maximum
    if low is not None and (value <= low if param.arg.exclusive_minimum else value < low):
        return False
    if high is not None and not value <= high:
        return False
    return value == value  # nan is out of every range


def check_text(name: str, value: str, *, path: bool = False) -> None:
    """InvalidArgument unless ``value`` is valid UTF-8 text (a ``path`` may also hold the
    ``surrogateescape`` characters that stand for bytes that are not UTF-8)."""
    try:
        value.encode("utf-8", "surrogateescape" if path else "strict")
    except UnicodeEncodeError as exc:
        code = ord(value[exc.start])
        if 0xDC80 <= code <= 0xDCFF:
            what = f"the byte 0x{code - 0xDC00:02x}, which is not UTF-8"
        else:
            what = f"a lone surrogate (U+{code:04X}), which no text holds"
        raise InvalidArgument(
            f"{name} must be valid UTF-8 text; character {exc.start} is {what}"
        ) from None


def expected(param: Param) -> str:
    """What ``param`` takes, in words: ``an integer between 1 and 32``."""
    words = [
        f"a list of {_plural(get_args(arm)[0])}"
        if get_origin(arm) in (list, tuple)
        else _scalar_expected(param, arm)
        for arm in param.arms
    ]
    return " or ".join(words)


def _scalar_expected(param: Param, kind: Any) -> str:
    arg = param.arg
    if kind is bool:
        return "true or false"
    if get_origin(kind) is dict:
        return "an object of strings"
    if kind is int or kind is float:
        noun = "an integer" if kind is int else "a number"
        low, high = arg.minimum, arg.maximum
        if low is not None and high is not None:
            lower = "greater than" if arg.exclusive_minimum else "between"
            joint = "and at most" if arg.exclusive_minimum else "and"
            words = f"{noun} {lower} {_number(low)} {joint} {_number(high)}"
        else:
            words = noun
        return words + (" (or a string of octal digits, such as '0644')" if arg.octal else "")
    if arg.choices:
        return "one of " + ", ".join(map(repr, arg.choices))
    return "a path" if arg.path else "a string"


def _plural(kind: Any) -> str:
    return {bool: "booleans", int: "integers", float: "numbers"}.get(kind, "strings")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _shown(param: Param, value: Any) -> str:
    if param.arg.sensitive:
        return f"a {type(value).__name__} (not shown: it may hold a secret)"
    return shown(value)


def shown(value: Any) -> str:
    """``value`` as an error message shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


# --- the same rules as a JSON schema, for MCP clients -------------------------------------


def arguments_schema(params: Sequence[Param]) -> dict[str, Any]:
    """The JSON schema of a call's arguments object: each of ``params`` with its type,
    help and default, the required ones listed, nothing else taken (what REST requests
    and the model tools of ``pyro demo ollama`` are described with)."""
    properties: dict[str, Any] = {}
    for param in params:
        prop = {**json_schema(param), "description": param.arg.help}
        if not param.required and _jsonable(param.default):
            prop["default"] = param.default
        properties[param.name] = prop
    return {
        "type": "object",
        "properties": properties,
        "required": [param.name for param in params if param.required],
        "additionalProperties": False,
    }


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, str | bool | int | float | list | dict)


def json_schema(param: Param) -> dict[str, Any]:
    """The JSON schema of ``param``'s values (its description and default are added by
    the MCP layer)."""
    arms = [_arm_schema(param, arm) for arm in param.arms]
    if param.optional:
        arms.append({"type": "null"})
    return arms[0] if len(arms) == 1 else {"anyOf": arms}


def _arm_schema(param: Param, arm: Any) -> dict[str, Any]:
    if get_origin(arm) in (list, tuple):
        return {"type": "array", "items": _scalar_schema(param, get_args(arm)[0])}
    return _scalar_schema(param, arm)


def _scalar_schema(param: Param, kind: Any) -> dict[str, Any]:
    arg = param.arg
    if kind is bool:
        return {"type": "boolean"}
    if get_origin(kind) is dict:
        return {"type": "object", "additionalProperties": {"type": "string"}}
    if kind is int or kind is float:
        schema: dict[str, Any] = {"type": "integer" if kind is int else "number"}
        if arg.minimum is not None:
            schema["exclusiveMinimum" if arg.exclusive_minimum else "minimum"] = arg.minimum
        if arg.maximum is not None:
            schema["maximum"] = arg.maximum
        if arg.octal:
            return {"anyOf": [schema, {"type": "string", "pattern": f"^{OCTAL.pattern}$"}]}
        return schema
    schema = {"type": "string"}
    if arg.choices:
        schema["enum"] = list(arg.choices)
    return schema
