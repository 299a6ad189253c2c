"""The backend interface every VMM implements.

A :class:`VMSpec` says what to boot; a backend turns it into a :class:`VM`, a handle on
one VMM process: ``start`` launches and boots it, ``wait_ready`` returns a connected
:class:`~pyro_mcp.guest.client.AgentClient`, and the rest controls or ends it. Every wait
is bounded and, on failure, its error carries the tail of the serial console.

Each backend records who its VMM process is, and what the VM holds outside it, in the run
directory (:class:`~pyro_mcp.vmm.identity.VMMRecord`) as soon as it knows: any later
process ends it and cleans up after it from that record (:mod:`pyro_mcp.vmm.recorded`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from pyro_mcp.errors import (
    AgentUnavailable,
    BootTimeout,
    InvalidArgument,
    OperationTimeout,
    VMError,
)
from pyro_mcp.guest.client import AgentClient
from pyro_mcp.vmm import console
from pyro_mcp.vmm.identity import ProcessIdentity, VMMRecord, mark_run_dir

MIN_MEM_MIB = 128
NETWORK_BOOT_ERROR = "cannot bring up the network"  # how pyro-init reports it
MAX_VCPUS = 32


@dataclass(frozen=True)
class Disk:
    path: Path
    format: str = "raw"  # raw | qcow2
    read_only: bool = False


@dataclass(frozen=True)
class Nic:
    """The guest's network device (:mod:`pyro_mcp.network.link` makes its TAP). ``fd``:
    an open TAP the VMM is handed and the VM owns from its start (QEMU); None when the
    VMM opens ``tap`` by name (Firecracker)."""

    tap: str
    mac: str
    kernel_arg: str  # how the guest learns its address, gateway and MAC
    fd: int | None = None


@dataclass(frozen=True)
class Restore:
    """Start from a saved state instead of booting (the spec must have the device layout
    the state was saved with): ``state`` is QEMU's state file or a Firecracker snapshot's
    directory. ``identity``: a guest's new name (a clone of a template or
    of another workspace gets a hostname of its own, a fresh machine-id and random state);
    None for a resume (only the clock is set). ``workspace_device``: the disk to mount at
    /workspace once restored (a template's slot for it held a placeholder). ``ram``: the
    template's guest RAM (its content digest ``ram_digest``), mapped privately instead of
    loaded: the state then holds only the devices and what is not in that RAM."""

    state: Path
    identity: str | None = None
    workspace_device: str | None = None
    ram: Path | None = None
    ram_digest: str | None = None


@dataclass(frozen=True)
class VMSpec:
    """What to boot."""

    vm_id: str
    run_dir: Path  # sockets, console log, VMM log; removed when the VM is cleaned up
    kernel: Path  # vmlinux (ELF) or bzImage
    root_disk: Disk
    initrd: Path | None = None
    kernel_args: tuple[str, ...] = ()
    extra_disks: tuple[Disk, ...] = ()
    vcpu_count: int = 1
    mem_mib: int = 256
    hostname: str = "pyro"
    agent_ports: int = 1  # channels to the agent: one per host process talking at once
    nic: Nic | None = None  # None: no network device at all
    read_files: tuple[Path, ...] = ()  # what the VMM only reads besides the kernel (backing
    # images of copy-on-write disks): a confined VMM sees these and nothing else of the host
    extra: dict[str, str] = field(default_factory=dict)
    restore: Restore | None = None  # None: boot the kernel
    ram_file: Path | None = None  # guest RAM kept in this file (a template being built)
    # The balloon reports pages the guest frees, and the VMM drops them. Off for a template
    # and its clones: QEMU 7.2 would punch the hole in the RAM file they map (the seal
    # refuses it, so all it gives is an error per page). Part of the device layout: a
    # saved state restores only into a VM with the same setting.
    free_page_reporting: bool = True

    def validate(self) -> None:
        if not 1 <= self.vcpu_count <= MAX_VCPUS:
            raise InvalidArgument(f"vcpu_count must be 1..{MAX_VCPUS}, got {self.vcpu_count}")
        if not 1 <= self.agent_ports <= 16:
            raise InvalidArgument(f"agent_ports must be 1..16, got {self.agent_ports}")
        if self.mem_mib < MIN_MEM_MIB:
            raise InvalidArgument(f"mem_mib must be at least {MIN_MEM_MIB}, got {self.mem_mib}")

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def vmm_log(self) -> Path:
        return self.run_dir / "vmm.log"


def guest_kernel_args(spec: VMSpec, channel: str) -> list[str]:
    """The kernel arguments every backend gives a guest: serial console, root disk,
    pyro's init, hostname and the agent channel (``virtio-serial`` or ``vsock``)."""
    return [
        "console=ttyS0",
        "reboot=k",
        "panic=1",
        "quiet",
        "root=/dev/vda",
        "rootfstype=ext4",
        "rw",
        "init=/sbin/pyro-init",
        f"pyro.hostname={spec.hostname}",
        f"pyro.channel={channel}",
        *([spec.nic.kernel_arg] if spec.nic else []),
    ]


def read_tail(path: Path, lines: int = 30, max_bytes: int = 16384) -> str:
    """The last lines of a log file ('' when it does not exist)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace").replace("\r", "")
    return "\n".join(text.rstrip().splitlines()[-lines:])


class VM(ABC):
    """A handle on one VMM process."""

    backend: str

    def __init__(self, spec: VMSpec) -> None:
        self.spec = spec
        self.process: subprocess.Popen[bytes] | None = None
        self.agent: AgentClient | None = None
        self.timings: dict[str, float] = {}
        self.record = VMMRecord(self.backend, spec.vm_id)
        # A one-shot VM ends with the process that started it, however that ends (kill -9
        # included) where the backend can arrange it; a workspace VM outlives it.
        self.ends_with_owner = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _make_run_dir(self) -> None:
        """The run directory: made (and marked as pyro's) when it does not exist yet."""
        if not self.spec.run_dir.exists():
            mark_run_dir(self.spec.run_dir)

    def _save_record(self, pid: int | None = None) -> None:
        """Record the VM in its run directory (with its VMM's identity once ``pid`` is
        known): written before the VM holds anything a later process must give back."""
        if pid is not None:
            self.record.process = ProcessIdentity.of(pid)
        self.record.save(self.spec.run_dir)

    @abstractmethod
    def start(self) -> None:
        """Launch the VMM and boot the guest (returns without waiting for the guest)."""

    @abstractmethod
    def wait_ready(self, timeout_s: float) -> AgentClient:
        """Wait until the guest agent answers hello; raise BootTimeout/VMError otherwise."""

    @abstractmethod
    def pause(self) -> None: ...

    @abstractmethod
    def resume(self) -> None: ...

    def _check_alive(self, when: str) -> None:
        """Raise VMError (with the console tail) if the VMM process has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise VMError(
                f"{self.backend} exited with {self.process.returncode} {when}: "
                f"{self.vmm_log_tail(5)}",
                console_tail=self.console_tail(),
            )

    def _boot_timeout(self, why: str, timeout_s: float) -> BootTimeout:
        return BootTimeout(
            f"guest {self.spec.vm_id} did not become ready within {timeout_s} s: {why}",
            hint="see the serial console tail below",
            console_tail=self.console_tail(),
        )

    def _greet(self, sock: socket.socket, deadline: float, timeout_s: float) -> AgentClient:
        """Say hello over a connected agent channel; the ready client or a boot error."""
        client = AgentClient(sock)
        try:
            client.hello(timeout_s=max(0.1, deadline - time.monotonic()))
            self._reidentify(client)
        except OperationTimeout as exc:
            client.close()
            raise self._boot_timeout("the guest agent did not answer hello", timeout_s) from exc
        except AgentUnavailable as exc:
            client.close()
            self._check_alive("during boot")
            raise VMError(
                f"guest agent link failed during boot: {exc}", console_tail=self.console_tail()
            ) from exc
        self._require_network(client)
        self.agent = client
        return client

    def _reidentify(self, client: AgentClient) -> None:
        """A guest has no battery-backed clock: give it the host's time right away (builds
        compare mtimes; TLS checks dates). A restored clone also gets a name, machine-id and
        random state of its own, and its workspace disk."""
        args: dict[str, object] = {"time_ns": time.time_ns()}
        restore = self.spec.restore
        if restore is not None and restore.identity is not None:
            args.update(
                seed=secrets.token_hex(32),
                hostname=restore.identity,
                machine_id=secrets.token_hex(16),
            )
        if restore is not None and restore.workspace_device is not None:
            args["workspace_device"] = restore.workspace_device
        reply, _ = client.call("reidentify", args, timeout_s=10)
        for key in ("mounts", "boot_errors"):  # hello's view was from before the mount
            if key in reply:
                client.hello_info[key] = reply[key]

    def _require_network(self, client: AgentClient) -> None:
        """A guest asked to have a network link that could not bring it up is refused."""
        if self.spec.nic is None:
            return
        errors = client.hello_info.get("boot_errors")
        failed = [
            str(error)
            for error in (errors if isinstance(errors, list) else [])
            if str(error).startswith(NETWORK_BOOT_ERROR)
        ]
        if failed:
            client.close()
            raise VMError(
                f"the guest could not bring up its network link: {'; '.join(failed)}",
                console_tail=self.console_tail(),
            )

    def console_tail(self, lines: int = 30) -> str:
        data = console.read_tail(self.spec.console_log, 16384)
        text = data.decode("utf-8", "replace").replace("\r", "")
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def vmm_log_tail(self, lines: int = 30) -> str:
        return read_tail(self.spec.vmm_log, lines)

    def status(self) -> str:
        if self.process is None:
            return "created"
        return "running" if self.process.poll() is None else "exited"

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the guest to power off; kill the VMM if it has not exited in time."""
        if self.agent is not None and not self.agent.closed and self.alive():
            with contextlib.suppress(Exception):
                self.agent.call("shutdown", timeout_s=timeout_s)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout_s)
        self.kill()

    def release_agent(self) -> None:
        """Close this process's agent connection; the VM keeps running (workspaces)."""
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        self._release_channel()

    def _release_channel(self) -> None:
        """Backend hook: give back whatever reserved the boot-time agent channel."""
        return None

    def kill(self) -> None:
        """End the VMM at once (SIGKILL to its process group) and release the handle."""
        if self.agent is not None:
            self.agent.close()
        self._release_channel()
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def mark(self, phase: str, since: float) -> None:
        self.timings[phase] = round((time.monotonic() - since) * 1000, 1)
