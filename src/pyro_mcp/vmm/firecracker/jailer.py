"""Launching Firecracker through the jailer: argv, chroot layout, files, cleanup.

The jailer (run as root) builds ``<chroot_base>/firecracker/<id>/root``, puts Firecracker
in a cgroup, a new mount namespace (pivot_root into the chroot), optionally a new PID
namespace and a network namespace, drops to ``uid``/``gid`` and execs it. With
``--new-pid-ns`` the jailer forks and exits at once: Firecracker is PID 1 of its namespace
(it ignores SIGTERM: only SIGKILL ends it) and its host PID is written to
``<chroot>/firecracker.pid``.

Files reach the chroot as hard links (the same inode: writes land in the caller's disk).
Across filesystems a writable file is bind-mounted instead and a read-only one copied.
A writable file is chowned to the jail's uid for the VM's lifetime and given back after.
Everything the jail holds is given back by :func:`.jail_release.release_jail`, from the
jail directory alone (whichever process finds the VM ended).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from pyro_mcp.errors import PyroError, VMError
from pyro_mcp.runtime.binaries import BinarySet
from pyro_mcp.runtime.host_tools import run
from pyro_mcp.vmm.firecracker.jail_release import JailState, mountinfo, release_jail
from pyro_mcp.vmm.firecracker.layout import VMRoot

# Jail uids: one per VM, from a range no distribution or systemd hands out (0x70000000+).
JAIL_UID_BASE = 0x7000_0000
JAIL_UID_SPAN = 1 << 20
JAIL_GID = 0x7000_0000  # shared by all jails: lets snapshot files be read by any of them
PARENT_CGROUP = "pyro-mcp"
CGROUP_ROOT = Path("/sys/fs/cgroup")
_JAIL_ID = re.compile(r"^[a-zA-Z0-9-]{1,64}$")


def default_chroot_base(run_dir: Path) -> Path:
    """``<run_dir>/jail``, or the jailer's own default when ``run_dir`` is on a nodev mount
    (device nodes there, /dev/kvm included, cannot be opened)."""
    probe = run_dir if run_dir.exists() else run_dir.parent
    with contextlib.suppress(OSError):
        if os.statvfs(probe).f_flag & os.ST_NODEV:
            return Path("/srv/jailer")
    return run_dir / "jail"


def default_cgroup_version() -> int:
    """2 on a unified (v2-only) hierarchy, else 1."""
    return 2 if (CGROUP_ROOT / "cgroup.controllers").exists() else 1


def _default_cgroups(version: int) -> tuple[str, ...]:
    return ("cpu.shares=512",) if version == 1 else ("cpu.weight=50",)


@dataclass(frozen=True)
class JailerConfig:
    """How the jailer confines one VM.

    ``uid``/``gid``: the ids Firecracker runs as (give each VM its own uid; the store's
    allocator should hand them out). ``chroot_base``: where jails are built (default:
    :func:`default_chroot_base`); it must allow device nodes (not mounted ``nodev``).
    ``cgroups``: ``file=value`` settings (default ``cpu.shares=512`` on cgroup v1).
    ``netns``: a network namespace path to join. ``new_pid_ns``: own PID namespace.
    """

    uid: int
    gid: int = JAIL_GID
    chroot_base: Path | None = None
    cgroup_version: int = 0  # 0: detect
    cgroups: tuple[str, ...] | None = None  # None: the default for the version
    parent_cgroup: str = PARENT_CGROUP
    netns: Path | None = None
    new_pid_ns: bool = True
    resource_limits: tuple[str, ...] = ()

    @classmethod
    def for_vm(cls, vm_id: str) -> JailerConfig:
        """A config with a uid derived from ``vm_id`` (collisions are possible, if rare)."""
        return cls(uid=JAIL_UID_BASE + zlib.crc32(vm_id.encode()) % JAIL_UID_SPAN)

    def resolved_cgroup_version(self) -> int:
        return self.cgroup_version or default_cgroup_version()

    def resolved_cgroups(self) -> tuple[str, ...]:
        if self.cgroups is not None:
            return self.cgroups
        return _default_cgroups(self.resolved_cgroup_version())


def _cgroup_mounts() -> list[tuple[str, Path, set[str]]]:
    """(fstype, mount point, super options) of every cgroup mount."""
    return [
        (kind, point, options)
        for point, kind, options in mountinfo()
        if kind in ("cgroup", "cgroup2")
    ]


def _readable_by(info: os.stat_result, uid: int, gid: int) -> bool:
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IRUSR)
    if info.st_gid == gid:
        return bool(info.st_mode & stat.S_IRGRP)
    return bool(info.st_mode & stat.S_IROTH)


class JailRoot(VMRoot):
    """The chroot the jailer builds for one VM, and everything placed in it."""

    def __init__(self, binaries: BinarySet, config: JailerConfig, jail_id: str, base: Path):
        if not _JAIL_ID.match(jail_id):
            raise VMError(f"jail id {jail_id!r} must be 1-64 letters, digits or '-'")
        self.binaries = binaries
        self.config = config
        self.jail_id = jail_id
        self.base = base
        self.jail_dir = base / binaries.firecracker.name / jail_id
        self.root = self.jail_dir / "root"
        self.state = JailState()  # what release_jail needs, saved in the jail directory

    # -- launching -------------------------------------------------------------------
    def argv(self, firecracker_args: list[str]) -> list[str]:
        cfg = self.config
        argv = [
            str(self.binaries.jailer),
            "--id", self.jail_id,
            "--exec-file", str(self.binaries.firecracker),
            "--uid", str(cfg.uid),
            "--gid", str(cfg.gid),
            "--chroot-base-dir", str(self.base),
            "--cgroup-version", str(cfg.resolved_cgroup_version()),
            "--parent-cgroup", cfg.parent_cgroup,
        ]  # fmt: skip
        for setting in cfg.resolved_cgroups():
            argv += ["--cgroup", setting]
        for limit in cfg.resource_limits:
            argv += ["--resource-limit", limit]
        if cfg.netns is not None:
            argv += ["--netns", str(cfg.netns)]
        if cfg.new_pid_ns:
            argv.append("--new-pid-ns")
        return [*argv, "--", *firecracker_args]

    def read_pid(self, timeout_s: float = 5.0) -> int:
        """Firecracker's host PID, written by the jailer before it exits (--new-pid-ns)."""
        path = self.root / "firecracker.pid"
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(OSError, ValueError):
                return int(path.read_text().strip())
            if time.monotonic() > deadline:
                raise VMError(f"the jailer wrote no PID to {path} within {timeout_s} s")
            time.sleep(0.001)

    # -- the chroot ------------------------------------------------------------------
    def prepare(self) -> None:
        self.check_socket_paths()
        if not self.base.exists():
            self.base.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.state.made_base = True
        if os.statvfs(self.base).f_flag & os.ST_NODEV:
            raise VMError(
                f"the jail base {self.base} is on a nodev mount: /dev/kvm cannot work there",
                hint="give JailerConfig a chroot_base on a filesystem that allows devices",
            )
        try:
            self.jail_dir.mkdir(parents=True, mode=0o700)
        except FileExistsError as exc:
            raise VMError(
                f"{self.jail_dir} already exists: a VM with this id runs or was not cleaned up"
            ) from exc
        self.state.cgroups = self.cgroup_dirs()  # the jailer makes them: known beforehand
        self.state.save(self.jail_dir)
        self.root.mkdir(mode=0o700)

    def place(self, source: Path, name: str, *, writable: bool) -> None:
        target = self.host_path(name)
        target.unlink(missing_ok=True)
        try:
            info = source.stat()
        except OSError as exc:
            raise VMError(f"cannot use {source} for the VM: {exc.strerror}") from exc
        uid, gid = self.config.uid, self.config.gid
        try:
            os.link(source, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise VMError(f"cannot link {source} into the jail: {exc.strerror}") from exc
            if writable:
                self._bind_mount(source, target)
            else:
                shutil.copyfile(source, target)
                os.chown(target, uid, gid)
                os.chmod(target, 0o400)
                return
        if writable and info.st_uid != uid:
            self.state.owners.append((source, info.st_uid, info.st_gid))
            self.state.save(self.jail_dir)  # before lending it: a crash must not keep it
            os.chown(target, uid, gid)
        elif not writable and not _readable_by(info, uid, gid):
            target.unlink()  # never chown a shared read-only file: give the jail a copy
            shutil.copyfile(source, target)
            os.chown(target, uid, gid)
            os.chmod(target, 0o400)

    def _bind_mount(self, source: Path, target: Path) -> None:
        target.touch(mode=0o600)
        try:
            run(["mount", "--bind", str(source), str(target)], what="bind-mount into the jail")
        except PyroError as exc:
            target.unlink(missing_ok=True)
            raise VMError(f"cannot bind-mount {source} into the jail: {exc}") from exc

    def take(self, name: str, destination: Path) -> None:
        path = self.host_path(name)
        shutil.move(path, destination)
        # Root-owned, readable by the group every jail shares: any jail can restore it.
        os.chown(destination, 0, self.config.gid)
        os.chmod(destination, 0o640)

    def give(self, name: str) -> None:
        """Hand a file we created in the root (the VMM log) to the jail's user."""
        os.chown(self.host_path(name), self.config.uid, self.config.gid)

    # -- cleanup ---------------------------------------------------------------------
    def cgroup_dirs(self) -> list[Path]:
        """The cgroup directories the jailer made for this VM."""
        version = self.config.resolved_cgroup_version()
        leaf = Path(self.config.parent_cgroup) / self.jail_id
        dirs: list[Path] = []
        mounts = _cgroup_mounts()
        if version == 2:
            dirs += [point / leaf for kind, point, _ in mounts if kind == "cgroup2"]
            return dirs[:1]
        controllers = {setting.split(".", 1)[0] for setting in self.config.resolved_cgroups()}
        for controller in sorted(controllers):
            for kind, point, options in mounts:
                if kind == "cgroup" and controller in options:
                    dirs.append(point / leaf)
        return dirs

    def cleanup(self) -> None:
        release_jail(self.jail_dir)
