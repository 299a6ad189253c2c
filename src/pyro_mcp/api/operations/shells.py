"""Persistent PTY shells in a workspace."""

from typing import TYPE_CHECKING, Annotated, Any

from pyro_mcp.api.context import Context
from pyro_mcp.api.operations.workspace_content import SECRET_ENV
from pyro_mcp.api.operations.workspaces import FULL, WORKSPACE, open_workspaces
from pyro_mcp.api.registry import CLI_ONLY, EVERY, Arg, operation
from pyro_mcp.workspace import secret_delivery
from pyro_mcp.workspace.paths import guest_path

if TYPE_CHECKING:
    from pyro_mcp.api.results import (
        ShellCloseResult,
        ShellListResult,
        ShellOpenResult,
        ShellReadResult,
        ShellSignalResult,
        ShellWriteResult,
    )

SIGNAL: dict[str, Any] = {"name": "signal_name", "flag": "signal"}  # pyro-mcp's name
SHELL = Arg("shell id (from shell open)", surfaces=EVERY, positional=True, name="shell_id")
MAX_WAIT_MS = 30_000
READ_MAX = 128 << 10  # what the agent returns from one read at most (ops_shells.READ_MAX)


def _call(ctx: Context, workspace: str, action: str, op: str, args: dict[str, Any]) -> Any:
    with open_workspaces(ctx) as workspaces, workspaces.agent(workspace, action) as agent:
        value, _ = agent.call(op, args, timeout_s=60)
        return value


@operation(
    cli=("workspace", "shell", "open"),
    sdk="open_shell",
    profiles=FULL,
    title="Open a shell in a workspace",
)
def shell_open(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    cwd: Annotated[
        str | None, Arg("start directory (default /workspace)", surfaces=EVERY, path=True)
    ] = None,
    cols: Annotated[int, Arg("terminal width", surfaces=EVERY, minimum=10, maximum=1000)] = 120,
    rows: Annotated[int, Arg("terminal height", surfaces=EVERY, minimum=2, maximum=1000)] = 30,
    secret_env: Annotated[list[str] | dict[str, str] | None, SECRET_ENV] = None,
    id_only: Annotated[bool, Arg("print only the shell id", surfaces=CLI_ONLY)] = False,
) -> "ShellOpenResult":
    """Open an interactive shell on a real PTY; it lives until closed or the VM stops.

    ``secret_env`` puts workspace secrets in the shell's environment (InvalidArgument for
    one the workspace does not have); reads show their values as ``***``.
    """
    args: dict[str, Any] = {"cwd": guest_path(cwd) if cwd else "/workspace", "cols": cols}
    args["rows"] = rows
    with open_workspaces(ctx) as workspaces:
        mapping = secret_delivery.env_mapping(workspaces.store, workspace, secret_env)
    if mapping:
        args["secret_env"] = mapping
    value = dict(_call(ctx, workspace, "shell open", "shell_open", args))
    if id_only:
        value["id_only"] = True
    return value


@operation(
    cli=("workspace", "shell", "read"),
    sdk="read_shell",
    profiles=FULL,
    title="Read a shell's output",
    read_only=True,
)
def shell_read(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    shell: Annotated[str, SHELL],
    cursor: Annotated[
        int,
        Arg(
            "read from this byte offset (next_cursor of the last read)",
            surfaces=EVERY,
            minimum=0,
            maximum=1 << 62,
        ),
    ] = 0,
    max_chars: Annotated[
        int, Arg("return at most this many bytes", surfaces=EVERY, minimum=1, maximum=READ_MAX)
    ] = 65536,
    plain: Annotated[bool, Arg("strip terminal control sequences", surfaces=EVERY)] = False,
    wait_for_idle_ms: Annotated[
        int,
        Arg(
            "first wait until the shell has been quiet this long",
            surfaces=EVERY,
            minimum=0,
            maximum=MAX_WAIT_MS,
        ),
    ] = 0,
) -> "ShellReadResult":
    """Read a shell's output from a cursor; ``next_cursor`` reads only what is new."""
    with open_workspaces(ctx) as workspaces, workspaces.agent(workspace, "shell read") as agent:
        return agent.shell_read(
            shell, cursor, max_chars=max_chars, plain=plain, wait_for_idle_ms=wait_for_idle_ms
        )


@operation(
    cli=("workspace", "shell", "write"),
    sdk="write_shell",
    profiles=FULL,
    title="Type into a shell",
    destructive=True,
    open_world=True,
)
def shell_write(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    shell: Annotated[str, SHELL],
    input: Annotated[str, Arg("text to type", surfaces=EVERY)],
    append_newline: Annotated[
        bool,
        Arg(
            "press Enter after it (the CLI's --no-newline turns it off)",
            surfaces=EVERY,
            flag="no-newline",
        ),
    ] = True,
) -> "ShellWriteResult":
    """Type into a shell (Enter is pressed after it unless append_newline is false)."""
    args = {"shell_id": shell, "input": input, "newline": append_newline}
    return dict(_call(ctx, workspace, "shell write", "shell_write", args))


@operation(
    cli=("workspace", "shell", "signal"),
    sdk="signal_shell",
    profiles=FULL,
    title="Signal a shell's foreground process",
    destructive=True,
)
def shell_signal(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    shell: Annotated[str, SHELL],
    signal: Annotated[
        str, Arg("signal for the foreground process (INT is Ctrl-C)", surfaces=EVERY, **SIGNAL)
    ] = "INT",
) -> "ShellSignalResult":
    """Send a signal to what runs in the shell's foreground (Ctrl-C by default)."""
    args = {"shell_id": shell, "signal": signal}
    return dict(_call(ctx, workspace, "shell signal", "shell_signal", args))


@operation(
    cli=("workspace", "shell", "close"),
    sdk="close_shell",
    profiles=FULL,
    title="Close a shell",
    destructive=True,
    idempotent=True,
)
def shell_close(
    ctx: Context, workspace: Annotated[str, WORKSPACE], shell: Annotated[str, SHELL]
) -> "ShellCloseResult":
    """Close a shell (its processes get SIGHUP)."""
    return dict(_call(ctx, workspace, "shell close", "shell_close", {"shell_id": shell}))


@operation(
    cli=("workspace", "shell", "list"),
    sdk="list_shells",
    profiles=FULL,
    title="List a workspace's shells",
    read_only=True,
)
def shell_list(ctx: Context, workspace: Annotated[str, WORKSPACE]) -> "ShellListResult":
    """The workspace's open shells."""
    return dict(_call(ctx, workspace, "shell list", "shell_list", {}))
