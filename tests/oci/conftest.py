"""Fixtures for the registry tests: a real loopback registry pair, and a small environment
built with a stand-in debootstrap (no VM), proven by recorded checks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.registry import Registry, registry_pair
from tests.unit.test_environments import fake_debootstrap

from pyro_mcp.runtime import env_obtain, lock, rootfs
from pyro_mcp.runtime.paths import RuntimePaths

USER, TOKEN = "publisher", "correct-horse-battery"
ENV = "debian:12-base"


@pytest.fixture
def registries(tmp_path: Path) -> Iterator[tuple[Registry, Registry]]:
    """(htpasswd registry for publishing, anonymous read-only one), one storage."""
    with registry_pair(tmp_path / "registry", {USER: TOKEN}) as pair:
        yield pair


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYRO_REGISTRY_USERNAME", USER)
    monkeypatch.setenv("PYRO_REGISTRY_TOKEN", TOKEN)


@pytest.fixture(autouse=True)
def no_registry_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in (
        "PYRO_REGISTRY",
        "PYRO_REGISTRY_USERNAME",
        "PYRO_REGISTRY_TOKEN",
        "DOCKERHUB_USERNAME",
        "DOCKERHUB_TOKEN",
        "PYRO_REGISTRY_INSECURE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))


def make_cache(root: Path) -> RuntimePaths:
    paths = RuntimePaths(root)
    paths.ensure()
    return paths


def prove(paths: RuntimePaths, name: str) -> None:
    """Record passed checks for ``name``'s current image (what `pyro env prove` writes
    after a real boot; the boot itself is the guest tests' business)."""
    current = lock.artifact_digests(lock.collect_components(paths, deep=False))
    artifacts = {f"env:{name}": current[f"env:{name}"]}
    for capability in ("vm_boot", "guest_exec"):
        lock.record_check(
            paths, capability, passed=True, artifacts=artifacts, detail="test", environment=name
        )


@pytest.fixture
def built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RuntimePaths:
    """A cache with ENV built by the stand-in debootstrap (not yet proven)."""
    monkeypatch.setattr(rootfs, "run_debootstrap", fake_debootstrap([]))
    paths = make_cache(tmp_path / "publisher-cache")
    env_obtain.obtain(paths, ENV, build=True)
    return paths
