"""What every operation receives besides its own arguments."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyro_mcp.errors import InvalidArgument, OutsideRoot
from pyro_mcp.runtime.paths import RuntimePaths, runtime_paths, state_dir
from pyro_mcp.storage.host_files import HostPath, locate

ProgressFn = Callable[[str], None]
OutputFn = Callable[[str, bytes], None]  # (stream name, bytes) as a command produces them


def _quiet(_message: str) -> None:
    return None


@dataclass(frozen=True)
class HostPathPolicy:
    """Which host paths a caller may name (seeds, sync sources, export targets, text files).

    ``roots`` None: any path (a person at the CLI, an SDK program). Otherwise every path
    must lie inside one of the roots both as written and once resolved (symlinks
    included): what an MCP client gets. Either way :meth:`check` gives a
    :class:`~pyro_mcp.storage.host_files.HostPath`, which is opened through directory file
    descriptors, so a link swapped in after the check is refused rather than followed.
    """

    roots: tuple[Path, ...] | None = None

    @classmethod
    def confined_to(cls, roots: Sequence[str | Path]) -> HostPathPolicy:
        return cls(tuple(Path(root).resolve() for root in roots))

    def check(self, value: str, purpose: str) -> HostPath:
        """``value`` (``~`` expanded, relative to the working directory) as a HostPath.

        Its parent directory is resolved now; its last component is kept as named, so a
        symlink there is met (and refused where refusing is the rule), not followed.
        InvalidArgument for an empty path, OutsideRoot for one outside the roots.
        """
        if not value:
            raise InvalidArgument(f"{purpose} path is empty", hint="name a host path")
        if "\x00" in value:
            raise InvalidArgument(f"{purpose} path {value!r} contains a NUL byte")
        expanded = os.path.expanduser(value)
        located = locate(expanded)
        if self.roots is None:
            return HostPath(located)
        absolute = os.path.join(os.getcwd(), expanded)
        lexical = Path(os.path.normpath(absolute))
        resolved = Path(os.path.realpath(absolute))
        if self._inside(lexical) and self._inside(resolved):
            for root in self.roots:
                if located.is_relative_to(root):
                    return HostPath(located, root)
        allowed = ", ".join(str(root) for root in self.roots)
        raise OutsideRoot(
            f"{purpose} path {value} is outside the allowed host roots ({allowed})",
            hint="pass a path under an allowed root, or start the server with --root DIR",
        )

    def _inside(self, path: Path) -> bool:
        return any(path.is_relative_to(root) for root in self.roots or ())


@dataclass
class Context:
    """Per-call context: where the runtime and state live, where progress and live output
    go, and which host paths the caller may name."""

    paths: RuntimePaths = field(default_factory=runtime_paths)
    progress: ProgressFn = _quiet
    output: OutputFn | None = None
    state_dir: Path = field(default_factory=state_dir)
    host_paths: HostPathPolicy = field(default_factory=HostPathPolicy)
