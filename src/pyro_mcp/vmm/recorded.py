"""A VMM as its run directory records it: checked, ended and cleaned up by any process.

Every way a VM ends (a one-shot run finishing, a workspace stopped or deleted, a crash or
an orphan found by reconcile or a sweep) goes through :meth:`RecordedVMM.end`: kill the
process recorded at launch (by pid and start time, never a later process with its pid),
then the backend's cleanup, then the run directory. The cleanup is the same function the
launching process's own ``VM.kill`` calls:

- Firecracker: :func:`~pyro_mcp.vmm.firecracker.jail_release.release_jail` (the jail,
  its mounts, hard links and cgroups, the disks' owners), or its working directory;
- QEMU: :func:`~pyro_mcp.vmm.qemu.confinement.release` (its cgroups; its uid went with
  the process).

A run directory without a record (a launch that died before writing one) is cleaned up as
either backend would have left it.
"""

from __future__ import annotations

from pathlib import Path

from pyro_mcp.errors import VMError
from pyro_mcp.vmm.identity import KILL_TIMEOUT_S, VMMRecord, is_run_dir

FIRECRACKER_JAIL_BASES = (Path("/srv/jailer"),)  # the jailer's default, besides <run dir>/jail


class RecordedVMM:
    """The VMM of one run directory, as ``vmm.json`` records it."""

    def __init__(self, run_dir: Path, record: VMMRecord | None, vm_id: str) -> None:
        self.run_dir = run_dir
        self.record = record
        self.vm_id = vm_id

    @classmethod
    def load(cls, run_dir: Path, vm_id: str | None = None) -> RecordedVMM:
        """The VMM of ``run_dir`` (``vm_id``: the VM's id, default the directory's name)."""
        record = VMMRecord.load(run_dir) if is_run_dir(run_dir) else None
        return cls(run_dir, record, record.vm_id if record else vm_id or run_dir.name)

    @property
    def pid(self) -> int | None:
        process = self.record.process if self.record else None
        return process.pid if process else None

    def alive(self) -> bool:
        """The recorded VMM process still runs."""
        process = self.record.process if self.record else None
        return process is not None and process.alive()

    def wait_exit(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` seconds for the VMM to exit; True once it has."""
        process = self.record.process if self.record else None
        return process is None or process.wait_exit(timeout_s)

    def kill(self) -> None:
        """SIGKILL the recorded VMM and wait for it to end (VMError if it will not)."""
        process = self.record.process if self.record else None
        if process is not None and not process.kill(KILL_TIMEOUT_S):
            raise VMError(f"the VMM of {self.vm_id} (PID {process.pid}) will not end")

    def cleanup(self) -> None:
        """Give back what the VM held outside its process (its VMM has ended)."""
        from pyro_mcp.network.link import release_network
        from pyro_mcp.vmm.qemu.confinement import release as release_confinement

        backend = self.record.backend if self.record else None
        if backend in ("firecracker", None):
            self._cleanup_firecracker()
        if backend in ("qemu", None):
            release_confinement(self.vm_id)
        release_network(self.vm_id)  # its TAP, policy, resolver, ports and address

    def _cleanup_firecracker(self) -> None:
        import shutil

        from pyro_mcp.vmm.firecracker.jail_release import release_jail
        from pyro_mcp.vmm.firecracker.jailer import default_chroot_base

        record = self.record
        if record is not None and record.jail_dir is not None:
            release_jail(record.jail_dir)
        elif record is None:  # where the jailer would have put it
            for base in {default_chroot_base(self.run_dir), *FIRECRACKER_JAIL_BASES}:
                release_jail(base / "firecracker" / self.vm_id)
        root = record.root_dir if record is not None else None
        if root is not None and root.is_relative_to(self.run_dir):  # no jailer: its cwd
            shutil.rmtree(root, ignore_errors=True)

    def end(self) -> None:
        """Kill, clean up, and remove the run directory (only one pyro marked as its own)."""
        import shutil

        self.kill()
        self.cleanup()
        if is_run_dir(self.run_dir):
            shutil.rmtree(self.run_dir, ignore_errors=True)


def end_vmm(run_dir: Path, vm_id: str | None = None) -> None:
    """End the VM of ``run_dir`` and remove everything of it (see :meth:`RecordedVMM.end`)."""
    RecordedVMM.load(run_dir, vm_id).end()
