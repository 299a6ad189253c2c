"""A content-addressed store of file contents: each blob is named by its sha256.

Every workspace has its own store (``<workspace dir>/blobs``): the host never takes a
guest's word that it has some content, so a digest one guest names can never bring in
what another workspace stored (nor tell it whether another workspace has it). Layout::

    ab/ab12...ef      one read-only file per blob, fanned out by the first two hex digits
    tmp/              blobs being written; renamed into place once hashed

A write hashes what it receives while it streams into a temporary file, then renames it to
that digest: the name is always what the host computed, never what a sender claimed.
Runs of zero bytes and the gaps of a sparse stream (:meth:`BlobWriter.write_at`) become
holes, so a sparse file stays sparse (and its holes are never read or sent).

Manifests are stored here too (:meth:`BlobStore.put_manifest`, :meth:`manifest_writer`),
as JSON lines in tree order: a format line, then one canonical JSON object per entry. They
are written and read as streams, so a manifest of millions of entries never sits in
memory. :meth:`BlobStore.gc` deletes what no manifest it is given reaches.

Concurrency: writers hold the store's lock shared (:meth:`BlobStore.writing`) from their
first blob until the manifest that names them is recorded; :meth:`BlobStore.gc` runs only
when it can take the lock exclusively (otherwise it skips, and the next collection does
the work). A writer that may leave unreferenced blobs behind (a checkpoint interrupted by
a crash) marks the store first (``PENDING``), so a later reconcile collects it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from pyro_mcp.errors import InvalidArgument, NotFound, TooLarge
from pyro_mcp.guest.extents import data_extents
from pyro_mcp.workspace.manifest import (
    STORED_MAX_ENTRIES,
    Entry,
    ManifestChecker,
    validate_manifest,
)

CHUNK = 1 << 20
MANIFEST_FORMAT = "pyro-manifest/2"
OLD_MANIFEST_FORMAT = "pyro-manifest/1"  # one JSON document; read, never written
STALE_TMP_S = 3600.0  # a temporary file this old belongs to a writer that died
LOCK = ".lock"
PENDING = ".collect"  # a writer may have left blobs no manifest names: collect them
MAX_MANIFEST_LINE = 64 << 10  # an entry's line: a path of 4 KiB escaped, a target too
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ZEROS = bytes(CHUNK)


class SparseWriter:
    """Writes chunks to an open file, seeking over all-zero chunks to leave holes."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.written = 0

    def write(self, chunk: bytes) -> None:
        if chunk.count(0) == len(chunk):
            self._handle.seek(len(chunk), os.SEEK_CUR)
        else:
            self._handle.write(chunk)
        self.written += len(chunk)

    def skip(self, size: int) -> None:
        """``size`` zero bytes as a hole."""
        self._handle.seek(size, os.SEEK_CUR)
        self.written += size

    def finish(self) -> None:
        """Set the final length (a trailing hole is not written otherwise) and flush."""
        self._handle.truncate(self.written)
        self._handle.flush()


class BlobWriter:
    """One blob being written: ``write`` (or ``write_at``) chunks, then ``commit``.

    Use as a context manager; leaving it without a commit discards the data. Raises
    TooLarge as soon as the content passes ``max_bytes``.
    """

    def __init__(self, store: BlobStore, max_bytes: int | None) -> None:
        self._store = store
        self._max_bytes = max_bytes
        self._digest = hashlib.sha256()
        store.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="blob-", dir=store.tmp_dir)
        self._tmp = Path(name)
        self._handle = os.fdopen(fd, "wb")
        self._sparse = SparseWriter(self._handle)
        self._done = False

    @property
    def size(self) -> int:
        return self._sparse.written

    def _check(self, end: int) -> None:
        if self._max_bytes is not None and end > self._max_bytes:
            raise TooLarge(f"blob is larger than the limit of {self._max_bytes} bytes")

    def write(self, chunk: bytes) -> None:
        self._check(self.size + len(chunk))
        self._digest.update(chunk)
        self._sparse.write(chunk)

    def write_at(self, offset: int, chunk: bytes) -> None:
        """``chunk`` at ``offset`` (never before what was written: InvalidArgument); the
        gap is a hole, hashed as the zeros it reads as."""
        if offset < self.size:
            raise InvalidArgument(
                f"sparse data at offset {offset} comes after offset {self.size} was written"
            )
        self._check(offset + len(chunk))
        self.zeros(offset - self.size)
        self.write(chunk)

    def zeros(self, size: int) -> None:
        """``size`` zero bytes, as a hole."""
        self._check(self.size + size)
        left = size
        while left > 0:
            step = min(left, CHUNK)
            self._digest.update(_ZEROS if step == CHUNK else memoryview(_ZEROS)[:step])
            left -= step
        self._sparse.skip(size)

    def commit(self, size: int | None = None) -> str:
        """Rename the data to its digest (or drop it if the blob exists) and return it.

        ``size``: the blob's length when a sparse stream ends in a hole.
        """
        if size is not None:
            if size < self.size:
                raise InvalidArgument(f"a blob of {self.size} bytes cannot end at {size}")
            self.zeros(size - self.size)
        sha = self._digest.hexdigest()
        self._sparse.finish()
        os.fsync(self._handle.fileno())
        self._handle.close()
        final = self._store.path(sha)
        if not final.exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            self._tmp.chmod(0o444)
            os.replace(self._tmp, final)
        self._tmp.unlink(missing_ok=True)
        self._done = True
        return sha

    def abort(self) -> None:
        """Discard what was written (nothing happens after a commit)."""
        if not self._done:
            self._done = True
            self._handle.close()
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def encode_entry(entry: Entry) -> bytes:
    """One manifest line: canonical JSON (sorted keys, ASCII, no spaces) and a newline."""
    return _CANONICAL.encode(entry.to_dict()).encode("ascii") + b"\n"


def _format_line() -> bytes:
    return json.dumps({"format": MANIFEST_FORMAT}, separators=(",", ":")).encode() + b"\n"


class ManifestWriter:
    """A manifest being written entry by entry (tree order, checked as it goes).

    ``add`` entries, then ``commit`` for the manifest's digest; counts ``entries``,
    ``files`` and ``file_bytes``. Leaving it without a commit discards it.
    """

    def __init__(self, store: BlobStore, max_entries: int) -> None:
        self._blob = store.writer()
        self._checker = ManifestChecker(max_entries=max_entries)
        self._blob.write(_format_line())
        self.files = 0
        self.file_bytes = 0

    @property
    def entries(self) -> int:
        return self._checker.count

    def add(self, entry: Entry) -> None:
        self._checker.add(entry)
        if entry.type == "file":
            self.files += 1
            self.file_bytes += entry.size
        self._blob.write(encode_entry(entry))

    def commit(self) -> str:
        return self._blob.commit()

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._blob.abort()


class BlobStore:
    """File contents by sha256 under ``directory`` (created on first write)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.tmp_dir = directory / "tmp"

    # --- naming -----------------------------------------------------------------------

    def path(self, sha: str) -> Path:
        """Where the blob ``sha`` lives (whether or not it exists); InvalidArgument if
        ``sha`` is not 64 lowercase hex digits."""
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise InvalidArgument(f"not a sha256 digest: {sha!r}")
        return self.directory / sha[:2] / sha

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def size(self, sha: str) -> int:
        """Bytes in the blob; NotFound if it is not stored."""
        try:
            return self.path(sha).stat().st_size
        except FileNotFoundError as exc:
            raise NotFound(f"blob {sha} is not in the store") from exc

    def __iter__(self) -> Iterator[str]:
        """Every stored digest, in no particular order."""
        if not self.directory.is_dir():
            return
        for fan in self.directory.iterdir():
            if len(fan.name) != 2 or not fan.is_dir():
                continue
            for blob in fan.iterdir():
                if _SHA256.fullmatch(blob.name) and blob.name.startswith(fan.name):
                    yield blob.name

    # --- writing ----------------------------------------------------------------------

    def writer(self, *, max_bytes: int | None = None) -> BlobWriter:
        """A :class:`BlobWriter` for streaming a blob in; TooLarge past ``max_bytes``."""
        return BlobWriter(self, max_bytes)

    def put_bytes(self, data: bytes) -> str:
        """Store ``data``; returns its sha256."""
        with self.writer() as writer:
            for start in range(0, len(data), CHUNK):
                writer.write(data[start : start + CHUNK])
            return writer.commit()

    def put_stream(self, chunks: Iterable[bytes], *, max_bytes: int | None = None) -> str:
        """Store the concatenated ``chunks``; TooLarge (nothing stored) past ``max_bytes``."""
        with self.writer(max_bytes=max_bytes) as writer:
            for chunk in chunks:
                writer.write(chunk)
            return writer.commit()

    def put_file(self, path: Path) -> str:
        """Store the content of the file at ``path`` (read in 1 MiB chunks); its sha256."""
        with path.open("rb") as handle:
            return self.put_stream(iter(lambda: handle.read(CHUNK), b""))

    # --- reading ----------------------------------------------------------------------

    def open(self, sha: str) -> BinaryIO:
        """The blob opened for reading; NotFound if it is not stored."""
        try:
            return self.path(sha).open("rb")
        except FileNotFoundError as exc:
            raise NotFound(f"blob {sha} is not in the store") from exc

    def get_bytes(self, sha: str, max_bytes: int | None = None) -> bytes:
        """The whole blob (TooLarge past ``max_bytes``); NotFound if it is not stored."""
        with self.open(sha) as handle:
            if max_bytes is not None and os.fstat(handle.fileno()).st_size > max_bytes:
                raise TooLarge(f"blob {sha} is larger than {max_bytes} bytes")
            return handle.read()

    def extents(self, sha: str) -> tuple[int, Iterator[tuple[int, bytes]]]:
        """(size, the blob's data as (offset, chunk) pairs): its holes are never read."""
        handle = self.open(sha)
        size = os.fstat(handle.fileno()).st_size

        def chunks() -> Iterator[tuple[int, bytes]]:
            with handle:
                fd = handle.fileno()
                for data_at, hole_at in data_extents(fd, size):
                    position = data_at
                    while position < hole_at:
                        chunk = os.pread(fd, min(CHUNK, hole_at - position), position)
                        if not chunk:
                            return
                        yield position, chunk
                        position += len(chunk)

        return size, chunks()

    # --- manifests --------------------------------------------------------------------

    def manifest_writer(self, *, max_entries: int = STORED_MAX_ENTRIES) -> ManifestWriter:
        """A :class:`ManifestWriter` into this store."""
        return ManifestWriter(self, max_entries)

    def put_manifest(self, entries: Sequence[Entry | Mapping[str, Any]]) -> str:
        """Store a manifest given whole (checked, put in tree order); its sha256. The same
        entries always give the same digest."""
        ordered = validate_manifest(list(entries), max_entries=STORED_MAX_ENTRIES)
        with self.manifest_writer() as writer:
            for entry in ordered:
                writer.add(entry)
            return writer.commit()

    def iter_manifest(self, sha: str) -> Iterator[Entry]:
        """The entries of the manifest ``sha`` as they are read, checked again; NotFound,
        or InvalidArgument if the blob is not a manifest."""
        with self.open(sha) as reader:
            first = reader.readline(MAX_MANIFEST_LINE)
            if first.startswith(b'{"entries":'):
                yield from self._old_manifest(sha, first + reader.read())
                return
            try:
                head = json.loads(first)
            except ValueError as exc:
                raise InvalidArgument(f"blob {sha} is not a manifest (not JSON)") from exc
            if not isinstance(head, dict) or head.get("format") != MANIFEST_FORMAT:
                raise InvalidArgument(f"blob {sha} is not a {MANIFEST_FORMAT} manifest")
            checker = ManifestChecker(max_entries=STORED_MAX_ENTRIES)
            while line := reader.readline(MAX_MANIFEST_LINE):
                if not line.endswith(b"\n"):
                    raise InvalidArgument(f"manifest {sha} has a line longer than allowed")
                try:
                    raw = json.loads(line)
                except ValueError as exc:
                    raise InvalidArgument(f"manifest {sha} holds a line that is not JSON") from exc
                yield checker.add(Entry.from_dict(raw))

    @staticmethod
    def _old_manifest(sha: str, data: bytes) -> Iterator[Entry]:
        try:
            document = json.loads(data)
        except ValueError as exc:
            raise InvalidArgument(f"blob {sha} is not a manifest (not JSON)") from exc
        if not isinstance(document, dict) or document.get("format") != OLD_MANIFEST_FORMAT:
            raise InvalidArgument(f"blob {sha} is not a {MANIFEST_FORMAT} manifest")
        yield from validate_manifest(document.get("entries"), max_entries=STORED_MAX_ENTRIES)

    def get_manifest(self, sha: str) -> list[Entry]:
        """The whole manifest ``sha`` in memory (small ones: tests, seeds)."""
        return list(self.iter_manifest(sha))

    # --- cleaning ---------------------------------------------------------------------

    @contextmanager
    def writing(self, *, may_leave_garbage: bool = False) -> Iterator[None]:
        """Hold the store's lock shared while adding blobs a manifest will name: no
        collection runs meanwhile. With ``may_leave_garbage`` the store is marked for a
        collection until the block ends without an error."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if may_leave_garbage:
                (self.directory / PENDING).touch()
            yield
            if may_leave_garbage:
                (self.directory / PENDING).unlink(missing_ok=True)
        finally:
            os.close(fd)

    @property
    def needs_collection(self) -> bool:
        """A writer that may have left unreferenced blobs did not finish cleanly."""
        return (self.directory / PENDING).exists()

    def reachable(self, manifests: Iterable[str]) -> set[str]:
        """``manifests`` and every file blob their entries name (the GC keep-set)."""
        keep: set[str] = set()
        for sha in manifests:
            keep.add(sha)
            if not self.has(sha):
                continue
            for entry in self.iter_manifest(sha):
                if entry.type == "file" and entry.sha256:
                    keep.add(entry.sha256)
        return keep

    def gc(self, keep: set[str]) -> tuple[int, int]:
        """Delete every blob not in ``keep``, and temporary files older than an hour.

        ``keep`` is what must survive, files and manifests alike (see :meth:`reachable`).
        Returns ``(blobs removed, bytes freed)``; bytes are the blobs' logical sizes.
        Skipped (``(0, 0)``) while a writer holds the store (see :meth:`writing`).
        """
        if not self.directory.is_dir():
            return 0, 0
        fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0, 0
            result = self._collect(keep)
            with contextlib.suppress(FileNotFoundError):
                (self.directory / PENDING).unlink()
            return result
        finally:
            os.close(fd)

    def _collect(self, keep: set[str]) -> tuple[int, int]:
        removed = freed = 0
        for sha in list(self):
            if sha in keep:
                continue
            blob = self.path(sha)
            try:
                size = blob.stat().st_size
                blob.unlink()
            except FileNotFoundError:
                continue
            removed += 1
            freed += size
        if self.tmp_dir.is_dir():
            cutoff = time.time() - STALE_TMP_S
            for tmp in self.tmp_dir.iterdir():
                try:
                    if tmp.stat().st_mtime < cutoff:
                        tmp.unlink()
                except FileNotFoundError:
                    continue
        return removed, freed
