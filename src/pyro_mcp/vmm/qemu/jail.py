"""Become a confined QEMU: the first moments of every QEMU process pyro starts as root.

Run as ``python -I -S jail.py CONFIG -- QEMU ARGV...`` (stdlib only: it runs before
anything else in the VMM process, whose pid it keeps), it

1. joins the VM's cgroups (memory, CPU and pids limits, set up by the caller);
2. enters a mount namespace of its own and builds a root holding only what QEMU needs:
   the system's programs and libraries read-only (``/usr`` and the merged-/usr links,
   ``/etc/ld.so.cache``), the VM's kernel, disks and backing images at their own paths
   (read-only unless the VM writes them), the directory where QEMU makes its sockets, and
   fresh device nodes (null, zero, urandom, and kvm when KVM is used) owned by the VM;
3. chroots there, drops to the VM's own unprivileged uid and gid (no supplementary
   groups, no capabilities left, ``no_new_privs``);
4. execs QEMU, which adds its own seccomp sandbox.

CONFIG is JSON: ``uid``, ``gid``, ``root`` (an empty directory to build the root on),
``cgroup_procs`` (files to write this pid to), ``binds`` ([path, "ro"|"rw"]), ``devices``
([path, major, minor]), ``proc`` (mount a procfs that shows only the VMM's own process:
it maps a template's RAM as ``/proc/self/fd/N``), ``parent`` (the pid of a one-shot VM's
owner, whose end kills the VMM: ``PR_SET_PDEATHSIG``; null for a workspace VM, which
outlives its starter). Any
failure ends the process with status 126 and a line on stderr (the VMM log): QEMU never
starts half-confined.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import stat
import sys
from typing import Any

CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG = 1
SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/bin", "/sbin")
SYSTEM_FILES = ("/etc/ld.so.cache",)

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None
) -> None:
    def enc(value: str | None) -> bytes | None:
        return None if value is None else value.encode()

    _check(
        _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
        f"mount {target}",
    )


def _inside(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _make_parents(root: str, path: str) -> None:
    os.makedirs(os.path.dirname(_inside(root, path)), mode=0o755, exist_ok=True)


def _bind(root: str, path: str, writable: bool) -> None:
    """``path`` visible at the same path in the new root (a file or a directory)."""
    target = _inside(root, path)
    _make_parents(root, path)
    if os.path.isdir(path):
        os.makedirs(target, mode=0o755, exist_ok=True)
    elif not os.path.lexists(target):
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o600))
    _mount(path, target, None, MS_BIND, None)
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (0 if writable else MS_RDONLY)
    _mount(None, target, None, flags, None)


def _system(root: str) -> None:
    for path in SYSTEM_DIRS:
        if os.path.islink(path):  # merged /usr: /lib -> usr/lib, and so on
            os.symlink(os.readlink(path), _inside(root, path))
        elif os.path.isdir(path):
            _bind(root, path, False)
    for path in SYSTEM_FILES:
        if os.path.isfile(path):
            _bind(root, path, False)


def _device(root: str, path: str, major: int, minor: int, uid: int, gid: int) -> None:
    target = _inside(root, path)
    _make_parents(root, path)
    os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(major, minor))
    os.chown(target, uid, gid)


def confine(config: dict[str, Any]) -> None:
    uid, gid, root = int(config["uid"]), int(config["gid"]), str(config["root"])
    if uid == 0 or gid == 0:
        raise ValueError("refusing to run a VMM as root")
    umask = os.umask(0o022)  # the new root's directories must be traversable by the VMM
    for procs in config.get("cgroup_procs", []):
        with open(str(procs), "w") as handle:
            handle.write(str(os.getpid()))
    _check(_libc.unshare(CLONE_NEWNS), "unshare")
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)  # nothing leaks back to the host
    _mount("tmpfs", root, "tmpfs", MS_NOSUID, "mode=0755,size=1m")
    _system(root)
    for path, how in config.get("binds", []):
        _bind(root, str(path), how == "rw")
    for path, major, minor in config.get("devices", []):
        _device(root, str(path), int(major), int(minor), uid, gid)
    if config.get("proc"):  # only its own process: its uid is its own, the rest is hidden
        os.mkdir(_inside(root, "/proc"), 0o555)
        flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
        _mount("proc", _inside(root, "/proc"), "proc", flags, "hidepid=invisible,subset=pid")
    _mount(None, root, None, MS_REMOUNT | MS_NOSUID | MS_RDONLY, "mode=0755,size=1m")
    os.chroot(root)
    os.chdir("/")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(no_new_privs)")
    parent = config.get("parent")
    if parent is not None:  # a one-shot VM: it dies with its owner (set after the uid
        # change, which would clear it; kept across the exec of QEMU)
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(pdeathsig)")
        if os.getppid() != int(parent):
            raise RuntimeError("the process that started this VM is gone")
    os.umask(umask)  # what QEMU creates (its sockets) stays private


def main(argv: list[str]) -> int:
    try:
        split = argv.index("--")
        config = json.loads(argv[1])
        program = argv[split + 1 :]
        confine(config)
        os.execv(program[0], program)
    except BaseException as exc:  # never run QEMU half-confined
        sys.stderr.write(f"pyro-jail: cannot confine the VMM: {exc!r}\n")
        sys.stderr.flush()
        return 126
    return 126


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
