"""A content-addressed store of file contents: each blob is named by its sha256.

Layout under the store's directory::

    ab/ab12...ef      one read-only file per blob, fanned out by the first two hex digits
    tmp/              blobs being written; renamed into place once hashed

A write hashes while it streams into a temporary file, then renames it to its digest, so a
reader sees a whole blob or none, and writing the same content twice stores it once. Runs
of zero bytes become holes, so a sparse file stays sparse. Manifests are stored here too,
as canonical JSON (:meth:`BlobStore.put_manifest`).

Concurrency: writers never conflict (same content, same name). :meth:`BlobStore.gc` must
not run while another process is adding blobs it means to keep; callers hold their lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from pyro_mcp.errors import InvalidArgument, NotFound, TooLarge
from pyro_mcp.workspace.manifest import Entry, validate_manifest

CHUNK = 1 << 20
MANIFEST_FORMAT = "pyro-manifest/1"
STALE_TMP_S = 3600.0  # a temporary file this old belongs to a writer that died
_SHA256 = re.compile(r"[0-9a-f]{64}")


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

    def finish(self) -> None:
        """Set the final length (a trailing hole is not written otherwise) and flush."""
        self._handle.truncate(self.written)
        self._handle.flush()


class BlobWriter:
    """One blob being written: ``write`` chunks, then ``commit`` for its digest.

    Use as a context manager; leaving it without a commit discards the data. Raises
    TooLarge as soon as more than ``max_bytes`` arrive.
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

    def write(self, chunk: bytes) -> None:
        if self._max_bytes is not None and self.size + len(chunk) > self._max_bytes:
            raise TooLarge(f"blob is larger than the limit of {self._max_bytes} bytes")
        self._digest.update(chunk)
        self._sparse.write(chunk)

    def commit(self) -> str:
        """Rename the data to its digest (or drop it if the blob exists) and return it."""
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

    def get_bytes(self, sha: str) -> bytes:
        """The whole blob; NotFound if it is not stored."""
        with self.open(sha) as handle:
            return handle.read()

    # --- manifests --------------------------------------------------------------------

    def put_manifest(self, entries: Sequence[Entry | Mapping[str, Any]]) -> str:
        """Store a manifest as canonical JSON (sorted keys, entries by path); its sha256.

        ``entries`` are Entry objects or their dict form (checked). The same entries
        always give the same digest, so equal trees share one blob.
        """
        ordered = validate_manifest(list(entries), max_entries=2**31)
        document = {"format": MANIFEST_FORMAT, "entries": [e.to_dict() for e in ordered]}
        text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return self.put_bytes(text.encode("ascii"))

    def get_manifest(self, sha: str) -> list[Entry]:
        """The manifest stored as ``sha``; NotFound, or InvalidArgument if the blob is not
        a manifest."""
        try:
            document = json.loads(self.get_bytes(sha))
        except ValueError as exc:
            raise InvalidArgument(f"blob {sha} is not a manifest (not JSON)") from exc
        if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
            raise InvalidArgument(f"blob {sha} is not a {MANIFEST_FORMAT} manifest")
        return validate_manifest(document.get("entries"), max_entries=2**31)

    # --- cleaning ---------------------------------------------------------------------

    def gc(self, keep: set[str]) -> tuple[int, int]:
        """Delete every blob not in ``keep``, and temporary files older than an hour.

        Returns ``(blobs removed, bytes freed)``; bytes are the blobs' logical sizes.
        """
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
