"""Shared fixtures: a real runtime (built on first use) for the guest tests."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.leftovers import jail_dirs, leftovers, vm_cgroups

from pyro_mcp.api import Context
from pyro_mcp.runtime.paths import RuntimePaths, runtime_paths


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The cluster tests last: their Ray driver leaves threads in this process, and later
    tests fork (a fork beside another library's threads is not safe)."""
    items.sort(key=lambda item: item.nodeid.startswith("tests/cluster/"))


@pytest.fixture(autouse=True)
def no_new_empty_vm_cgroups() -> Iterator[None]:
    """Fail the very test after which an empty VMM cgroup is left that was not there
    before it (a VM cleaned up without its cgroups), so a leak names its test."""
    before = set(vm_cgroups())
    yield
    left = sorted(str(group) for group in set(vm_cgroups()) - before)
    assert left == [], f"VMM cgroups this test left behind: {left}"


def _progress(message: str) -> None:
    print(f"[runtime] {message}", file=sys.stderr, flush=True)


@pytest.fixture(scope="session")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimePaths]:
    """The host's runtime cache with the kernel and ``debian:12`` ready.

    Builds what is missing (the kernel from source takes ~5 minutes on a fresh host);
    VMs get a private run directory so a test run never touches another's sockets.
    """
    from pyro_mcp.api.operations.environments import env_pull
    from pyro_mcp.api.operations.runtime import runtime_build_kernel, runtime_fetch

    run_root = Path(f"/tmp/pyro-test-{os.getpid()}")
    os.environ["PYRO_RUN_DIR"] = str(run_root)
    paths = RuntimePaths(runtime_paths().cache_dir, run_root)
    ctx = Context(paths=paths, progress=_progress)
    runtime_fetch(ctx)
    runtime_build_kernel(ctx)
    env_pull(ctx, "debian:12")
    jails_before = jail_dirs()  # another pyro process's live VMs may have some
    yield paths
    # Whichever the VMM (QEMU, Firecracker with or without the jailer): no run directory,
    # VMM process, jail, mount in a jail or empty VMM cgroup (a live VM, maybe of another
    # pyro process, keeps its own populated) is left.
    problems = leftovers(run_root, jails_before=jails_before)
    assert problems == [], "; ".join(problems)
    if run_root.exists():
        run_root.rmdir()


@pytest.fixture
def ctx(runtime: RuntimePaths) -> Context:
    return Context(paths=runtime)


@pytest.fixture
def ws_ctx(runtime: RuntimePaths, tmp_path: Path) -> Iterator[Context]:
    """A context with a private state dir; every workspace or VM left in it is deleted after."""
    from pyro_mcp.api.operations.workspaces import open_workspaces

    context = Context(paths=runtime, state_dir=tmp_path / "state")
    yield context
    with open_workspaces(context) as workspaces:
        every = workspaces.every_kind()  # lifecycle VMs too
        for record in every.store.list():
            every.delete(record.id)
