"""Importing this package registers every operation."""

from pyro_mcp.api.operations import (
    demo,
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
    "demo",
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
