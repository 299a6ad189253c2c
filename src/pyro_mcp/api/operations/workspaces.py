"""Workspace lifecycle operations: create, list, update, status, logs, stop, start, delete."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

from pyro_mcp.api.context import Context
from pyro_mcp.api.operations.network_args import (
    ALLOW_CIDR,
    ALLOW_HOST,
    NETWORK_POLICY,
    PUBLISH,
    require_publishing,
    workspace_policy,
)
from pyro_mcp.api.operations.vm import ALLOW_HOST_COMPAT, MEMORY, VCPUS, refuse_host_compat
from pyro_mcp.api.registry import CLI_ONLY, EVERY, Arg, Surface, operation
from pyro_mcp.errors import InvalidArgument, PyroError
from pyro_mcp.vmm.selection import BACKEND_NAMES
from pyro_mcp.workspace.keeper import ensure_keeper
from pyro_mcp.workspace.lifecycle import Workspaces
from pyro_mcp.workspace.records import WorkspaceRecord
from pyro_mcp.workspace.secret_input import MAX_VALUE_BYTES, collect_secrets
from pyro_mcp.workspace.states import Kind
from pyro_mcp.workspace.store import UNSET

if TYPE_CHECKING:
    from pyro_mcp.api.results import (
        ReconcileResult,
        WorkspaceCreateResult,
        WorkspaceDeleteResult,
        WorkspaceForkResult,
        WorkspaceListResult,
        WorkspaceLogsResult,
        WorkspaceNetworkResult,
        WorkspacePauseResult,
        WorkspaceResumeResult,
        WorkspaceStartResult,
        WorkspaceStatusResult,
        WorkspaceStopResult,
        WorkspaceUpdateResult,
    )

CORE = ("workspace-core", "workspace-full")
FULL = ("workspace-full",)
MAX_TTL_S = 365 * 24 * 3600
WORKSPACE = Arg("workspace id or name", surfaces=EVERY, positional=True, name="workspace_id")


def _ttl(help: str) -> Arg:
    return Arg(help, surfaces=EVERY, minimum=0, exclusive_minimum=True, maximum=MAX_TTL_S)


@contextmanager
def open_workspaces(ctx: Context, kind: str = Kind.WORKSPACE) -> Iterator[Workspaces]:
    """The host's workspaces (or, with ``kind``, its lifecycle VMs); the keeper runs after
    while any TTL is set."""
    workspaces = Workspaces(ctx.paths, ctx.state_dir, kind=kind)
    try:
        yield workspaces
        # A TTL set now, or found after a host reboot, is kept from now on.
        needed = workspaces.store.next_expiry() is not None
        ensure_keeper(ctx.paths, workspaces.layout.state_dir, needed)
    finally:
        workspaces.close()


def read_secret_file(ctx: Context, path: str) -> bytes:
    """A secret's host file, read as the caller may (MCP clients: under their roots)."""
    from pyro_mcp.storage import host_files

    try:
        return host_files.read_file(
            ctx.host_paths.check(path, "secret file"), "secret file", MAX_VALUE_BYTES
        )
    except PyroError as exc:
        if exc.hint:
            raise
        raise type(exc)(
            exc.message, hint="name a readable regular file, e.g. --secret-file NAME=./token"
        ) from exc


def labels_arg(help: str) -> Arg:
    """Labels: an object of strings (SDK, MCP: pyro-mcp's ``labels``) or ``KEY=VALUE``
    items (the CLI's repeatable ``--label``)."""
    return Arg(help, surfaces=EVERY, name="labels", flag="label", metavar="KEY=VALUE")


Labels = dict[str, str] | list[str] | None


def parse_pairs(values: dict[str, str] | list[str] | None, what: str) -> dict[str, str]:
    """``["K=V", ...]`` (or an object of strings) as a dict (InvalidArgument naming the
    bad item)."""
    if isinstance(values, dict):
        return dict(values)
    pairs: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"{what} {item!r} is not KEY=VALUE")
        pairs[key] = value
    return pairs


@operation(
    cli=("workspace", "create"),
    sdk="create_workspace",
    profiles=CORE,
    progress=True,
    title="Create a workspace",
)
def workspace_create(
    ctx: Context,
    environment: Annotated[
        str, Arg("environment to base it on, e.g. debian:12", surfaces=EVERY, positional=True)
    ],
    seed_path: Annotated[
        str | None,
        Arg(
            "host directory or tar archive copied into /workspace as the baseline",
            surfaces=EVERY,
            path=True,
        ),
    ] = None,
    name: Annotated[str | None, Arg("a unique name to refer to it by", surfaces=EVERY)] = None,
    label: Annotated[Labels, labels_arg("KEY=VALUE label (repeatable)")] = None,
    vcpu_count: Annotated[int, VCPUS] = 1,
    mem_mib: Annotated[int, MEMORY] = 512,
    disk_mib: Annotated[
        int,
        Arg("size of the /workspace disk in MiB", surfaces=EVERY, minimum=16, maximum=1 << 20),
    ] = 1024,
    ttl_seconds: Annotated[float | None, _ttl("delete it automatically after this long")] = None,
    backend: Annotated[
        str | None,
        Arg("VMM backend (default: the boot probe's pick)", surfaces=EVERY, choices=BACKEND_NAMES),
    ] = None,
    network_policy: Annotated[str | None, NETWORK_POLICY] = None,
    allow_cidr: Annotated[list[str] | None, ALLOW_CIDR] = None,
    allow_host: Annotated[list[str] | None, ALLOW_HOST] = None,
    publish: Annotated[list[str] | None, PUBLISH] = None,
    secrets: Annotated[
        list[dict[str, str]] | None,
        Arg(
            'secrets: [{"name": N, "value": V} or {"name": N, "file_path": P}]; values are '
            "encrypted at rest, given to processes only by secret_env, shown as *** in output",
            surfaces=Surface.SDK | Surface.MCP,
            sensitive=True,
        ),
    ] = None,
    secret: Annotated[
        list[str] | None,
        Arg(
            "a secret NAME=VALUE (repeatable; see --secret-file to keep it off the command line)",
            surfaces=CLI_ONLY,
            metavar="NAME=VALUE",
            sensitive=True,
        ),
    ] = None,
    secret_file: Annotated[
        list[str] | None,
        Arg(
            "a secret NAME=PATH, its value the content of a host file (repeatable)",
            surfaces=CLI_ONLY,
            metavar="NAME=PATH",
        ),
    ] = None,
    allow_host_compat: Annotated[bool, ALLOW_HOST_COMPAT] = False,
    id_only: Annotated[bool, Arg("print only the new workspace's id", surfaces=CLI_ONLY)] = False,
) -> "WorkspaceCreateResult":
    """Create a persistent workspace VM; ``/workspace`` starts as the seed (the baseline).

    ``network_policy`` (default off: no network device) is kept for every start; status
    and ``workspace network`` show the guest's address and published ports.
    Errors: NotFound (unknown environment), InvalidArgument (bad sizes, names, labels,
    policy or allowlist), OutsideRoot (a seed outside the allowed host roots, or links
    escaping the seed), TooLarge (seed bigger than the disk, too many live workspaces),
    BootTimeout, NetworkUnavailable (the host cannot give it the network asked for);
    InvalidArgument or NotFound for a bad secret (its name, never its value), before
    anything is created.
    """
    from pyro_mcp.network.ports import check_free, check_publish_list

    refuse_host_compat(allow_host_compat)
    policy = workspace_policy(network_policy, allow_cidr, allow_host)
    require_publishing(policy, publish)
    check_free(check_publish_list(publish))
    given = collect_secrets(secrets, secret, secret_file, lambda p: read_secret_file(ctx, p))
    seed = ctx.host_paths.check(seed_path, "seed") if seed_path else None
    with open_workspaces(ctx) as workspaces:
        record = workspaces.create(
            environment,
            # Workspaces.create passes it to seeds.ingest_seed, which takes a HostPath; the
            # ignore goes once its annotation says Path | HostPath.
            seed_path=seed,
            name=name,
            labels=parse_pairs(label, "label"),
            vcpu_count=vcpu_count,
            mem_mib=mem_mib,
            disk_mib=disk_mib,
            ttl_seconds=ttl_seconds,
            backend=backend,
            network=policy,
            publish=publish or [],
            secrets=given,
            progress=ctx.progress,
        )
        result = {
            **_with_network(record),
            "secrets": secret_names(workspaces, record.id),
            **_boot(workspaces, record.id),
        }
        return {**result, "id_only": id_only} if id_only else result


def _boot(workspaces: Workspaces, workspace_id: str) -> dict[str, Any]:
    """How this call brought the workspace's VM up: warm (restored) or cold, and why."""
    plan = workspaces.boot_plans.get(workspace_id)
    return {"boot": plan.to_dict()} if plan else {}


def secret_names(workspaces: Workspaces, workspace_id: str) -> list[dict[str, str]]:
    """A workspace's secrets as status shows them: names and sources, never values."""
    return [s.to_dict() for s in workspaces.store.secrets(workspace_id)]


@operation(
    cli=("workspace", "list"),
    sdk="list_workspaces",
    profiles=CORE,
    title="List workspaces",
    read_only=True,
)
def workspace_list(
    ctx: Context,
    label: Annotated[Labels, labels_arg("only those with this KEY=VALUE label")] = None,
) -> "WorkspaceListResult":
    """List workspaces with their state, environment, sizes and labels."""
    with open_workspaces(ctx) as workspaces:
        workspaces.reconcile()
        records = workspaces.store.list(labels=parse_pairs(label, "label") or None)
        return {"workspaces": [record.to_dict() for record in records], "count": len(records)}


@operation(
    cli=("workspace", "update"),
    sdk="update_workspace",
    profiles=CORE,
    title="Rename, relabel or set the TTL of a workspace",
    idempotent=True,
)
def workspace_update(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    name: Annotated[str | None, Arg("new name", surfaces=EVERY)] = None,
    clear_name: Annotated[bool, Arg("remove the name", surfaces=EVERY)] = False,
    label: Annotated[Labels, labels_arg("set KEY=VALUE label (repeatable)")] = None,
    clear_label: Annotated[
        list[str] | None,
        Arg(
            "remove label KEY (repeatable)",
            surfaces=EVERY,
            name="clear_labels",
            flag="clear-label",
        ),
    ] = None,
    ttl_seconds: Annotated[float | None, _ttl("expire this many seconds from now")] = None,
) -> "WorkspaceUpdateResult":
    """Rename, relabel, or extend (or set) the time-to-live of a workspace."""
    import time

    if name is not None and clear_name:
        raise InvalidArgument("give either name or clear_name, not both")
    with open_workspaces(ctx) as workspaces:
        record = workspaces.store.get(workspace)
        labels = dict(record.labels)
        labels.update(parse_pairs(label, "label"))
        for key in clear_label or []:
            labels.pop(key, None)
        updated = workspaces.store.update(
            record.id,
            name=None if clear_name else (name if name is not None else UNSET),
            labels=labels,
            expires_at=time.time() + ttl_seconds if ttl_seconds is not None else UNSET,
        )
        return updated.to_dict()


@operation(
    cli=("workspace", "status"),
    sdk="workspace_status",
    profiles=CORE,
    title="Show a workspace's status",
    read_only=True,
)
def workspace_status(ctx: Context, workspace: Annotated[str, WORKSPACE]) -> "WorkspaceStatusResult":
    """A workspace's state (and why), sizes, backend, checkpoints, commands and services."""
    with open_workspaces(ctx) as workspaces:
        workspaces.reconcile_one(workspace)
        record = workspaces.store.get(workspace)
        if record.state.value == "running":
            record = workspaces.refresh_services(record.id)
        counts: dict[str, int] = {}
        for service in record.services.values():
            counts[str(service.get("state"))] = counts.get(str(service.get("state")), 0) + 1
        return {
            **_with_network(record),
            "secrets": secret_names(workspaces, record.id),
            "checkpoints": [c.name for c in workspaces.store.checkpoints(record.id)],
            "commands": workspaces.store.command_count(record.id),
            "command_count": workspaces.store.command_count(record.id),  # pyro-mcp's key
            "service_counts": counts,
            "service_count": len(record.services),
            "running_service_count": counts.get("running", 0) + counts.get("ready", 0),
        }


@operation(
    cli=("workspace", "network"),
    sdk="network_info_workspace",
    profiles=FULL,
    title="Show a workspace's network",
    read_only=True,
)
def workspace_network(
    ctx: Context, workspace: Annotated[str, WORKSPACE]
) -> "WorkspaceNetworkResult":
    """A workspace's network: its policy and allowlist and, while it runs, the guest's
    IP, gateway, MAC, TAP device and published ports."""
    with open_workspaces(ctx) as workspaces:
        workspaces.reconcile_one(workspace)
        record = workspaces.store.get(workspace)
        return {"workspace_id": record.id, **_with_network(record)["network"]}


def _with_network(record: WorkspaceRecord) -> dict[str, Any]:
    """The record as shown, its network with what the running VM has."""
    from pyro_mcp.network.link import vm_network_info
    from pyro_mcp.network.policy import NetworkPolicy

    running = record.state.value == "running"
    policy = NetworkPolicy.from_dict(record.network)
    return {**record.to_dict(), "network": vm_network_info(policy, record.id if running else None)}


@operation(
    cli=("workspace", "logs"),
    sdk="workspace_logs",
    profiles=CORE,
    title="Show a workspace's command journal",
    read_only=True,
)
def workspace_logs(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    limit: Annotated[
        int, Arg("at most this many recent commands", surfaces=EVERY, minimum=1, maximum=10_000)
    ] = 50,
) -> "WorkspaceLogsResult":
    """The commands journal: what ran, where, how it ended, and the tail of its output."""
    with open_workspaces(ctx) as workspaces:
        commands = workspaces.store.commands(workspace, limit=limit)
        return {
            "commands": [command.to_dict() for command in commands],
            "workspace_id": workspaces.store.get(workspace).id,
            "count": len(commands),
        }


@operation(
    cli=("workspace", "stop"),
    sdk="stop_workspace",
    profiles=FULL,
    progress=True,
    title="Stop a workspace",
    destructive=True,
    idempotent=True,
    workspace_action=True,
)
def workspace_stop(ctx: Context, workspace: Annotated[str, WORKSPACE]) -> "WorkspaceStopResult":
    """Power a workspace off; its root and /workspace disks are kept."""
    with open_workspaces(ctx) as workspaces:
        return workspaces.stop(workspace, progress=ctx.progress).to_dict()


@operation(
    cli=("workspace", "start"),
    sdk="start_workspace",
    profiles=FULL,
    progress=True,
    title="Start a stopped workspace",
    idempotent=True,
    workspace_action=True,
)
def workspace_start(ctx: Context, workspace: Annotated[str, WORKSPACE]) -> "WorkspaceStartResult":
    """Boot a stopped workspace again from its disks (always a cold boot: its root disk
    no longer matches any template)."""
    with open_workspaces(ctx) as workspaces:
        record = workspaces.start(workspace, progress=ctx.progress)
        return {**record.to_dict(), **_boot(workspaces, record.id)}


@operation(
    cli=("workspace", "pause"),
    sdk="pause_workspace",
    profiles=FULL,
    progress=True,
    title="Pause a workspace to disk",
    idempotent=True,
    workspace_action=True,
)
def workspace_pause(ctx: Context, workspace: Annotated[str, WORKSPACE]) -> "WorkspacePauseResult":
    """Save a running workspace's memory and device state to disk and end its VM: a
    paused workspace uses no host memory and survives a pyro or host restart. QEMU only,
    not with a network link. Errors: InvalidState when it is not running; VMError when
    the state cannot be saved (a full disk), and then it keeps running."""
    with open_workspaces(ctx) as workspaces:
        return workspaces.pause(workspace, progress=ctx.progress).to_dict()


@operation(
    cli=("workspace", "resume"),
    sdk="resume_workspace",
    profiles=FULL,
    progress=True,
    title="Resume a paused workspace",
    idempotent=True,
    workspace_action=True,
)
def workspace_resume(ctx: Context, workspace: Annotated[str, WORKSPACE]) -> "WorkspaceResumeResult":
    """Run a paused workspace again from its saved memory: processes, services, shells
    and page cache as they were; the guest clock is set to now. Errors: InvalidState when
    it is not paused; on a failure it stays paused."""
    with open_workspaces(ctx) as workspaces:
        record = workspaces.resume(workspace, progress=ctx.progress)
        return {**record.to_dict(), **_boot(workspaces, record.id)}


@operation(
    cli=("workspace", "fork"),
    sdk="fork_workspace",
    profiles=FULL,
    progress=True,
    title="Fork a running workspace",
    workspace_action=True,
)
def workspace_fork(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    name: Annotated[str | None, Arg("a unique name for the fork", surfaces=EVERY)] = None,
) -> "WorkspaceForkResult":
    """A new running workspace from a running one's memory and disks at this instant,
    with a hostname, machine-id and random state of its own; the source keeps running.
    The fork has the source's baseline and secrets, not its checkpoints. QEMU only, not
    with a network link. Errors: InvalidState when the source is not running."""
    with open_workspaces(ctx) as workspaces:
        record = workspaces.fork(workspace, name=name, progress=ctx.progress)
        return {
            **_with_network(record),
            "secrets": secret_names(workspaces, record.id),
            **_boot(workspaces, record.id),
            "source": workspace,
        }


@operation(
    cli=("workspace", "delete"),
    sdk="delete_workspace",
    profiles=CORE,
    title="Delete a workspace",
    destructive=True,
    idempotent=True,
    workspace_action=True,
)
def workspace_delete(ctx: Context, workspace: Annotated[str, WORKSPACE]) -> "WorkspaceDeleteResult":
    """Delete a workspace: its VM, disks, checkpoints and journal."""
    with open_workspaces(ctx) as workspaces:
        return workspaces.delete(workspace)


@operation(
    cli=("reconcile",),
    sdk="reconcile",
    profiles=FULL,
    title="Repair what crashes left",
    destructive=True,
    idempotent=True,
)
def reconcile(ctx: Context) -> "ReconcileResult":
    """Repair what crashes left: records of dead VMs, orphan VMMs, stale sockets, TTLs."""
    with open_workspaces(ctx) as workspaces:
        return dict(workspaces.reconcile())
