"""pyro-mcp: disposable, hardware-isolated Linux machines for coding agents.

The names exported here are the SDK (``Pyro``) and the whole exception tree of
:mod:`pyro_mcp.errors`: whatever an operation documents that it raises can be caught by
importing it from ``pyro_mcp``.
"""

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
    NetworkUnavailable,
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

__version__ = "4.0.0.dev0"


def __getattr__(name: str) -> object:
    # Pyro is imported lazily so `import pyro_mcp` stays cheap (no registry at import).
    if name == "Pyro":
        from pyro_mcp.sdk import Pyro

        return Pyro
    raise AttributeError(name)


__all__ = [
    "AgentUnavailable",
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
    "NetworkUnavailable",
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
]
