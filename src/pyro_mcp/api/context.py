"""What every operation receives besides its own arguments."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyro_mcp.errors import OutsideRoot
from pyro_mcp.runtime.paths import RuntimePaths, runtime_paths, state_dir

ProgressFn = Callable[[str], None]
OutputFn = Callable[[str, bytes], None]  # (stream name, bytes) as a command produces them


def _quiet(_message: str) -> None:
    return None


@dataclass(frozen=True)
class HostPathPolicy:
    """Which host paths a caller may name (seeds, sync sources, export targets).

    ``roots`` None: any path (a person at the CLI, an SDK program). Otherwise every path
    must resolve (symlinks included) inside one of the roots: what an MCP client gets.
    """

    roots: tuple[Path, ...] | None = None

    @classmethod
    def confined_to(cls, roots: Sequence[str | Path]) -> HostPathPolicy:
        return cls(tuple(Path(root).resolve() for root in roots))

    def check(self, value: str, purpose: str) -> Path:
        path = Path(value).expanduser()
        if self.roots is None:
            return path
        resolved = (Path.cwd() / path).resolve() if not path.is_absolute() else path.resolve()
        for root in self.roots:
            if resolved == root or resolved.is_relative_to(root):
                return resolved
        allowed = ", ".join(str(root) for root in self.roots)
        raise OutsideRoot(
            f"{purpose} path {value} is outside the allowed host roots ({allowed})",
            hint="pass a path under an allowed root, or start the server with --root DIR",
        )


@dataclass
class Context:
    """Per-call context: where the runtime and state live, where progress and live output
    go, and which host paths the caller may name."""

    paths: RuntimePaths = field(default_factory=runtime_paths)
    progress: ProgressFn = _quiet
    output: OutputFn | None = None
    state_dir: Path = field(default_factory=state_dir)
    host_paths: HostPathPolicy = field(default_factory=HostPathPolicy)
