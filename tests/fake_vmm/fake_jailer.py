"""A stand-in for Firecracker's jailer in the unit tests: the same argv and the same traces.

Given the argv pyro builds (``vmm/firecracker/jailer.py``), it does what the real jailer
leaves behind on the host, except entering namespaces and dropping privileges:

- ``<chroot base>/<exec file name>/<id>/root`` (made if missing), with a copy of the exec
  file in it and device nodes under ``dev/`` (as root);
- the VM's cgroups: ``<hierarchy>/<parent cgroup>/<id>`` with each ``--cgroup`` setting
  written, the process placed in them;
- with ``--new-pid-ns``: forks, writes the child's pid to ``<root>/firecracker.pid`` and
  exits 0; the child (a new session, in the root) becomes Firecracker. Without it, the
  jailer itself becomes Firecracker.

"Becomes Firecracker": execs this Python with argv[0] ``/firecracker`` (the name the real
jailer gives it inside the chroot) running the exec file with Firecracker's own flags
(``--id``, ``--start-time-us``, ``--start-time-cpu-us``, ``--parent-cpu-time-us``, then
pyro's). A failure exits 1 with a line on stderr, as the jailer does.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
DEVICES = (("kvm", 10, 232), ("urandom", 1, 9))


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _options(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == name]


def _v1_mount(controller: str) -> Path:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(tail) > 2 and tail[0] == "cgroup" and controller in tail[2].split(","):
            return Path(fields[4])
    raise RuntimeError(f"no cgroup v1 hierarchy has the {controller} controller")


def _cgroups(argv: list[str], jail_id: str) -> list[Path]:
    version = _option(argv, "--cgroup-version")
    parent = _option(argv, "--parent-cgroup")
    made = []
    for setting in _options(argv, "--cgroup"):
        name, _, value = setting.partition("=")
        controller = name.split(".", 1)[0]
        base = CGROUP_ROOT if version == "2" else _v1_mount(controller)
        directory = base / parent / jail_id
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(value)
        made.append(directory)
    return made


def main(argv: list[str]) -> int:
    split = argv.index("--")
    own, firecracker_args = argv[:split], argv[split + 1 :]
    jail_id = _option(own, "--id")
    exec_file = Path(_option(own, "--exec-file"))
    root = Path(_option(own, "--chroot-base-dir")) / exec_file.name / jail_id / "root"
    started_us = time.time_ns() // 1000
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.copy2(exec_file, root / exec_file.name)
        if os.geteuid() == 0:
            (root / "dev").mkdir(exist_ok=True)
            for name, major, minor in DEVICES:
                os.mknod(root / "dev" / name, stat.S_IFCHR | 0o600, os.makedev(major, minor))
        for directory in _cgroups(own, jail_id):
            (directory / "cgroup.procs").write_text(str(os.getpid()))
    except (OSError, RuntimeError, ValueError) as exc:
        sys.stderr.write(f"fake jailer: {exc}\n")
        return 1
    if "--new-pid-ns" in own:
        child = os.fork()
        if child:
            (root / "firecracker.pid").write_text(f"{child}\n")
            return 0
        os.setsid()
    os.chdir(root)
    cpu_us = time.process_time_ns() // 1000
    os.execv(
        sys.executable,
        [
            "/firecracker", "-S", str(exec_file),
            "--id", jail_id,
            "--start-time-us", str(started_us),
            "--start-time-cpu-us", str(cpu_us),
            "--parent-cpu-time-us", str(cpu_us),
            *firecracker_args,
        ],
    )  # fmt: skip
    return 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
