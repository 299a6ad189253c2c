"""pyro-mcp: disposable, hardware-isolated Linux machines for coding agents.

The names exported here are the SDK (``Pyro``, and ``AsyncPyro`` whose methods are
coroutines) and the whole exception tree of
:mod:`pyro_mcp.errors`: whatever an operation documents that it raises can be caught by
importing it from ``pyro_mcp``.
"""

from typing import TYPE_CHECKING

from pyro_mcp.errors import (
    AgentUnavailable,
    BootTimeout,
    BuildError,
    Cancelled,
    Conflict,
    Expired,
    GuestError,
    HostToolMissing,
    IntegrityError,
    InvalidArgument,
    InvalidState,
    ModelServerError,
    NetworkUnavailable,
    NodeLost,
    NotFound,
    OperationTimeout,
    OutsideRoot,
    ProtocolViolation,
    PyroError,
    RegistryError,
    RegistryUnreachable,
    RuntimeMissing,
    TooLarge,
    ToolFailed,
    VMError,
)

if TYPE_CHECKING:
    from pyro_mcp.sdk import AsyncPyro, Pyro

__version__ = "4.0.0.dev0"


def __getattr__(name: str) -> object:
    # The SDK is imported lazily so `import pyro_mcp` stays cheap (no registry at import).
    if name in ("Pyro", "AsyncPyro"):
        from pyro_mcp import sdk

        return getattr(sdk, name)
    if name == "create_server":  # pyro-mcp 3.x's pyro_mcp.create_server
        from pyro_mcp.server import create_server

        return create_server
    raise AttributeError(name)


__all__ = [
    "AgentUnavailable",
    "AsyncPyro",
    "BootTimeout",
    "BuildError",
    "Cancelled",
    "Conflict",
    "Expired",
    "GuestError",
    "HostToolMissing",
    "IntegrityError",
    "InvalidArgument",
    "InvalidState",
    "ModelServerError",
    "NetworkUnavailable",
    "NodeLost",
    "NotFound",
    "OperationTimeout",
    "OutsideRoot",
    "ProtocolViolation",
    "Pyro",
    "PyroError",
    "RegistryError",
    "RegistryUnreachable",
    "RuntimeMissing",
    "TooLarge",
    "ToolFailed",
    "VMError",
    "__version__",
    "create_server",
]
