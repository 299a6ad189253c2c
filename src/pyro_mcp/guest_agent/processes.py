"""Processes seen from outside: liveness, process groups, waiting on a process or an fd.

``alive`` and ``group_alive`` read /proc (a zombie counts as gone), ``killpg`` signals a
process group that may already be gone, ``wait_foreign`` waits for a process that is no
child of the agent (one adopted after an agent restart) through a pidfd, and
``wait_readable`` waits, bounded, for an fd to become readable. The service supervisor
(``ops_services.Registry``) uses them.
"""

from __future__ import annotations

import contextlib
import os
import select

from pyro_mcp.guest_agent.service_records import proc_stat


def alive(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in "ZXx"


def group_alive(pgid: int) -> bool:
    """Does any live (non-zombie) process belong to process group ``pgid``?"""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return False
    for entry in entries:
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None and stat[1] == pgid and stat[0] not in "ZXx":
                return True
    return False


def killpg(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def wait_foreign(pid: int) -> None:
    """Wait for a process that is not our child to end."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        while alive(pid):
            wait_readable(pidfd, 5.0)
    finally:
        os.close(pidfd)


def wait_readable(fd: int, timeout_s: float) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    with contextlib.suppress(OSError):
        poller.poll(int(timeout_s * 1000))
