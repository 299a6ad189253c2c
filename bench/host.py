"""Host-side rows: what pyro does without a VM, timed where the unit tests only check it.

- The guest agent's tree manifest of 10,000 files of 10 KiB (100 MB), the agent served in
  this process over a socketpair: first with an empty digest cache (every file hashed),
  then again (every digest from the cache). A sample counts only when the manifest holds
  every path and the counts say so.
- Refusing archive bombs on the host: a 1 MB ``.tar.gz`` seed whose GNU long-name header
  declares 1 GiB, and a guest export whose pax header declares 1 GiB. A sample counts
  only when the refusal is the ``TooLarge`` naming the declared size.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

from bench.archives import gzip_bomb, metadata_header
from bench.guest import Counts
from bench.stats import Table
from pyro_mcp.errors import TooLarge
from pyro_mcp.guest.client import AgentClient
from pyro_mcp.guest_agent import ops_tree
from pyro_mcp.guest_agent.agent import Agent
from pyro_mcp.workspace import exporting, seeds
from pyro_mcp.workspace.blobs import BlobStore

TREE_DIRS = 100
FILES_PER_DIR = 100
FILE_BYTES = 10 << 10
# Files this much older than a manifest's start are cached (the agent's racy window).
SETTLE_S = ops_tree.RACY_NS / 1e9 + 0.05
DECLARED = 1 << 30

MANIFEST_FIRST_ROW = (
    f"agent manifest, {TREE_DIRS * FILES_PER_DIR:,} x 10 KiB files (in process): hashing all",
    "ms",
    0,
)
MANIFEST_CACHED_ROW = ("  same tree again: every digest cached", "ms", 0)
SEED_BOMB_ROW = ("seed refused: 1 MB .tar.gz whose long-name header declares 1 GiB", "ms", 2)
EXPORT_BOMB_ROW = ("export refused: a pax header from the guest declaring 1 GiB", "ms", 2)


@dataclass(frozen=True)
class HostCounts:
    """Samples of the host-side rows."""

    host_manifest: int = 3
    host_bomb: int = 10

    @classmethod
    def quick(cls) -> HostCounts:
        return cls(host_manifest=1, host_bomb=2)

    @classmethod
    def scaled(cls, repeat: int) -> HostCounts:
        """Scaled like :meth:`bench.guest.Counts.scaled` (by ``repeat`` / default cold runs)."""
        factor = repeat / Counts().cold_run
        return cls(**{f.name: max(1, round(getattr(cls(), f.name) * factor)) for f in fields(cls)})


@contextmanager
def agent_in_process() -> Iterator[AgentClient]:
    """A client of the guest agent served by a thread of this process (no VM)."""
    host, guest = socket.socketpair()
    agent = Agent(guest.fileno(), poweroff=lambda: None)
    serving = threading.Thread(target=agent.serve, daemon=True, name="bench-agent")
    serving.start()
    client = AgentClient(host)
    try:
        client.hello()
        yield client
    finally:
        client.close()
        serving.join(timeout=10)  # the agent stops on EOF; only then is its fd free
        guest.close()


def write_tree(root: Path, dirs: int, files_per_dir: int) -> int:
    """``dirs`` x ``files_per_dir`` files of FILE_BYTES (each different); how many."""
    block = os.urandom(FILE_BYTES)
    for top in range(dirs):
        directory = root / f"d{top:03d}"
        directory.mkdir(parents=True)
        for index in range(files_per_dir):
            (directory / f"f{index:03d}").write_bytes(block[index:] + block[:index])
    return dirs * files_per_dir


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def measure_manifest(
    table: Table, n: int, dirs: int = TREE_DIRS, files_per_dir: int = FILES_PER_DIR
) -> None:
    first, cached = table.row(*MANIFEST_FIRST_ROW), table.row(*MANIFEST_CACHED_ROW)
    work = Path(tempfile.mkdtemp(prefix="pyro-bench-tree-"))
    try:
        files = write_tree(work / "tree", dirs, files_per_dir)
        time.sleep(SETTLE_S)  # untimed: past the racy window, so the second run is cached
        with agent_in_process() as client:
            for _ in range(n):
                ops_tree.clear_digest_cache()
                for row, hashed in ((first, files), (cached, 0)):
                    started = time.perf_counter()
                    entries, counts = client.manifest(str(work / "tree"))
                    elapsed = _ms_since(started)
                    if len(entries) == files + dirs and counts["hashed"] == hashed:
                        row.add(elapsed)
                    else:
                        row.note = row.note or f"sample(s) not counted: {counts}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure_bombs(table: Table, n: int) -> None:
    seed_row, export_row = table.row(*SEED_BOMB_ROW), table.row(*EXPORT_BOMB_ROW)
    work = Path(tempfile.mkdtemp(prefix="pyro-bench-bombs-"))
    try:
        seed = work / "bomb.tar.gz"
        seed.write_bytes(gzip_bomb(metadata_header(b"L", DECLARED), 1024))
        export = gzip_bomb(metadata_header(b"x", DECLARED), 1024)
        for index in range(n):

            def ingest(place: Path = work / f"seed-{index}") -> None:
                seeds.ingest_seed(seed, place / "staging", BlobStore(place / "blobs"))

            def extract(place: Path = work / f"export-{index}") -> None:
                chunks = (export[at : at + (64 << 10)] for at in range(0, len(export), 64 << 10))
                exporting.extract_export(chunks, place)

            for row, refuse in ((seed_row, ingest), (export_row, extract)):
                started = time.perf_counter()
                try:
                    refuse()
                except TooLarge as exc:
                    elapsed = _ms_since(started)
                    if f"declares {DECLARED} bytes" in str(exc):
                        row.add(elapsed)
                        continue
                    row.note = row.note or f"sample(s) not counted: {exc}"
                else:
                    row.note = row.note or "sample(s) not counted: the bomb was accepted"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure_host_side(table: Table, counts: HostCounts) -> None:
    measure_manifest(table, counts.host_manifest)
    measure_bombs(table, counts.host_bomb)
