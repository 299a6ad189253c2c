"""pyro-mcp: disposable, hardware-isolated Linux machines for coding agents."""

from pyro_mcp.errors import (
    BuildError,
    Conflict,
    HostToolMissing,
    IntegrityError,
    InvalidArgument,
    InvalidState,
    NotFound,
    OutsideRoot,
    PyroError,
    RuntimeMissing,
    TooLarge,
    ToolFailed,
)

__version__ = "4.0.0.dev0"


def __getattr__(name: str) -> object:
    # Pyro is imported lazily so `import pyro_mcp` stays cheap (no registry at import).
    if name == "Pyro":
        from pyro_mcp.sdk import Pyro

        return Pyro
    raise AttributeError(name)


__all__ = [
    "BuildError",
    "Conflict",
    "HostToolMissing",
    "IntegrityError",
    "InvalidArgument",
    "InvalidState",
    "NotFound",
    "OutsideRoot",
    "Pyro",
    "PyroError",
    "RuntimeMissing",
    "TooLarge",
    "ToolFailed",
    "__version__",
]
