"""Importing this package registers every operation."""

from pyro_mcp.api.operations import environments, runtime, vm

__all__ = ["environments", "runtime", "vm"]
