"""Operations inside a workspace: exec, files, patch, sync, diff, export, checkpoints, disks."""

import sys
from typing import Annotated, Any

from pyro_mcp.api.context import Context
from pyro_mcp.api.operations.vm import COMMAND, OUTPUT_CAP, TIMEOUT
from pyro_mcp.api.operations.workspaces import CORE, FULL, open_workspaces, parse_pairs
from pyro_mcp.api.registry import CLI_ONLY, EVERY, Arg, operation
from pyro_mcp.errors import InvalidArgument, InvalidState
from pyro_mcp.workspace import checkpoints, content

WORKSPACE = Arg("workspace id or name", surfaces=EVERY, positional=True)
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
CHECKPOINT = Arg("checkpoint name", surfaces=EVERY, positional=True)


@operation(
    cli=("workspace", "exec"),
    sdk="exec_workspace",
    profiles=CORE,
    exit_code_key="exit_code",
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
) -> dict[str, Any]:
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


@operation(cli=("workspace", "file", "list"), sdk="list_workspace_files", profiles=CORE)
def workspace_file_list(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    path: Annotated[
        str, Arg("directory in /workspace", surfaces=EVERY, positional=True, path=True)
    ] = ".",
    recursive: Annotated[bool, RECURSIVE] = False,
) -> dict[str, Any]:
    """List files under a directory of /workspace (type, mode, size, mtime)."""
    with open_workspaces(ctx) as workspaces:
        return content.list_files(workspaces, workspace, path, recursive)


@operation(cli=("workspace", "file", "read"), sdk="read_workspace_file", profiles=CORE)
def workspace_file_read(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    path: Annotated[str, PATH],
    max_bytes: Annotated[int, READ_BYTES] = content.DEFAULT_READ_BYTES,
    content_only: Annotated[bool, Arg("print only the content", surfaces=CLI_ONLY)] = False,
) -> dict[str, Any]:
    """Read a file from /workspace: UTF-8 text as is, anything else base64-encoded."""
    with open_workspaces(ctx) as workspaces:
        result = content.read_file(workspaces, workspace, path, max_bytes)
    if content_only:
        result["content_only"] = True
    return result


@operation(cli=("workspace", "file", "write"), sdk="write_workspace_file", profiles=CORE)
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
) -> dict[str, Any]:
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


@operation(cli=("workspace", "file", "delete"), sdk="delete_workspace_file", profiles=FULL)
def workspace_file_delete(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    path: Annotated[str, PATH],
    recursive: Annotated[
        bool, Arg("delete a directory and everything in it", surfaces=EVERY)
    ] = False,
) -> dict[str, Any]:
    """Delete a file, symlink or (with recursive) directory in /workspace."""
    with open_workspaces(ctx) as workspaces:
        return content.delete_file(workspaces, workspace, path, recursive)


@operation(cli=("workspace", "patch", "apply"), sdk="apply_workspace_patch", profiles=CORE)
def workspace_patch_apply(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    patch: Annotated[str | None, Arg("the unified diff text", surfaces=EVERY)] = None,
    patch_file: Annotated[
        str | None, Arg("read the unified diff from this host file", surfaces=EVERY, path=True)
    ] = None,
) -> dict[str, Any]:
    """Apply a unified diff to /workspace: all hunks or none (the error names the hunk)."""
    if (patch is None) == (patch_file is None):
        raise InvalidArgument("give exactly one of patch or patch_file")
    text = patch if patch is not None else _read_text(ctx, patch_file or "", "patch file")
    with open_workspaces(ctx) as workspaces:
        return content.apply_patch(workspaces, workspace, text)


@operation(cli=("workspace", "sync", "push"), sdk="push_workspace_sync", profiles=FULL)
def workspace_sync_push(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    source: Annotated[
        str, Arg("host directory or tar archive", surfaces=EVERY, positional=True, path=True)
    ],
    dest: Annotated[
        str, Arg("destination directory in /workspace", surfaces=EVERY, path=True)
    ] = ".",
) -> dict[str, Any]:
    """Copy a host directory or archive into /workspace (safely: no escapes, capped)."""
    path = ctx.host_paths.check(source, "sync source")
    with open_workspaces(ctx) as workspaces:
        return content.sync_push(workspaces, workspace, path, dest)


@operation(cli=("workspace", "diff"), sdk="diff_workspace", profiles=CORE)
def workspace_diff(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    against: Annotated[
        str, Arg("checkpoint to compare with", surfaces=EVERY)
    ] = checkpoints.BASELINE,
) -> dict[str, Any]:
    """What changed in /workspace since the baseline: counts and unified patches."""
    with open_workspaces(ctx) as workspaces:
        return checkpoints.diff(workspaces, workspace, against)


@operation(cli=("workspace", "export"), sdk="export_workspace", profiles=CORE)
def workspace_export(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    path: Annotated[str, PATH],
    output: Annotated[
        str, Arg("host path to write (file or directory)", surfaces=EVERY, path=True)
    ],
    force: Annotated[bool, FORCE] = False,
) -> dict[str, Any]:
    """Copy a file or directory out of /workspace to the host.

    An empty directory exports as an empty directory. Device nodes, fifos and sockets
    are left out: ``skipped`` counts them and ``skipped_paths`` names the first 100.
    """
    target = ctx.host_paths.check(output, "export output")
    with open_workspaces(ctx) as workspaces:
        # content.export hands ``output`` to exporting.extract_export, which takes a
        # HostPath; the ignore goes once content.export's annotation says Path | HostPath.
        return content.export(workspaces, workspace, path, target, force=force)


@operation(cli=("workspace", "snapshot", "create"), sdk="create_snapshot", profiles=FULL)
def snapshot_create(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    name: Annotated[str, CHECKPOINT],
) -> dict[str, Any]:
    """Checkpoint /workspace under a name (only changed files are copied out)."""
    with open_workspaces(ctx) as workspaces:
        return checkpoints.create_checkpoint(workspaces, workspace, name)


@operation(cli=("workspace", "snapshot", "list"), sdk="list_snapshots", profiles=FULL)
def snapshot_list(ctx: Context, workspace: Annotated[str, WORKSPACE]) -> dict[str, Any]:
    """The checkpoints of a workspace (the seed is the implicit ``baseline``)."""
    with open_workspaces(ctx) as workspaces:
        return {"snapshots": [c.to_dict() for c in workspaces.store.checkpoints(workspace)]}


@operation(cli=("workspace", "snapshot", "delete"), sdk="delete_snapshot", profiles=FULL)
def snapshot_delete(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    name: Annotated[str, CHECKPOINT],
) -> dict[str, Any]:
    """Delete a checkpoint; the file contents no other checkpoint needs are freed."""
    with open_workspaces(ctx) as workspaces:
        workspaces.store.delete_checkpoint(workspace, name)
        removed, freed = workspaces.collect_blobs(workspaces.store.get(workspace).id)
        return {"deleted": name, "blobs_removed": removed, "bytes_freed": freed}


@operation(cli=("workspace", "reset"), sdk="reset_workspace", profiles=FULL)
def workspace_reset(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    snapshot: Annotated[str, Arg("checkpoint to restore", surfaces=EVERY)] = checkpoints.BASELINE,
) -> dict[str, Any]:
    """Restore /workspace exactly to a checkpoint (default: the baseline) and say what changed."""
    with open_workspaces(ctx) as workspaces:
        return checkpoints.reset(workspaces, workspace, snapshot)


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


@operation(cli=("workspace", "disk", "list"), sdk="list_workspace_disk", profiles=FULL)
def workspace_disk_list(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    path: Annotated[
        str, Arg("directory on the /workspace disk", surfaces=EVERY, positional=True, path=True)
    ] = "/",
    recursive: Annotated[bool, RECURSIVE] = False,
) -> dict[str, Any]:
    """List a stopped workspace's /workspace disk offline (never mounted on the host)."""
    from pyro_mcp.storage import workspace_disk

    image = _stopped_disk(ctx, workspace, "disk list")
    listing = workspace_disk.disk_list(image, path, recursive)
    return {"path": path, "entries": list(listing), "unlisted": listing.unlisted}


@operation(cli=("workspace", "disk", "read"), sdk="read_workspace_disk", profiles=FULL)
def workspace_disk_read(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    path: Annotated[
        str, Arg("file on the /workspace disk", surfaces=EVERY, positional=True, path=True)
    ],
    max_bytes: Annotated[int, READ_BYTES] = 1 << 20,
) -> dict[str, Any]:
    """Read a file from a stopped workspace's /workspace disk offline."""
    from pyro_mcp.storage import workspace_disk

    image = _stopped_disk(ctx, workspace, "disk read")
    data = workspace_disk.disk_read(image, path, max_bytes)
    return {"path": path, "size": len(data), "content": data.decode("utf-8", "replace")}


@operation(cli=("workspace", "disk", "export"), sdk="export_workspace_disk", profiles=FULL)
def workspace_disk_export(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    output: Annotated[str, Arg("host path of the ext4 image to write", surfaces=EVERY, path=True)],
    force: Annotated[bool, FORCE] = False,
) -> dict[str, Any]:
    """Copy a stopped workspace's /workspace disk image (ext4) to the host."""
    from pyro_mcp.storage import disk_export

    target = ctx.host_paths.check(output, "disk export output")
    image = _stopped_disk(ctx, workspace, "disk export")
    written = disk_export.disk_export(image, target, force=force)
    return {"output": str(written), "size": image.stat().st_size}


def _read_text(ctx: Context, path: str, purpose: str) -> str:
    """A host text file (UTF-8), read through a confined descriptor, at most 64 MiB."""
    from pyro_mcp.storage import host_files

    target = ctx.host_paths.check(path, purpose)
    data = host_files.read_file(target, purpose)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{purpose} {target} is not UTF-8 text") from exc
