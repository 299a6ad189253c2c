"""What every operation receives besides its own arguments."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyro_mcp.errors import Cancelled, InvalidArgument, OutsideRoot, PyroError
from pyro_mcp.runtime.paths import RuntimePaths, runtime_paths, state_dir

if TYPE_CHECKING:
    from pyro_mcp.storage.host_files import HostPath

ProgressFn = Callable[[str], None]
# Runs a checked call somewhere else (a cluster node): (operation, surface, arguments,
# the caller's context).
Dispatch = Callable[[Any, Any, dict[str, Any], Any], Any]
HEARTBEAT_S = 5.0  # how often a running command's progress is reported
CANCEL_POLL_S = 0.05  # how soon a cancellation reaches what the operation waits for
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
        from pyro_mcp.storage.host_files import HostPath, locate

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
    # Set when the caller gives up: operations stop what they run (see check_cancelled).
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Told every HEARTBEAT_S how a running command is doing (MCP progress notifications,
    # so a client waiting on a long build knows it is alive); None: nobody asks.
    heartbeat: ProgressFn | None = None
    # Set when operations run on other hosts (a pyro cluster: pyro_mcp.cluster): each
    # call, once its arguments are checked here, is handed to it instead of run here.
    remote: Dispatch | None = None

    def check_cancelled(self) -> None:
        """Raise Cancelled if the caller has given up."""
        if self.cancelled.is_set():
            raise Cancelled("the call was cancelled")

    @contextmanager
    def running_command(self) -> Iterator[OutputFn | None]:
        """While a command runs: the output function to give it (``output``, counting
        bytes), and a heartbeat every HEARTBEAT_S with the time and output so far."""
        if self.heartbeat is None:
            yield self.output
            return
        beat, passed_on = self.heartbeat, self.output
        produced = [0]
        started = time.monotonic()
        done = threading.Event()

        def output(stream: str, data: bytes) -> None:
            produced[0] += len(data)
            if passed_on is not None:
                passed_on(stream, data)

        def tick() -> None:
            while not done.wait(HEARTBEAT_S):
                elapsed = time.monotonic() - started
                beat(f"command running: {elapsed:.0f} s, {produced[0]} bytes of output")

        ticker = threading.Thread(target=tick, daemon=True, name="pyro-heartbeat")
        ticker.start()
        try:
            yield output
        finally:
            done.set()
            ticker.join()

    @contextmanager
    def on_cancel(self, action: Callable[[], None]) -> Iterator[None]:
        """Run ``action`` (from another thread) if the caller gives up while the block
        runs, e.g. kill the VM a blocking boot waits for; after the block, Cancelled if
        the caller gave up (whatever the block raised because of the action)."""
        done = threading.Event()

        def watch() -> None:
            # Wakes at once when the block ends (no poll left to sit out), and notices a
            # cancellation within CANCEL_POLL_S.
            while not done.wait(CANCEL_POLL_S):
                if self.cancelled.is_set():
                    action()
                    return

        watcher = threading.Thread(target=watch, daemon=True, name="pyro-cancel-watch")
        watcher.start()
        try:
            yield
        except PyroError:
            self.check_cancelled()
            raise
        finally:
            done.set()
            watcher.join()
        self.check_cancelled()
