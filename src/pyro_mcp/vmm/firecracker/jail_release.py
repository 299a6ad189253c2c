"""What a Firecracker jail holds on the host, and the one way to give it all back.

A jail is ``<chroot base>/firecracker/<id>``: the chroot (``root/``) holds hard links to
the VM's disks and kernel (their space is not freed while the links exist), bind mounts
of writable disks on other filesystems, device nodes and a copy of Firecracker; the jailer
made cgroups for it; writable disks were lent to the jail's uid. ``pyro-jail.json``
beside the chroot (out of the VM's sight) records what is not found otherwise: the
cgroups, the disks' owners, whether the chroot base was made for this jail. It is written
before anything is placed and marks the directory as a jail pyro made.

:func:`release_jail` undoes all of it from the jail directory alone, so whichever pyro
process finds the VM ended (the one that launched it, or a later stop, delete or
reconcile) cleans up the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pyro_mcp.errors import PyroError, VMError
from pyro_mcp.runtime.host_tools import run
from pyro_mcp.vmm.cgroups import RELEASE_TIMEOUT_S, remove_cgroup

STATE_FILE = "pyro-jail.json"
UNMOUNT_ROUNDS = 8  # a file can be mounted over more than once


@dataclass
class JailState:
    """What ``pyro-jail.json`` records of one jail."""

    cgroups: list[Path] = field(default_factory=list)
    owners: list[tuple[Path, int, int]] = field(default_factory=list)  # lent: path, uid, gid
    made_base: bool = False

    def save(self, jail_dir: Path) -> None:
        data = {
            "cgroups": [str(path) for path in self.cgroups],
            "owners": [[str(path), uid, gid] for path, uid, gid in self.owners],
            "made_base": self.made_base,
        }
        partial = jail_dir / f".{STATE_FILE}.{os.getpid()}"
        partial.write_text(json.dumps(data))
        os.replace(partial, jail_dir / STATE_FILE)

    @classmethod
    def load(cls, jail_dir: Path) -> JailState | None:
        """The state of ``jail_dir``; None when it is not a jail pyro made."""
        try:
            data = json.loads((jail_dir / STATE_FILE).read_text())
            return cls(
                cgroups=[Path(path) for path in data["cgroups"]],
                owners=[(Path(path), int(uid), int(gid)) for path, uid, gid in data["owners"]],
                made_base=bool(data["made_base"]),
            )
        except (OSError, ValueError, TypeError, KeyError):
            return None


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mountinfo() -> Iterator[tuple[Path, str, set[str]]]:
    """(mount point, filesystem type, super options) of each mount this process sees."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) > 4 and len(tail) > 2:
                yield Path(_unescape(fields[4])), tail[0], set(tail[2].split(","))


def mounts_under(directory: Path) -> list[Path]:
    """Mount points at or below ``directory``, deepest first."""
    found = {
        point for point, _, _ in mountinfo() if point == directory or directory in point.parents
    }
    return sorted(found, key=lambda point: len(point.parts), reverse=True)


def _unmount_all(jail_dir: Path) -> list[str]:
    """Undo every mount in the jail; what could not be undone."""
    problems: list[str] = []
    for _ in range(UNMOUNT_ROUNDS):
        mounts = mounts_under(jail_dir)
        if not mounts:
            return []
        problems = []
        for target in mounts:
            try:
                run(["umount", str(target)], what="unmount a jail bind mount")
            except PyroError as exc:
                if target in mounts_under(target):  # not another process that got there first
                    problems.append(str(exc))
        if problems:
            break
    return problems or [f"{len(mounts_under(jail_dir))} mounts remain"]


def release_jail(jail_dir: Path, timeout_s: float = RELEASE_TIMEOUT_S) -> None:
    """Give back everything the jail ``jail_dir`` holds; its VMM must have been ended.

    Whatever still runs in the VM's cgroups is killed, every mount in the jail undone, the
    disks given back to their owners, the cgroups and the jail removed (its directory per
    binary, and the base if it was made for it, once empty). A directory without
    ``pyro-jail.json`` is left alone. Idempotent. Raises VMError, leaving the jail in
    place, when a mount cannot be undone (removing the tree then would reach into the
    mounted files).
    """
    state = JailState.load(jail_dir)
    if state is None:
        return
    deadline = time.monotonic() + timeout_s
    lingering = [str(d) for d in state.cgroups if not remove_cgroup(d, deadline)]
    problems = _unmount_all(jail_dir)
    for source, uid, gid in state.owners:
        with contextlib.suppress(OSError):
            os.chown(source, uid, gid)
    if problems:
        raise VMError(f"jail {jail_dir} left in place: {'; '.join(problems)}")
    if lingering:
        raise VMError(f"jail {jail_dir}: cgroups still busy: {', '.join(lingering)}")
    (jail_dir / STATE_FILE).unlink(missing_ok=True)  # past this point it is only files
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(jail_dir)
    # jail_dir is <base>/<binary name>/<id>: the per-binary directory goes once no other
    # jail uses it, and the base once empty, if it was made for this jail.
    for directory in (jail_dir.parent, *([jail_dir.parent.parent] if state.made_base else [])):
        with contextlib.suppress(OSError):
            directory.rmdir()
