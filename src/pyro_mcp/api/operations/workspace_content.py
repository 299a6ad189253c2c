"""Operations inside a workspace: exec, files, patch, sync, diff, export, checkpoints, disks."""

import sys
from typing import TYPE_CHECKING, Annotated, Any

from pyro_mcp.api.context import Context
from pyro_mcp.api.operations.vm import COMMAND, OUTPUT_CAP, TIMEOUT
from pyro_mcp.api.operations.workspaces import CORE, FULL, WORKSPACE, open_workspaces, parse_pairs
from pyro_mcp.api.registry import CLI_ONLY, EVERY, Arg, operation
from pyro_mcp.errors import InvalidArgument, InvalidState
from pyro_mcp.workspace import checkpoints, content

if TYPE_CHECKING:
    from pyro_mcp.api.results import (
        SnapshotCreateResult,
        SnapshotDeleteResult,
        SnapshotListResult,
        WorkspaceDiffResult,
        WorkspaceDiskExportResult,
        WorkspaceDiskListResult,
        WorkspaceDiskReadResult,
        WorkspaceExecResult,
        WorkspaceExportResult,
        WorkspaceFileDeleteResult,
        WorkspaceFileListResult,
        WorkspaceFileReadResult,
        WorkspaceFileWriteResult,
        WorkspacePatchApplyResult,
        WorkspaceResetResult,
        WorkspaceSyncPushResult,
    )

PATH = Arg(
    "path in /workspace (relative paths start there)", surfaces=EVERY, positional=True, path=True
)
ENV = Arg("KEY=VALUE environment variable (repeatable)", surfaces=EVERY)
SECRET_ENV = Arg(
    "expose workspace secret NAME to this process as $NAME, or as $ENVVAR with NAME=ENVVAR "
    '(repeatable; SDK/MCP also take pyro-mcp 3.x\'s {"NAME": "ENVVAR"})',
    surfaces=EVERY,
    metavar="NAME[=ENVVAR]",
)
CWD = Arg("working directory (default /workspace)", surfaces=EVERY, path=True)
FORCE = Arg("replace an existing output", surfaces=EVERY)
RECURSIVE = Arg("descend into subdirectories", surfaces=EVERY)
READ_BYTES = Arg("read at most this many bytes", surfaces=EVERY, minimum=1, maximum=64 << 20)
CONTENT_ONLY = Arg(
    "print only the file's bytes, exactly as stored (neither JSON nor base64)", surfaces=CLI_ONLY
)
CHECKPOINT = Arg("checkpoint name", surfaces=EVERY, positional=True, name="snapshot_name")


@operation(
    cli=("workspace", "exec"),
    sdk="exec_workspace",
    profiles=CORE,
    exit_code_key="exit_code",
    title="Run a command in a workspace",
    destructive=True,
    open_world=True,
)
def workspace_exec(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    command: Annotated[str | list[str], COMMAND],
    cwd: Annotated[str | None, CWD] = None,
    env: Annotated[list[str] | None, ENV] = None,
    secret_env: Annotated[list[str] | dict[str, str] | None, SECRET_ENV] = None,
    timeout_seconds: Annotated[float, TIMEOUT] = 300.0,
    output_cap_bytes: Annotated[int, OUTPUT_CAP] = 1 << 20,
) -> "WorkspaceExecResult":
    """Run a command in a running workspace; output streams, the exit code is data.

    ``command`` is a shell command line (run with ``/bin/sh -lc``) or an argv list.
    ``secret_env`` puts workspace secrets in its environment; their values show as
    ``***`` in its output and its journal entry.
    Errors: InvalidState when the workspace is not running (names its state),
    NotFound for an unknown workspace, AgentUnavailable if its VM died mid-call.
    """
    with open_workspaces(ctx) as workspaces, ctx.running_command() as output:
        return content.exec_command(
            workspaces,
            workspace,
            command,
            cwd=cwd,
            env=parse_pairs(env, "env") or None,
            secret_env=secret_env,
            timeout_seconds=timeout_seconds,
            output_cap_bytes=output_cap_bytes,
            output=output,
            cancel=ctx.cancelled,
        )


@operation(
    cli=("workspace", "file", "list"),
    sdk="list_workspace_files",
    profiles=CORE,
    title="List files in a workspace",
    read_only=True,
)
def workspace_file_list(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    path: Annotated[
        str, Arg("directory in /workspace", surfaces=EVERY, positional=True, path=True)
    ] = ".",
    recursive: Annotated[bool, RECURSIVE] = False,
) -> "WorkspaceFileListResult":
    """List files under a directory of /workspace (type, mode, size, mtime)."""
    with open_workspaces(ctx) as workspaces:
        return content.list_files(workspaces, workspace, path, recursive)


@operation(
    cli=("workspace", "file", "read"),
    sdk="read_workspace_file",
    profiles=CORE,
    title="Read a file in a workspace",
    read_only=True,
)
def workspace_file_read(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    path: Annotated[str, PATH],
    max_bytes: Annotated[int, READ_BYTES] = content.DEFAULT_READ_BYTES,
    content_only: Annotated[bool, CONTENT_ONLY] = False,
) -> "WorkspaceFileReadResult":
    """Read a file from /workspace: UTF-8 text as is, anything else base64-encoded."""
    with open_workspaces(ctx) as workspaces:
        result = content.read_file(workspaces, workspace, path, max_bytes)
    if content_only:
        result["content_only"] = True
    return result


@operation(
    cli=("workspace", "file", "write"),
    sdk="write_workspace_file",
    profiles=CORE,
    title="Write a file in a workspace",
    destructive=True,
    idempotent=True,
)
def workspace_file_write(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    path: Annotated[str, PATH],
    text: Annotated[str | None, Arg("the new content", surfaces=EVERY)] = None,
    text_file: Annotated[
        str | None, Arg("take the content from this host file", surfaces=EVERY, path=True)
    ] = None,
    stdin: Annotated[bool, Arg("take the content from standard input", surfaces=CLI_ONLY)] = False,
    mode: Annotated[
        int,
        Arg(
            "permission bits: octal digits as chmod takes them (644, 0o644), or an integer",
            surfaces=EVERY,
            minimum=0,
            maximum=0o7777,
            octal=True,
        ),
    ] = 0o644,
) -> "WorkspaceFileWriteResult":
    """Write a file in /workspace atomically (parent directories are created).

    The content is ``text`` or the host file ``text_file`` (at the CLI also ``--stdin``).
    """
    from pyro_mcp.storage import host_files

    sources = [text is not None, text_file is not None, stdin]
    if sum(sources) != 1:
        raise InvalidArgument("give exactly one of text or text_file (or --stdin at the CLI)")
    if text is not None:
        data = text.encode()
    elif text_file is not None:
        data = host_files.read_file(ctx.host_paths.check(text_file, "text file"), "text file")
    else:
        data = sys.stdin.buffer.read()
    with open_workspaces(ctx) as workspaces:
        return content.write_file(workspaces, workspace, path, data, mode)


@operation(
    cli=("workspace", "file", "delete"),
    sdk="delete_workspace_file",
    profiles=FULL,
    title="Delete a file in a workspace",
    destructive=True,
    idempotent=True,
)
def workspace_file_delete(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    path: Annotated[str, PATH],
    recursive: Annotated[
        bool, Arg("delete a directory and everything in it", surfaces=EVERY)
    ] = False,
) -> "WorkspaceFileDeleteResult":
    """Delete a file, symlink or (with recursive) directory in /workspace."""
    with open_workspaces(ctx) as workspaces:
        return content.delete_file(workspaces, workspace, path, recursive)


@operation(
    cli=("workspace", "patch", "apply"),
    sdk="apply_workspace_patch",
    profiles=CORE,
    title="Apply a patch in a workspace",
    destructive=True,
)
def workspace_patch_apply(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    patch: Annotated[str | None, Arg("the unified diff text", surfaces=EVERY)] = None,
    patch_file: Annotated[
        str | None, Arg("read the unified diff from this host file", surfaces=EVERY, path=True)
    ] = None,
) -> "WorkspacePatchApplyResult":
    """Apply a unified diff to /workspace: all hunks or none (the error names the hunk)."""
    if (patch is None) == (patch_file is None):
        raise InvalidArgument("give exactly one of patch or patch_file")
    text = patch if patch is not None else _read_text(ctx, patch_file or "", "patch file")
    with open_workspaces(ctx) as workspaces:
        return content.apply_patch(workspaces, workspace, text)


@operation(
    cli=("workspace", "sync", "push"),
    sdk="push_workspace_sync",
    profiles=CORE,
    title="Copy host files into a workspace",
    destructive=True,
    idempotent=True,
)
def workspace_sync_push(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    source: Annotated[
        str,
        Arg(
            "host directory or tar archive",
            surfaces=EVERY,
            positional=True,
            path=True,
            name="source_path",
        ),
    ],
    dest: Annotated[
        str, Arg("destination directory in /workspace", surfaces=EVERY, path=True)
    ] = ".",
) -> "WorkspaceSyncPushResult":
    """Copy a host directory or archive into /workspace (safely: no escapes, capped)."""
    path = ctx.host_paths.check(source, "sync source")
    with open_workspaces(ctx) as workspaces:
        return content.sync_push(workspaces, workspace, path, dest)


@operation(
    cli=("workspace", "diff"),
    sdk="diff_workspace",
    profiles=CORE,
    title="Diff a workspace against a checkpoint",
    read_only=True,
)
def workspace_diff(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    against: Annotated[
        str, Arg("checkpoint to compare with", surfaces=EVERY)
    ] = checkpoints.BASELINE,
) -> "WorkspaceDiffResult":
    """What changed in /workspace since the baseline: counts and unified patches."""
    with open_workspaces(ctx) as workspaces:
        return checkpoints.diff(workspaces, workspace, against)


@operation(
    cli=("workspace", "export"),
    sdk="export_workspace",
    profiles=CORE,
    title="Export workspace files to the host",
    destructive=True,
    idempotent=True,
)
def workspace_export(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    path: Annotated[str, PATH],
    output: Annotated[
        str,
        Arg(
            "host path to write (file or directory)",
            surfaces=EVERY,
            path=True,
            name="output_path",
            flag="output",
        ),
    ],
    force: Annotated[bool, FORCE] = False,
) -> "WorkspaceExportResult":
    """Copy a file or directory out of /workspace to the host.

    An empty directory exports as an empty directory. Device nodes, fifos and sockets
    are left out: ``skipped`` counts them and ``skipped_paths`` names the first 100.
    """
    target = ctx.host_paths.check(output, "export output")
    with open_workspaces(ctx) as workspaces:
        # content.export hands ``output`` to exporting.extract_export, which takes a
        # HostPath; the ignore goes once content.export's annotation says Path | HostPath.
        result = content.export(workspaces, workspace, path, target, force=force)
        return {**result, "output_path": result["output"]}


@operation(
    cli=("workspace", "snapshot", "create"),
    sdk="create_snapshot",
    profiles=FULL,
    title="Checkpoint a workspace",
    workspace_action=True,
)
def snapshot_create(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    name: Annotated[str, CHECKPOINT],
) -> "SnapshotCreateResult":
    """Checkpoint /workspace under a name (only changed files are copied out)."""
    with open_workspaces(ctx) as workspaces:
        return checkpoints.create_checkpoint(workspaces, workspace, name)


@operation(
    cli=("workspace", "snapshot", "list"),
    sdk="list_snapshots",
    profiles=FULL,
    title="List a workspace's checkpoints",
    read_only=True,
)
def snapshot_list(ctx: Context, workspace: Annotated[str, WORKSPACE]) -> "SnapshotListResult":
    """The checkpoints of a workspace (the seed is the implicit ``baseline``)."""
    with open_workspaces(ctx) as workspaces:
        found = workspaces.store.checkpoints(workspace)
        return {
            "snapshots": [c.to_dict() for c in found],
            "workspace_id": workspaces.store.get(workspace).id,
            "count": len(found),
        }


@operation(
    cli=("workspace", "snapshot", "delete"),
    sdk="delete_snapshot",
    profiles=FULL,
    title="Delete a checkpoint",
    destructive=True,
    idempotent=True,
)
def snapshot_delete(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    name: Annotated[str, CHECKPOINT],
) -> "SnapshotDeleteResult":
    """Delete a checkpoint; the file contents no other checkpoint needs are freed."""
    with open_workspaces(ctx) as workspaces:
        workspaces.store.delete_checkpoint(workspace, name)
        removed, freed = workspaces.collect_blobs(workspaces.store.get(workspace).id)
        return {
            "deleted": name,
            "snapshot_name": name,
            "workspace_id": workspaces.store.get(workspace).id,
            "blobs_removed": removed,
            "bytes_freed": freed,
        }


@operation(
    cli=("workspace", "reset"),
    sdk="reset_workspace",
    profiles=CORE,
    title="Reset a workspace to a checkpoint",
    destructive=True,
    idempotent=True,
    workspace_action=True,
)
def workspace_reset(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    snapshot: Annotated[str, Arg("checkpoint to restore", surfaces=EVERY)] = checkpoints.BASELINE,
) -> "WorkspaceResetResult":
    """Restore /workspace exactly to a checkpoint (default: the baseline) and say what changed."""
    with open_workspaces(ctx) as workspaces:
        return checkpoints.reset(workspaces, workspace, snapshot)


def _on_disk(path: str) -> str:
    """A path as the file tools take it (``/workspace/x``, ``x``) on the /workspace disk,
    whose root is ``/workspace`` in the guest: ``/x``. A path that is already absolute
    elsewhere is taken as on the disk, as before."""
    if path == "/workspace" or path.startswith("/workspace/"):
        return "/" + path.removeprefix("/workspace").lstrip("/")
    return path if path.startswith("/") else "/" + path


def _stopped_disk(ctx: Context, workspace: str, action: str) -> Any:
    with open_workspaces(ctx) as workspaces:
        workspaces.reconcile_one(workspace)
        record = workspaces.store.get(workspace)
        if record.state not in ("stopped", "failed"):
            raise InvalidState(
                f"workspace {record.id} is {record.state}; {action} reads its disk offline",
                hint=f"run `pyro workspace stop {record.id}` first",
            )
        return workspaces.layout.workspace(record.id).workspace_disk


@operation(
    cli=("workspace", "disk", "list"),
    sdk="list_workspace_disk",
    profiles=FULL,
    title="List a stopped workspace's disk",
    read_only=True,
)
def workspace_disk_list(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    path: Annotated[
        str,
        Arg(
            "directory in /workspace (/workspace/src, src; / is the disk's root)",
            surfaces=EVERY,
            positional=True,
            path=True,
        ),
    ] = "/workspace",
    recursive: Annotated[bool, RECURSIVE] = False,
) -> "WorkspaceDiskListResult":
    """List a stopped workspace's /workspace disk offline (never mounted on the host)."""
    from pyro_mcp.storage import workspace_disk

    image = _stopped_disk(ctx, workspace, "disk list")
    listing = workspace_disk.disk_list(image, _on_disk(path), recursive)
    return {"path": path, "entries": list(listing), "unlisted": listing.unlisted}


@operation(
    cli=("workspace", "disk", "read"),
    sdk="read_workspace_disk",
    profiles=FULL,
    title="Read a file from a stopped workspace's disk",
    read_only=True,
)
def workspace_disk_read(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    path: Annotated[
        str,
        Arg(
            "file in /workspace (/workspace/a.txt or a.txt)",
            surfaces=EVERY,
            positional=True,
            path=True,
        ),
    ],
    max_bytes: Annotated[int, READ_BYTES] = 1 << 20,
    content_only: Annotated[bool, CONTENT_ONLY] = False,
) -> "WorkspaceDiskReadResult":
    """Read a file from a stopped workspace's /workspace disk offline: UTF-8 text as is,
    anything else base64-encoded."""
    from pyro_mcp.storage import workspace_disk

    image = _stopped_disk(ctx, workspace, "disk read")
    data = workspace_disk.disk_read(image, _on_disk(path), max_bytes)
    result = {"path": path, "size": len(data), **content.content_fields(data)}
    if content_only:
        result["content_only"] = True
    return result


@operation(
    cli=("workspace", "disk", "export"),
    sdk="export_workspace_disk",
    profiles=FULL,
    title="Export a stopped workspace's disk image",
    destructive=True,
    idempotent=True,
)
def workspace_disk_export(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    output: Annotated[
        str,
        Arg(
            "host path of the ext4 image to write",
            surfaces=EVERY,
            path=True,
            name="output_path",
            flag="output",
        ),
    ],
    force: Annotated[bool, FORCE] = False,
) -> "WorkspaceDiskExportResult":
    """Copy a stopped workspace's /workspace disk image (ext4) to the host."""
    from pyro_mcp.storage import disk_export

    target = ctx.host_paths.check(output, "disk export output")
    image = _stopped_disk(ctx, workspace, "disk export")
    written = disk_export.disk_export(image, target, force=force)
    return {"output": str(written), "output_path": str(written), "size": image.stat().st_size}


def _read_text(ctx: Context, path: str, purpose: str) -> str:
    """A host text file (UTF-8), read through a confined descriptor, at most 64 MiB."""
    from pyro_mcp.storage import host_files

    target = ctx.host_paths.check(path, purpose)
    data = host_files.read_file(target, purpose)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{purpose} {target} is not UTF-8 text") from exc
