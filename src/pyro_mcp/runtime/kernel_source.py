"""The default guest kernel: Debian's linux-source built with a small project config.

``make tinyconfig``, then the project fragment ``kernel_config/guest-6.1.config`` merged
over it, then ``make olddefconfig``; every option the fragment names must survive into
the final ``.config`` (an option whose dependencies are missing is silently dropped by
kconfig, so the build stops and names it). Everything is built in: no modules, no
initramfs, and the ELF ``vmlinux`` has a PVH entry for QEMU ``-kernel`` and Firecracker.
"""

from __future__ import annotations

import os
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Any

from pyro_mcp.errors import BuildError, HostToolMissing, InvalidArgument, ToolFailed
from pyro_mcp.runtime.digests import sha256_bytes, sha256_json
from pyro_mcp.runtime.host_tools import require, run
from pyro_mcp.runtime.kernel_artifact import (
    KernelArtifact,
    Progress,
    artifact_dir,
    artifact_from_metadata,
    build_lock,
    cached_artifact,
    file_record,
    install_staged,
    now,
    quiet,
    scratch_dir,
    verify_artifact,
    write_metadata,
)
from pyro_mcp.runtime.kernel_packages import download_package, resolve_package, unpack_deb
from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.runtime.pins import LINUX_SOURCE_PACKAGE, LINUX_SOURCE_VERSION

# Bump when the build steps change in a way that changes the output.
SOURCE_BUILDER_REVISION = 1

FRAGMENT_RESOURCE = "kernel_config/guest-6.1.config"
JOBS_ENV = "PYRO_KERNEL_BUILD_JOBS"
_GIB = 1 << 30
_MAKE_ARCH = "ARCH=x86_64"
_BUILD_TOOLS = ("make", "gcc", "as", "bc", "bison", "flex", "tar", "xz", "dpkg-deb", "apt-get")
_HOST_PACKAGES_HINT = "run `make host-packages` (or `pyro runtime install-host-packages`)"


def guest_config_fragment() -> bytes:
    """The project's kernel config fragment, shipped as package data."""
    try:
        return resources.files("pyro_mcp.runtime").joinpath(FRAGMENT_RESOURCE).read_bytes()
    except OSError as exc:
        raise BuildError(
            f"the kernel config fragment {FRAGMENT_RESOURCE} is missing from the package",
            hint="reinstall pyro-mcp; the package data was not installed",
        ) from exc


def parse_config(text: str) -> dict[str, str | None]:
    """Options of a kconfig file or fragment: name -> value, None for "is not set"."""
    options: dict[str, str | None] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("# CONFIG_") and line.endswith(" is not set"):
            options[line[2 : -len(" is not set")]] = None
        elif line.startswith("CONFIG_") and "=" in line:
            name, _, value = line.partition("=")
            options[name] = value
        elif line and not line.startswith("#"):
            raise ValueError(f"line {number} is not a kconfig option: {raw!r}")
    return options


def config_problems(fragment: str, config: str) -> list[str]:
    """Options of ``fragment`` that the final ``config`` does not have as asked."""
    final = parse_config(config)
    problems = []
    for name, wanted in parse_config(fragment).items():
        got = final.get(name)
        if wanted is None:
            if got not in (None, "n"):
                problems.append(f"{name} should be unset but is {got}")
        elif got != wanted:
            problems.append(f"{name}={wanted} requested, got {got if got else 'not set'}")
    return problems


def source_cache_key(package: str, version: str, fragment: bytes) -> str:
    """The cache key of a source kernel: what it is built from and how."""
    return sha256_json(
        {
            "flavor": "source",
            "package": package,
            "version": version,
            "fragment_sha256": sha256_bytes(fragment),
            "builder": SOURCE_BUILDER_REVISION,
        }
    )


def default_build_jobs(cpus: int, mem_available_bytes: int) -> int:
    """Conservative make -j: one job per core and per 2 GiB available, at least one."""
    return max(1, min(cpus, mem_available_bytes // _GIB // 2))


def _mem_available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 2 * _GIB


def build_jobs(jobs: int | None = None) -> int:
    """make -j for the kernel: ``jobs`` if given, else $PYRO_KERNEL_BUILD_JOBS, else sized."""
    if jobs is not None:
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise InvalidArgument(f"jobs must be a positive integer, got {jobs!r}")
        return jobs
    value = os.environ.get(JOBS_ENV, "").strip()
    if value:
        try:
            parsed = int(value)
        except ValueError:
            parsed = 0
        if parsed < 1:
            raise InvalidArgument(
                f"{JOBS_ENV}={value!r} is not a positive integer",
                hint=f"set {JOBS_ENV} to a number such as 2, or unset it",
            )
        return parsed
    return default_build_jobs(len(os.sched_getaffinity(0)), _mem_available_bytes())


def matches_current_recipe(meta: dict[str, Any]) -> bool:
    """True if a source kernel's metadata was built from today's pins and fragment."""
    return (
        meta.get("package") == LINUX_SOURCE_PACKAGE
        and meta.get("wanted_version") == LINUX_SOURCE_VERSION
        and meta.get("builder_revision") == SOURCE_BUILDER_REVISION
        and meta.get("recipe_sha256") == sha256_bytes(guest_config_fragment())
    )


def _check_build_tools() -> None:
    for program in _BUILD_TOOLS:
        require(program)
    if not Path("/usr/include/gelf.h").is_file():
        raise HostToolMissing(
            "the libelf headers (gelf.h) needed to build the kernel are missing",
            hint=f"{_HOST_PACKAGES_HINT}, or `apt-get install libelf-dev`",
        )


def _make_env() -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        # A calling make's jobserver or a stray ARCH/O= must not leak into the build.
        if name
        not in {
            "MAKEFLAGS",
            "MFLAGS",
            "MAKELEVEL",
            "MAKEOVERRIDES",
            "ARCH",
            "CROSS_COMPILE",
            "KBUILD_OUTPUT",
            "KCONFIG_CONFIG",
            "LOCALVERSION",
        }
    }
    env.update(LC_ALL="C", KBUILD_BUILD_USER="pyro", KBUILD_BUILD_HOST="pyro-mcp")
    return env


def _make(tree: Path, args: list[str], *, what: str) -> None:
    try:
        run(["make", _MAKE_ARCH, *args], what=what, cwd=tree, env=_make_env())
    except ToolFailed as exc:
        raise BuildError(
            f"{what} failed: {exc.message}\n{exc.stderr_tail}",
            hint=f"{_HOST_PACKAGES_HINT}; if tools are present, report the error above",
        ) from exc


def _unpack_source(deb: Path, scratch: Path, progress: Progress) -> Path:
    progress(f"unpacking {deb.name}")
    unpacked = scratch / "deb"
    unpack_deb(deb, unpacked)
    tarballs = sorted((unpacked / "usr/src").glob("linux-source-*.tar.*"))
    if len(tarballs) != 1:
        raise BuildError(
            f"{deb.name} does not contain exactly one linux-source tarball",
            hint=f"delete {deb} so it is downloaded again",
        )
    source = scratch / "src"
    source.mkdir()
    run(["tar", "-xf", str(tarballs[0]), "-C", str(source)], what="unpack the kernel source")
    shutil.rmtree(unpacked)
    trees = [path for path in source.iterdir() if (path / "Makefile").is_file()]
    if len(trees) != 1:
        raise BuildError(
            f"the kernel source tarball in {deb.name} has an unexpected layout",
            hint=f"delete {deb} so it is downloaded again",
        )
    return trees[0]


def _configure(tree: Path, fragment: bytes, scratch: Path, progress: Progress) -> None:
    progress("configuring (tinyconfig + kernel_config/guest-6.1.config)")
    fragment_path = scratch / "guest.config"
    fragment_path.write_bytes(fragment)
    _make(tree, ["tinyconfig"], what="make tinyconfig")
    run(
        ["sh", "scripts/kconfig/merge_config.sh", "-m", ".config", str(fragment_path)],
        what="merge the guest config fragment",
        cwd=tree,
        env=_make_env(),
    )
    _make(tree, ["olddefconfig"], what="make olddefconfig")
    problems = config_problems(fragment.decode(), (tree / ".config").read_text())
    if problems:
        raise BuildError(
            "kernel options did not end up as the config fragment asks: " + "; ".join(problems),
            hint="their dependencies are missing: add them to "
            f"src/pyro_mcp/runtime/{FRAGMENT_RESOURCE} and build again",
        )


def build_source_kernel(
    paths: RuntimePaths, *, progress: Progress = quiet, jobs: int | None = None
) -> KernelArtifact:
    """Build (or return the cached) guest kernel from Debian's pinned linux-source.

    Takes about 5 minutes at -j2 the first time; later calls with the same inputs return
    at once. ``jobs`` overrides $PYRO_KERNEL_BUILD_JOBS and the memory-based default.
    Raises HostToolMissing (install the named package), BuildError (names the failing
    step), InvalidArgument (bad ``jobs``).
    """
    started = time.monotonic()
    make_jobs = build_jobs(jobs)
    paths.ensure()
    fragment = guest_config_fragment()
    progress(f"resolving {LINUX_SOURCE_PACKAGE} {LINUX_SOURCE_VERSION}")
    package = resolve_package(LINUX_SOURCE_PACKAGE, LINUX_SOURCE_VERSION, paths.downloads_dir)
    if not package.pinned:
        progress(
            f"{LINUX_SOURCE_PACKAGE} {LINUX_SOURCE_VERSION} is not available; "
            f"using {package.version}"
        )
    key = source_cache_key(package.name, package.version, fragment)
    with build_lock(paths, "source", progress):
        cached = cached_artifact(paths, "source", key, progress)
        if cached is not None:
            return cached
        _check_build_tools()
        deb = download_package(package, paths.downloads_dir, progress)
        with scratch_dir(paths, "source", key) as scratch:
            tree = _unpack_source(deb, scratch, progress)
            _configure(tree, fragment, scratch, progress)
            progress(f"compiling (-j{make_jobs})")
            compile_started = time.monotonic()
            _make(tree, [f"-j{make_jobs}", "vmlinux", "bzImage"], what="compile the guest kernel")
            compile_seconds = time.monotonic() - compile_started
            release = (tree / "include/config/kernel.release").read_text().strip()
            progress("installing")
            target = artifact_dir(paths, "source", key)
            staging = scratch / target.name
            staging.mkdir()
            shutil.copyfile(tree / "vmlinux", staging / "vmlinux")
            shutil.copyfile(tree / "arch/x86/boot/bzImage", staging / "bzImage")
            shutil.copyfile(tree / ".config", staging / "config")
            files = {name: file_record(staging / name) for name in ("vmlinux", "bzImage", "config")}
            meta: dict[str, Any] = {
                "flavor": "source",
                "package": package.name,
                "version": package.version,
                "wanted_version": package.wanted,
                "pinned": package.pinned,
                "key": key,
                "builder_revision": SOURCE_BUILDER_REVISION,
                "recipe_sha256": sha256_bytes(fragment),
                "release": release,
                "build_seconds": round(time.monotonic() - started, 3),
                "compile_seconds": round(compile_seconds, 3),
                "jobs": make_jobs,
                "created_at": now(),
                "vmlinux": "vmlinux",
                "bzimage": "bzImage",
                "initramfs": None,
                "config": "config",
                "files": files,
            }
            write_metadata(staging, meta)
            problems = verify_artifact(artifact_from_metadata(staging, meta))
            if problems:
                raise BuildError(
                    "the built kernel failed its checks: " + "; ".join(problems),
                    hint="check the fragment still enables CONFIG_PVH, then rebuild",
                )
            install_staged(staging, target)
    progress(f"built {target.name} ({release}) in {time.monotonic() - started:.0f} s")
    return artifact_from_metadata(target, meta)
