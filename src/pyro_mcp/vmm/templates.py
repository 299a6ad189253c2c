"""Templates: a guest booted once to agent-ready, quiesced and saved, that runs and
workspaces restore from instead of booting a kernel.

A template is made for one shape of VM, and only a VM of exactly that shape restores from
it. Its **inputs** are everything that shape depends on: the environment image's digest,
the guest kernel's cache key and file, the backend and its VMM's version, vCPUs, memory,
agent channels, the device layout (root disk, and whether a workspace disk slot follows)
and the full kernel command line (which carries the host's pinned TSC frequency). The
template's **key** is the digest of its inputs, so a change to any of them means another
template; one built by another QEMU version is never used.

``<cache>/templates/<key>/`` holds, for QEMU:

- ``ram``: the guest's RAM at that instant (a sparse file as big as its memory); clones
  map a sealed copy of it privately (:mod:`pyro_mcp.vmm.qemu.template_ram`), so they
  share what none of them has written;
- ``state``: the VM's device state and what of its memory is not in ``ram`` (a QEMU
  migration stream with ``x-ignore-shared``: tens of KiB);
- ``root.qcow2``: the root disk as it was at that instant (an overlay of the image; each
  VM restoring from the template gets a copy of it, never the file itself);
- ``manifest.json``: the inputs, the sha256 and size of each file, how long the build
  took; written last, so a directory without it is an unfinished build.

For Firecracker: its snapshot (``vm.state``, ``vm.mem``, ``snapshot.json``: see
:mod:`pyro_mcp.vmm.firecracker.snapshot`) and ``root.ext4``. Firecracker opens the memory
file read-only and maps it privately, so its clones share it as they are; the files are
readable by every uid (a jailed Firecracker reads them through a hard link) and writable
by none.

Before use a template is verified: each file's digest against the manifest (for ``ram``,
the digest of its non-zero blocks, :func:`~pyro_mcp.vmm.qemu.ram_holder.ram_digest`). A file's
verified (size, mtime, ctime, inode) is remembered in ``verified.json`` and a file whose
stat still matches is not read again; any write changes its ctime, so a changed byte is
always re-hashed and caught. A template that fails is removed (the next use rebuilds it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyro_mcp.errors import IntegrityError, NotFound
from pyro_mcp.runtime.digests import sha256_file, sha256_json
from pyro_mcp.runtime.jsonfile import read_json, write_json_atomic
from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.vmm.firecracker import snapshot as firecracker_snapshot
from pyro_mcp.vmm.qemu.ram_holder import ram_digest

TEMPLATE_FORMAT = 3
TEMPLATE_HOSTNAME = "pyro-template"  # the hostname a template boots with (clones get theirs)
STATE = "state"
ROOT = "root.qcow2"
RAM = "ram"
MANIFEST = "manifest.json"
VERIFIED = "verified.json"
FILES = (STATE, ROOT, RAM)  # a QEMU template's
FIRECRACKER_ROOT = "root.ext4"
FIRECRACKER_FILES = (
    firecracker_snapshot.STATE_FILE,
    firecracker_snapshot.MEMORY_FILE,
    firecracker_snapshot.MANIFEST_FILE,
    FIRECRACKER_ROOT,
)
MEMORY_FILES = (RAM, firecracker_snapshot.MEMORY_FILE)  # digested by content (sparse)
MAX_MANIFEST_BYTES = 1 << 20


def templates_dir(paths: RuntimePaths) -> Path:
    return paths.cache_dir / "templates"


def key_of(inputs: dict[str, Any]) -> str:
    return sha256_json({"format": TEMPLATE_FORMAT, **inputs})


def files_for(backend: object) -> tuple[str, ...]:
    """The files a template for ``backend`` (a backend label) holds."""
    return FIRECRACKER_FILES if backend == "firecracker" else FILES


@dataclass(frozen=True)
class Template:
    key: str
    directory: Path
    manifest: dict[str, Any]

    @property
    def backend(self) -> str:
        return str(self.manifest.get("inputs", {}).get("backend"))

    @property
    def files(self) -> tuple[str, ...]:
        return files_for(self.backend)

    @property
    def state(self) -> Path:
        """What a VM restores from: QEMU's state file, or Firecracker's snapshot (this
        directory)."""
        return self.directory if self.backend == "firecracker" else self.directory / STATE

    @property
    def root_disk(self) -> Path:
        name = FIRECRACKER_ROOT if self.backend == "firecracker" else ROOT
        return self.directory / name

    @property
    def ram(self) -> Path | None:
        """The guest RAM a QEMU clone maps (None for Firecracker: its snapshot has it)."""
        return None if self.backend == "firecracker" else self.directory / RAM

    @property
    def ram_digest(self) -> str | None:
        return None if self.ram is None else str(self.manifest["files"][RAM]["sha256"])

    def disk_bytes(self) -> int:
        """What its files take on disk (the RAM file is sparse: far less than its size)."""
        total = 0
        for name in self.files:
            with contextlib.suppress(OSError):
                total += (self.directory / name).stat().st_blocks * 512
        return total

    def to_dict(self) -> dict[str, Any]:
        files = self.manifest.get("files", {})
        return {
            "key": self.key,
            "directory": str(self.directory),
            "inputs": self.manifest.get("inputs", {}),
            "size_bytes": sum(int(f.get("size", 0)) for f in files.values()),
            "disk_bytes": self.disk_bytes(),
            "files": files,
            "build_ms": self.manifest.get("build_ms"),
            "created": self.manifest.get("created"),
        }


def _load(directory: Path) -> Template | None:
    path = directory / MANIFEST
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            return None
    except OSError:
        return None
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("key") != directory.name:
        return None
    files = manifest.get("files")
    inputs = manifest.get("inputs")
    backend = inputs.get("backend") if isinstance(inputs, dict) else None
    if not isinstance(files, dict) or set(files) != set(files_for(backend)):
        return None
    return Template(directory.name, directory, manifest)


def find(paths: RuntimePaths, inputs: dict[str, Any]) -> Template | None:
    """The template made for exactly ``inputs``, if one is installed (not yet verified)."""
    key = key_of(inputs)
    template = _load(templates_dir(paths) / key)
    if template is None or template.manifest.get("inputs") != inputs:
        return None
    return template


def verify(template: Template) -> None:
    """IntegrityError unless every file matches the digest and size in the manifest."""
    seen = read_json(template.directory / VERIFIED)
    seen = seen if isinstance(seen, dict) else {}
    stamps: dict[str, list[int]] = {}
    for name in template.files:
        expected = template.manifest["files"][name]
        path = template.directory / name
        try:
            info = path.stat()
        except OSError as exc:
            raise IntegrityError(f"template {template.key[:12]}: {name} is missing") from exc
        stamp = [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]
        if seen.get(name) == stamp:
            stamps[name] = stamp
            continue
        if info.st_size != expected.get("size") or digest_of(path) != expected.get("sha256"):
            raise IntegrityError(
                f"template {template.key[:12]}: {name} does not match its manifest "
                "(changed or damaged on disk)"
            )
        stamps[name] = stamp
    if stamps != seen:
        with contextlib.suppress(OSError):
            write_json_atomic(template.directory / VERIFIED, stamps)


def digest_of(path: Path) -> str:
    """A template file's digest: sha256 of its bytes, or for guest memory of its content."""
    if path.name not in MEMORY_FILES:
        return sha256_file(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return ram_digest(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def install(
    paths: RuntimePaths, inputs: dict[str, Any], staging: Path, build_ms: float
) -> Template:
    """Move a finished build (``staging`` holding its files) into place."""
    key = key_of(inputs)
    names = files_for(inputs.get("backend"))
    files = {
        name: {"sha256": digest_of(staging / name), "size": (staging / name).stat().st_size}
        for name in names
    }
    mode = 0o444 if names == FIRECRACKER_FILES else 0o400
    for name in names:  # the VMM that built them no longer owns them
        os.chown(staging / name, os.geteuid(), os.getegid())
        (staging / name).chmod(mode)
    manifest = {
        "key": key,
        "format": TEMPLATE_FORMAT,
        "inputs": inputs,
        "files": files,
        "build_ms": round(build_ms, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(staging / MANIFEST, manifest)
    final = templates_dir(paths) / key
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return Template(key, final, manifest)


def remove(template: Template) -> None:
    shutil.rmtree(template.directory, ignore_errors=True)


def staging_dir(paths: RuntimePaths) -> Path:
    root = templates_dir(paths)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = root / f".build-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir(mode=0o700)
    return path


@contextlib.contextmanager
def build_lock(paths: RuntimePaths, key: str) -> Iterator[None]:
    """Held while a template is built: a second builder of the same key waits, then finds it."""
    root = templates_dir(paths)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(root / f".{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def installed(paths: RuntimePaths) -> list[Template]:
    root = templates_dir(paths)
    if not root.is_dir():
        return []
    found = [_load(entry) for entry in sorted(root.iterdir()) if not entry.name.startswith(".")]
    return [template for template in found if template is not None]


def get(paths: RuntimePaths, key: str) -> Template:
    """The installed template whose key is or starts with ``key`` (NotFound otherwise)."""
    matches = [t for t in installed(paths) if key and t.key.startswith(key)]
    if len(matches) != 1:
        why = "no template" if not matches else f"{len(matches)} templates"
        raise NotFound(f"{why} with key {key!r}", hint="see `pyro template list`")
    return matches[0]


def prune(paths: RuntimePaths, *, keep: set[str], everything: bool = False) -> list[str]:
    """Remove templates whose key is not in ``keep`` (all with ``everything``), unfinished
    builds and whatever is not a template; the keys (or names) removed."""
    root = templates_dir(paths)
    removed: list[str] = []
    if not root.is_dir():
        return removed
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".build-"):
            if _build_is_dead(entry):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
            continue
        if entry.name.startswith("."):
            continue
        template = _load(entry)
        if template is None or everything or template.key not in keep:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def _build_is_dead(entry: Path) -> bool:
    try:
        pid = int(entry.name.split("-")[1])
    except (IndexError, ValueError):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
