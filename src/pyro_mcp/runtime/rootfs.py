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

This module holds step 1: debootstrap, the tree's clean-up and its cache. Steps 2 and 3,
the guest files and the ext4 image, are in :mod:`pyro_mcp.runtime.rootfs_image`; disk
housekeeping (removing trees past stray mounts, out-of-space errors, fsync) is in
:mod:`pyro_mcp.runtime.rootfs_disk`. The names other modules use are re-exported here.

Every subprocess goes through :func:`pyro_mcp.runtime.host_tools.run`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pyro_mcp.errors import BuildError, HostToolMissing, ToolFailed
from pyro_mcp.runtime import host_tools
from pyro_mcp.runtime.digests import sha256_json
from pyro_mcp.runtime.jsonfile import write_json_atomic
from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.runtime.pins import DEBIAN_MIRROR, DEBIAN_SUITE
from pyro_mcp.runtime.rootfs_disk import (
    MIB,
    check_space,
    detach_mounts,
    du,
    file_sha256_and_sync,
    fsync_dir,
    mounts_under,
    out_of_space,
    remove_path,
)
from pyro_mcp.runtime.rootfs_image import (
    GUEST_MTIME,
    GUEST_ROOT,
    IMAGE_REVISION,
    INIT_PATH,
    LABEL,
    GuestFile,
    TreeSize,
    add_guest_files,
    check_ext4,
    free_bytes,
    guest_files,
    guest_files_digest,
    guest_python,
    image_size_for,
    image_too_small,
    measure,
    mke2fs_options,
    pack_ext4,
    stage_root,
)

__all__ = [
    "ARCH",
    "BUILDER_REVISION",
    "DEBOOTSTRAP_SPACE_HINT",
    "DEBOOTSTRAP_TIMEOUT_S",
    "GUEST_MTIME",
    "GUEST_PACKAGES",
    "GUEST_ROOT",
    "HOSTNAME",
    "IMAGE_REVISION",
    "INIT_PATH",
    "KEYRING",
    "LABEL",
    "MIB",
    "GuestFile",
    "Progress",
    "Tree",
    "TreeSize",
    "add_guest_files",
    "check_ext4",
    "check_space",
    "clean_tree",
    "deb_cache_dir",
    "detach_mounts",
    "du",
    "ensure_tree",
    "file_sha256_and_sync",
    "free_bytes",
    "fsync_dir",
    "guest_files",
    "guest_files_digest",
    "guest_python",
    "image_size_for",
    "image_too_small",
    "measure",
    "mke2fs_options",
    "mounts_under",
    "out_of_space",
    "pack_ext4",
    "read_dpkg_status",
    "remove_path",
    "run_debootstrap",
    "set_guest_etc",
    "stage_root",
    "tree_key",
    "tree_packages",
    "utc_now",
]

# Bump when the tree build or clean-up changes: every cached tree is rebuilt.
BUILDER_REVISION = "1"
ARCH = "amd64"
# The init and the agent need the full Python standard library (ctypes, json, pty, ...);
# python3-minimal alone lacks it. Added to every environment's package set.
GUEST_PACKAGES: tuple[str, ...] = ("libpython3-stdlib",)
HOSTNAME = "pyro"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEBOOTSTRAP_TIMEOUT_S = 1800.0
# A rough upper bound of what debootstrap needs on disk, for the out-of-space message.
DEBOOTSTRAP_SPACE_HINT = 1536 << 20

Progress = Callable[[str], None]

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
    set_guest_etc(tree, hostname=hostname)
    dpkg_cfg = tree / "etc/dpkg/dpkg.cfg.d"
    dpkg_cfg.mkdir(parents=True, exist_ok=True)
    (dpkg_cfg / "pyro-nodoc").write_text(_DPKG_NODOC)


def set_guest_etc(tree: Path, *, hostname: str = HOSTNAME) -> None:
    """The /etc files pyro owns in every guest: machine-id (empty: set at boot), hostname,
    hosts, fstab (the root by label) and resolv.conf (written when the network is up).
    A symlink there is replaced, never written through."""
    etc = tree / "etc"
    if etc.is_symlink():
        raise BuildError("the image's /etc is a symlink; refused")
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


# --- helpers --------------------------------------------------------------------------


def _empty_dir(directory: Path, keep: Iterable[str] = ()) -> None:
    if not directory.is_dir() or directory.is_symlink():
        return
    kept = set(keep)
    for entry in directory.iterdir():
        if entry.name not in kept:
            remove_path(entry)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
