"""Root filesystems: a Debian tree from debootstrap, the guest files, an ext4 image.

Three steps, each cheap to repeat on its own:

1. :func:`ensure_tree` runs debootstrap once per package set and keeps the cleaned tree
   under ``rootfs_trees_dir/<key>/tree`` (the key hashes suite, mirror, packages and
   :data:`BUILDER_REVISION`), so a change to the guest init or agent never re-runs it.
2. :func:`stage_root` makes a hard-link copy of that tree (seconds, no extra space) and
   adds the guest files: ``/sbin/pyro-init`` and the ``pyro_mcp`` guest packages under
   ``/opt/pyro``. Guest files are new paths, so the cached tree is never written through
   a hard link.
3. :func:`pack_ext4` packs the staged root with ``mke2fs -d`` (no loop mount, no root
   needed for this step) into a sparse image; :func:`check_ext4` runs ``e2fsck -fn``.

Every subprocess goes through :func:`pyro_mcp.runtime.host_tools.run`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import py_compile
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISDIR

from pyro_mcp.errors import BuildError, HostToolMissing, ToolFailed
from pyro_mcp.runtime import host_tools
from pyro_mcp.runtime.digests import sha256_bytes, sha256_json
from pyro_mcp.runtime.jsonfile import write_json_atomic
from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.runtime.pins import DEBIAN_MIRROR, DEBIAN_SUITE

# Bump when the tree build or clean-up changes: every cached tree is rebuilt.
BUILDER_REVISION = "1"
# Bump when packing changes (mke2fs options, guest file layout): images are repacked.
IMAGE_REVISION = "1"
ARCH = "amd64"
# The init and the agent need the full Python standard library (ctypes, json, pty, ...);
# python3-minimal alone lacks it. Added to every environment's package set.
GUEST_PACKAGES: tuple[str, ...] = ("libpython3-stdlib",)
HOSTNAME = "pyro"
LABEL = "pyro-root"
GUEST_ROOT = "opt/pyro"
INIT_PATH = "sbin/pyro-init"
# Fixed mtime for the guest files (the same in every image).
GUEST_MTIME = 1_704_067_200
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEBOOTSTRAP_TIMEOUT_S = 1800.0
# A rough upper bound of what debootstrap needs on disk, for the out-of-space message.
DEBOOTSTRAP_SPACE_HINT = 1536 << 20
MIB = 1 << 20

Progress = Callable[[str], None]

_INIT_STUB = """#!/usr/bin/python3 -IS
# pyro-init: PID 1. The code is /opt/pyro/pyro_mcp/guest_agent/init.py, imported from
# its precompiled .pyc (a script would be compiled again on every boot). An import
# failure exits, so the kernel panics and the VM stops at once (panic=1).
import sys
sys.path.insert(0, "/opt/pyro")
from pyro_mcp.guest_agent.init import main
main()
"""
_PACKAGE_INIT = '"""pyro guest code (copied into the image by pyro_mcp.runtime.rootfs)."""\n'
_DPKG_NODOC = """# pyro: keep guest images small; copyright files stay.
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
"""
_FSTAB = "# pyro: / is mounted by the kernel; /proc, /sys, /dev, /run, /tmp by pyro-init\n"
_FSTAB += f"LABEL={LABEL} / ext4 defaults 0 1\n"
_HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
_RESOLV = "# pyro: written by pyro when the guest's network is configured\n"


# --- the cached debootstrap tree ------------------------------------------------------


@dataclass(frozen=True)
class Tree:
    """A cleaned debootstrap tree in the cache (``seconds``: how long debootstrap took)."""

    key: str
    path: Path
    packages: tuple[str, ...]
    installed: dict[str, str]
    seconds: float
    reused: bool


def tree_packages(packages: Iterable[str]) -> tuple[str, ...]:
    """The package set debootstrap installs: the catalog's plus :data:`GUEST_PACKAGES`."""
    return tuple(sorted(set(packages) | set(GUEST_PACKAGES)))


def tree_key(
    packages: Iterable[str], *, suite: str = DEBIAN_SUITE, mirror: str = DEBIAN_MIRROR
) -> str:
    return sha256_json(
        {
            "suite": suite,
            "mirror": mirror,
            "arch": ARCH,
            "packages": list(tree_packages(packages)),
            "revision": BUILDER_REVISION,
        }
    )


def run_debootstrap(
    tree: Path, *, suite: str, mirror: str, packages: Sequence[str], deb_cache: Path
) -> None:
    """debootstrap a minbase tree into ``tree`` (tests replace this function)."""
    if os.geteuid() != 0:
        raise BuildError(
            "building an environment runs debootstrap, which needs root",
            hint="run `pyro env pull` as root",
        )
    host_tools.require("debootstrap")
    if not KEYRING.is_file():
        raise HostToolMissing(
            f"{KEYRING} is missing, so the mirror's signatures cannot be checked",
            hint="apt-get install debian-archive-keyring",
        )
    deb_cache.mkdir(parents=True, exist_ok=True)
    argv = [
        "debootstrap",
        "--variant=minbase",
        f"--arch={ARCH}",
        "--components=main",
        f"--include={','.join(packages)}",
        f"--keyring={KEYRING}",
        "--force-check-gpg",
        f"--cache-dir={deb_cache}",
        suite,
        str(tree),
        mirror,
    ]
    path = os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/local/sbin:/usr/sbin:/sbin"
    env = dict(os.environ, PATH=path, LC_ALL="C.UTF-8", DEBIAN_FRONTEND="noninteractive")
    try:
        host_tools.run(argv, what="debootstrap", env=env, timeout_s=DEBOOTSTRAP_TIMEOUT_S)
    except ToolFailed as exc:
        log = tree / "debootstrap" / "debootstrap.log"
        detail = exc.stderr_tail
        if log.is_file():
            detail += "\n--- debootstrap.log (tail) ---\n" + host_tools.tail(log.read_bytes())
        if "No space left on device" in detail:
            raise out_of_space("debootstrap", tree.parent, DEBOOTSTRAP_SPACE_HINT) from exc
        raise ToolFailed(
            f"debootstrap {suite} from {mirror} failed",
            hint=f"check that {mirror} is reachable and the package names exist",
            stderr_tail=detail.strip(),
        ) from exc


def ensure_tree(
    paths: RuntimePaths, packages: Sequence[str], progress: Progress, *, force: bool = False
) -> Tree:
    """The cached tree for ``packages``, built (debootstrap + clean) if missing.

    The caller holds the build lock. Built under ``.partial-*`` and renamed into place,
    so a directory named by its key is always complete.
    """
    wanted = tree_packages(packages)
    key = tree_key(packages)
    final = paths.rootfs_trees_dir / key
    meta_path = final / "meta.json"
    if not force:
        try:
            meta = json.loads(meta_path.read_text())
            if (final / "tree").is_dir():
                seconds = float(meta.get("debootstrap_seconds", 0.0))
                return Tree(key, final / "tree", wanted, dict(meta["installed"]), seconds, True)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # missing or damaged: build it again
    paths.rootfs_trees_dir.mkdir(parents=True, exist_ok=True)
    partial = paths.rootfs_trees_dir / f".partial-{key[:16]}-{os.getpid()}"
    remove_path(partial)
    partial.mkdir()
    try:
        started = time.monotonic()
        progress(f"debootstrap {DEBIAN_SUITE} with {len(wanted)} packages (about a minute)")
        run_debootstrap(
            partial / "tree",
            suite=DEBIAN_SUITE,
            mirror=DEBIAN_MIRROR,
            packages=wanted,
            deb_cache=deb_cache_dir(paths),
        )
        seconds = time.monotonic() - started
        progress(f"debootstrap done in {seconds:.0f} s; cleaning the tree")
        clean_tree(partial / "tree")
        installed = read_dpkg_status(partial / "tree")
        meta = {
            "key": key,
            "suite": DEBIAN_SUITE,
            "mirror": DEBIAN_MIRROR,
            "arch": ARCH,
            "packages": list(wanted),
            "revision": BUILDER_REVISION,
            "built_at": utc_now(),
            "debootstrap_seconds": round(seconds, 1),
            "installed": installed,
        }
        write_json_atomic(partial / "meta.json", meta)
        remove_path(final)
        os.rename(partial, final)
    except BaseException:
        remove_path(partial)
        raise
    return Tree(key, final / "tree", wanted, installed, seconds, False)


def deb_cache_dir(paths: RuntimePaths) -> Path:
    """Where debootstrap keeps downloaded .deb files between tree builds."""
    return paths.downloads_dir / f"debootstrap-{DEBIAN_SUITE}-{ARCH}"


def clean_tree(tree: Path, *, hostname: str = HOSTNAME) -> None:
    """Drop what a guest never needs and set the files pyro owns."""
    remove_path(tree / "debootstrap")
    _empty_dir(tree / "var/lib/apt/lists", keep={"partial"})
    _empty_dir(tree / "var/cache/apt", keep={"archives"})
    _empty_dir(tree / "var/cache/apt/archives", keep={"partial"})
    _empty_dir(tree / "usr/share/man")
    _empty_dir(tree / "usr/share/info")
    _empty_dir(tree / "usr/share/lintian")
    _empty_dir(tree / "usr/share/locale", keep={"locale.alias"})
    _empty_dir(tree / "tmp")
    _empty_dir(tree / "var/tmp")
    doc = tree / "usr/share/doc"
    if doc.is_dir():
        for entry in doc.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                _empty_dir(entry, keep={"copyright"})
    for directory in (tree / "var/cache/debconf", tree / "var/lib/dpkg"):
        if directory.is_dir():
            for entry in directory.glob("*-old"):
                remove_path(entry)
    log = tree / "var/log"
    if log.is_dir():  # keep the files (login needs wtmp/btmp/lastlog), drop their content
        for dirpath, _dirs, files in os.walk(log):
            for name in files:
                file = Path(dirpath, name)
                if file.is_file() and not file.is_symlink():
                    os.truncate(file, 0)
    etc = tree / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("machine-id", ""),
        ("hostname", hostname + "\n"),
        ("hosts", _HOSTS),
        ("fstab", _FSTAB),
        ("resolv.conf", _RESOLV),
    ):
        target = etc / name
        if target.is_symlink():
            target.unlink()
        target.write_text(text)
        target.chmod(0o444 if name == "machine-id" else 0o644)
    dpkg_cfg = etc / "dpkg/dpkg.cfg.d"
    dpkg_cfg.mkdir(parents=True, exist_ok=True)
    (dpkg_cfg / "pyro-nodoc").write_text(_DPKG_NODOC)


def read_dpkg_status(tree: Path) -> dict[str, str]:
    """Installed packages and versions, read from the tree's dpkg status file."""
    status = tree / "var/lib/dpkg/status"
    if not status.is_file():
        return {}
    installed: dict[str, str] = {}
    for paragraph in status.read_text(errors="replace").split("\n\n"):
        fields: dict[str, str] = {}
        for line in paragraph.splitlines():
            if line and not line[0].isspace() and ":" in line:
                name, _, value = line.partition(":")
                fields[name.strip().lower()] = value.strip()
        if fields.get("status", "").endswith(" installed") and "package" in fields:
            name = fields["package"]
            if name in installed and installed[name] != fields.get("version"):
                name = f"{name}:{fields.get('architecture', '')}"
            installed[name] = fields.get("version", "")
    return dict(sorted(installed.items()))


# --- guest files ----------------------------------------------------------------------


@dataclass(frozen=True)
class GuestFile:
    path: str  # relative to the guest's /
    data: bytes
    mode: int = 0o644


def guest_files() -> list[GuestFile]:
    """The files pyro adds to every image: the init stub and the guest packages."""
    package_root = Path(__file__).resolve().parent.parent  # .../pyro_mcp
    files = [
        GuestFile(INIT_PATH, _INIT_STUB.encode(), 0o755),
        GuestFile(f"{GUEST_ROOT}/pyro_mcp/__init__.py", _PACKAGE_INIT.encode()),
    ]
    agent_dir = package_root / "guest_agent"
    for source in sorted(agent_dir.rglob("*")):
        relative = source.relative_to(agent_dir)
        if not source.is_file() or "__pycache__" in relative.parts:
            continue
        if source.suffix in (".pyc", ".pyo"):
            continue
        dest = f"{GUEST_ROOT}/pyro_mcp/guest_agent/{relative.as_posix()}"
        files.append(GuestFile(dest, source.read_bytes()))
    protocol = package_root / "guest" / "protocol.py"
    if protocol.is_file():
        files.append(GuestFile(f"{GUEST_ROOT}/pyro_mcp/guest/__init__.py", _PACKAGE_INIT.encode()))
        files.append(GuestFile(f"{GUEST_ROOT}/pyro_mcp/guest/protocol.py", protocol.read_bytes()))
    return files


def guest_files_digest(files: Sequence[GuestFile]) -> str:
    return sha256_json(sorted([f.path, f.mode, sha256_bytes(f.data)] for f in files))


def guest_python(root: Path) -> str | None:
    """``python3.11`` if the guest's /usr/bin/python3 points there, else None."""
    try:
        target = os.readlink(root / "usr/bin/python3")
    except OSError:
        return None
    name = os.path.basename(target)
    return name if name.startswith("python3.") else None


def stage_root(tree: Path, root: Path, files: Sequence[GuestFile]) -> None:
    """A hard-link copy of ``tree`` at ``root`` with the guest files added."""
    host_tools.run(["cp", "-al", "--", str(tree), str(root)], what="copy the rootfs tree")
    touched: dict[Path, tuple[int, int]] = {}
    written: list[Path] = []
    for item in files:
        target = _resolve_in(root, item.path)
        for parent in reversed(target.parents):
            if parent == root or not parent.is_relative_to(root):
                continue
            if parent.exists():
                stat = parent.stat()
                touched.setdefault(parent, (stat.st_atime_ns, stat.st_mtime_ns))
            else:
                parent.mkdir(mode=0o755)
                touched[parent] = (GUEST_MTIME * 10**9, GUEST_MTIME * 10**9)
        if target.exists() or target.is_symlink():
            target.unlink()  # never write through a hard link into the cached tree
        target.write_bytes(item.data)
        target.chmod(item.mode)
        written.append(target)
    py_tag = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if guest_python(root) == py_tag:  # same bytecode format: precompile for fast imports
        for target in written:
            if target.suffix == ".py":
                cfile = Path(importlib.util.cache_from_source(str(target)))
                if not cfile.parent.exists():
                    cfile.parent.mkdir(mode=0o755)
                    touched[cfile.parent] = (GUEST_MTIME * 10**9, GUEST_MTIME * 10**9)
                py_compile.compile(
                    str(target),
                    cfile=str(cfile),
                    dfile="/" + target.relative_to(root).as_posix(),
                    doraise=True,
                    invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
                )
                written.append(cfile)
    for target in written:
        os.utime(target, (GUEST_MTIME, GUEST_MTIME), follow_symlinks=False)
    for directory, (atime, mtime) in touched.items():
        os.utime(directory, ns=(atime, mtime))


def _resolve_in(root: Path, relative: str) -> Path:
    """``root/relative`` with symlinks in the parents resolved as if ``root`` were /."""
    current = root
    parts = [p for p in relative.split("/") if p]
    for depth, part in enumerate(parts[:-1]):
        candidate = current / part
        for _ in range(40):
            if not candidate.is_symlink():
                break
            link = os.readlink(candidate)
            candidate = root / link.lstrip("/") if link.startswith("/") else candidate.parent / link
            candidate = Path(os.path.normpath(candidate))
        if not candidate.is_relative_to(root):
            raise BuildError(f"guest path {relative!r} leaves the image at part {depth}")
        current = candidate
    return current / parts[-1]


# --- the ext4 image -------------------------------------------------------------------


@dataclass
class TreeSize:
    data_bytes: int = 0
    inodes: int = 0
    seen: set[tuple[int, int]] = field(default_factory=set, repr=False)


def measure(root: Path, block: int = 4096) -> TreeSize:
    """Bytes (in whole blocks) and inodes the tree needs in an ext4 file system."""
    size = TreeSize()
    stack = [root]
    while stack:
        directory = stack.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                stat = entry.stat(follow_symlinks=False)
                if (stat.st_dev, stat.st_ino) in size.seen:
                    continue
                size.seen.add((stat.st_dev, stat.st_ino))
                size.inodes += 1
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                    size.data_bytes += block
                elif entry.is_file(follow_symlinks=False):
                    size.data_bytes += -(-stat.st_size // block) * block
                elif entry.is_symlink() and stat.st_size > 59:  # longer ones need a block
                    size.data_bytes += block
    return size


def image_size_for(tree_size: TreeSize) -> int:
    """Tree + 30% + 64 MiB, plus ext4's own metadata (inode tables, journal), in MiB."""
    raw = tree_size.data_bytes * 13 // 10 + 64 * MIB
    raw = raw * 100 // 94 + 32 * MIB  # ~3% inode tables (-i 8192), bitmaps, journal
    return -(-raw // (16 * MIB)) * (16 * MIB)


def mke2fs_options(seed: str) -> list[str]:
    """The options pyro packs images with (see pack_ext4 for why)."""
    fs_uuid = str(uuid.UUID(hex=seed[:32]))
    hash_seed = str(uuid.UUID(hex=seed[32:64]))
    return [
        "-t", "ext4",
        "-b", "4096",
        "-I", "256",
        "-i", "8192",
        "-m", "0",
        "-L", LABEL,
        "-U", fs_uuid,
        "-E", f"root_owner=0:0,lazy_itable_init=0,lazy_journal_init=1,hash_seed={hash_seed}",
    ]  # fmt: skip


def pack_ext4(root: Path, image: Path, *, size: int, seed: str) -> list[str]:
    """Pack ``root`` into a new sparse ext4 image of ``size`` bytes; returns the options.

    - ``-b 4096 -I 256``: without them mke2fs picks 1 KiB blocks and 128-byte inodes for
      images under 512 MiB (its "small" type); 256-byte inodes keep nanosecond times.
    - ``-i 8192``: one inode per 8 KiB; the image can take as many small files again.
    - ``-m 0``: everything in the guest runs as root; a reserve only wastes 5%.
    - the journal stays: workspace root disks are written and can be killed mid-write.
    - ``lazy_itable_init=0``: inode tables are marked zeroed now (they stay holes in the
      sparse file), so the guest kernel starts no ext4lazyinit thread writing at boot.
    - ``lazy_journal_init=1``: the file is new and sparse, so the journal already reads
      as zeros; writing them would only allocate 16-32 MiB of real zeros on the host.
    - ``-U`` and ``hash_seed`` derive from ``seed`` (tree key + guest files), so the file
      system UUID names its inputs. The bytes are not reproducible all the same: mke2fs
      copies each file's ctime and atime, which the hard-link staging changes.
    """
    options = mke2fs_options(seed)
    with open(image, "wb") as handle:
        handle.truncate(size)
    argv = ["mke2fs", "-q", "-F", *options, "-d", str(root), str(image)]
    try:
        host_tools.run(argv, what="pack the ext4 image", timeout_s=1800.0)
    except ToolFailed as exc:
        if "No space left on device" in exc.stderr_tail:
            raise out_of_space("pack the ext4 image", image.parent, size) from exc
        raise
    return options


def image_too_small(exc: ToolFailed) -> bool:
    return "Could not allocate" in exc.stderr_tail


def check_ext4(image: Path) -> None:
    """``e2fsck -fn``: ToolFailed unless the file system is clean."""
    host_tools.run(["e2fsck", "-fn", str(image)], what=f"check {image.name}", timeout_s=600.0)


def free_bytes(image: Path) -> int | None:
    """Free space inside the image's file system (from dumpe2fs -h), if readable."""
    try:
        result = host_tools.run(["dumpe2fs", "-h", str(image)], what="read the superblock")
    except (ToolFailed, HostToolMissing):
        return None
    fields = {}
    for line in result.stdout.decode(errors="replace").splitlines():
        name, _, value = line.partition(":")
        fields[name.strip()] = value.strip()
    try:
        return int(fields["Free blocks"]) * int(fields["Block size"])
    except (KeyError, ValueError):
        return None


# --- helpers --------------------------------------------------------------------------


def out_of_space(step: str, where: Path, needed: int | None) -> BuildError:
    """The error for a full disk: how much the step needs, where, and what is free."""
    details = []
    if needed:
        details.append(f"needs about {needed // MIB} MiB")
    try:
        free = shutil.disk_usage(where if where.exists() else where.parent).free
        details.append(f"{free // MIB} MiB free")
    except OSError:
        pass
    extra = f" ({', '.join(details)})" if details else ""
    return BuildError(
        f"{step}: no space left on device in {where}{extra}",
        hint="free disk space there or point PYRO_CACHE_DIR at a larger disk",
    )


def check_space(step: str, where: Path, needed: int) -> None:
    if shutil.disk_usage(where).free < needed:
        raise out_of_space(step, where, needed)


def remove_path(path: Path) -> int:
    """Remove a file or a tree; returns the bytes it held on disk (hard links counted once).

    A tree left by a killed debootstrap may still have /proc, /sys or a bind mount of the
    host's /dev inside it: those are detached first, never deleted through.
    """
    if not path.exists() and not path.is_symlink():
        return 0
    if path.is_dir() and not path.is_symlink():
        detach_mounts(path)
        freed = du(path)
        shutil.rmtree(path)
        return freed
    freed = path.lstat().st_blocks * 512 if path.lstat().st_nlink == 1 else 0
    path.unlink()
    return freed


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    base = os.path.realpath(path)
    found = []
    try:
        with open("/proc/self/mountinfo") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        if point == base or point.startswith(base + "/"):
            found.append(point)
    return sorted(found, key=len, reverse=True)


def detach_mounts(path: Path) -> None:
    """Lazily unmount everything mounted below ``path``; BuildError if that fails."""
    for point in mounts_under(path):
        with contextlib.suppress(ToolFailed):
            host_tools.run(["umount", "-l", point], what=f"unmount {point}")
    left = mounts_under(path)
    if left:
        raise BuildError(
            f"{path} still has file systems mounted in it ({', '.join(left)}); not deleting it",
            hint=f"unmount them (umount -l {left[0]}) and run `pyro env prune`",
        )


def du(path: Path) -> int:
    """Allocated bytes under ``path`` that removing it frees (files linked outside it
    are not counted)."""
    total = 0
    seen: dict[tuple[int, int], int] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            stat = os.lstat(os.path.join(dirpath, name))
            if S_ISDIR(stat.st_mode):
                total += stat.st_blocks * 512
                continue
            key = (stat.st_dev, stat.st_ino)
            seen[key] = seen.get(key, 0) + 1
            if seen[key] == stat.st_nlink:
                total += stat.st_blocks * 512
    return total


def _empty_dir(directory: Path, keep: Iterable[str] = ()) -> None:
    if not directory.is_dir() or directory.is_symlink():
        return
    kept = set(keep)
    for entry in directory.iterdir():
        if entry.name not in kept:
            remove_path(entry)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256_and_sync(path: Path) -> str:
    """sha256 of ``path``, fsyncing it on the way (one pass over the data)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
        os.fsync(handle.fileno())
    return digest.hexdigest()
