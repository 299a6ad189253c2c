"""What the guest's boot left behind: mounts, and what pyro-init could not do.

pyro-init writes each boot step that failed to ``BOOT_ERRORS`` (one line each). ``hello``
reports them with the mounts, so the host can refuse a guest whose ``/workspace`` disk did
not mount instead of serving the root disk's empty directory in its place; and every
workspace operation checks the mount itself (:func:`require_mounted`).
"""

from __future__ import annotations

import os
from typing import Any

from pyro_mcp.guest_agent.calls import CallError

BOOT_ERRORS = "/run/pyro/boot-errors"
REPORTED_MOUNTS = ("/", "/workspace")
WORKSPACE = "/workspace"


def mounts(targets: tuple[str, ...], table: str = "/proc/self/mounts") -> dict[str, Any]:
    """What is mounted at each of ``targets``: {target: {source, fstype, options}}."""
    found: dict[str, Any] = {}
    try:
        with open(table) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if len(fields) >= 4 and fields[1] in targets:
            # A later line for the same target is what is mounted on top now.
            found[fields[1]] = {"source": fields[0], "fstype": fields[2], "options": fields[3]}
    return found


def boot_errors(path: str = BOOT_ERRORS) -> list[str]:
    """What pyro-init reported it could not do at boot (at most 20 lines)."""
    try:
        with open(path, errors="replace") as handle:
            return [line.rstrip("\n")[:500] for line in handle.readlines()[:20]]
    except OSError:
        return []


def _workspace_expected() -> bool:
    try:
        with open("/proc/cmdline") as handle:
            return any(w.startswith("pyro.workspace=") for w in handle.read().split())
    except OSError:
        return False


_expected: bool | None = None


def require_mounted(real_root: str) -> None:
    """Refuse to work in ``/workspace`` when its disk should be mounted there but is not."""
    global _expected
    if real_root != WORKSPACE:
        return
    if _expected is None:
        _expected = _workspace_expected()
    if _expected and not os.path.ismount(real_root):
        errors = "; ".join(boot_errors()) or "no reason was recorded"
        raise CallError(
            "not_mounted",
            f"{WORKSPACE} is not mounted (the workspace disk failed to mount at boot: {errors})",
        )
