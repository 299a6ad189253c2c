"""VMs and workspaces whose VMM is the fake Firecracker (``fake_firecracker.py``) or the
fake QEMU (``fake_qemu.py``).

:func:`make_fake_host` installs the fake ``firecracker``, ``jailer`` and
``qemu-system-x86_64`` programs in a temporary directory and points pyro at them (and at a
stand-in kernel and environment image); everything else runs as on a real host:
``Workspaces.create`` boots through ``FirecrackerVM`` (jailed when root, unless
``jailed=False``) or ``QemuVM`` (unconfined: a confined QEMU sees only system programs),
the agent is pyro's own, stop, delete, reconcile and the sweeps are the real code paths.
:meth:`FakeHost.in_child` does the same in another process (``python -m
tests.fake_vmm.child``), which then dies or exits: what any later pyro process finds after
a crash or after a CLI command returned.

Every fake process appends ``<kind> <pid> <vm id>`` to :attr:`FakeHost.log`, so a test
can name exactly what its VMs were and check that none is left.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests.leftovers import leftovers, mounts_under, process_running

import pyro_mcp
from pyro_mcp.runtime import binaries, environments
from pyro_mcp.runtime.binaries import BinarySet
from pyro_mcp.runtime.kernel_artifact import KernelArtifact
from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.vmm import launch, selection, warm
from pyro_mcp.vmm.base import VMSpec
from pyro_mcp.vmm.firecracker import FirecrackerVM
from pyro_mcp.vmm.launch import BackendChoice
from pyro_mcp.vmm.qemu import vm as qemu_vm
from pyro_mcp.vmm.qemu.confinement import Confinement, vmm_dir
from pyro_mcp.vmm.warm import cold
from pyro_mcp.workspace.lifecycle import Workspaces

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SRC = Path(pyro_mcp.__file__).resolve().parents[1]  # the pyro under test, for children
FIRECRACKER_CHOICE = BackendChoice("firecracker", "kvm", "the fake Firecracker of the unit tests")
QEMU_CHOICE = BackendChoice("qemu", "tcg", "the fake QEMU of the unit tests")
Setter = Callable[[Any, str, Any], None]


def _program(directory: Path, name: str, script: Path) -> Path:
    """An executable ``directory/name`` that runs ``script`` (with ``-S``: no site)."""
    path = directory / name
    path.write_text(
        f"#!{sys.executable} -S\n"
        "import runpy, sys\n"
        f"sys.argv[0] = {str(script)!r}\n"
        f"sys.path.insert(0, {str(script.parent)!r})\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')\n"
    )
    path.chmod(0o755)
    return path


@dataclass
class FakeHost:
    """A runtime whose Firecracker is the fake: paths, binaries and what ran."""

    paths: RuntimePaths
    state_dir: Path
    bin_dir: Path
    jailed: bool
    backend: str = "firecracker"
    workspaces: list[Workspaces] = field(default_factory=list)

    @property
    def log(self) -> Path:
        return self.bin_dir / "fake-vmm.log"

    @property
    def binaries(self) -> BinarySet:
        return BinarySet(
            version="v0-fake",
            firecracker=self.bin_dir / "firecracker",
            jailer=self.bin_dir / "jailer",
            source="local",
        )

    @property
    def image(self) -> Path:
        return self.paths.cache_dir / "env.ext4"

    @property
    def kernel(self) -> KernelArtifact:
        cache = self.paths.cache_dir
        return KernelArtifact(
            flavor="source", package="fake", version="0", pinned=True, key="0" * 64,
            directory=cache, vmlinux=cache / "vmlinux", bzimage=cache / "vmlinux",
            initramfs=None, files={}, release="0-fake", build_seconds=0.0,
        )  # fmt: skip

    def env(self) -> dict[str, str]:
        return {"PYRO_FAKE_VMM_LOG": str(self.log), "PYRO_FAKE_VMM_SRC": str(SRC)}

    def patch(self, setter: Setter) -> None:
        """Point pyro at the fakes (``setter``: ``monkeypatch.setattr`` or ``setattr``)."""
        image, kernel, fake = self.image, self.kernel, self.binaries
        choice = QEMU_CHOICE if self.backend == "qemu" else FIRECRACKER_CHOICE
        qemu = str(self.bin_dir / "qemu-system-x86_64")
        setter(environments, "image_for", lambda paths, environment: image)
        setter(launch, "kernel_for", lambda paths, flavor=None: kernel)
        setter(binaries, "installed_binaries", lambda paths: fake)
        setter(selection, "choose_backend", lambda *args, **kwargs: choice)
        setter(qemu_vm, "require", lambda program: qemu)
        setter(qemu_vm, "confine", _unconfined)
        if not self.jailed:
            setter(launch, "FirecrackerVM", functools.partial(FirecrackerVM, jailer=None))
        if self.backend == "qemu":  # the fake QEMU saves no state: its VMs boot
            setter(warm, "plan_boot", lambda *args, **kwargs: cold("the fake QEMU boots"))

    def open(self) -> Workspaces:
        opened = Workspaces(self.paths, self.state_dir)
        self.workspaces.append(opened)
        return opened

    def in_child(self, action: str, **options: Any) -> dict[str, Any]:
        """Run ``action`` of :mod:`tests.fake_vmm.child` in another process; its report."""
        params = {
            "cache_dir": str(self.paths.cache_dir),
            "run_root": str(self.paths.run_root),
            "state_dir": str(self.state_dir),
            "bin_dir": str(self.bin_dir),
            "jailed": self.jailed,
            "backend": self.backend,
            "action": action,
            **options,
        }
        env = {**os.environ, **self.env(), "PYTHONPATH": f"{SRC}{os.pathsep}{REPO}"}
        done = subprocess.run(
            [sys.executable, "-m", "tests.fake_vmm.child", json.dumps(params)],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=60,
        )
        lines = done.stdout.strip().splitlines()
        assert lines, f"the child process reported nothing: {done.stderr}"
        report: dict[str, Any] = json.loads(lines[-1])
        report["returncode"] = done.returncode
        return report

    def launched(self) -> list[tuple[str, int, str]]:
        """(kind, pid, vm id) of every fake process started so far."""
        if not self.log.exists():
            return []
        rows = [line.split() for line in self.log.read_text().splitlines()]
        return [(kind, int(pid), vm_id) for kind, pid, vm_id in rows]

    def vmm_pid(self, vm_id: str) -> int:
        """The pid of the latest fake VMM of ``vm_id``."""
        pids = [pid for kind, pid, vid in self.launched() if kind == self.backend and vid == vm_id]
        assert pids, f"no fake {self.backend} ran for {vm_id}"
        return pids[-1]

    def running_vmms(self) -> list[int]:
        return [pid for _, pid, _ in self.launched() if process_running(pid)]

    def jail_dir(self, vm_id: str) -> Path:
        return self.paths.run_root / vm_id / "jail" / "firecracker" / vm_id

    def close(self) -> list[str]:
        """Delete every workspace left and end every fake process; what was left behind."""
        problems: list[str] = []
        for opened in self.workspaces:
            for record in opened.store.list():
                try:
                    opened.delete(record.id)
                except Exception as exc:
                    problems.append(f"deleting {record.id} failed: {exc!r}")
            opened.close()
        left = self.running_vmms()
        if left:
            problems.append(f"fake VMM processes left running: {left}")
        for pid in left:
            subprocess.run(["kill", "-9", str(pid)], check=False)
        ids = sorted({vm_id for _, _, vm_id in self.launched()})
        problems += leftovers(self.paths.run_root, ids, extra_roots=[self.state_dir])
        _force_remove(self.paths.run_root)
        if self.state_dir.is_relative_to("/dev/shm"):
            _force_remove(self.state_dir)
        return problems


def _unconfined(spec: VMSpec, argv: list[str], **_: Any) -> Confinement:
    """QEMU's launch as without root (a confined QEMU sees only system programs)."""
    vmm_dir(spec.run_dir).mkdir(mode=0o700, exist_ok=True)
    return Confinement(argv, summary={"confined": False, "reason": "the unit tests' fake"})


def make_fake_host(
    directory: Path, *, jailed: bool, state_dir: Path, backend: str = "firecracker"
) -> FakeHost:
    """Install the fake programs, a stand-in kernel and environment image in ``directory``."""
    bin_dir = directory / "bin"
    bin_dir.mkdir(parents=True)
    _program(bin_dir, "firecracker", HERE / "fake_firecracker.py")
    _program(bin_dir, "jailer", HERE / "fake_jailer.py")
    _program(bin_dir, "qemu-system-x86_64", HERE / "fake_qemu.py")
    cache = directory / "cache"
    cache.mkdir()
    (cache / "vmlinux").write_bytes(b"\x7fELF: not really a kernel\n")
    with (cache / "env.ext4").open("wb") as handle:
        handle.truncate(4 << 20)
    # Firecracker's socket paths must stay short: a run root right under /tmp.
    run_root = Path(tempfile.mkdtemp(prefix="pyro-u-", dir="/tmp"))
    return FakeHost(RuntimePaths(cache, run_root), state_dir, bin_dir, jailed, backend)


def _force_remove(root: Path) -> None:
    """Remove a test's directory even when the code under test left mounts in it."""
    if not root.exists():
        return
    for mount in sorted(mounts_under([root]), key=lambda p: -len(str(p))):
        subprocess.run(["umount", "-l", str(mount)], check=False)
    shutil.rmtree(root, ignore_errors=True)


FakeHostFactory = Callable[..., FakeHost]
"""``factory(jailed=True, other_filesystem=False, backend="firecracker")``."""


def fake_hosts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHostFactory]:
    """The ``fake_host`` fixture: make a FakeHost and point pyro at it; after the test,
    every workspace is deleted and the test fails if anything of its VMs is left
    (processes, run dirs, jails, mounts, cgroups). ``other_filesystem``: the workspace
    disks live on /dev/shm, another filesystem than the jail's, so it bind-mounts them."""
    hosts: list[FakeHost] = []

    def factory(
        *, jailed: bool = True, other_filesystem: bool = False, backend: str = "firecracker"
    ) -> FakeHost:
        jailed = jailed and backend == "firecracker"
        if jailed and os.geteuid() != 0:
            pytest.skip("the jailer's layout (bind mounts, cgroups, device nodes) needs root")
        if other_filesystem:
            if not Path("/dev/shm").is_dir():
                pytest.skip("no /dev/shm")
            state = Path(tempfile.mkdtemp(prefix="pyro-u-state-", dir="/dev/shm"))
        else:
            state = tmp_path / f"state{len(hosts)}"
        host = make_fake_host(
            tmp_path / f"host{len(hosts)}", jailed=jailed, state_dir=state, backend=backend
        )
        for name, value in host.env().items():
            monkeypatch.setenv(name, value)
        host.patch(monkeypatch.setattr)
        hosts.append(host)
        return host

    yield factory
    problems = [problem for host in hosts for problem in host.close()]
    assert problems == [], f"the test left things behind: {problems}"
