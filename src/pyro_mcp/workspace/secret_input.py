"""What a caller may give as workspace secrets, checked before anything is created.

A secret is a name (a valid environment variable name, ``[A-Za-z_][A-Za-z0-9_]*``, at
most 64 characters) and a value: UTF-8 text, 1 byte to ``MAX_VALUE_BYTES``, without NUL
(an environment cannot hold one), taken as given (a file's trailing newline is kept). A
workspace has at most ``MAX_SECRETS``. Every message names the secret, never its value.

``secret_env`` maps secrets into one process's environment: ``["NAME", "NAME=ENVVAR"]``
(the CLI's ``--secret-env``) or pyro-mcp 3.x's ``{"NAME": "ENVVAR"}``; as the agent
takes it, ``{ENVVAR: NAME}``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final

from pyro_mcp.errors import InvalidArgument

MAX_SECRETS: Final = 64
MAX_VALUE_BYTES: Final = 64 << 10
NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
LITERAL, FILE = "literal", "file"
SPEC_KEYS: Final = frozenset({"name", "value", "file_path"})


@dataclass(frozen=True)
class SecretInput:
    name: str
    value: str
    source_kind: str  # LITERAL or FILE

    def __repr__(self) -> str:  # a traceback or a log line never shows the value
        return f"SecretInput(name={self.name!r}, source_kind={self.source_kind!r})"


def check_name(name: object, what: str = "secret name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        shown = repr(name)[:70]
        raise InvalidArgument(
            f"{what} {shown} is not a valid environment variable name",
            hint="use letters, digits and '_' (at most 64), not starting with a digit, "
            "e.g. API_TOKEN",
        )
    return name


def _check_value(name: str, value: bytes | str, source: str) -> str:
    if isinstance(value, bytes):
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(
                f"secret {name!r}: {source} is not UTF-8 text", hint="secrets are text"
            ) from None
    else:
        text = value
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgument(f"secret {name!r}: the value is not valid text") from None
    size = len(text.encode("utf-8"))
    if size == 0:
        raise InvalidArgument(
            f"secret {name!r}: {source} is empty", hint="an empty secret hides nothing: drop it"
        )
    if size > MAX_VALUE_BYTES:
        raise InvalidArgument(
            f"secret {name!r}: {source} is {size} bytes, more than {MAX_VALUE_BYTES}",
            hint="keep a secret to a token or key; pass bulk data as a file in /workspace",
        )
    if "\0" in text:
        raise InvalidArgument(
            f"secret {name!r}: {source} holds a NUL byte, which no environment variable can"
        )
    return text


def collect_secrets(
    specs: list[dict[str, Any]] | None,
    literals: list[str] | None,
    files: list[str] | None,
    read_file: Callable[[str], bytes],
) -> list[SecretInput]:
    """Every secret given, checked: ``specs`` as pyro-mcp 3.x took them (``{"name",
    "value"}`` or ``{"name", "file_path"}``), the CLI's ``NAME=VALUE`` and
    ``NAME=PATH``. ``read_file(path)`` reads a host file (confined as the caller is)."""
    found: list[SecretInput] = []
    for index, spec in enumerate(specs or []):
        found.append(_from_spec(index, spec, read_file))
    for item in literals or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise InvalidArgument(
                "--secret takes NAME=VALUE",
                hint="e.g. --secret API_TOKEN=..., or use "
                "--secret-file NAME=PATH to keep the value off the command line",
            )
        found.append(SecretInput(check_name(name), _check_value(name, value, "the value"), LITERAL))
    for item in files or []:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise InvalidArgument(
                "--secret-file takes NAME=PATH", hint="e.g. --secret-file KEY=./key.pem"
            )
        found.append(_from_file(check_name(name), path, read_file))
    names = [s.name for s in found]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidArgument(
            f"secret {duplicates[0]!r} is given more than once", hint="give each name once"
        )
    if len(found) > MAX_SECRETS:
        raise InvalidArgument(f"{len(found)} secrets given, at most {MAX_SECRETS} are allowed")
    return found


def _from_spec(
    index: int, spec: Mapping[str, Any], read_file: Callable[[str], bytes]
) -> SecretInput:
    where = f"secrets[{index}]"
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise InvalidArgument(
            f"{where} has unknown key {unknown[0]!r}",
            hint='give {"name": ..., "value": ...} or {"name": ..., "file_path": ...}',
        )
    name = check_name(spec.get("name"), f"{where} name")
    if ("value" in spec) == ("file_path" in spec):
        raise InvalidArgument(
            f"secret {name!r} needs exactly one of 'value' and 'file_path'",
            hint='give {"name": ..., "value": ...} or {"name": ..., "file_path": ...}',
        )
    if "value" in spec:
        return SecretInput(name, _check_value(name, spec["value"], "the value"), LITERAL)
    return _from_file(name, str(spec["file_path"]), read_file)


def _from_file(name: str, path: str, read_file: Callable[[str], bytes]) -> SecretInput:
    data = read_file(path)
    return SecretInput(name, _check_value(name, data, f"file {path}"), FILE)


def secret_env_mapping(
    given: list[str] | Mapping[str, str] | None,
    known: Collection[str],
    *,
    workspace: str,
    env_keys: Collection[str] = (),
) -> dict[str, str]:
    """``given`` as ``{ENVVAR: secret name}``. InvalidArgument for a bad name, a secret
    the workspace does not have (naming the ones it has), an environment variable given
    twice or also by ``env``."""
    pairs: list[tuple[str, str]] = []
    if isinstance(given, Mapping):
        pairs = [(str(secret), str(var)) for secret, var in given.items()]
    else:
        for item in given or []:
            secret, sep, var = item.partition("=")
            pairs.append((secret, var if sep else secret))
    mapping: dict[str, str] = {}
    for secret, var in pairs:
        check_name(secret, "--secret-env secret name")
        check_name(var, f"--secret-env variable name for {secret!r}")
        if secret not in known:
            has = ", ".join(sorted(known)) if known else "no secrets"
            raise InvalidArgument(
                f"workspace {workspace} has no secret {secret!r} (it has {has})",
                hint="name one of its secrets, or create the workspace with "
                f"--secret {secret}=... or --secret-file {secret}=PATH",
            )
        if var in mapping or var in env_keys:
            raise InvalidArgument(
                f"environment variable {var!r} is given twice (by --secret-env and "
                f"{'--secret-env' if var in mapping else '--env'})",
                hint="give each variable once",
            )
        mapping[var] = secret
    return mapping
