"""Importing this package registers every operation."""

from pyro_mcp.api.operations import environments, runtime

__all__ = ["environments", "runtime"]
