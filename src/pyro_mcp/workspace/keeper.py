"""The keeper: what must happen to workspaces on time, whether or not a pyro command runs.

It keeps the lifecycle VMs of ``pyro vm`` as it keeps workspaces (they are records of
the same store, on the same lifecycle).

- A workspace given a TTL is deleted (its VM killed, its disks and records removed) when
  the TTL runs out.
- A create, start or stop whose process died (``kill -9`` of the CLI mid-create) is
  repaired as reconcile would: a create that never finished is removed with its VM, a
  start or stop becomes ``failed`` or ``stopped``. Nothing waits for the next command.

One small background process per state directory does it. The first pyro process that
sees a TTL, or begins a create, start or stop, starts it if none runs
(``ensure_keeper``). It holds ``<state dir>/keeper.lock`` while it runs (a second one
started in a race sees the lock and leaves), looks at the store every ``RECHECK_S`` (or
sooner when a TTL ends sooner), and exits once there is nothing left to watch. After a
host reboot the next pyro command starts it again; what expired meanwhile goes at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from pathlib import Path

from pyro_mcp.errors import Expired, PyroError
from pyro_mcp.runtime.paths import RuntimePaths

LOCK_FILE = "keeper.lock"
LOG_FILE = "keeper.log"
LOG_MAX_BYTES = 1 << 20  # the keeper's log is started afresh past this
RECHECK_S = 1.0  # how late a shortened TTL or a dead create's process may be noticed
CHANGING = (
    "creating",
    "starting",
    "stopping",
    "pausing",
    "resuming",
)  # a process is doing these: watched


def _lock(state_dir: Path) -> int | None:
    """An fd holding the keeper's lock of ``state_dir``, or None if a keeper holds it."""
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def keeper_running(state_dir: Path) -> bool:
    fd = _lock(state_dir)
    if fd is None:
        return True
    os.close(fd)
    return False


def ensure_keeper(paths: RuntimePaths, state_dir: Path, needed: bool) -> None:
    """Start the keeper of ``state_dir`` if it is ``needed`` and none runs."""
    if not needed or keeper_running(state_dir):
        return
    import subprocess

    log_path = state_dir / LOG_FILE
    with contextlib.suppress(OSError):
        if log_path.stat().st_size > LOG_MAX_BYTES:
            log_path.unlink()
    argv = [sys.executable, "-m", "pyro_mcp.workspace.keeper"]
    argv += [str(state_dir), str(paths.cache_dir), str(paths.run_root)]
    with open(log_path, "ab") as output:
        subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            start_new_session=True,  # outlives this process and its terminal
            close_fds=True,
        )


def keep(paths: RuntimePaths, state_dir: Path) -> None:
    """Delete what expired and repair changes whose process died, until nothing is left
    to watch (see the module doc)."""
    import logging

    from pyro_mcp.workspace.lifecycle import Workspaces

    log = logging.getLogger(__name__)
    fd = _lock(state_dir)
    if fd is None:
        return  # another keeper has it
    workspaces = Workspaces(paths, state_dir, kind=None)  # workspaces and VMs alike
    try:
        while workspaces.layout.store_path.exists():  # gone: nothing is left to keep
            for record in workspaces.store.list(states=CHANGING):
                try:  # repaired only if its process is gone (see Workspaces.reconcile_one)
                    workspaces.reconcile_one(record.id)
                except Expired:
                    log.warning("%s %s expired and was deleted", record.kind, record.id)
                except PyroError as exc:
                    log.warning("workspace %s: repairing it failed: %s", record.id, exc)
            for record in workspaces.store.expired(time.time()):
                if record.state == "creating":
                    continue  # its create finishes (or is repaired above) first
                try:
                    workspaces.delete(record.id)
                    log.warning("workspace %s expired and was deleted", record.id)
                except PyroError as exc:
                    log.warning("workspace %s expired; deleting it failed: %s", record.id, exc)
            upcoming = workspaces.store.next_expiry()
            if upcoming is None and not workspaces.store.list(states=CHANGING):
                return
            wait = RECHECK_S if upcoming is None else upcoming - time.time()
            time.sleep(min(max(wait, 0.05), RECHECK_S))
    finally:
        workspaces.close()
        os.close(fd)


def main(argv: list[str]) -> int:
    import logging

    log = logging.getLogger(__name__)
    logging.basicConfig(format="%(asctime)s pyro-keeper: %(message)s", level=logging.INFO)
    state_dir, cache_dir, run_root = (Path(a) for a in argv)
    try:
        keep(RuntimePaths(cache_dir, run_root), state_dir)
    except (PyroError, OSError) as exc:
        log.warning("stopped: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
