"""Acknowledged means durable: what pyro said it wrote survives ``kill -9`` of the VMM.

Each trial makes one acknowledged change (file write, patch, sync push or reset, in turn),
kills the VMM the moment the call returns, starts the workspace again and checks every
path pyro has written so far, byte for byte. Nothing in the test flushes anything: no
``sync``, no waiting. ``PYRO_DURABILITY_TRIALS`` sets the number of trials (default 50).
"""

from __future__ import annotations

import io
import os
import signal
import tarfile
from pathlib import Path

import pytest

from pyro_mcp.api import Context
from pyro_mcp.api.operations import workspace_content as wc
from pyro_mcp.api.operations import workspaces as ws
from pyro_mcp.errors import GuestError
from pyro_mcp.vmm.identity import ProcessIdentity

pytestmark = pytest.mark.guest

TRIALS = int(os.environ.get("PYRO_DURABILITY_TRIALS", "50"))
KINDS = ("file write", "patch", "sync push", "reset")
Model = dict[str, bytes | None]  # path -> the content pyro acknowledged (None: absent)


def _content(trial: int, what: str) -> bytes:
    # Some kilobytes, unique per trial: a lost write cannot pass for a kept one.
    line = f"{what} of trial {trial}\n".encode()
    return line * (4096 // len(line) + 1)


def _archive(path: Path, name: str, data: bytes) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def _kill_9(pid: int) -> None:
    """SIGKILL the VMM and wait until it is dead (a zombie or gone): nothing else."""
    vmm = ProcessIdentity.of(pid)
    os.kill(pid, signal.SIGKILL)
    assert vmm is None or vmm.wait_exit(10.0), f"VMM {pid} outlived SIGKILL for 10 s"


def _read(ctx: Context, wid: str, path: str) -> bytes | None:
    try:
        found = wc.workspace_file_read(ctx, wid, path, max_bytes=1 << 20)
    except GuestError as exc:
        if exc.guest_code == "not_found":
            return None
        raise
    if found["encoding"] == "utf-8":
        return str(found["content"]).encode()
    import base64

    return base64.b64decode(found["content"])


def test_acknowledged_writes_survive_an_immediate_kill_9(ws_ctx: Context, tmp_path: Path) -> None:
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "patched.txt").write_bytes(b"version 0\n")
    (seed / "reset.txt").write_bytes(b"as checkpointed\n")
    wid = ws.workspace_create(ws_ctx, "debian:12", seed_path=str(seed))["id"]
    wc.snapshot_create(ws_ctx, wid, "good")
    checkpointed: Model = {
        "patched.txt": b"version 0\n",
        "reset.txt": b"as checkpointed\n",
        "written.txt": None,
        "pushed/p.txt": None,
    }
    model = dict(checkpointed)
    lost: list[str] = []
    torn: list[str] = []
    for trial in range(TRIALS):
        kind = KINDS[trial % len(KINDS)]
        if kind == "file write":
            data = _content(trial, "written")
            wc.workspace_file_write(ws_ctx, wid, "written.txt", text=data.decode())
            model["written.txt"] = data
        elif kind == "patch":
            old, new = model["patched.txt"] or b"", f"version {trial}\n".encode()
            patch = (
                f"--- a/patched.txt\n+++ b/patched.txt\n@@ -1 +1 @@\n-{old.decode()}+{new.decode()}"
            )
            wc.workspace_patch_apply(ws_ctx, wid, patch=patch)
            model["patched.txt"] = new
        elif kind == "sync push":
            data = _content(trial, "pushed")
            source = _archive(tmp_path / f"push-{trial}.tar.gz", "p.txt", data)
            wc.workspace_sync_push(ws_ctx, wid, str(source), dest="pushed")
            model["pushed/p.txt"] = data
        else:
            # Unsynced junk the reset must replace (how long the guest keeps it is moot).
            wc.workspace_exec(ws_ctx, wid, ["sh", "-c", "echo junk > reset.txt"])
            wc.workspace_reset(ws_ctx, wid, snapshot="good")
            model = dict(checkpointed)
        _kill_9(ws.workspace_status(ws_ctx, wid)["vmm_pid"])
        ws.workspace_start(ws_ctx, wid)
        for path, expected in model.items():
            found = _read(ws_ctx, wid, path)
            if found == expected:
                continue
            where = f"trial {trial} ({kind}): {path}"
            if found is None or expected is None or len(found) != len(expected):
                lost.append(f"{where}: {None if found is None else len(found)} bytes")
            else:
                torn.append(f"{where}: same length, other bytes")
            # Put the path back as the model says, so later trials test their own write.
            if expected is None:
                wc.workspace_file_delete(ws_ctx, wid, path)
            else:
                wc.workspace_file_write(ws_ctx, wid, path, text=expected.decode())
    assert (lost, torn) == ([], []), f"{len(lost)} lost, {len(torn)} torn in {TRIALS} trials"
