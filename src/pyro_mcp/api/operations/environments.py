"""Environment operations: the catalog of guest root filesystems."""

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pyro_mcp.api.context import Context
from pyro_mcp.api.registry import EVERY, Arg, operation
from pyro_mcp.errors import InvalidArgument, OutsideRoot, PyroError

if TYPE_CHECKING:
    from pyro_mcp.api.results import (
        EnvBuildResult,
        EnvImportResult,
        EnvInspectResult,
        EnvListResult,
        EnvProveResult,
        EnvPruneResult,
        EnvPublishResult,
        EnvPullResult,
    )

ALL_PROFILES = ("vm-run", "workspace-core", "workspace-full")


@operation(
    cli=("env", "list"),
    sdk="list_environments",
    profiles=ALL_PROFILES,
    title="List environments",
    read_only=True,
)
def env_list(ctx: Context) -> "EnvListResult":
    """List the environment catalog: each name, whether it is installed, its size and digest."""
    from pyro_mcp.runtime import environments

    rows = environments.list_environments(ctx.paths)
    return {"environments": [row.to_dict() for row in rows]}


REGISTRY_HELP = "pull from HOST[:PORT]/PREFIX instead of $PYRO_REGISTRY"
INSECURE_HELP = "allow plain HTTP to a registry that is not on loopback"


@operation(
    cli=("env", "pull"),
    sdk="pull_environment",
    progress=True,
    title="Pull an environment",
    idempotent=True,
    open_world=True,
)
def env_pull(
    ctx: Context,
    name: Annotated[str, Arg("environment name, e.g. debian:12", surfaces=EVERY, positional=True)],
    force: Annotated[bool, Arg("rebuild even if it is installed", surfaces=EVERY)] = False,
    no_templates: Annotated[
        bool,
        Arg("do not build its warm-start templates (runs build them on first use)", surfaces=EVERY),
    ] = False,
    build: Annotated[
        bool, Arg("build it locally with debootstrap; do not ask a registry", surfaces=EVERY)
    ] = False,
    registry: Annotated[str | None, Arg(REGISTRY_HELP, surfaces=EVERY)] = None,
    insecure: Annotated[bool, Arg(INSECURE_HELP, surfaces=EVERY)] = False,
) -> "EnvPullResult":
    """Obtain an environment and install it: pulled from a registry, else built locally.

    Returns at once when it is already installed. With a registry (``--registry``, the
    catalog entry's source, else ``$PYRO_REGISTRY=HOST[:PORT]/PREFIX``: ``debian:12`` is
    ``HOST[:PORT]/PREFIX/debian:12``) it pulls the artifact anonymously, verifying every
    digest while it streams; an interrupted pull resumes. With none configured or
    reachable, or when the artifact carries another guest agent, it builds locally and
    says why in ``obtained.why``. A pulled environment is then proven here (booted, a
    command run) before the lock claims any capability for it. Then builds (or verifies)
    its templates at the default size (1 vCPU, 512 MiB) so the first run restores instead
    of booting (``templates``; one that cannot be made is reported there, not raised).
    Errors: NotFound for an unknown name or tag, IntegrityError for an artifact whose
    digests or claims do not check out, RegistryError for refused credentials,
    OperationTimeout naming the PYRO_OCI_* timeout that fired; nothing half-written is
    ever installed.
    """
    from pyro_mcp.api.operations.runtime import prove_environment
    from pyro_mcp.api.operations.templates import build_templates
    from pyro_mcp.runtime import env_obtain

    info, obtained = env_obtain.obtain(
        ctx.paths,
        name,
        progress=ctx.progress,
        force=force,
        build=build,
        registry=registry,
        insecure=insecure,
    )
    result = info.to_dict()
    result["obtained"] = obtained
    if not no_templates:
        try:
            result["templates"] = build_templates(ctx, name)
        except PyroError as exc:
            result["templates"] = [{"mode": "cold", "reason": exc.message}]
    if obtained.get("kind") == "registry":  # after the templates: the proof restores one
        result["proven"] = prove_environment(ctx, name)
    return result


@operation(
    cli=("env", "publish"),
    sdk="publish_environment",
    progress=True,
    title="Publish an environment to a registry",
    destructive=True,
    idempotent=True,
    open_world=True,
)
def env_publish(
    ctx: Context,
    name: Annotated[str, Arg("environment name", surfaces=EVERY, positional=True)],
    to: Annotated[
        str | None,
        Arg("REGISTRY/REPOSITORY[:TAG] (default: $PYRO_REGISTRY/NAME)", surfaces=EVERY),
    ] = None,
    insecure: Annotated[bool, Arg(INSECURE_HELP, surfaces=EVERY)] = False,
) -> "EnvPublishResult":
    """Publish an installed environment to an OCI registry as an artifact.

    The zstd-compressed image, and a config with its digests, package list, agent version,
    the kernel it was proven with (a reference) and the capabilities proven here. Refused
    unless the image verifies and this host proved vm_boot and guest_exec on it (`pyro env
    prove`). Blobs the registry has are skipped, ones it holds in a repository we know are
    mounted, the rest uploaded in chunks (PYRO_OCI_UPLOAD_CHUNK_SIZE_BYTES), resumably.
    Credentials (PYRO_REGISTRY_USERNAME/PYRO_REGISTRY_TOKEN, DOCKERHUB_USERNAME/
    DOCKERHUB_TOKEN, or docker's config.json) are used for this only and never stored or
    shown.
    """
    from pyro_mcp.runtime.oci import reference
    from pyro_mcp.runtime.oci.publish import publish_environment

    if to:
        ref = reference.parse_reference(to, what="--to")
    else:
        base = reference.configured_registry()
        if base is None:
            raise InvalidArgument(
                "say where to publish: --to REGISTRY/REPOSITORY[:TAG] or set PYRO_REGISTRY"
            )
        ref = reference.environment_reference(name, base)
    return publish_environment(
        ctx.paths, name, ref, progress=ctx.progress, insecure=insecure or _insecure()
    )


@operation(
    cli=("env", "prove"),
    sdk="prove_environment",
    progress=True,
    title="Prove an environment on this host",
    idempotent=True,
)
def env_prove(
    ctx: Context,
    name: Annotated[str, Arg("environment name", surfaces=EVERY, positional=True)],
) -> "EnvProveResult":
    """Prove an installed environment on this host: boot it and run a command in it.

    Records vm_boot and guest_exec for its image and the installed kernel in the lock's
    checks: what publishing requires."""
    from pyro_mcp.api.operations.runtime import prove_environment
    from pyro_mcp.runtime import environments

    environments.image_for(ctx.paths, name)
    return {"environment": name, "capabilities": prove_environment(ctx, name)}


@operation(
    cli=("env", "import"),
    sdk="import_environment",
    progress=True,
    title="Import an OCI image as an environment",
    open_world=True,
)
def env_import(
    ctx: Context,
    name: Annotated[str, Arg("name for the new environment", surfaces=EVERY, positional=True)],
    source: Annotated[
        str | None, Arg("pull the image REGISTRY/REPO:TAG", surfaces=EVERY, flag="from")
    ] = None,
    oci_layout: Annotated[
        str | None, Arg("an OCI image layout directory", surfaces=EVERY, path=True)
    ] = None,
    docker_archive: Annotated[
        str | None, Arg("a `docker save` archive (FILE.tar)", surfaces=EVERY, path=True)
    ] = None,
    tag: Annotated[
        str | None, Arg("which image of the OCI layout (its ref.name annotation)", surfaces=EVERY)
    ] = None,
    insecure: Annotated[bool, Arg(INSECURE_HELP, surfaces=EVERY)] = False,
) -> "EnvImportResult":
    """Turn a linux/amd64 OCI image into an environment.

    Layers applied in order (whiteouts and opaque directories; owners, modes, xattrs,
    hard links kept; an entry with `..`, an absolute path or a path through a symlink is
    refused), pyro's init and agent added, packed with `mke2fs -d`. The agent runs on the
    image's own python3 (with its standard library) and needs /bin/sh: an image without
    them is refused naming what is missing. The result lists, boots, publishes and prunes
    like any environment.
    """
    from pyro_mcp.runtime.oci import reference
    from pyro_mcp.runtime.oci.importer import import_environment

    ref = reference.parse_reference(source, what="--from") if source else None
    layout_dir = _confined(ctx, oci_layout, "OCI layout")
    archive = _confined(ctx, docker_archive, "docker archive")
    info = import_environment(
        ctx.paths,
        name,
        reference=ref,
        oci_layout=layout_dir,
        docker_archive=archive,
        tag=tag,
        insecure=insecure or _insecure(),
        progress=ctx.progress,
    )
    return info.to_dict()


@operation(
    cli=("env", "build"),
    sdk="build_environment",
    progress=True,
    title="Build an environment with extra packages",
    open_world=True,
)
def env_build(
    ctx: Context,
    name: Annotated[str, Arg("name for the new environment", surfaces=EVERY, positional=True)],
    packages: Annotated[
        list[str], Arg("Debian packages to add (a,b,c or repeated)", surfaces=EVERY)
    ],
    base: Annotated[
        str, Arg("the catalog environment it extends", surfaces=EVERY, flag="from")
    ] = "debian:12",
) -> "EnvBuildResult":
    """Build a Debian environment with extra packages.

    A catalog environment's packages (``--from``, default debian:12) plus ``packages``,
    with debootstrap from Debian's mirror, installed like the catalog's."""
    from pyro_mcp.runtime import env_obtain

    names = [p.strip() for item in packages for p in item.split(",") if p.strip()]
    info = env_obtain.build_custom(ctx.paths, name, base, names, progress=ctx.progress)
    return info.to_dict()


def _confined(ctx: Context, value: str | None, purpose: str) -> Path | None:
    """A host path the caller may name; for a confined caller (MCP), no symlink inside
    a named directory may lead out of its root either (the readers open files by name)."""
    if value is None:
        return None
    checked = ctx.host_paths.check(value, purpose)
    if checked.root is not None and checked.path.is_dir():
        for dirpath, dirnames, filenames in os.walk(checked.path):
            for entry in dirnames + filenames:
                full = Path(dirpath, entry)
                if full.is_symlink() and not full.resolve().is_relative_to(checked.root):
                    raise OutsideRoot(f"{purpose}: {full} leads out of {checked.root}")
    return checked.path


def _insecure() -> bool:
    from pyro_mcp.runtime.oci.reference import insecure_from_env

    return insecure_from_env()


@operation(
    cli=("env", "inspect"),
    sdk="inspect_environment",
    title="Inspect an environment",
    read_only=True,
)
def env_inspect(
    ctx: Context,
    name: Annotated[str, Arg("environment name", surfaces=EVERY, positional=True)],
) -> "EnvInspectResult":
    """Show an environment's manifest: packages, image digest and size, build details."""
    from pyro_mcp.runtime import environments

    return environments.inspect_environment(ctx.paths, name)


@operation(
    cli=("env", "prune"),
    sdk="prune_environments",
    title="Prune unused environment images",
    destructive=True,
    idempotent=True,
)
def env_prune(ctx: Context) -> "EnvPruneResult":
    """Remove cached images and build leftovers that no installed environment uses."""
    from pyro_mcp.runtime import environments

    return environments.prune(ctx.paths)
