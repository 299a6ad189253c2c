"""What every operation returns, declared once as a ``TypedDict``.

Each operation function is annotated with its result type (``vm_run -> VmRunResult``), so
the SDK stub (``pyro_mcp/_sdk_methods.pyi``), the MCP output schemas
(:func:`pyro_mcp.api.result_shapes.result_schema`) and mypy all read the same
declaration. A key marked ``NotRequired`` is present only in some outcomes (said beside
it); every other key is always there. ``dict[str, Any]`` is a JSON object whose content
is another component's own record (a lock component, a doctor section, a probe spec).

This module is imported without ``from __future__ import annotations`` on purpose: on
Python 3.11 ``NotRequired`` is only recognised in evaluated annotations.
"""

from typing import Any, Literal, NotRequired, Required, TypedDict

# --- records shared by several results ---------------------------------------------------


class ExecOutcome(TypedDict):
    """How a command in a guest ended (output decoded as UTF-8)."""

    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool
    signal: str | None
    stdout_truncated: bool
    stderr_truncated: bool
    duration_ms: float


class BootPlanInfo(TypedDict):
    """How a VM came up: ``warm`` (restored from ``template``) or ``cold``, and why."""

    mode: str
    reason: str
    template: str | None


class PublishedPort(TypedDict):
    """TCP to ``host_ip:host_port`` reaches the guest's ``guest_port``."""

    host_ip: str
    host_port: int
    guest_port: int
    owner: str


class NetworkPolicyInfo(TypedDict):
    """A workspace's network policy as stored: mode, allowlist and published ports (as
    given: ``[HOST_IP:]HOST_PORT:GUEST_PORT``)."""

    mode: str
    allow_cidrs: list[str]
    allow_hosts: list[str]
    publish: NotRequired[list[str]]


class NetworkInfo(TypedDict):
    """A VM's network: its policy and, while it runs with a link, the guest's address."""

    policy: str
    allow_cidrs: list[str]
    allow_hosts: list[str]
    guest_ip: str | None
    gateway: str | None
    mac: str | None
    tap: str | None
    published_ports: list[PublishedPort]


class FileDigest(TypedDict):
    sha256: str
    size: int


class ServiceInfo(TypedDict):
    """A workspace service as the guest agent reports it."""

    name: str
    state: str
    pid: int | None
    exit_code: int | None
    signal: str | None
    started_at: float | None
    restarts: int
    starts: int
    command: list[str]
    cwd: str
    probe: dict[str, Any] | None
    last_probe_error: str | None
    restart: str
    restart_pending: bool
    ready_ms: float | None
    note: str | None
    logs: dict[str, str]
    # pyro-mcp 3.x's keys, in the results of service operations (not in the copies a
    # workspace record keeps)
    workspace_id: NotRequired[str]
    service_name: NotRequired[str]


class ShellInfo(TypedDict):
    """An open PTY shell in a workspace."""

    shell_id: str
    pid: int
    foreground_pgid: int | None
    alive: bool
    exit_code: int | None
    cwd: str
    cols: int
    rows: int
    command: list[str]
    created_at: float
    end: int


class SecretInfo(TypedDict):
    """A workspace secret as shown: its name and where it came from, never its value."""

    name: str
    source_kind: str


class _WorkspaceFields(TypedDict):
    id: str
    workspace_id: str  # pyro-mcp 3.x's key: the same id
    kind: str  # workspace (a lifecycle VM is kind vm, shown by the vm operations)
    name: str | None
    environment: str
    state: str
    state_note: str | None
    created_at: float
    updated_at: float
    expires_at: float | None
    vcpu_count: int
    mem_mib: int
    disk_mib: int
    labels: dict[str, str]
    backend: str | None
    vmm_pid: int | None
    run_dir: str | None
    agent_endpoint: str | None
    boot_id: str | None
    error: str | None
    baseline_manifest: str | None
    seed: str | None
    services: dict[str, ServiceInfo]
    owner: str | None


class WorkspaceRecordInfo(_WorkspaceFields):
    """A workspace as the store keeps it (``network``: its policy)."""

    network: NetworkPolicyInfo


class WorkspaceInfo(_WorkspaceFields):
    """A workspace as status shows it (``network``: with what its running VM has)."""

    network: NetworkInfo


class CommandEntry(TypedDict):
    """One command of a workspace's journal (environment variable names only)."""

    workspace_id: str
    started_at: float
    argv: list[str] | None
    shell: str | None
    cwd: str | None
    env_keys: list[str]
    duration_ms: float | None
    exit_code: int | None
    timed_out: bool
    signal: str | None
    stdout_tail: str
    stderr_tail: str
    stdout_bytes: int
    stderr_bytes: int
    error: str | None
    id: int | None


class CheckpointInfo(TypedDict):
    """A checkpoint of a workspace's ``/workspace``."""

    workspace_id: str
    name: str
    manifest: str
    created_at: float
    file_count: int
    total_bytes: int
    snapshot_name: str  # pyro-mcp 3.x's key: the same name


class EnvironmentRow(TypedDict):
    """One environment of the catalog (or an installed custom one)."""

    name: str
    description: str
    installed: bool
    image_sha256: str | None
    image_size: int | None
    image_path: str | None
    built_at: str | None
    packages: list[str]
    stale: bool
    source: dict[str, Any] | None


class TemplateInfo(TypedDict):
    """An installed warm-start template."""

    key: str
    directory: str
    inputs: dict[str, Any]
    size_bytes: int
    disk_bytes: int
    files: dict[str, FileDigest]
    build_ms: float | None
    created: str | None


class TemplateOutcome(TypedDict):
    """What building (or verifying) one template came to: warm, or cold and why."""

    mode: str
    reason: str
    kind: NotRequired[str]  # run or workspace; absent when none could be planned
    environment: NotRequired[str]  # materialize: the environment whose build failed
    template: NotRequired[str | None]
    # The template's own fields, when there is one:
    key: NotRequired[str]
    directory: NotRequired[str]
    inputs: NotRequired[dict[str, Any]]
    size_bytes: NotRequired[int]
    disk_bytes: NotRequired[int]
    files: NotRequired[dict[str, FileDigest]]
    build_ms: NotRequired[float | None]
    created: NotRequired[str | None]


class RuntimeHost(TypedDict):
    machine: str
    kernel: str


class RuntimeLock(TypedDict):
    """The runtime lock: installed components, proven capabilities and why."""

    schema: int
    generated_at: str
    host: RuntimeHost
    components: dict[str, dict[str, Any]]
    capabilities: dict[str, bool]
    capability_reasons: dict[str, str]


# --- one-shot VMs --------------------------------------------------------------------------


class VmRunResult(ExecOutcome):
    environment: str
    command: str | list[str]
    backend: str
    vm_id: str
    timings_ms: dict[str, float]
    boot: BootPlanInfo
    network: NetworkInfo


# --- templates -----------------------------------------------------------------------------


class TemplateListResult(TypedDict):
    templates: list[TemplateInfo]


class TemplateBuildResult(TypedDict):
    templates: list[TemplateOutcome]


class TemplatePruneResult(TypedDict):
    removed: list[str]


# --- environments --------------------------------------------------------------------------


class EnvListResult(TypedDict):
    environments: list[EnvironmentRow]


class ObtainedReport(TypedDict, total=False):
    """How ``env pull`` got the environment this time."""

    kind: str  # installed, registry or debootstrap
    why: str  # debootstrap: why it was built here
    seconds: float
    reference: str  # registry: what was pulled
    manifest_digest: str
    config_digest: str
    layer_digest: str
    layer_size: int
    bytes_downloaded: int


class EnvPullResult(EnvironmentRow):
    obtained: ObtainedReport
    templates: NotRequired[list[TemplateOutcome]]  # unless no_templates
    proven: NotRequired[list[str]]  # pulled from a registry: the capabilities proven here


# One blob of a publish: already present, mounted from another repository (``from``),
# or uploaded. Declared this way because ``from`` is a Python keyword.
BlobMove = TypedDict(
    "BlobMove",
    {
        "what": str,
        "digest": str,
        "size": int,
        "action": str,
        "bytes_uploaded": int,
        "from": NotRequired[str],
    },
)


class EnvPublishResult(TypedDict):
    environment: str
    reference: str
    digest: str
    blobs: list[BlobMove]
    bytes_uploaded: int
    compressed_size: int
    image_size: int
    capabilities: list[str]
    seconds: float


class EnvProveResult(TypedDict):
    environment: str
    capabilities: list[str]


class EnvImportResult(EnvironmentRow):
    pass


class EnvBuildResult(EnvironmentRow):
    pass


class EnvInspectResult(TypedDict, total=False):
    """An environment's manifest (what its build, import or pull recorded), with
    ``installed``; one that is not installed has only name, description, packages,
    installed, hint (and problem when its image is missing)."""

    name: str
    description: str
    packages: list[str]
    installed: Required[bool]
    hint: str
    problem: str
    image_path: str
    stale: bool
    schema: int
    guest_packages: list[str]
    installed_packages: dict[str, str]
    image_sha256: str
    image_size: int
    image_allocated: int
    image_free: int
    image_file: str
    mke2fs_options: list[str]
    tree_key: str
    tree_reused: bool
    debootstrap_seconds: float
    guest_files_digest: str
    guest_files: list[str]
    builder_revision: str
    image_revision: str
    suite: str
    mirror: str
    built_at: str
    build_seconds: float
    source: dict[str, Any]
    image_config: dict[str, Any]  # imported: what the OCI image's config said
    published_by: str | None  # pulled: the pyro version that published it
    published_capabilities: list[str]
    kernel_reference: dict[str, Any] | None
    pulled_at: str
    pull_seconds: float
    origin: dict[str, Any]  # pulled: where the publisher had it from


class EnvPruneResult(TypedDict):
    removed: list[str]
    bytes_freed: int


# --- runtime -------------------------------------------------------------------------------


class RuntimeInstallHostPackagesResult(TypedDict):
    packages: list[str]
    installed: list[str]


class RuntimeFetchResult(TypedDict):
    version: str
    firecracker: str
    jailer: str
    source: str
    sha256: dict[str, str]


class RuntimeBuildKernelResult(TypedDict):
    flavor: str
    package: str
    version: str
    pinned: bool
    key: str
    directory: str
    vmlinux: str
    bzimage: str
    initramfs: str | None
    files: dict[str, FileDigest]
    release: str
    build_seconds: float
    boot_args: list[str]


class BuiltEnvironment(EnvironmentRow):
    seconds: float


class RuntimeBuildRootfsResult(TypedDict):
    environments: list[BuiltEnvironment]


class RuntimeBundleResult(RuntimeLock):
    pass


class RuntimeMaterializeResult(RuntimeLock):
    templates: list[TemplateOutcome]


class RuntimePins(TypedDict):
    firecracker: str
    linux_source: str
    cloud_kernel: str
    debian_suite: str


class RuntimeStatusResult(RuntimeLock):
    cache_dir: str
    pins: RuntimePins
    default_kernel_flavor: str
    lock_written: bool


class RuntimeVerifyResult(TypedDict):
    ok: bool
    components: list[str]


class RuntimeDoctorResult(TypedDict):
    """The doctor's report: a summary, then one section per area (a section whose probe
    failed is ``{"error": ...}``)."""

    summary: list[str]
    platform: dict[str, Any]
    kvm: dict[str, Any]
    binaries: dict[str, Any]
    backends: dict[str, Any]
    host_tools: dict[str, Any]
    network: dict[str, Any]
    cgroups: dict[str, Any]
    cache: dict[str, Any]
    lock: dict[str, Any]
    kernels: dict[str, Any]
    environments: dict[str, Any]


# --- workspaces ----------------------------------------------------------------------------


class WorkspaceCreateResult(WorkspaceInfo):
    secrets: list[SecretInfo]
    boot: NotRequired[BootPlanInfo]  # how its VM came up, when it booted
    id_only: NotRequired[bool]  # the CLI's --id-only


class WorkspaceListResult(TypedDict):
    workspaces: list[WorkspaceRecordInfo]
    count: int


class WorkspaceUpdateResult(WorkspaceRecordInfo):
    pass


class WorkspaceStatusResult(WorkspaceInfo):
    secrets: list[SecretInfo]
    checkpoints: list[str]
    commands: int
    command_count: int
    service_counts: dict[str, int]
    service_count: int
    running_service_count: int


class WorkspaceNetworkResult(NetworkInfo):
    workspace_id: str


class WorkspaceLogsResult(TypedDict):
    commands: list[CommandEntry]
    workspace_id: str
    count: int


class WorkspaceStopResult(WorkspaceRecordInfo):
    pass


class WorkspaceStartResult(WorkspaceRecordInfo):
    boot: NotRequired[BootPlanInfo]


class WorkspacePauseResult(WorkspaceRecordInfo):
    pass


class WorkspaceResumeResult(WorkspaceRecordInfo):
    boot: NotRequired[BootPlanInfo]


class WorkspaceForkResult(WorkspaceInfo):
    secrets: list[SecretInfo]
    boot: NotRequired[BootPlanInfo]
    source: str


class WorkspaceDeleteResult(TypedDict):
    deleted: str
    name: str | None
    workspace_id: str


class ReconcileResult(TypedDict):
    """The ids of the workspaces each repair touched (``orphans``: VMMs ended)."""

    stopped: list[str]
    failed: list[str]
    discarded: list[str]
    expired: list[str]
    collected: list[str]
    orphans: list[str]


# --- inside a workspace --------------------------------------------------------------------


class WorkspaceExecResult(ExecOutcome):
    workspace_id: str
    command: str | list[str]
    cwd: str


class FileEntry(TypedDict):
    """One entry of a /workspace listing (``path`` relative to /workspace; ``size`` 0 but
    for files and symlinks)."""

    path: str
    type: str  # file, dir, symlink, fifo, socket, chardev or blockdev
    mode: int
    size: int
    mtime_ns: int
    sha256: NotRequired[str]  # files, when hashed
    target: NotRequired[str]  # symlinks
    rdev: NotRequired[list[int]]  # devices: [major, minor]


class WorkspaceFileListResult(TypedDict):
    path: str
    count: int
    truncated: bool
    entries: list[FileEntry]


class WorkspaceFileReadResult(TypedDict):
    path: str
    size: int | None
    mode: int | None
    truncated: bool
    encoding: Literal["utf-8", "base64"]
    content: str
    content_only: NotRequired[bool]  # the CLI's --content-only


class WorkspaceFileWriteResult(TypedDict):
    path: str
    size: int | None
    mode: int | None


class WorkspaceFileDeleteResult(TypedDict):
    path: str
    removed: int  # entries removed (a directory's contents count)
    missing: list[str]


class WorkspacePatchApplyResult(TypedDict):
    files: int
    created: list[str]
    modified: list[str]
    deleted: list[str]
    hunks: int


class WorkspaceSyncPushResult(TypedDict):
    dest: str
    created: bool
    entries: int
    files: int
    dirs: int
    symlinks: int
    hardlinks: int
    bytes: int
    compression: str | None
    replaced: list[str]
    replaced_count: int


class DiffSummary(TypedDict):
    added: int
    modified: int
    deleted: int
    type_changed: int


class ModeChange(TypedDict):
    old: str
    new: str


class DiffFile(TypedDict):
    path: str
    status: str
    type: str
    binary: bool
    patch: str | None
    mode_change: ModeChange | None
    truncated: bool


class WorkspaceDiffResult(TypedDict):
    against: str
    summary: DiffSummary
    files: list[DiffFile]
    files_omitted: int
    patch: str
    truncated: bool


class WorkspaceExportResult(TypedDict):
    output: str
    output_path: str  # pyro-mcp 3.x's key: the same path
    type: Literal["file", "dir"]
    entries: int
    files: int
    bytes: int
    skipped: int
    skipped_paths: list[str]


class SnapshotCreateResult(CheckpointInfo):
    fetched: int
    vanished: int


class SnapshotListResult(TypedDict):
    snapshots: list[CheckpointInfo]
    workspace_id: str
    count: int


class SnapshotDeleteResult(TypedDict):
    deleted: str
    snapshot_name: str
    workspace_id: str
    blobs_removed: int
    bytes_freed: int


class WorkspaceResetResult(TypedDict):
    reset_to: str
    restored: int
    removed: int
    kept: list[str]
    dropped: list[str]


class DiskEntry(TypedDict):
    """One entry of an offline /workspace disk listing (path absolute in the disk)."""

    path: str
    name: str
    type: str
    mode: int
    size: int
    inode: int
    target: NotRequired[str]  # symlinks
    repeat_of: NotRequired[str]  # a directory met again (only a tampered disk has one)
    unlisted: NotRequired[int]  # entries of it no path can name


class WorkspaceDiskListResult(TypedDict):
    path: str
    entries: list[DiskEntry]
    unlisted: dict[str, int]


class WorkspaceDiskReadResult(TypedDict):
    path: str
    size: int
    encoding: Literal["utf-8", "base64"]
    content: str
    content_only: NotRequired[bool]  # the CLI's --content-only


class WorkspaceDiskExportResult(TypedDict):
    output: str
    output_path: str
    size: int


# --- services ------------------------------------------------------------------------------


class ServiceStartResult(ServiceInfo):
    published_ports: list[PublishedPort]


class ServiceListResult(TypedDict):
    services: list[ServiceInfo]
    workspace_id: str
    count: int
    running_count: int  # up: running, or ready by its probe
    as_of: NotRequired[str]  # a workspace that is not running: when it was last seen


class ServiceStatusResult(ServiceInfo):
    published_ports: list[PublishedPort]


class LogLine(TypedDict):
    stream: str
    text: str


class ServiceLogsResult(TypedDict):
    name: str
    workspace_id: str
    service_name: str
    lines: list[LogLine]
    truncated: bool
    paths: dict[str, str]
    ended: NotRequired[str]  # followed (CLI --follow): exited or cancelled
    bytes: NotRequired[int]  # followed: how much was streamed


class ServiceStopResult(ServiceInfo):
    was_running: bool
    restart_cancelled: NotRequired[bool]  # it was waiting to restart
    stop_signal: NotRequired[str]  # it was running: the signal sent first
    killed: NotRequired[bool]  # it was running: whether KILL was needed


# --- shells --------------------------------------------------------------------------------


class ShellOpenResult(ShellInfo):
    id_only: NotRequired[bool]  # the CLI's --id-only


class ShellReadResult(TypedDict):
    shell_id: str
    output: str
    cursor: int
    next_cursor: int
    end: int
    more: bool
    truncated: bool
    alive: bool
    exit_code: int | None


class ShellWriteResult(TypedDict):
    shell_id: str
    written: int
    complete: bool


class ShellSignalResult(TypedDict):
    shell_id: str
    signal: str
    pgid: int | None


class ShellCloseResult(TypedDict):
    shell_id: str
    exit_code: int | None
    closed: bool


class ShellListResult(TypedDict):
    shells: list[ShellInfo]


# --- the demo and MCP hosts --------------------------------------------------------------


class DemoResult(TypedDict):
    environment: str
    command: list[str]
    exit_code: int
    stdout: str
    stderr: str
    duration_ms: float
    timings_ms: dict[str, float]
    boot: BootPlanInfo
    backend: str
    network: NetworkInfo
    next: list[str]


class ToolCallRecord(TypedDict):
    """One tool call a model made, and how it ended."""

    name: str
    arguments: dict[str, Any]
    ok: bool
    outcome: str  # "exit code 0", "done", or the error's text


class DemoOllamaResult(TypedDict):
    base_url: str
    model: str
    task: str
    answer: str
    rounds: int
    tool_calls: list[ToolCallRecord]


class HostPrintConfigResult(TypedDict):
    host: str
    scope: str
    file: str
    format: str
    text: str


class HostConnectResult(TypedDict, total=False):
    """What ``connect`` wrote (or, with ``--print``, a print-config result)."""

    host: Required[str]
    scope: Required[str]
    file: Required[str]
    format: str  # --print
    text: str  # --print
    changed: bool
    changes: list[str]
    backup: str | None
    mode: str | None
    entry: dict[str, Any]
    notes: list[str]


class HostsReport(TypedDict):
    """Each host's report (its entries, problems and fixes) and whether all are sound."""

    hosts: dict[str, dict[str, Any]]
    ok: bool


class HostDoctorResult(HostsReport):
    pass


class HostRepairResult(HostsReport):
    pass


# --- lifecycle VMs (pyro-mcp 3.x's) ------------------------------------------------------


class VmInfo(TypedDict):
    """A lifecycle VM as status shows it."""

    vm_id: str
    environment: str
    state: str
    state_note: str | None
    vcpu_count: int
    mem_mib: int
    ttl_seconds: float | None
    created_at: float
    updated_at: float
    expires_at: float | None
    network_enabled: bool
    backend: str | None
    vmm_pid: int | None
    error: str | None
    guest_ip: NotRequired[str | None]  # networked VMs (None until started)


class VmCreateResult(VmInfo):
    pass


class VmStartResult(VmInfo):
    boot: NotRequired[BootPlanInfo]


class VmExecResult(ExecOutcome):
    vm_id: str
    environment: str
    command: str | list[str]
    backend: str | None


class VmStopResult(VmInfo):
    pass


class VmDeleteResult(TypedDict):
    deleted: str


class VmStatusResult(VmInfo):
    pass


class VmNetworkInfoResult(NetworkInfo):
    vm_id: str


class VmReapExpiredResult(TypedDict):
    deleted: list[str]
    count: int
