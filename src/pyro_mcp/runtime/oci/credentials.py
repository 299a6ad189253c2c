"""Registry credentials: only for publishing, never written anywhere, never shown.

Looked up in this order:

1. ``PYRO_REGISTRY_USERNAME`` + ``PYRO_REGISTRY_TOKEN``;
2. ``DOCKERHUB_USERNAME`` + ``DOCKERHUB_TOKEN`` (pyro-mcp 3.x's names);
3. the registry's entry in docker's ``config.json`` (``$DOCKER_CONFIG/config.json``, else
   ``~/.docker/config.json``): ``auth`` (base64 ``user:secret``) or ``username`` +
   ``password``. Credential helpers (``credsStore``) are not run.

A :class:`Credentials` prints as its user and source only: the secret is kept out of
``repr``, errors and results.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pyro_mcp.runtime.oci.reference import DOCKER_HUB

_PAIRS = (
    ("PYRO_REGISTRY_USERNAME", "PYRO_REGISTRY_TOKEN"),
    ("DOCKERHUB_USERNAME", "DOCKERHUB_TOKEN"),
)
_DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io")
_MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class Credentials:
    username: str
    secret: str = field(repr=False)
    source: str

    def basic(self) -> str:
        raw = f"{self.username}:{self.secret}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def find_credentials(registry: str) -> Credentials | None:
    """The credentials for ``registry`` (host[:port]), or None."""
    for user_var, secret_var in _PAIRS:
        user, secret = os.environ.get(user_var, ""), os.environ.get(secret_var, "")
        if user and secret:
            return Credentials(user, secret, f"{user_var}/{secret_var}")
    return _from_docker_config(registry)


def docker_config_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def _from_docker_config(registry: str) -> Credentials | None:
    path = docker_config_path()
    try:
        with open(path, "rb") as handle:
            data = json.loads(handle.read(_MAX_CONFIG_BYTES))
    except (OSError, ValueError):
        return None
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        return None
    keys = [registry, f"https://{registry}", f"http://{registry}"]
    if registry == DOCKER_HUB:
        keys += list(_DOCKER_HUB_KEYS)
    for key in keys:
        entry = auths.get(key)
        if not isinstance(entry, dict):
            continue
        user, secret = entry.get("username"), entry.get("password")
        encoded = entry.get("auth")
        if isinstance(encoded, str) and encoded:
            try:
                user, _, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                continue
        if isinstance(user, str) and isinstance(secret, str) and user and secret:
            return Credentials(user, secret, f"{path} ({key})")
    return None
