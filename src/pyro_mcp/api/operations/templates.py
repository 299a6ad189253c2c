"""Warm-start templates: list, build and prune them (see :mod:`pyro_mcp.vmm.templates`)."""

from typing import TYPE_CHECKING, Annotated, Any

from pyro_mcp.api.context import Context
from pyro_mcp.api.operations.vm import MEMORY, VCPUS
from pyro_mcp.api.registry import EVERY, Arg, operation

if TYPE_CHECKING:
    from pyro_mcp.api.results import TemplateBuildResult, TemplateListResult, TemplatePruneResult
    from pyro_mcp.vmm import warm


def _shapes(ctx: Context, environment: str, vcpu_count: int, mem_mib: int) -> "list[warm.Shape]":
    from pyro_mcp.vmm import warm
    from pyro_mcp.vmm.selection import choose_backend
    from pyro_mcp.workspace.boot import AGENT_PORTS

    choice = choose_backend(ctx.paths, None, progress=ctx.progress)
    return [
        warm.Shape(environment, choice, vcpu_count, mem_mib),
        warm.Shape(
            environment,
            choice,
            vcpu_count,
            mem_mib,
            AGENT_PORTS,
            workspace_disk=True,
        ),
    ]


@operation(
    cli=("template", "list"),
    sdk="list_templates",
    title="List warm-start templates",
    read_only=True,
)
def template_list(ctx: Context) -> "TemplateListResult":
    """The installed templates: key, inputs, size on disk and build time."""
    from pyro_mcp.vmm import templates

    return {"templates": [t.to_dict() for t in templates.installed(ctx.paths)]}


@operation(
    cli=("template", "build"),
    sdk="build_template",
    progress=True,
    title="Build warm-start templates",
    idempotent=True,
)
def template_build(
    ctx: Context,
    environment: Annotated[
        str, Arg("environment, e.g. debian:12", surfaces=EVERY, positional=True)
    ],
    vcpu_count: Annotated[int, VCPUS] = 1,
    mem_mib: Annotated[int, MEMORY] = 512,
) -> "TemplateBuildResult":
    """Build (or verify) the templates for one environment and size.

    One for `pyro run`, one for workspaces; each entry says warm or cold, and why."""
    from pyro_mcp.runtime import environments

    environments.image_for(ctx.paths, environment)
    return {"templates": build_templates(ctx, environment, vcpu_count, mem_mib)}


def build_templates(
    ctx: Context, environment: str, vcpu_count: int = 1, mem_mib: int = 512
) -> list[dict[str, Any]]:
    """The run and workspace templates of ``environment`` at this size, built if missing."""
    from pyro_mcp.vmm import warm

    built = []
    for shape in _shapes(ctx, environment, vcpu_count, mem_mib):
        plan = warm.plan_boot(ctx.paths, shape, progress=ctx.progress)
        entry = {"kind": "workspace" if shape.workspace_disk else "run", **plan.to_dict()}
        if plan.template is not None:
            entry.update(plan.template.to_dict())
        built.append(entry)
    return built


@operation(
    cli=("template", "prune"),
    sdk="prune_templates",
    title="Prune unused templates",
    destructive=True,
    idempotent=True,
)
def template_prune(
    ctx: Context,
    all_templates: Annotated[
        bool, Arg("remove every template, not only those nothing current fits", surfaces=EVERY)
    ] = False,
) -> "TemplatePruneResult":
    """Remove templates nothing current fits.

    Those whose inputs changed (environment, kernel, VMM version), unfinished builds, and
    with ``all_templates`` every template."""
    from pyro_mcp.vmm import templates, warm
    from pyro_mcp.vmm.selection import choose_backend

    keep: set[str] = set()
    for template in templates.installed(ctx.paths):
        inputs = template.manifest.get("inputs", {})
        try:
            current = warm.inputs_for(
                ctx.paths,
                warm.Shape(
                    str(inputs.get("environment")),
                    choose_backend(ctx.paths, None),
                    int(inputs.get("vcpu_count", 1)),
                    int(inputs.get("mem_mib", 512)),
                    int(inputs.get("agent_ports", 1)),
                    workspace_disk=len(inputs.get("disks", [])) > 1,
                ),
            )
        except Exception:
            continue
        if templates.key_of(current) == template.key:
            keep.add(template.key)
    return {"removed": templates.prune(ctx.paths, keep=keep, everything=all_templates)}
