"""A VMM without a VM, for the workspace orchestration tests (no kernel, no guest).

:class:`FakeVM` is a backend like QEMU's: ``start`` launches one process per VM, in its
own session, with the run directory in its argv, and that process serves the guest agent
on the same Unix sockets QEMU would (``<run dir>/vmm/agent.N.sock``, one host at a time
per port, each port guarded by the host's ``agent.N.lock``). The process is the real
agent, run as this file in new mount, PID and UTS namespaces (``unshare``):

- ``/workspace`` is the workspace's own ``workspace.ext4``, loop-mounted, so a seed, a
  write, a stop and a start go through the real disk image as with a VM;
- ``/run`` is a fresh tmpfs (the agent keeps service and shell state there), ``/proc``
  is the new PID namespace's; everything else is the host's, bind-mounted read-write;
- ``shutdown`` kills every process of the "guest", unmounts ``/workspace`` and exits;
  killing the VMM (SIGKILL to its process group, as the lifecycle does to QEMU) ends the
  whole PID namespace, like a VM losing power.

``reidentify`` answers without doing anything: the real one sets the clock, and here
that clock would be the host's.

:func:`install` points ``Workspaces`` at this backend (the environment image, backend
choice, VM spec and VM construction). It needs root, ``unshare`` and loop devices;
:func:`unavailable` says why not, for a skip.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest

FAKE_LABEL = "qemu-fake"
PORT_DIR = "vmm"  # the run dir's subdirectory QEMU makes its sockets in
BUSY_DISK_S = 10.0  # how long a start waits for the previous boot's loop device to go
# What the "guest" sees of the host as it is; the rest is its own.
OWN_MOUNTS = ("proc", "run", "workspace")
# A fake VM fails its boot as this variable says: ``mount`` (the workspace disk does not
# mount), ``exit`` (the VMM exits at once), ``hang`` (the guest never answers).
FAIL_ENV = "PYRO_FAKE_VM_FAIL"
NO_DISK = "-"  # the disk argument of a VM without a workspace disk


# --- the host side: a VM backend ---------------------------------------------------------


def unavailable() -> str | None:
    """Why fake VMs cannot run here (None: they can)."""
    if os.geteuid() != 0:
        return "fake VMs mount the workspace disk: they need root"
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "fake VMs need unshare and mount (util-linux)"
    if shutil.which("mke2fs") is None:
        return "workspace disks need mke2fs (e2fsprogs)"
    if not Path("/dev/loop-control").exists():
        return "fake VMs loop-mount the workspace disk: no /dev/loop-control"
    probe = subprocess.run(
        ["unshare", "--mount", "--pid", "--uts", "--fork", "--propagation", "private", "true"],
        capture_output=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return f"cannot make mount and PID namespaces: {probe.stderr.decode().strip()}"
    return None


def _loop_devices_of(image: Path) -> str:
    found = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True)
    return found.stdout.strip()


def make_fake_vm_class() -> type[Any]:
    """The FakeVM class (built on first use: importing this module stays cheap)."""
    from pyro_mcp.errors import VMError
    from pyro_mcp.guest.client import AgentClient
    from pyro_mcp.vmm.base import VM
    from pyro_mcp.vmm.qemu.vm import agent_socket, lock_port

    class FakeVM(VM):
        backend = "qemu"

        def __init__(self, spec: Any) -> None:
            super().__init__(spec)
            self._port_lock: int | None = None

        @property
        def workspace_disk(self) -> Path | None:
            """The disk mounted at /workspace (None: a lifecycle VM, which has none)."""
            disks = self.spec.extra_disks
            return Path(disks[0].path) if disks else None

        def start(self) -> None:
            run_dir = self.spec.run_dir
            (run_dir / PORT_DIR).mkdir(parents=True, exist_ok=True, mode=0o700)
            # A VM that was killed a moment ago may still hold the disk: never mount an
            # ext4 image twice at once.
            deadline = time.monotonic() + BUSY_DISK_S
            while self.workspace_disk is not None and _loop_devices_of(self.workspace_disk):
                if time.monotonic() > deadline:
                    raise VMError(f"{self.workspace_disk} is still attached to a loop device")
                time.sleep(0.05)
            import pyro_mcp

            source = str(Path(pyro_mcp.__file__).resolve().parents[1])
            inherited = os.environ.get("PYTHONPATH")
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [source, inherited])))
            argv = [
                *("unshare", "--mount", "--pid", "--uts", "--fork", "--kill-child"),
                *("--propagation", "private"),
                *(sys.executable, str(Path(__file__).resolve())),
                *(str(run_dir), str(self.workspace_disk or NO_DISK), str(self.spec.agent_ports)),
            ]
            with (
                self.spec.console_log.open("ab") as console,
                self.spec.vmm_log.open("ab") as log,
            ):
                self.process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=console,
                    stderr=log,
                    start_new_session=True,
                    env=env,
                )
            self._save_record(self.process.pid)  # its identity, as every VMM's is recorded

        def wait_ready(self, timeout_s: float) -> AgentClient:
            deadline = time.monotonic() + timeout_s
            if self._port_lock is None:
                self._port_lock = lock_port(self.spec.run_dir, 0, wait=True)
            while True:
                self._check_alive("while waiting for its agent socket")
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(str(agent_socket(self.spec.run_dir, 0)))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    sock.close()
                if time.monotonic() > deadline:
                    raise self._boot_timeout("the agent socket never appeared", timeout_s)
                time.sleep(0.01)
            return self._greet(sock, deadline, timeout_s)

        def pause(self) -> None:
            if self.process is not None:
                os.killpg(self.process.pid, signal.SIGSTOP)

        def resume(self) -> None:
            if self.process is not None:
                os.killpg(self.process.pid, signal.SIGCONT)

        def _release_channel(self) -> None:
            if self._port_lock is not None:
                os.close(self._port_lock)
                self._port_lock = None

    return FakeVM


def install(monkeypatch: pytest.MonkeyPatch, base_image: Path) -> None:
    """Make ``Workspaces`` boot fake VMs: every environment is ``base_image``, the backend
    is ``qemu-fake``, and a VM is a :class:`FakeVM` of the spec the lifecycle asks for."""
    from pyro_mcp.runtime import environments
    from pyro_mcp.vmm import launch, selection, warm
    from pyro_mcp.vmm.base import VMSpec
    from pyro_mcp.vmm.launch import BackendChoice
    from pyro_mcp.vmm.warm import cold

    fake_vm = make_fake_vm_class()
    choice = BackendChoice("qemu", "fake", "fake VMs for unit tests")
    # Where the lifecycle finds them when it boots a VM.
    monkeypatch.setattr(warm, "plan_boot", lambda *a, **k: cold("a fake VM boots"))

    def build_spec(paths: Any, *, vm_id: str, root_overlay: Path, **options: Any) -> VMSpec:
        from pyro_mcp.vmm.identity import mark_run_dir

        run_dir = mark_run_dir(paths.run_root / vm_id)
        if not root_overlay.exists():
            root_overlay.write_bytes(b"")  # the root disk is never read: the host's is used
        from pyro_mcp.vmm.base import Disk

        return VMSpec(
            vm_id=vm_id,
            run_dir=run_dir,
            kernel=Path("/nonexistent/vmlinux"),
            root_disk=Disk(root_overlay),
            extra_disks=options["extra_disks"],
            kernel_args=options["kernel_args"],
            vcpu_count=options["vcpu_count"],
            mem_mib=options["mem_mib"],
            agent_ports=options["agent_ports"],
        )

    monkeypatch.setattr(environments, "image_for", lambda _paths, _environment: base_image)
    monkeypatch.setattr(selection, "choose_backend", lambda *_args, **_kwargs: choice)
    monkeypatch.setattr(launch, "build_spec", build_spec)
    monkeypatch.setattr(launch, "create_vm", lambda _paths, spec, _choice: fake_vm(spec))


def vmm_processes(run_root: Path) -> list[int]:
    """Pids of fake VMMs (and their guests) still running for VMs under ``run_root``."""
    needle = str(run_root).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if needle in cmdline and Path(__file__).name.encode() in cmdline:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def left_behind(state_dir: Path, run_root: Path) -> list[str]:
    """Everything of workspaces that is left: records (read without the repairs a list or
    reconcile makes), their files, run directories and VMM processes."""
    from pyro_mcp.workspace.store import WorkspaceStore

    store = WorkspaceStore(state_dir / "store.sqlite3", kind=None)  # workspaces and VMs
    try:
        left = [f"record {r.id} ({r.state})" for r in store.list()]
    finally:
        store.close()
    files = state_dir / "workspaces"
    if files.exists():
        left += [f"file {p.relative_to(state_dir)}" for p in sorted(files.rglob("*"))]
    left += [f"run dir {p.name}" for p in sorted(run_root.iterdir())]
    left += [f"VMM process {pid}" for pid in vmm_processes(run_root)]
    return left


# --- the "guest" side: this file run in its namespaces ---------------------------------


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def _guest_root(run_dir: Path, disk: Path, fail: str) -> Path:
    """The guest's root: the host's top-level directories bound in, its own /proc, /run
    and /workspace (the workspace disk, unless ``fail`` says the mount fails)."""
    root = run_dir / "guest-root"
    root.mkdir(mode=0o755)
    _mount("-t", "tmpfs", "-o", "mode=0755", "guest-root", str(root))
    for entry in os.scandir("/"):
        target = root / entry.name
        if entry.name in OWN_MOUNTS:
            target.mkdir()
        elif entry.is_symlink():
            target.symlink_to(os.readlink(entry.path))
        elif entry.is_dir(follow_symlinks=False):
            target.mkdir()
            _mount("--rbind", entry.path, str(target))
    (root / "workspace").mkdir(exist_ok=True)
    _mount("-t", "proc", "proc", str(root / "proc"))
    _mount("-t", "tmpfs", "-o", "mode=0755", "run", str(root / "run"))
    (root / "run/pyro").mkdir()
    if fail == "mount":
        (root / "run/pyro/boot-errors").write_text("cannot mount /dev/vdb: fake failure\n")
    elif str(disk) != NO_DISK:
        _mount("-o", "loop", str(disk), str(root / "workspace"))
    return root


def _power_off() -> None:
    """What the guest's init does at shutdown: end everything, flush the disk, power off."""
    with contextlib.suppress(ProcessLookupError):  # none is left
        os.kill(-1, signal.SIGKILL)  # every process of this PID namespace but its init (us)
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.umount2(b"/workspace", 0)
    os._exit(0)


def _serve_port(listener: socket.socket) -> None:
    from pyro_mcp.guest_agent.agent import Agent

    def reidentify(_call: object) -> tuple[dict[str, Any], bytes]:
        return {"reidentified": []}, b""

    while True:
        conn, _ = listener.accept()
        with conn:
            agent = Agent(conn.fileno(), poweroff=_power_off)
            agent.handlers["reidentify"] = reidentify
            agent.serve()


def guest_main(argv: list[str]) -> None:
    run_dir, disk, ports = Path(argv[0]), Path(argv[1]), int(argv[2])
    fail = os.environ.get(FAIL_ENV, "")
    if fail == "exit":
        print("fake-vmm: the guest crashed at boot", flush=True)
        sys.exit(3)
    if fail == "hang":
        threading.Event().wait()  # a guest that never comes up
    import pyro_mcp.guest_agent.agent  # noqa: F401  (before the root changes)

    root = _guest_root(run_dir, disk, fail)
    listeners = []
    for port in range(ports):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(run_dir / PORT_DIR / f"agent.{port}.sock"))
        listener.listen(1)
        listeners.append(listener)
    os.chroot(root)
    os.chdir("/")
    socket.sethostname(f"pyro-{run_dir.name[:8]}")
    print("pyro-init: ready", flush=True)
    for listener in listeners:
        threading.Thread(target=_serve_port, args=(listener,), daemon=True).start()
    threading.Event().wait()


if __name__ == "__main__":
    guest_main(sys.argv[1:])
