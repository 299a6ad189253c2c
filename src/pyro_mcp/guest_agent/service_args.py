"""Service arguments: what a service call may ask for, checked, with its defaults.

``name_arg`` (``NAME_PATTERN``), ``command_arg`` (argv or shell), ``env_arg``,
``cwd_arg``, ``number_arg`` and ``signal_arg`` raise ``invalid_argument`` (``bad_arg``;
``not_found`` for a missing cwd). ``base_environment`` and ``default_cwd`` are what a
process started by the agent gets (services and shells).
"""

from __future__ import annotations

import os
import re
import signal
from typing import Any

from pyro_mcp.guest_agent.calls import CallError
from pyro_mcp.guest_agent.ops_exec import DEFAULT_PATH

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"  # compiled on first use (start time)


def bad_arg(message: str) -> CallError:
    return CallError("invalid_argument", message)


def name_arg(args: dict[str, Any]) -> str:
    name = args.get("name")
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise bad_arg(
            f"service name {name!r} is invalid: 1-63 characters of letters, digits, "
            "'_', '.' and '-', starting with a letter or digit"
        )
    return name


def number_arg(args: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = args.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise bad_arg(f"{key} must be a number from {low:g} to {high:g}, not {value!r}")
    return float(value)


def command_arg(args: dict[str, Any]) -> list[str]:
    argv, shell = args.get("argv"), args.get("shell")
    if (argv is None) == (shell is None):
        raise bad_arg("a service needs exactly one of argv or shell")
    if shell is not None:
        if not isinstance(shell, str) or not shell.strip():
            raise bad_arg("shell must be a non-empty string")
        return ["/bin/sh", "-lc", shell]
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and a for a in argv):
        raise bad_arg("argv must be a non-empty list of non-empty strings")
    return list(argv)


def env_arg(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and k and "=" not in k and isinstance(v, str) for k, v in value.items()
    ):
        raise bad_arg("env must map variable names to strings")
    return dict(value)


def base_environment(extra: dict[str, str]) -> dict[str, str]:
    env = {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "xterm"}
    env.update({k: v for k, v in os.environ.items() if k in ("TZ",)})
    env.update(extra)
    return env


def default_cwd() -> str:
    return "/workspace" if os.path.isdir("/workspace") else "/"


def cwd_arg(value: Any) -> str:
    if value is None:
        return default_cwd()
    if not isinstance(value, str) or not value.startswith("/"):
        raise bad_arg(f"cwd must be an absolute path, not {value!r}")
    if not os.path.isdir(value):
        raise CallError("not_found", f"working directory {value!r} does not exist in the guest")
    return value


def signal_arg(value: Any, default: str) -> tuple[int, str]:
    name = str(default if value is None else value).upper().removeprefix("SIG")
    number = getattr(signal, f"SIG{name}", None)
    if not isinstance(number, int) or name in ("IGN", "DFL"):
        raise bad_arg(f"unknown signal {value!r}")
    return number, name
