"""Operation results as declared (:mod:`pyro_mcp.api.results`): the type of each, a check
that a real result matches it, and its JSON schema (closed, for checks; open, as MCP
output schemas).

The declaration is the operation function's return annotation, so nothing here keeps a
second list of result types: a new operation's result is checked and described as soon
as it is annotated.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union, get_args, get_origin, is_typeddict

from pyro_mcp.api.registry import Operation

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class ResultMismatch(ValueError):
    """A result does not have the shape its operation declares: a bug in pyro, so not a
    PyroError (nothing a caller did wrong)."""


def result_type(op: Operation) -> Any:
    """The TypedDict ``op`` declares it returns (an operation module names it only for
    the type checker, so the name is looked up in :mod:`pyro_mcp.api.results`)."""
    from pyro_mcp.api import results

    declared = typing.get_type_hints(op.func, localns=vars(results)).get("return")
    if not is_typeddict(declared):
        raise TypeError(f"{op.name}: annotate its result with a TypedDict of api.results")
    return declared


def check_result(op: Operation, result: object) -> None:
    """ResultMismatch listing every way ``result`` differs from what ``op`` declares:
    a key it does not declare, a required key missing, a value of another type."""
    problems = result_problems(result_type(op), result, op.name)
    if problems:
        raise ResultMismatch(f"{op.name} returned what it does not declare: " + "; ".join(problems))


def result_problems(declared: Any, value: object, where: str = "result") -> list[str]:
    """How ``value`` differs from the type ``declared`` (empty: it is one), each problem
    naming where it is (``vm_run.network.guest_ip``)."""
    if declared is Any:
        return []
    if declared is None or declared is type(None):
        return [] if value is None else [_wrong(where, "null", value)]
    origin = get_origin(declared)
    if origin is Literal:
        allowed = get_args(declared)
        return [] if value in allowed else [f"{where}: {value!r} is not one of {allowed!r}"]
    if origin in (Union, types.UnionType):
        arms = [result_problems(arm, value, where) for arm in get_args(declared)]
        if any(not problems for problems in arms):
            return []
        return [f"{where}: {_shown(value)} is none of {_name(declared)}"]
    if is_typeddict(declared):
        return _typeddict_problems(declared, value, where)
    if origin is list:
        if not isinstance(value, list):
            return [_wrong(where, _name(declared), value)]
        (item,) = get_args(declared)
        return [p for i, v in enumerate(value) for p in result_problems(item, v, f"{where}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [_wrong(where, _name(declared), value)]
        _key, item = get_args(declared)
        problems = [f"{where}: key {k!r} is not a string" for k in value if not isinstance(k, str)]
        for key, v in value.items():
            problems += result_problems(item, v, f"{where}[{key!r}]")
        return problems
    return [] if _is_scalar(declared, value) else [_wrong(where, _name(declared), value)]


def _typeddict_problems(declared: Any, value: object, where: str) -> list[str]:
    if not isinstance(value, dict):
        return [_wrong(where, declared.__name__, value)]
    hints = typing.get_type_hints(declared)
    problems = [
        f"{where}: key {key!r} is not declared in {declared.__name__}"
        for key in value
        if key not in hints
    ]
    problems += [
        f"{where}: required key {key!r} of {declared.__name__} is missing"
        for key in sorted(declared.__required_keys__)
        if key not in value
    ]
    for key, item in value.items():
        if key in hints:
            problems += result_problems(hints[key], item, f"{where}.{key}")
    return problems


def _is_scalar(declared: Any, value: object) -> bool:
    if declared is bool:
        return isinstance(value, bool)
    if declared is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if declared is float:  # an int is a float too, as for mypy
        return isinstance(value, int | float) and not isinstance(value, bool)
    if declared is str:
        return isinstance(value, str)
    raise TypeError(f"no result check for values of type {declared!r}")


def _wrong(where: str, expected: str, value: object) -> str:
    return f"{where}: expected {expected}, got {_shown(value)}"


def _shown(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _name(declared: Any) -> str:
    if is_typeddict(declared):
        return str(declared.__name__)
    if isinstance(declared, type):
        return declared.__name__
    return str(declared).replace("typing.", "")


# --- JSON schema ---------------------------------------------------------------------------


def result_schema(op: Operation) -> dict[str, Any]:
    """The JSON schema (draft 2020-12) of what ``op`` returns: an object with exactly the
    declared keys (the required ones listed), each nested record a closed object too."""
    return {"$schema": JSON_SCHEMA_DIALECT, **type_schema(result_type(op))}


def output_schema(op: Operation) -> dict[str, Any]:
    """What ``op``'s MCP tool publishes as its ``outputSchema``: the keys of
    :func:`result_schema`, each typed, the required ones listed, but open objects (a later
    version may add keys: a client that kept an older listing still accepts its results),
    and no ``$schema`` (the protocol's default dialect is 2020-12, and clients that
    validate with a draft-07 validator refuse the 2020-12 meta-schema's address)."""
    return type_schema(result_type(op), closed=False)


def type_schema(declared: Any, *, closed: bool = True) -> dict[str, Any]:
    """The JSON schema of values of the type ``declared`` (its records closed objects, or
    with ``closed`` false, open ones)."""
    if declared is Any:
        return {}
    if declared is None or declared is type(None):
        return {"type": "null"}
    origin = get_origin(declared)
    if origin is Literal:
        return {"enum": list(get_args(declared))}
    if origin in (Union, types.UnionType):
        return {"anyOf": [type_schema(arm, closed=closed) for arm in get_args(declared)]}
    if is_typeddict(declared):
        return _object_schema(declared, closed)
    if origin is list:
        return {"type": "array", "items": type_schema(get_args(declared)[0], closed=closed)}
    if origin is dict:
        values = type_schema(get_args(declared)[1], closed=closed)
        return {"type": "object", "additionalProperties": values}
    scalars = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if declared in scalars:
        return {"type": scalars[declared]}
    raise TypeError(f"no JSON schema for values of type {declared!r}")


def _object_schema(declared: Any, closed: bool) -> dict[str, Any]:
    hints = typing.get_type_hints(declared)
    schema: dict[str, Any] = {
        "title": declared.__name__,
        "type": "object",
        "properties": {key: type_schema(hint, closed=closed) for key, hint in hints.items()},
        "required": sorted(declared.__required_keys__),
    }
    if closed:
        schema["additionalProperties"] = False
    own_doc = declared.__dict__.get("__doc__")
    if own_doc:
        schema["description"] = " ".join(own_doc.split())
    return schema
