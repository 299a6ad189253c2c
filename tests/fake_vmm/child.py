"""Another pyro process for the fake-VMM tests: boots a VM with the fakes, then goes away.

``python -m tests.fake_vmm.child PARAMS`` (JSON: the FakeHost's directories and
``action``) prints one JSON line, then

- ``one-shot``: starts a one-shot VM as ``pyro run`` does (``start_owned``) and is killed
  with SIGKILL, as a CLI killed mid-run: its VM is an orphan for the next sweep;
- ``launch``: starts a VM (with ``extra_disk``, a writable disk, when given) and exits
  without ending it, as a process that booted a workspace does.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from tests.fake_vmm.harness import FIRECRACKER_CHOICE, QEMU_CHOICE, FakeHost

from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.vmm import launch
from pyro_mcp.vmm.base import Disk


def main(argv: list[str]) -> int:
    params = json.loads(argv[1])
    host = FakeHost(
        RuntimePaths(Path(params["cache_dir"]), Path(params["run_root"])),
        Path(params["state_dir"]),
        Path(params["bin_dir"]),
        bool(params["jailed"]),
        params["backend"],
    )
    host.patch(setattr)
    extra = tuple(Disk(Path(p)) for p in params.get("extra_disks", []))
    choice = QEMU_CHOICE if host.backend == "qemu" else FIRECRACKER_CHOICE
    vm = launch.prepare_vm(host.paths, environment="debian:12", choice=choice, extra_disks=extra)
    if params["action"] == "one-shot":
        launch.start_owned(vm)
    else:
        vm.start()
    root = getattr(vm, "root", None)
    report = {"vm_id": vm.spec.vm_id, "run_dir": str(vm.spec.run_dir), "pid": vm.pid}
    if root is not None and hasattr(root, "jail_dir"):
        report["jail_dir"] = str(root.jail_dir)
    print(json.dumps(report), flush=True)
    if params["action"] == "one-shot":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(0)  # no atexit, no cleanup: the VM outlives this process


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
