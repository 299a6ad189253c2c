"""Image references (``HOST[:PORT]/REPOSITORY[:TAG][@sha256:…]``) and where an
environment's artifact lives in a registry.

A reference names its registry explicitly: the first component is a registry when it has
a dot or a port or is ``localhost``. A reference without one is Docker Hub's
(``debian:12`` -> ``docker.io/library/debian:12``), as docker and skopeo read it.

Environment names map onto a repository and a tag: ``debian:12`` is repository
``debian``, tag ``12``; a name without a colon gets the tag ``latest``.
``PYRO_REGISTRY=HOST[:PORT]/PREFIX`` puts every environment under ``PREFIX``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from pyro_mcp.errors import InvalidArgument
from pyro_mcp.runtime.loopback import is_loopback_host

REGISTRY_ENV = "PYRO_REGISTRY"
INSECURE_ENV = "PYRO_REGISTRY_INSECURE"
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9-]+)*(?::\d{1,5})?$"
)
_IPV6_HOST = re.compile(r"^\[[0-9A-Fa-f:.]+\](?::\d{1,5})?$")


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port] as written (docker.io for Docker Hub)
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def target(self) -> str:
        """What to ask the registry's manifests endpoint for: the digest, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    def with_repository(self, repository: str) -> Reference:
        return Reference(self.registry, repository, self.tag, self.digest)

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def is_digest(value: str) -> bool:
    return bool(_DIGEST.match(value))


def check_digest(value: object, *, what: str) -> str:
    """``value`` if it is ``sha256:`` and 64 lowercase hex digits, else InvalidArgument."""
    if not isinstance(value, str) or not _DIGEST.match(value):
        raise InvalidArgument(f"{what}: {value!r} is not a sha256 digest")
    return value


def _looks_like_registry(component: str) -> bool:
    return (
        "." in component
        or ":" in component
        or component == "localhost"
        or (component.startswith("["))
    )


def parse_reference(text: str, *, what: str = "image reference") -> Reference:
    """Parse ``[HOST[:PORT]/]REPOSITORY[:TAG][@DIGEST]``; InvalidArgument says what is wrong."""
    if not isinstance(text, str) or not text or len(text) > 512 or text != text.strip():
        raise InvalidArgument(f"{what} {text!r} is empty, too long or has spaces")
    rest, _, digest = text.partition("@")
    if digest and not _DIGEST.match(digest):
        raise InvalidArgument(f"{what} {text!r}: {digest!r} is not a sha256 digest")
    first, slash, remainder = rest.partition("/")
    if slash and _looks_like_registry(first):
        registry, path = first, remainder
    else:
        registry, path = DOCKER_HUB, rest
    if not (_HOST.match(registry) or _IPV6_HOST.match(registry)):
        raise InvalidArgument(f"{what} {text!r}: {registry!r} is not a registry host[:port]")
    repository, tag = path, None
    last_slash = path.rfind("/")
    colon = path.rfind(":")
    if colon > last_slash:
        repository, tag = path[:colon], path[colon + 1 :]
        if not _TAG.match(tag):
            raise InvalidArgument(f"{what} {text!r}: {tag!r} is not a valid tag")
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    if not _REPOSITORY.match(repository):
        raise InvalidArgument(
            f"{what} {text!r}: {repository!r} is not a valid repository name",
            hint="repository names are lowercase letters, digits and . _ - separated by /",
        )
    if tag is None and not digest:
        tag = "latest"
    return Reference(registry, repository, tag, digest or None)


def environment_reference(name: str, base: str) -> Reference:
    """Where environment ``name`` lives under ``base`` (``HOST[:PORT]/PREFIX``)."""
    repository, _, tag = name.partition(":")
    base = base.rstrip("/")
    if "/" not in base and not _looks_like_registry(base):
        raise InvalidArgument(
            f"{REGISTRY_ENV}={base!r} names no registry host",
            hint="set it to HOST[:PORT]/PREFIX, e.g. registry.example.com/pyro",
        )
    return parse_reference(f"{base}/{repository}:{tag or 'latest'}", what="environment reference")


def configured_registry() -> str | None:
    """``$PYRO_REGISTRY`` if set (``HOST[:PORT]/PREFIX``), else None."""
    value = os.environ.get(REGISTRY_ENV, "").strip()
    return value or None


def is_loopback(registry: str) -> bool:
    """True for localhost and 127.0.0.0/8 or ::1 registries (plain HTTP is allowed there)."""
    host = registry
    if host.startswith("["):
        host = host[1 : host.find("]")]
    else:
        host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return is_loopback_host(host)


def insecure_from_env() -> bool:
    return os.environ.get(INSECURE_ENV, "").strip().lower() in ("1", "true", "yes")
