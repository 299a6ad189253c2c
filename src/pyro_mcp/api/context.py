"""What every operation receives besides its own arguments."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pyro_mcp.runtime.paths import RuntimePaths, runtime_paths

ProgressFn = Callable[[str], None]
OutputFn = Callable[[str, bytes], None]  # (stream name, bytes) as a command produces them


def _quiet(_message: str) -> None:
    return None


@dataclass
class Context:
    """Per-call context: where the runtime lives, where progress and live output go."""

    paths: RuntimePaths = field(default_factory=runtime_paths)
    progress: ProgressFn = _quiet
    output: OutputFn | None = None
