"""The network namespace pyro's host side of guest networking lives in.

By default that is the namespace of the pyro process (the host's). ``PYRO_NET_NAMESPACE``
names another one (made with ``ip netns add``): every TAP, address, nftables table,
sysctl and DNS resolver of guest networking is then made in it, while the VMMs run where
they are (a TAP's file descriptor works from any namespace). The test suite uses it to
give pyro a host whose only uplink is a fake internet made of test namespaces.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pyro_mcp.errors import InvalidArgument

NAMESPACE_ENV = "PYRO_NET_NAMESPACE"
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")

T = TypeVar("T")


def configured_namespace() -> str | None:
    """The name ``PYRO_NET_NAMESPACE`` gives (checked as a name, whether or not it exists
    now: what is kept per namespace is found by it); None for the process's own."""
    name = os.environ.get(NAMESPACE_ENV) or None
    if name is not None and (not _NAME.fullmatch(name) or name in (".", "..")):
        raise InvalidArgument(f"{NAMESPACE_ENV}={name!r} is not a network namespace name")
    return name


def namespace_gone(name: str | None = None) -> bool:
    """Whether namespace ``name`` (by default the configured one) no longer exists: every
    TAP, address and nftables rule made in it went with it (a link is then released by its
    host side alone). The process's own namespace is never gone."""
    name = name or configured_namespace()
    return name is not None and not (NETNS_DIR / name).exists()


def namespace_name() -> str | None:
    """The namespace named by ``PYRO_NET_NAMESPACE``, which must exist; None for the
    process's own."""
    name = configured_namespace()
    if name is not None and not (NETNS_DIR / name).exists():
        raise InvalidArgument(
            f"{NAMESPACE_ENV}={name!r}: no such network namespace",
            hint=f"create it with `ip netns add {name}` or unset {NAMESPACE_ENV}",
        )
    return name


def namespace_path() -> Path | None:
    """The namespace's file (what ``setns`` and the jailer's ``--netns`` take); None for
    the process's own."""
    name = namespace_name()
    return None if name is None else NETNS_DIR / name


def in_namespace_argv(argv: list[str]) -> list[str]:
    """``argv`` run inside the namespace (``ip netns exec``), or as is. A program that is
    not installed raises HostToolMissing naming its package, either way."""
    from pyro_mcp.runtime.host_tools import require

    program = argv[0] if "/" in argv[0] else require(argv[0])
    name = namespace_name()
    if name is None:
        return [program, *argv[1:]]
    return [require("ip"), "netns", "exec", name, program, *argv[1:]]


def run_in_namespace(action: Callable[[], T]) -> T:
    """Call ``action`` in the namespace: in a thread of its own that entered it (the
    namespace is per thread), so the rest of the process stays where it is."""
    name = namespace_name()
    if name is None:
        return action()
    outcome: list[T] = []
    failure: list[BaseException] = []

    def enter_and_run() -> None:
        try:
            fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {name}: {os.strerror(err)}")
            finally:
                os.close(fd)
            outcome.append(action())
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    worker = threading.Thread(target=enter_and_run, name=f"netns-{name}")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return outcome[0]
