"""Importing this package registers every operation."""

from pyro_mcp.api.operations import (
    environments,
    runtime,
    services,
    shells,
    templates,
    vm,
    vm_lifecycle,
    workspace_content,
    workspaces,
)

__all__ = [
    "environments",
    "runtime",
    "services",
    "shells",
    "templates",
    "vm",
    "vm_lifecycle",
    "workspace_content",
    "workspaces",
]
