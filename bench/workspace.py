"""Rows for persistent workspaces, timed through the operations a CLI or MCP client calls.

Every figure is host wall clock around one operation (``workspace_create``,
``workspace_exec``, ``workspace_diff``, ``snapshot_create``, ``workspace_reset``), which
opens the state store and attaches to the guest agent on each call, as a client does.
Workspaces live in a private state directory under /tmp; every one is deleted in a
``finally`` (Ctrl-C included) and the directory removed. A sample counts only when the
operation did what it should (exit code 0, a diff of exactly the files changed, a reset
that leaves no difference); otherwise the row says why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.guest import Counts
from bench.stats import Row, Table
from pyro_mcp.api.context import Context
from pyro_mcp.api.operations import workspace_content as wc
from pyro_mcp.api.operations import workspaces as ws
from pyro_mcp.api.operations.workspaces import open_workspaces
from pyro_mcp.runtime.paths import RuntimePaths

MIB = 1 << 20
# The create seed: 10 MiB of random (incompressible) bytes in 100 files of ~100 KiB.
BLOB_FILES = 100
BLOB_FILE_BYTES = 10 * MIB // BLOB_FILES
BLOB_SEED = f"{BLOB_FILES * BLOB_FILE_BYTES / MIB:.0f} MiB seed of {BLOB_FILES} random files"
# The diff/checkpoint seed: 100 directories x 100 text files of ~200 bytes.
TREE_DIRS = 100
TREE_FILES_PER_DIR = 100
TREE_FILES = TREE_DIRS * TREE_FILES_PER_DIR
TREE_LINE_BYTES = 100  # random bytes per file, written as 200 hex digits + newline
CHANGED = 10
# The guest agent does not cache the digest of a file whose ctime lies within 100 ms of
# the start of a manifest; waiting this long after a change (untimed) makes the "repeat"
# rows measure the cached path rather than that race window.
SETTLE_S = 0.25
REPEATS_PER_DIFF = 2
NO_CHANGES = {"added": 0, "modified": 0, "deleted": 0, "type_changed": 0}
EXPECTED_DIFF = {**NO_CHANGES, "modified": CHANGED}

# (metric, unit, decimals)
CREATE_ROW = (f"workspace create, {BLOB_SEED}, until guest ready", "ms", 0)
DELETE_ROW = (f"  workspace delete (running, {BLOB_SEED})", "ms", 0)
EXEC_OP_ROW = ("workspace exec `true` (operation: open store, attach, exec, journal)", "ms", 1)
EXEC_ATTACHED_ROW = ("  exec `true` through one attached AgentClient", "ms", 1)
ATTACH_ROW = ("  attach + detach only (Workspaces.agent, no call)", "ms", 1)
FILE_WRITE_ROW = ("workspace file write, 4 KiB (operation; acknowledged = on disk)", "ms", 1)
TREE_CREATE_ROW = (f"workspace create, {TREE_FILES:,}-file seed, until guest ready", "ms", 0)
DIFF_COLD_ROW = (
    f"diff {TREE_FILES:,} files / {CHANGED} modified: first since boot (cold caches)",
    "ms",
    0,
)
DIFF_FIRST_ROW = (f"  diff: first call after changing {CHANGED} files", "ms", 0)
DIFF_REPEAT_ROW = ("  diff: repeated call, nothing changed since", "ms", 0)
SNAPSHOT_ROW = (f"checkpoint create, {TREE_FILES:,} files, {CHANGED} changed since", "ms", 0)
RESET_ROW = (f"reset to checkpoint, {CHANGED} files changed since (diff verified empty)", "ms", 0)

CREATE_EXEC_ROWS = [
    CREATE_ROW,
    DELETE_ROW,
    EXEC_OP_ROW,
    EXEC_ATTACHED_ROW,
    ATTACH_ROW,
    FILE_WRITE_ROW,
]
TREE_ROWS = [
    TREE_CREATE_ROW,
    DIFF_COLD_ROW,
    DIFF_FIRST_ROW,
    DIFF_REPEAT_ROW,
    SNAPSHOT_ROW,
    RESET_ROW,
]


@dataclass(frozen=True)
class WorkspaceCounts:
    """Samples of the workspace rows (diff rounds each add REPEATS_PER_DIFF repeats)."""

    ws_create: int = 3
    ws_exec: int = 30
    ws_diff: int = 3
    ws_checkpoint: int = 3

    @classmethod
    def quick(cls) -> WorkspaceCounts:
        return cls(ws_create=1, ws_exec=3, ws_diff=1, ws_checkpoint=1)

    @classmethod
    def scaled(cls, repeat: int) -> WorkspaceCounts:
        """Scaled like :meth:`bench.guest.Counts.scaled` (by ``repeat`` / default cold runs)."""
        base = cls()
        factor = repeat / Counts().cold_run

        def scale(value: int) -> int:
            return max(1, round(value * factor))

        return cls(
            ws_create=scale(base.ws_create),
            ws_exec=scale(base.ws_exec),
            ws_diff=scale(base.ws_diff),
            ws_checkpoint=scale(base.ws_checkpoint),
        )


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def _timed(call: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """(milliseconds, result) of ``call(*args, **kwargs)``."""
    started = time.perf_counter()
    result = call(*args, **kwargs)
    return _ms_since(started), result


def _miss(row: Row, what: str) -> None:
    """Note on ``row`` that a sample was not counted, and why (the first reason is kept)."""
    row.note = row.note or f"sample(s) not counted: {what}"


# -- seeds, built on the host ---------------------------------------------------------------
def write_blob_seed(root: Path) -> Path:
    root.mkdir(parents=True)
    for index in range(BLOB_FILES):
        (root / f"blob-{index:03d}.bin").write_bytes(os.urandom(BLOB_FILE_BYTES))
    return root


def write_tree_seed(root: Path) -> Path:
    for d in range(TREE_DIRS):
        directory = root / f"d{d:02d}"
        directory.mkdir(parents=True)
        for f in range(TREE_FILES_PER_DIR):
            (directory / f"f{f:02d}.txt").write_text(os.urandom(TREE_LINE_BYTES).hex() + "\n")
    return root


def changed_paths() -> list[str]:
    """The files each round changes: spread over ten directories."""
    step = TREE_DIRS // CHANGED
    return [f"d{i * step:02d}/f{(i * 7) % TREE_FILES_PER_DIR:02d}.txt" for i in range(CHANGED)]


def change_files(ctx: Context, wid: str, tag: str) -> None:
    """Append a line to each of the CHANGED files with one workspace_exec (untimed)."""
    script = f'for f in {" ".join(changed_paths())}; do echo {tag} >> "$f"; done'
    result = wc.workspace_exec(ctx, wid, ["sh", "-c", script])
    if result["exit_code"] != 0:
        raise RuntimeError(f"changing files failed: {result['stderr'][:120]}")
    time.sleep(SETTLE_S)


# -- the measurements -----------------------------------------------------------------------
def measure_workspaces(
    table: Table,
    paths: RuntimePaths,
    environment: str,
    counts: WorkspaceCounts,
    mem_mib: int,
) -> dict[str, Any]:
    """Every workspace row; each part that fails explains its own rows and the next runs."""
    for spec in CREATE_EXEC_ROWS + TREE_ROWS:
        table.row(*spec)
    scratch = Path(tempfile.mkdtemp(prefix="pyro-bench-ws-", dir="/tmp"))
    ctx = Context(paths=paths, state_dir=scratch / "state")
    info: dict[str, Any] = {"diff_repeats_per_round": REPEATS_PER_DIFF, "swept_workspaces": []}
    try:
        parts: list[tuple[list[tuple[str, str, int]], Callable[[], None]]] = [
            (
                CREATE_EXEC_ROWS,
                lambda: measure_create_and_exec(table, ctx, scratch, environment, counts, mem_mib),
            ),
            (
                TREE_ROWS,
                lambda: measure_tree(table, ctx, scratch, environment, counts, mem_mib),
            ),
        ]
        for specs, part in parts:
            try:
                part()
            except Exception as exc:
                reason = (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0][:160]
                table.explain([table.row(*spec) for spec in specs], reason)
            finally:  # what a failed part left running must not hold memory for the next
                info["swept_workspaces"] += delete_all(ctx)
    finally:
        info["swept_workspaces"] += delete_all(ctx)
        shutil.rmtree(scratch, ignore_errors=True)
    return info


def delete_all(ctx: Context) -> list[str]:
    """Delete every workspace of the private state dir; the ids that needed it."""
    if not ctx.state_dir.exists():
        return []
    deleted = []
    with open_workspaces(ctx) as workspaces:
        for record in workspaces.store.list():
            with contextlib.suppress(Exception):
                workspaces.delete(record.id)
                deleted.append(record.id)
    return deleted


def measure_create_and_exec(
    table: Table,
    ctx: Context,
    scratch: Path,
    environment: str,
    counts: WorkspaceCounts,
    mem_mib: int,
) -> None:
    """Create (and delete) ``ws_create`` workspaces from a 10 MiB seed; exec in the last."""
    create, delete = table.row(*CREATE_ROW), table.row(*DELETE_ROW)
    seed = write_blob_seed(scratch / "seed-blobs")
    n = max(1, counts.ws_create)
    for index in range(n):
        elapsed, created = _timed(
            ws.workspace_create, ctx, environment, seed_path=str(seed), mem_mib=mem_mib
        )
        wid = created["id"]
        if created.get("state") == "running":
            create.add(elapsed)
        else:
            _miss(create, f"state {created.get('state')}")
        if index == n - 1:
            listed = wc.workspace_exec(ctx, wid, ["sh", "-c", "find . -type f | wc -l"])
            if listed["stdout"].strip() != str(BLOB_FILES):
                _miss(create, f"/workspace holds {listed['stdout'].strip()} files")
            try:
                measure_exec(table, ctx, wid, counts.ws_exec)
            except Exception as exc:
                reason = (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0][:160]
                rows = (EXEC_OP_ROW, EXEC_ATTACHED_ROW, ATTACH_ROW, FILE_WRITE_ROW)
                table.explain([table.row(*s) for s in rows], reason)
        elapsed, _ = _timed(ws.workspace_delete, ctx, wid)
        delete.add(elapsed)


def measure_exec(table: Table, ctx: Context, wid: str, n: int) -> None:
    """``true`` through the operation, through one attached client, and attach alone.

    Each way is warmed with one untimed call, so the rows compare like with like.
    """
    through_op = table.row(*EXEC_OP_ROW)
    attached = table.row(*EXEC_ATTACHED_ROW)
    attach_only = table.row(*ATTACH_ROW)
    wc.workspace_exec(ctx, wid, ["true"])
    for _ in range(n):
        elapsed, result = _timed(wc.workspace_exec, ctx, wid, ["true"])
        if result["exit_code"] == 0:
            through_op.add(elapsed)
        else:
            _miss(through_op, f"exit {result['exit_code']}")
    with open_workspaces(ctx) as workspaces:
        with workspaces.agent(wid, "bench") as agent:
            agent.exec(["true"], timeout_s=30)
            for _ in range(n):
                started = time.perf_counter()
                outcome = agent.exec(["true"], timeout_s=30)
                elapsed = _ms_since(started)
                if outcome.exit_code == 0:
                    attached.add(elapsed)
                else:
                    _miss(attached, f"exit {outcome.exit_code}")
        with workspaces.agent(wid, "bench"):
            pass
        for _ in range(n):
            started = time.perf_counter()
            with workspaces.agent(wid, "bench"):
                pass
            attach_only.add(_ms_since(started))
    measure_file_write(table, ctx, wid, n)


def measure_file_write(table: Table, ctx: Context, wid: str, n: int) -> None:
    """4 KiB written through the operation, a new file each time; a sample counts when the
    file reads back as written."""
    row = table.row(*FILE_WRITE_ROW)
    text = os.urandom(2048).hex()
    wc.workspace_file_write(ctx, wid, "bench-warm.txt", text=text)
    for index in range(n):
        elapsed, _ = _timed(wc.workspace_file_write, ctx, wid, f"bench-{index}.txt", text=text)
        back = wc.workspace_file_read(ctx, wid, f"bench-{index}.txt", max_bytes=8192)
        if back["content"] == text:
            row.add(elapsed)
        else:
            _miss(row, "the file did not read back as written")


def measure_tree(
    table: Table,
    ctx: Context,
    scratch: Path,
    environment: str,
    counts: WorkspaceCounts,
    mem_mib: int,
) -> None:
    """Diff, checkpoint and reset on one workspace seeded with TREE_FILES small files."""
    seed = write_tree_seed(scratch / "seed-tree")
    elapsed, created = _timed(
        ws.workspace_create, ctx, environment, seed_path=str(seed), mem_mib=mem_mib
    )
    wid = created["id"]
    tree_create = table.row(*TREE_CREATE_ROW)
    if created.get("state") == "running":
        tree_create.add(elapsed)
    else:
        _miss(tree_create, f"state {created.get('state')}")
    measure_diff(table, ctx, wid, counts.ws_diff)
    measure_checkpoints(table, ctx, wid, counts.ws_checkpoint)
    ws.workspace_delete(ctx, wid)


def _diff_sample(row: Row, ctx: Context, wid: str, against: str, expected: dict[str, int]) -> None:
    elapsed, result = _timed(wc.workspace_diff, ctx, wid, against=against)
    if result["summary"] == expected:
        row.add(elapsed)
    else:
        _miss(row, f"summary {result['summary']}")


def measure_diff(table: Table, ctx: Context, wid: str, rounds: int) -> None:
    """Round 0 is the first manifest since boot: the guest reads every file from its disk
    and hashes it. Later rounds meet a warm hash cache and hash only the changed files."""
    cold = table.row(*DIFF_COLD_ROW)
    first = table.row(*DIFF_FIRST_ROW)
    repeat = table.row(*DIFF_REPEAT_ROW)
    for index in range(rounds + 1):
        change_files(ctx, wid, f"diff-round-{index}")
        _diff_sample(cold if index == 0 else first, ctx, wid, "baseline", EXPECTED_DIFF)
        for _ in range(REPEATS_PER_DIFF):
            _diff_sample(repeat, ctx, wid, "baseline", EXPECTED_DIFF)


def measure_checkpoints(table: Table, ctx: Context, wid: str, n: int) -> None:
    """Change, checkpoint, change again, reset to the checkpoint, check nothing differs."""
    snapshot = table.row(*SNAPSHOT_ROW)
    reset = table.row(*RESET_ROW)
    for index in range(n):
        name = f"bench-{index}"
        change_files(ctx, wid, f"before-{name}")
        elapsed, made = _timed(wc.snapshot_create, ctx, wid, name)
        if made.get("file_count") == TREE_FILES:
            snapshot.add(elapsed)
        else:
            _miss(snapshot, f"checkpoint holds {made.get('file_count')} files")
        change_files(ctx, wid, f"after-{name}")
        elapsed, back = _timed(wc.workspace_reset, ctx, wid, snapshot=name)
        after = wc.workspace_diff(ctx, wid, against=name)["summary"]
        if (back.get("restored"), back.get("removed")) != (CHANGED, 0):
            _miss(reset, f"restored {back.get('restored')}, removed {back.get('removed')}")
        elif after != NO_CHANGES:
            _miss(reset, f"diff against the checkpoint after reset: {after}")
        else:
            reset.add(elapsed)
