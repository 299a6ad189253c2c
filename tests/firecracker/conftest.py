"""Fixtures for the Firecracker tests: the tiny guest, verified binaries, a VM factory.

The tiny guest is assembled and linked once per session (see ``fc_support``). Binaries
come from ``fetch_binaries`` into ``$PYRO_CACHE_DIR`` when set, else a session temp dir.
Every test here skips, saying why, when /dev/kvm is unusable or a tool is missing.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fc_support import ToolMissing, VMFactory, build_tiny_guest

from pyro_mcp.errors import PyroError
from pyro_mcp.runtime.binaries import BinarySet, fetch_binaries
from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.vmm.base import Disk, VMSpec
from pyro_mcp.vmm.firecracker import FirecrackerVM, JailerConfig

_VM_NUMBERS = itertools.count()  # VM ids (and run dirs) unique across the session


def _kvm_problem() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm is absent: Firecracker needs KVM"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


@pytest.fixture(scope="session", autouse=True)
def _require_kvm() -> None:
    problem = _kvm_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="session")
def tiny_kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_tiny_guest(tmp_path_factory.mktemp("tiny-guest"))
    except ToolMissing as exc:
        pytest.skip(f"cannot build the tiny guest: {exc}")


@pytest.fixture(scope="session")
def fc_binaries(tmp_path_factory: pytest.TempPathFactory) -> BinarySet:
    cache = os.environ.get("PYRO_CACHE_DIR")
    cache_dir = Path(cache) if cache else tmp_path_factory.mktemp("pyro-cache")
    try:
        return fetch_binaries(RuntimePaths(cache_dir=cache_dir))
    except PyroError as exc:
        pytest.skip(f"cannot fetch the Firecracker binaries: {exc}")


@pytest.fixture(scope="session")
def short_dir() -> Iterator[Path]:
    """A short base path: Firecracker's Unix socket paths must stay under ~100 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pyro-fc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tiny_disk(short_dir: Path) -> Path:
    """A 1 MiB raw disk: the VM code always attaches a root drive."""
    fd, name = tempfile.mkstemp(prefix="disk-", suffix=".raw", dir=short_dir)
    os.ftruncate(fd, 1 << 20)
    os.close(fd)
    return Path(name)


def root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("the jailer needs root")


@pytest.fixture
def make_vm(
    fc_binaries: BinarySet, tiny_kernel: Path, tiny_disk: Path, short_dir: Path
) -> Iterator[VMFactory]:
    """Build FirecrackerVMs for the tiny guest; every one is killed after the test."""
    made: list[FirecrackerVM] = []

    def factory(
        *,
        jailed: bool = False,
        jailer: JailerConfig | None = None,
        kernel: Path | None = None,
        disk: Path | None = None,
        disk_format: str = "raw",
        serial_input: bool = True,
        mem_mib: int = 128,
    ) -> FirecrackerVM:
        vm_id = f"t{os.getpid()}x{next(_VM_NUMBERS)}"
        spec = VMSpec(
            vm_id=vm_id,
            run_dir=short_dir / vm_id,
            kernel=kernel or tiny_kernel,
            root_disk=Disk(disk or tiny_disk, disk_format),
            mem_mib=mem_mib,
        )
        if jailed or jailer is not None:
            root_only()
            jailer = jailer or JailerConfig.for_vm(vm_id)
        vm = FirecrackerVM(spec, fc_binaries, jailer=jailer, serial_input=serial_input)
        made.append(vm)
        return vm

    yield factory
    for vm in made:
        with contextlib.suppress(PyroError):
            vm.kill()
