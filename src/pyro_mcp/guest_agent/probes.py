"""Readiness probes of services: is the service up yet?

A probe spec is one of::

    {"type": "file", "path": P}                  P exists (relative: to the service's cwd)
    {"type": "tcp", "host": H, "port": N}        a TCP connect succeeds (host default 127.0.0.1)
    {"type": "http", "url": "http://h[:p]/x"}    GET answers 2xx or 3xx (plain http only)
    {"type": "command", "argv": [...]}           the command exits 0 (or "shell": "...")

:func:`parse` validates a spec (``invalid_argument`` otherwise) and returns it normalised;
:func:`check` runs one attempt and returns None when ready, else why not. Network
modules are imported on first use: the agent's start time matters under emulation.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Any

from pyro_mcp.guest_agent.calls import CallError

TYPES = ("file", "tcp", "http", "command")
ATTEMPT_S = 2.0  # at most this long for one tcp/http attempt
COMMAND_ATTEMPT_S = 10.0  # and for one probe command


def _bad(message: str) -> CallError:
    return CallError("invalid_argument", f"readiness probe: {message}")


def parse(spec: Any) -> dict[str, Any] | None:
    """The normalised probe spec, or None for no probe."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise _bad("ready must be an object with a type")
    kind = spec.get("type")
    if kind not in TYPES:
        raise _bad(f"unknown type {kind!r} (one of {', '.join(TYPES)})")
    if kind == "file":
        path = spec.get("path")
        if not isinstance(path, str) or not path:
            raise _bad("a file probe needs a path")
        return {"type": "file", "path": path}
    if kind == "tcp":
        host = spec.get("host", "127.0.0.1")
        if not isinstance(host, str) or not host:
            raise _bad("tcp host must be a non-empty string")
        return {"type": "tcp", "host": host, "port": _port(spec.get("port"))}
    if kind == "http":
        url = spec.get("url")
        split_url(url)
        return {"type": "http", "url": url}
    argv, shell = spec.get("argv"), spec.get("shell")
    if (argv is None) == (shell is None):
        raise _bad("a command probe needs exactly one of argv or shell")
    if shell is not None:
        if not isinstance(shell, str) or not shell.strip():
            raise _bad("command probe shell must be a non-empty string")
        return {"type": "command", "shell": shell}
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise _bad("command probe argv must be a non-empty list of strings")
    return {"type": "command", "argv": list(argv)}


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise _bad(f"port must be an integer 1-65535, not {value!r}")
    return value


def split_url(url: Any) -> tuple[str, int, str]:
    """(host, port, request target) of an ``http://host[:port]/path`` URL."""
    from urllib.parse import urlsplit

    if not isinstance(url, str) or not url:
        raise _bad("an http probe needs a url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _bad(f"bad url {url!r}: {exc}") from exc
    if parts.scheme != "http" or not parts.hostname:
        raise _bad(f"url must look like http://host[:port]/path, not {url!r}")
    if port is not None and not 1 <= port <= 65535:
        raise _bad(f"port must be 1-65535 in {url!r}")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return parts.hostname, port or 80, target


def describe(spec: dict[str, Any]) -> str:
    """How a probe reads in messages: ``tcp probe 127.0.0.1:8000``."""
    kind = spec["type"]
    if kind == "file":
        return f"file probe {spec['path']}"
    if kind == "tcp":
        return f"tcp probe {spec['host']}:{spec['port']}"
    if kind == "http":
        return f"http probe {spec['url']}"
    shown = spec.get("shell") or " ".join(spec.get("argv", []))
    return f"command probe {shown!r}"


def check(spec: dict[str, Any], cwd: str, env: dict[str, str], budget_s: float) -> str | None:
    """One attempt: None when ready, else the reason it is not (for messages)."""
    attempt = max(0.05, min(ATTEMPT_S, budget_s))
    kind = spec["type"]
    try:
        if kind == "file":
            path = os.path.join(cwd, spec["path"])
            return None if os.path.exists(path) else f"{path} does not exist"
        if kind == "tcp":
            return _tcp(spec["host"], spec["port"], attempt)
        if kind == "http":
            return _http(*split_url(spec["url"]), attempt)
        return _command(spec, cwd, env, max(0.05, min(COMMAND_ATTEMPT_S, budget_s)))
    except OSError as exc:
        return _oserror(exc)


def _oserror(exc: OSError) -> str:
    import errno

    if exc.errno is not None and exc.strerror:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{exc.strerror} ({name})"
    return str(exc) or type(exc).__name__


def _tcp(host: str, port: int, timeout: float) -> str | None:
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except TimeoutError:
        return f"connect to {host}:{port} timed out after {timeout:.1f} s"
    except OSError as exc:
        return f"connect to {host}:{port}: {_oserror(exc)}"


def _http(host: str, port: int, target: str, timeout: float) -> str | None:
    import http.client

    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", target, headers={"User-Agent": "pyro-agent-probe"})
        response = conn.getresponse()
        response.read(65536)
        if 200 <= response.status < 400:
            return None
        return f"GET {target} answered HTTP {response.status} {response.reason}"
    except TimeoutError:
        return f"GET http://{host}:{port}{target} timed out after {timeout:.1f} s"
    except OSError as exc:
        return f"GET http://{host}:{port}{target}: {_oserror(exc)}"
    except http.client.HTTPException as exc:
        return f"GET http://{host}:{port}{target}: bad HTTP answer ({type(exc).__name__})"
    finally:
        conn.close()


def _command(spec: dict[str, Any], cwd: str, env: dict[str, str], timeout: float) -> str | None:
    argv = ["/bin/sh", "-lc", spec["shell"]] if "shell" in spec else list(spec["argv"])
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )
    except FileNotFoundError:
        return f"{argv[0]}: command not found"
    except PermissionError as exc:
        return f"{argv[0]}: {exc.strerror}"
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return f"probe command still running after {timeout:.1f} s"
    if proc.returncode == 0:
        return None
    tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] if err else []
    status = (
        f"killed by {signal.Signals(-proc.returncode).name}"
        if proc.returncode < 0
        else f"exit status {proc.returncode}"
    )
    return status + (f": {tail[0][:200]}" if tail else "")
