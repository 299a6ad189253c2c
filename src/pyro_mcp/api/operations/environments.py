"""Environment operations: the catalog of guest root filesystems."""

from __future__ import annotations

from typing import Annotated, Any

from pyro_mcp.api.context import Context
from pyro_mcp.api.operations.templates import build_templates
from pyro_mcp.api.registry import EVERY, Arg, operation
from pyro_mcp.errors import PyroError
from pyro_mcp.runtime import environments

ALL_PROFILES = ("vm-run", "workspace-core", "workspace-full")


@operation(cli=("env", "list"), sdk="list_environments", profiles=ALL_PROFILES)
def env_list(ctx: Context) -> dict[str, Any]:
    """List the environment catalog: each name, whether it is installed, its size and digest."""
    rows = environments.list_environments(ctx.paths)
    return {"environments": [row.to_dict() for row in rows]}


@operation(cli=("env", "pull"), sdk="pull_environment", progress=True)
def env_pull(
    ctx: Context,
    name: Annotated[str, Arg("environment name, e.g. debian:12", surfaces=EVERY, positional=True)],
    force: Annotated[bool, Arg("rebuild even if it is installed", surfaces=EVERY)] = False,
    no_templates: Annotated[
        bool,
        Arg("do not build its warm-start templates (runs build them on first use)", surfaces=EVERY),
    ] = False,
) -> dict[str, Any]:
    """Obtain an environment image (built locally from Debian packages) and install it.

    Returns at once when it is already installed. Then builds (or verifies) its templates
    at the default size (1 vCPU, 512 MiB; one for runs, one for workspaces) so the first
    run restores instead of booting; their outcome is in ``templates`` (a template that
    cannot be made is reported there, not raised). Errors: NotFound for an unknown name,
    HostToolMissing when debootstrap or e2fsprogs are missing, BuildError on a failed build
    (nothing half-written is ever installed).
    """
    info = environments.pull_environment(ctx.paths, name, progress=ctx.progress, force=force)
    result = info.to_dict()
    if not no_templates:
        try:
            result["templates"] = build_templates(ctx, name)
        except PyroError as exc:
            result["templates"] = [{"mode": "cold", "reason": exc.message}]
    return result


@operation(cli=("env", "inspect"), sdk="inspect_environment")
def env_inspect(
    ctx: Context,
    name: Annotated[str, Arg("environment name", surfaces=EVERY, positional=True)],
) -> dict[str, Any]:
    """Show an environment's manifest: packages, image digest and size, build details."""
    return environments.inspect_environment(ctx.paths, name)


@operation(cli=("env", "prune"), sdk="prune_environments")
def env_prune(ctx: Context) -> dict[str, Any]:
    """Remove cached images and build leftovers that no installed environment uses."""
    return environments.prune(ctx.paths)
