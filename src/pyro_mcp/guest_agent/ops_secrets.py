"""Workspace secrets inside the guest: kept in tmpfs only, handed to one process at a time.

``secrets_put`` {names: [NAME, ...]} + payload (JSON ``{NAME: value}``) -> {names}
    The host sends a workspace's secrets at every boot. They replace whatever the
    directory held, as one file each (0600) in ``SECRETS_DIR`` (0700, root's), which must
    be on a tmpfs: never on ``/workspace`` or the root disk. A directory elsewhere is
    refused (``not_tmpfs``) and nothing is written.

Exec, shells and services take ``secret_env`` {ENVVAR: NAME}: :func:`resolve` reads the
values from here when the process starts (a service again at each restart), so values
travel over the channel once per boot, and a service's record keeps only the names.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from pyro_mcp.guest_agent.calls import Call, CallError

SECRETS_DIR_ENV = "PYRO_AGENT_SECRETS_DIR"  # tests of the agent as a local process
DEFAULT_SECRETS_DIR = "/run/pyro-secrets"
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_SECRETS = 64
MAX_VALUE_BYTES = 64 << 10


def secrets_dir() -> str:
    return os.environ.get(SECRETS_DIR_ENV) or DEFAULT_SECRETS_DIR


def _mount_type(path: str) -> str:
    """The filesystem type of the mount ``path`` lies on (the longest mount point)."""
    best, kind = "", ""
    real = os.path.realpath(path)
    with open("/proc/self/mounts", encoding="utf-8", errors="replace") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) < 3:
                continue
            point = fields[1].replace("\\040", " ")
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, fields[2]
    return kind


def secrets_put(call: Call) -> tuple[dict[str, Any], bytes]:
    try:
        values = json.loads(call.payload.decode("utf-8")) if call.payload else {}
    except (UnicodeDecodeError, ValueError) as exc:
        raise CallError("invalid_argument", f"the secrets are not JSON: {exc}") from exc
    if not isinstance(values, dict) or len(values) > MAX_SECRETS:
        raise CallError("invalid_argument", f"secrets must be an object of at most {MAX_SECRETS}")
    for name, value in values.items():
        if not NAME.fullmatch(name) or not isinstance(value, str) or "\0" in value:
            raise CallError("invalid_argument", f"secret {name[:70]!r} is malformed")
        if not 0 < len(value.encode("utf-8")) <= MAX_VALUE_BYTES:
            raise CallError("invalid_argument", f"secret {name!r} is empty or too large")
    directory = secrets_dir()
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    kind = _mount_type(directory)
    if kind != "tmpfs":
        raise CallError(
            "not_tmpfs", f"{directory} is on {kind or 'an unknown filesystem'}, not tmpfs"
        )
    for name, value in values.items():
        temp = os.path.join(directory, f".{name}.new")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, value.encode("utf-8"))
        finally:
            os.close(fd)
        os.replace(temp, os.path.join(directory, name))
    for entry in os.listdir(directory):
        if entry not in values:
            os.unlink(os.path.join(directory, entry))
    return {"names": sorted(values)}, b""


def resolve(mapping: Any) -> dict[str, str]:
    """``secret_env`` {ENVVAR: NAME} as the variables to set. ``not_found`` for a secret
    this guest was not given."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict) or not all(
        isinstance(k, str) and NAME.fullmatch(k) and isinstance(v, str) and NAME.fullmatch(v)
        for k, v in mapping.items()
    ):
        raise CallError("invalid_argument", "secret_env must map variable names to secret names")
    env: dict[str, str] = {}
    for var, name in mapping.items():
        try:
            with open(os.path.join(secrets_dir(), name), "rb") as f:
                env[var] = f.read(MAX_VALUE_BYTES + 1).decode("utf-8")
        except FileNotFoundError:
            raise CallError("not_found", f"this guest was not given secret {name!r}") from None
    return env
