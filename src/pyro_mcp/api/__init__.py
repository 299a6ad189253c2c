"""The operations of pyro-mcp, each defined once (see :mod:`pyro_mcp.api.registry`)."""

from pyro_mcp.api.context import Context
from pyro_mcp.api.registry import OPERATIONS, Arg, Operation, all_operations, operation

__all__ = ["OPERATIONS", "Arg", "Context", "Operation", "all_operations", "operation"]
