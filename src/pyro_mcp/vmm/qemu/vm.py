"""One QEMU process running one guest on ``-M microvm``.

The guest agent channel is a virtio-serial port backed by a host Unix socket (mode 0600,
in the VM's run directory): no vhost device is needed. QMP (another Unix socket) controls
the VM. Under TCG the guest TSC is pinned on the kernel command line to the host's
measured frequency (:mod:`tsc`): concurrent software-emulated guests hang while
calibrating it, and a wrong value makes guest time run fast or slow.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from pyro_mcp.errors import VMError
from pyro_mcp.guest.client import AgentClient
from pyro_mcp.guest.protocol import AGENT_PORT_NAME
from pyro_mcp.network.link import release_network
from pyro_mcp.runtime.host_tools import require
from pyro_mcp.vmm.base import VM, VMSpec, guest_kernel_args
from pyro_mcp.vmm.console import start_pump
from pyro_mcp.vmm.qemu import snapshot, template_ram
from pyro_mcp.vmm.qemu.channels import agent_socket, lock_port
from pyro_mcp.vmm.qemu.confinement import confine, release, vmm_dir
from pyro_mcp.vmm.qemu.qmp import QMPClient
from pyro_mcp.vmm.qemu.tsc import tcg_clock_args

ACCELS = ("kvm", "tcg")
TCG_TB_SIZE_MIB = 64
# Host memory QEMU takes beyond the guest's RAM (MiB): the translation cache and emulation
# state under TCG, device emulation under KVM; admission and the memory cgroup count it.
OVERHEAD_MIB = {"tcg": TCG_TB_SIZE_MIB + 128, "kvm": 96}
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
MAX_SOCKET_PATH = 100


def kernel_command_line(spec: VMSpec, accel: str) -> str:
    args = guest_kernel_args(spec, "virtio-serial")
    if accel == "tcg":
        args += tcg_clock_args()
    return " ".join([*args, *spec.kernel_args])


def memory_backend(spec: VMSpec, ram_fd: int | None) -> str:
    """Guest RAM, always the backend object ``mem`` (so a saved state loads into any VM of
    the same layout): anonymous memory; or a file it shares, every write landing in it (a
    template being built); or a template's sealed RAM on ``ram_fd``, mapped privately."""
    size = f"id=mem,size={spec.mem_mib}M"
    if spec.ram_file is not None:
        return f"memory-backend-file,{size},mem-path={spec.ram_file},share=on"
    if ram_fd is not None:
        return f"memory-backend-file,{size},mem-path=/proc/self/fd/{ram_fd},share=off"
    return f"memory-backend-ram,{size}"


def qemu_argv(spec: VMSpec, accel: str, ram_fd: int | None = None) -> list[str]:
    """The full QEMU command line for ``spec`` (an argv list, never a shell string)."""
    if accel not in ACCELS:
        raise VMError(f"unknown QEMU accelerator {accel!r}")
    run = spec.run_dir
    reporting = "on" if spec.free_page_reporting else "off"
    options: list[tuple[str, str]] = [
        ("-name", f"pyro-{spec.vm_id}"),
        ("-M", "microvm,x-option-roms=off,rtc=off,isa-serial=on,pit=off,pic=off"),
        ("-accel", f"tcg,tb-size={TCG_TB_SIZE_MIB}" if accel == "tcg" else "kvm"),
        ("-cpu", "max" if accel == "tcg" else "host"),
        ("-m", str(spec.mem_mib)),
        ("-object", memory_backend(spec, ram_fd)),
        ("-machine", "memory-backend=mem"),
        ("-smp", str(spec.vcpu_count)),
        ("-sandbox", SANDBOX),
        # The console goes to QEMU's stdout, a pipe to the VM's console pump (bounded).
        ("-chardev", "stdio,id=console,signal=off"),
        ("-serial", "chardev:console"),
        ("-kernel", str(spec.kernel)),
        ("-append", kernel_command_line(spec, accel)),
        ("-qmp", f"unix:{vmm_dir(run) / 'qmp.sock'},server=on,wait=off"),
        ("-object", "rng-random,id=rng0,filename=/dev/urandom"),
        ("-device", "virtio-rng-device,rng=rng0"),
        # Pages the guest frees are reported and dropped from QEMU's resident set.
        ("-device", f"virtio-balloon-device,free-page-reporting={reporting},deflate-on-oom=on"),
        ("-device", f"virtio-serial-device,max_ports={spec.agent_ports + 1}"),
    ]
    for port in range(spec.agent_ports):
        chardev = f"socket,id=agent{port},path={agent_socket(run, port)},server=on,wait=off"
        options.append(("-chardev", chardev))
        port_name = f"{AGENT_PORT_NAME}.{port}"
        options.append(("-device", f"virtserialport,chardev=agent{port},name={port_name}"))
    if spec.nic is not None and spec.nic.fd is not None:
        options.append(("-netdev", f"tap,id=net0,fd={spec.nic.fd}"))
        options.append(("-device", f"virtio-net-device,netdev=net0,mac={spec.nic.mac}"))
    if spec.initrd is not None:
        options.append(("-initrd", str(spec.initrd)))
    for index, disk in enumerate((spec.root_disk, *spec.extra_disks)):
        drive = f"id=d{index},file={disk.path},format={disk.format},if=none,discard=unmap"
        if disk.read_only:
            drive += ",readonly=on"
        options += [("-drive", drive), ("-device", f"virtio-blk-device,drive=d{index}")]
    argv = [require("qemu-system-x86_64"), "-nodefaults", "-no-user-config", "-display", "none"]
    argv.append("-no-reboot")
    for flag, value in options:
        argv += [flag, value]
    return argv


class QemuVM(VM):
    backend = "qemu"

    def __init__(self, spec: VMSpec, accel: str = "tcg") -> None:
        super().__init__(spec)
        self.accel = accel
        self._qmp: QMPClient | None = None
        self.started_at = 0.0
        self._port_lock: int | None = None
        self._state_fd: int | None = None  # the saved state's descriptor number in QEMU
        self.confinement: dict[str, object] = {}

    @property
    def agent_socket(self) -> Path:
        return agent_socket(self.spec.run_dir, 0)

    @property
    def qmp_socket(self) -> Path:
        return vmm_dir(self.spec.run_dir) / "qmp.sock"

    def start(self) -> None:
        self.spec.validate()
        if len(str(self.agent_socket)) > MAX_SOCKET_PATH:
            raise VMError(f"run directory path too long for a Unix socket: {self.spec.run_dir}")
        self._make_run_dir()
        self._save_record()  # before its cgroups exist: whoever ends the VM removes them
        started = time.monotonic()
        state_fds = self._open_state()
        try:
            ram_fds = self._template_ram()
        except BaseException:
            for fd in state_fds:
                os.close(fd)
            release(self.spec.vm_id)
            raise
        argv = qemu_argv(self.spec, self.accel, ram_fds[0] if ram_fds else None)
        if state_fds:
            argv += snapshot.INCOMING_ARGS
        reads = [self.spec.kernel, *([self.spec.initrd] if self.spec.initrd else [])]
        jailed = confine(
            self.spec,
            argv,
            accel=self.accel,
            overhead_mib=OVERHEAD_MIB[self.accel],
            read_files=[*reads, *self.spec.read_files],
            ends_with_owner=self.ends_with_owner,
            proc=bool(ram_fds),  # it opens the RAM as /proc/self/fd/N
        )
        self.confinement = jailed.summary
        console = start_pump(self.spec.console_log)
        try:
            with self.spec.vmm_log.open("ab") as log:
                self.process = subprocess.Popen(
                    jailed.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=console,
                    stderr=log,
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=[*jailed.pass_fds, *self._nic_fds(), *state_fds, *ram_fds],
                    umask=0o077,
                )
        except OSError as exc:
            release(self.spec.vm_id)
            raise VMError(f"cannot start QEMU: {exc}") from exc
        finally:
            os.close(console)  # QEMU holds it now; the pump ends when QEMU does
            jailed.close_parent_fds()  # and its uid lock
            for fd in [*self._nic_fds(), *state_fds, *ram_fds]:  # QEMU's now
                os.close(fd)
        self._save_record(self.process.pid)  # the jail execs QEMU: the pid stays the same
        self.started_at = started
        self._state_fd = state_fds[0] if state_fds else None

    def _open_state(self) -> list[int]:
        """The saved state to start from, open read-only for QEMU ([] for a boot)."""
        if self.spec.restore is None:
            return []
        try:
            return [os.open(self.spec.restore.state, os.O_RDONLY | os.O_CLOEXEC)]
        except OSError as exc:
            release(self.spec.vm_id)
            raise VMError(f"cannot open the saved state {self.spec.restore.state}: {exc}") from exc

    def _template_ram(self) -> list[int]:
        """The template's sealed guest RAM for QEMU to map ([] when it has none)."""
        restore = self.spec.restore
        if restore is None or restore.ram is None:
            return []
        return [template_ram.sealed_ram(restore.ram, restore.ram_digest or "")]

    def _nic_fds(self) -> list[int]:
        nic = self.spec.nic
        return [nic.fd] if nic is not None and nic.fd is not None else []

    def _connect_agent(self, deadline: float, timeout_s: float) -> socket.socket:
        while True:
            self._check_alive("while waiting for its agent socket")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.agent_socket))
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
            if time.monotonic() > deadline:
                raise self._boot_timeout("the agent socket never appeared", timeout_s)
            time.sleep(0.002)

    def wait_ready(self, timeout_s: float) -> AgentClient:
        deadline = time.monotonic() + timeout_s
        if self._port_lock is None:  # port 0 is ours while this process holds the client
            self._port_lock = lock_port(self.spec.run_dir, 0, wait=True)
        if self.spec.restore is not None:
            self._resume_restored(deadline)
        sock = self._connect_agent(deadline, timeout_s)
        self.mark("vmm_started_ms", self.started_at)
        client = self._greet(sock, deadline, timeout_s)
        self.mark("agent_ready_ms", self.started_at)
        return client

    def _resume_restored(self, deadline: float) -> None:
        """Let a VM started from a saved state run once QEMU has loaded all of it."""
        restore = self.spec.restore
        assert restore is not None and self._state_fd is not None
        try:
            snapshot.load_state(self.qmp(), self._state_fd, ignore_shared=restore.ram is not None)
            snapshot.await_incoming(self.qmp(), deadline)
            self.mark("state_loaded_ms", self.started_at)
            self.qmp().execute("cont")
        except VMError as exc:
            self._check_alive("while loading its saved state")
            raise VMError(f"{exc.message}: {self.vmm_log_tail(5)}") from exc

    def save_state(self, path: Path) -> int:
        """Stop the guest and save its memory and device state to ``path`` (fsynced);
        the VM stays stopped (``resume`` continues it). Its size in bytes. The RAM of a
        template being built stays in its file (``ram_file``), out of the state."""
        return snapshot.save_state(self.qmp(), path, ignore_shared=self.spec.ram_file is not None)

    def qmp(self) -> QMPClient:
        if self._qmp is None:
            self._qmp = QMPClient(self.qmp_socket)
        return self._qmp

    def pause(self) -> None:
        self.qmp().execute("stop")

    def resume(self) -> None:
        self.qmp().execute("cont")

    def status(self) -> str:
        base = super().status()
        if base != "running":
            return base
        try:
            state = self.qmp().execute("query-status")
        except VMError:
            return "running"
        return "paused" if isinstance(state, dict) and state.get("status") == "paused" else base

    def _release_channel(self) -> None:
        if self._port_lock is not None:
            os.close(self._port_lock)
            self._port_lock = None

    def kill(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        super().kill()
        release(self.spec.vm_id)
        if self.spec.nic is not None:
            release_network(self.spec.vm_id)
