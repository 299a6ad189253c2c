"""Importing this package registers every operation."""

from pyro_mcp.api.operations import (
    environments,
    hosts,
    runtime,
    services,
    shells,
    templates,
    vm,
    workspace_content,
    workspaces,
)

__all__ = [
    "environments",
    "hosts",
    "runtime",
    "services",
    "shells",
    "templates",
    "vm",
    "workspace_content",
    "workspaces",
]
