"""One Firecracker process running one guest.

Lifecycle: :meth:`FirecrackerVM.start` = :meth:`~FirecrackerVM.launch` (process up, API
answering) + :meth:`~FirecrackerVM.configure` (machine, kernel, drives, vsock) +
:meth:`~FirecrackerVM.instance_start`; or ``start(config_file=True)`` hands Firecracker the
same configuration as a JSON file and it boots without API calls. :meth:`~FirecrackerVM.restore`
loads a :class:`Snapshot` into a new process instead. :meth:`~FirecrackerVM.kill` ends the
process and removes its root (chroot or working directory) and sockets; the console and VMM
logs stay in the run directory, with ``vmm.json``: who the process was and where its root
is, so that any later process can end it and clean up the same way
(:mod:`pyro_mcp.vmm.recorded`).

As root, Firecracker is launched through the jailer (see :mod:`.jailer`); otherwise it runs
directly as the caller. The guest agent is reached over virtio-vsock (:mod:`.vsock`). The
serial console (Firecracker's stdout) goes through a pump to ``console.log`` (bounded,
see :mod:`pyro_mcp.vmm.console`); serial input is Firecracker's
stdin, a pipe when ``serial_input`` is set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from pyro_mcp.errors import BootTimeout, VMError
from pyro_mcp.guest.client import AgentClient
from pyro_mcp.guest.protocol import AGENT_VSOCK_PORT
from pyro_mcp.network.link import release_network
from pyro_mcp.network.namespace import namespace_path
from pyro_mcp.runtime.binaries import BinarySet
from pyro_mcp.vmm.base import VM, VMSpec, read_tail
from pyro_mcp.vmm.console import start_pump
from pyro_mcp.vmm.firecracker import layout as names
from pyro_mcp.vmm.firecracker.api import FirecrackerAPI
from pyro_mcp.vmm.firecracker.config import GUEST_CID, vm_config
from pyro_mcp.vmm.firecracker.jailer import JailerConfig, JailRoot, default_chroot_base
from pyro_mcp.vmm.firecracker.layout import DirectRoot, VMRoot, drive_name
from pyro_mcp.vmm.firecracker.process import VMMProcess
from pyro_mcp.vmm.firecracker.snapshot import MEMORY_FILE, STATE_FILE, Snapshot
from pyro_mcp.vmm.firecracker.vsock import VsockRefused, connect_vsock

API_READY_TIMEOUT_S = 5.0
JAILER_EXIT_TIMEOUT_S = 10.0
VSOCK_ATTEMPT_S = 2.0
SNAPSHOT_TIMEOUT_S = 120.0
LOG_LEVEL = "Info"
OVERHEAD_MIB = 32  # host memory Firecracker takes beyond the guest's RAM (MiB)


class _Auto:
    """Sentinel: decide from the environment (jailer when running as root)."""


AUTO = _Auto()


class FirecrackerVM(VM):
    """A Firecracker microVM; see the module docstring for its lifecycle."""

    backend = "firecracker"

    def __init__(
        self,
        spec: VMSpec,
        binaries: BinarySet,
        *,
        jailer: JailerConfig | _Auto | None = AUTO,
        serial_input: bool = False,
        vsock_cid: int = GUEST_CID,
    ) -> None:
        """``jailer``: a JailerConfig, None (run Firecracker directly), or AUTO (the
        jailer, with a uid derived from the VM id, when running as root).
        ``serial_input``: make the guest's serial input a pipe (:meth:`write_serial`)."""
        super().__init__(spec)
        self.binaries = binaries
        if isinstance(jailer, _Auto):
            jailer = JailerConfig.for_vm(spec.vm_id) if os.geteuid() == 0 else None
        if jailer is not None and spec.nic is not None and jailer.netns is None:
            # Firecracker opens its TAP by name: it must live where the TAP was made.
            jailer = dataclasses.replace(jailer, netns=namespace_path())
        self.jailer = jailer
        self.serial_input = serial_input
        self.vsock_cid = vsock_cid
        self.root: VMRoot
        if jailer is not None:
            base = jailer.chroot_base or default_chroot_base(spec.run_dir)
            self.root = JailRoot(binaries, jailer, spec.vm_id, base)
        else:
            self.root = DirectRoot(spec.run_dir / "root")
        self.api = FirecrackerAPI(self.root.host_path(names.API_SOCKET))
        self.vmm: VMMProcess | None = None
        self.launched_at = 0.0
        self.console_start = 0  # console.log offset where this VM's output begins
        self._root_used = False  # a root is used once: a VM object is never relaunched
        self._root_ready = False
        self._api_ready = False

    def _ready_api(self) -> FirecrackerAPI:
        """The API client, once Firecracker's API socket accepts connections."""
        self._check_alive("before the API call")
        if not self._api_ready:
            self._wait_for_api()
        return self.api

    # -- paths -----------------------------------------------------------------------
    @property
    def jailed(self) -> bool:
        return self.jailer is not None

    @property
    def api_socket(self) -> Path:
        return self.root.host_path(names.API_SOCKET)

    @property
    def vsock_socket(self) -> Path:
        return self.root.host_path(names.VSOCK_SOCKET)

    @property
    def pid(self) -> int | None:
        """Firecracker's host PID (not the jailer's)."""
        return self.vmm.pid if self.vmm else None

    # -- launching -------------------------------------------------------------------
    def launch(self) -> None:
        """Start the Firecracker process and wait until its API answers (nothing booted).

        The kernel and disks are placed in the VM's root first: a bind mount made after
        the jailer entered its own mount namespace would not reach the jail."""
        self._launch(self._place_boot_files, self._place_disks)

    def _launch(self, *placers: Callable[[], None]) -> None:
        self._prepare_root()
        try:
            for place in placers:
                place()
            self._spawn(())
            self._wait_for_api()
        except BaseException:
            self.kill()
            raise
        self.mark("api_ready_ms", self.launched_at)

    def _prepare_root(self) -> None:
        if self._root_used:
            raise VMError(f"VM {self.spec.vm_id} was already launched; create a new one")
        self.spec.validate()
        self._make_run_dir()
        self._root_used = True
        if isinstance(self.root, JailRoot):
            self.record.jail_dir = self.root.jail_dir
        else:
            self.record.root_dir = self.root.root
        self._save_record()  # before the root exists: whoever ends the VM removes it
        self.root.prepare()  # refuses an existing root: it may belong to a live VM
        self._root_ready = True

    def _spawn(self, extra_args: tuple[str, ...]) -> None:
        self.spec.vmm_log.touch(mode=0o600)
        self.root.place(self.spec.vmm_log, names.VMM_LOG, writable=True)
        args = [
            "--api-sock", names.API_SOCKET,
            "--log-path", names.VMM_LOG,
            "--level", LOG_LEVEL,
            "--show-level",
            *extra_args,
        ]  # fmt: skip
        if isinstance(self.root, JailRoot):
            argv, cwd = self.root.argv(args), None  # the jailer passes --id itself
        else:
            argv = [str(self.binaries.firecracker), "--id", self.spec.vm_id, *args]
            cwd = self.root.root
        stdin: int | IO[bytes] = subprocess.PIPE if self.serial_input else subprocess.DEVNULL
        self.console_start = self.console_size()
        self.launched_at = time.monotonic()
        console = start_pump(self.spec.console_log)  # serial output, kept bounded
        try:
            with self.spec.vmm_log.open("ab") as log:
                self.process = subprocess.Popen(
                    argv,
                    stdin=stdin,
                    stdout=console,
                    stderr=log,
                    cwd=cwd,
                    start_new_session=True,
                    close_fds=True,
                    umask=0o077,
                )
        except OSError as exc:
            raise VMError(f"cannot start {argv[0]}: {exc}") from exc
        finally:
            os.close(console)
        if isinstance(self.root, JailRoot) and self.root.config.new_pid_ns:
            # The jailer forks Firecracker into the new PID namespace and exits.
            try:
                code = self.process.wait(timeout=JAILER_EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired as exc:
                raise VMError("the jailer did not hand over to Firecracker in time") from exc
            if code != 0:
                raise VMError(
                    f"the jailer failed (exit {code}): {self.vmm_log_tail(5)}",
                    hint="the jailer needs root, cgroups and a chroot base that allows devices",
                )
            pid = self.root.read_pid()
            try:
                self.vmm = VMMProcess(pid)
            except VMError as exc:
                raise VMError(
                    f"Firecracker exited at once (PID {pid}): {self.vmm_log_tail(5)}",
                    console_tail=self.console_tail(),
                ) from exc
        else:
            self.vmm = VMMProcess(self.process.pid, child=self.process)
        self.record.process = self.vmm.identity
        self._save_record()

    def _wait_for_api(self) -> None:
        deadline = time.monotonic() + API_READY_TIMEOUT_S
        while True:
            self._check_alive("before its API socket answered")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.api_socket))
                self._api_ready = True
                return
            except (FileNotFoundError, ConnectionRefusedError):
                pass
            finally:
                probe.close()
            if time.monotonic() > deadline:
                raise VMError(
                    f"Firecracker's API socket did not appear within {API_READY_TIMEOUT_S} s: "
                    f"{self.vmm_log_tail(5)}"
                )
            time.sleep(0.0005)

    def _place_disks(self) -> None:
        for index, disk in enumerate((self.spec.root_disk, *self.spec.extra_disks)):
            self.root.place(disk.path, drive_name(index), writable=not disk.read_only)

    def _place_boot_files(self) -> None:
        self.root.place(self.spec.kernel, names.KERNEL, writable=False)
        if self.spec.initrd is not None:
            self.root.place(self.spec.initrd, names.INITRD, writable=False)

    def configure(self) -> None:
        """Send the machine, kernel, drives, vsock and balloon configuration through the API.

        Raises FirecrackerAPIError (a VMError) with Firecracker's fault message."""
        config = vm_config(self.spec, self.vsock_cid)
        self.api.machine_config.put(**config["machine-config"])
        self.api.boot_source.put(**config["boot-source"])
        for drive in config["drives"]:
            self.api.drives.put(**drive)
        self.api.vsock.put(**config["vsock"])
        self.api.balloon.put(**config["balloon"])
        self.mark("configured_ms", self.launched_at)

    def instance_start(self) -> None:
        self.api.actions.put(action_type="InstanceStart")
        self.mark("instance_started_ms", self.launched_at)

    def start(self, *, config_file: bool = False) -> None:
        """Launch Firecracker and boot the guest (or, with ``spec.restore``, load that
        snapshot and resume it); returns without waiting for the guest.

        ``config_file``: hand Firecracker its configuration as a JSON file (it boots as it
        starts, no API calls); else configure through the API. On any failure the process
        is killed and its root removed (the logs stay) before the VMError propagates.
        """
        config = vm_config(self.spec, self.vsock_cid)  # refuses what Firecracker cannot boot
        if self.spec.restore is not None:  # a template or a saved VM: load, not boot
            self.restore(Snapshot.load(self.spec.restore.state))
            return
        if not config_file:
            self.launch()
            try:
                self.configure()
                self.instance_start()
            except BaseException:
                self.kill()
                raise
            return
        self._prepare_root()
        try:
            self._place_boot_files()
            self._place_disks()
            config_path = self.root.host_path(names.CONFIG_FILE)
            config_path.write_text(json.dumps(config))
            config_path.chmod(0o644)
            self._spawn(("--config-file", names.CONFIG_FILE))
        except BaseException:
            self.kill()
            raise
        self._api_ready = False  # the API socket is waited for at its first use

    # -- snapshots -------------------------------------------------------------------
    def create_snapshot(self, directory: Path, *, resume: bool = False) -> Snapshot:
        """Pause the VM and write a full snapshot into ``directory`` (created if needed).

        The VM stays paused unless ``resume``. Restore it with :meth:`restore` on a new VM.
        """
        self.pause()
        started = time.monotonic()
        self.api.snapshot_create.put(
            snapshot_type="Full",
            snapshot_path=names.SNAPSHOT_STATE,
            mem_file_path=names.SNAPSHOT_MEMORY,
            timeout_s=SNAPSHOT_TIMEOUT_S,
        )
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.root.take(names.SNAPSHOT_STATE, directory / STATE_FILE)
        self.root.take(names.SNAPSHOT_MEMORY, directory / MEMORY_FILE)
        self.mark("snapshot_create_ms", started)
        snapshot = Snapshot(
            directory=directory,
            source_vm_id=self.spec.vm_id,
            firecracker_version=self.binaries.version,
            vcpu_count=self.spec.vcpu_count,
            mem_mib=self.spec.mem_mib,
            drive_count=1 + len(self.spec.extra_disks),
            created_ms=self.timings["snapshot_create_ms"],
        )
        snapshot.write_manifest()
        if resume:
            self.resume()
        return snapshot

    def restore(self, snapshot: Snapshot, *, resume: bool = True) -> None:
        """Load ``snapshot`` into this (new, never started) VM's own Firecracker process.

        This VM's spec gives the disks (as many, in the same order, as the source had);
        its vcpu/memory sizes are the snapshot's. Resumes unless ``resume`` is False.
        Vsock connections of the source do not survive: call :meth:`wait_ready` again.
        """
        if snapshot.firecracker_version != self.binaries.version:
            raise VMError(
                f"snapshot {snapshot.directory} was written by Firecracker "
                f"{snapshot.firecracker_version}; this is {self.binaries.version}"
            )
        drives = 1 + len(self.spec.extra_disks)
        if drives != snapshot.drive_count:
            raise VMError(f"snapshot needs {snapshot.drive_count} disks, the spec gives {drives}")

        def place_snapshot() -> None:
            self.root.place(snapshot.state_path, names.SNAPSHOT_STATE, writable=False)
            self.root.place(snapshot.memory_path, names.SNAPSHOT_MEMORY, writable=False)

        self._launch(self._place_disks, place_snapshot)
        try:
            started = time.monotonic()
            self.api.snapshot_load.put(
                snapshot_path=names.SNAPSHOT_STATE,
                mem_backend={"backend_type": "File", "backend_path": names.SNAPSHOT_MEMORY},
                resume_vm=resume,
                timeout_s=SNAPSHOT_TIMEOUT_S,
            )
        except BaseException:
            self.kill()
            raise
        self.mark("snapshot_load_ms", started)
        self.mark("restored_ms", self.launched_at)

    # -- the guest -------------------------------------------------------------------
    def console_size(self) -> int:
        """Bytes of serial output so far (an offset for :meth:`wait_for_console`)."""
        try:
            return self.spec.console_log.stat().st_size
        except FileNotFoundError:
            return 0

    def wait_for_console(
        self, marker: bytes | str, timeout_s: float, *, since: int | None = None
    ) -> float:
        """Wait until ``marker`` appears in the serial output after byte offset ``since``
        (default: where this VM's output began; the log may hold an earlier run's).

        Returns milliseconds since the process was launched. Raises BootTimeout (with the
        console tail) after ``timeout_s`` seconds, VMError when Firecracker exits first.
        """
        needle = marker.encode() if isinstance(marker, str) else marker
        deadline = time.monotonic() + timeout_s
        seen = b""
        with self.spec.console_log.open("rb") as console:
            console.seek(self.console_start if since is None else since)
            while True:
                chunk = console.read()
                if chunk:
                    seen = seen[-len(needle) :] + chunk
                    if needle in seen:
                        self.mark("console_marker_ms", self.launched_at)
                        return self.timings["console_marker_ms"]
                    continue
                self._check_alive(f"before the console showed {needle!r}")
                if time.monotonic() > deadline:
                    raise self._boot_timeout(f"the console never showed {needle!r}", timeout_s)
                time.sleep(0.0005)

    def write_serial(self, data: bytes) -> None:
        """Write ``data`` to the guest's serial input (needs ``serial_input=True``)."""
        stdin = self.process.stdin if self.process is not None else None
        if stdin is None:
            raise VMError("this VM has no serial input: create it with serial_input=True")
        try:
            stdin.write(data)
            stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise VMError(f"serial input of VM {self.spec.vm_id} is closed: {exc}") from exc

    def wait_ready(self, timeout_s: float) -> AgentClient:
        """Connect to the guest agent over vsock and say hello, within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_alive("while waiting for its agent")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._boot_timeout("the guest agent never accepted a connection", timeout_s)
            try:
                sock = connect_vsock(
                    self.vsock_socket, AGENT_VSOCK_PORT, min(VSOCK_ATTEMPT_S, remaining)
                )
                break
            except VsockRefused:
                time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))
        client = self._greet(sock, deadline, timeout_s)
        self.mark("agent_ready_ms", self.launched_at)
        return client

    # -- control ---------------------------------------------------------------------
    def pause(self) -> None:
        """Pause the vCPUs (PATCH /vm); the guest keeps its state and memory."""
        self._ready_api().vm.patch(state="Paused")

    def resume(self) -> None:
        self._ready_api().vm.patch(state="Resumed")

    def alive(self) -> bool:
        return self.vmm is not None and self.vmm.alive()

    def wait(self, timeout_s: float | None) -> bool:
        """Wait up to ``timeout_s`` seconds for Firecracker to exit; True once it has."""
        return self.vmm is None or self.vmm.wait(timeout_s)

    @property
    def returncode(self) -> int | None:
        """Firecracker's exit status when known (not when jailed in a new PID namespace)."""
        return self.vmm.returncode if self.vmm else None

    def status(self) -> str:
        """``created``, ``running``, ``paused`` or ``exited``."""
        if self.vmm is None:
            return "exited" if self._root_used else "created"
        if not self.vmm.alive():
            return "exited"
        try:
            state = self._ready_api().instance.get(timeout_s=2.0).get("state")
        except VMError:
            return "running"
        return {"Paused": "paused", "Not started": "created"}.get(state, "running")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the guest to power off; kill Firecracker if it has not exited in time."""
        if self.agent is not None and not self.agent.closed and self.alive():
            with contextlib.suppress(Exception):
                self.agent.call("shutdown", timeout_s=timeout_s)
            self.wait(timeout_s)
        self.kill()

    def kill(self) -> None:
        """SIGKILL Firecracker, wait for it to exit, remove its root and sockets (idempotent).

        Our own child is reaped here. Jailed in a new PID namespace, Firecracker is the
        (exited) child of the host's init, which reaps it; nothing of it runs any more.
        """
        if self.agent is not None:
            self.agent.close()
        self.api.close()
        if self.vmm is not None:
            self.vmm.kill()  # raises (keeping the handle and the root) if it will not die
            self.vmm.close()
            self.vmm = None
        if self.process is not None:
            if self.process.poll() is None:  # a jailer that never handed over
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            if self.process.stdin is not None:
                with contextlib.suppress(OSError):
                    self.process.stdin.close()
        if self._root_ready:
            self._root_ready = False
            self.root.cleanup()
        if self.spec.nic is not None:
            release_network(self.spec.vm_id)

    def __enter__(self) -> FirecrackerVM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    # -- errors ----------------------------------------------------------------------
    def _boot_timeout(self, why: str, timeout_s: float) -> BootTimeout:
        log = read_tail(self.spec.vmm_log, 5)
        return BootTimeout(
            f"guest {self.spec.vm_id} did not become ready within {timeout_s} s: {why}"
            + (f"\n--- Firecracker log (tail) ---\n{log}" if log else ""),
            hint="see the serial console tail below",
            console_tail=self.console_tail(),
        )

    def _check_alive(self, when: str) -> None:
        if self.vmm is not None and not self.vmm.alive():
            code = self.vmm.returncode
            how = f"with {code}" if code is not None else "(killed, or it failed)"
            raise VMError(
                f"Firecracker exited {how} {when}: {self.vmm_log_tail(5)}",
                console_tail=self.console_tail(),
            )
        if self.vmm is None and self._root_used:
            raise VMError(f"VM {self.spec.vm_id} was killed {when}")
