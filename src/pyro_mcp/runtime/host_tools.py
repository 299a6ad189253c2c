"""Host programs pyro needs, and the Debian packages that provide them.

This table is the one place that knows which package brings which program: the install
step (`pyro runtime install-host-packages`, called by `make host-packages`), the errors
for a missing tool, and `pyro doctor` all read it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pyro_mcp.errors import HostToolMissing, ToolFailed


@dataclass(frozen=True)
class HostTool:
    program: str
    package: str
    purpose: str


HOST_TOOLS: tuple[HostTool, ...] = (
    HostTool("qemu-system-x86_64", "qemu-system-x86", "run guests (QEMU backend)"),
    HostTool("qemu-img", "qemu-utils", "copy-on-write disk overlays"),
    HostTool("debootstrap", "debootstrap", "build environment root filesystems"),
    HostTool("mke2fs", "e2fsprogs", "pack root filesystems into ext4 images"),
    HostTool("e2fsck", "e2fsprogs", "check ext4 images"),
    HostTool("debugfs", "e2fsprogs", "read ext4 images offline"),
    HostTool("prlimit", "util-linux", "bound the memory of offline disk readers"),
    HostTool("apt-get", "apt", "download Debian packages"),
    HostTool("dpkg-deb", "dpkg", "unpack Debian packages"),
    HostTool("make", "make", "build the guest kernel"),
    HostTool("gcc", "gcc", "build the guest kernel"),
    HostTool("bc", "bc", "build the guest kernel"),
    HostTool("bison", "bison", "build the guest kernel"),
    HostTool("flex", "flex", "build the guest kernel"),
    HostTool("xz", "xz-utils", "unpack the kernel source"),
    HostTool("lz4", "lz4", "decompress Debian's cloud kernel"),
    HostTool("cpio", "cpio", "pack the fallback kernel's initramfs"),
    HostTool("ip", "iproute2", "guest networking"),
    HostTool("nft", "nftables", "guest network policy (NAT and filtering)"),
    HostTool("setpriv", "util-linux", "run the guests' DNS resolvers unprivileged"),
    HostTool("as", "binutils", "assemble the Firecracker test guest"),
    HostTool("docker-registry", "docker-registry", "the tests' loopback OCI registry"),
    HostTool("node", "nodejs", "the tests' npm tools (MCP clients, MCP hosts)"),
    HostTool("npm", "npm", "install the tests' npm tools (tests/npm)"),
    HostTool("chromium", "chromium", "the dashboard's browser tests (headless)"),
)

# Packages installed for their files rather than for a program on PATH.
EXTRA_PACKAGES: tuple[str, ...] = (
    "libelf-dev",  # kernel build (objtool/resolve_btfids headers)
    "zstd",  # kernel source tarballs may be zstd-compressed
    "ca-certificates",
)

_BY_PROGRAM = {tool.program: tool for tool in HOST_TOOLS}


def host_packages() -> list[str]:
    """Every Debian package the project needs, sorted, without repeats."""
    return sorted({tool.package for tool in HOST_TOOLS} | set(EXTRA_PACKAGES))


def find_program(program: str) -> str | None:
    """Absolute path of ``program`` on PATH or in the sbin directories, else None."""
    search = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    return shutil.which(program, path=search)


def require(program: str) -> str:
    """The absolute path of a host program, or HostToolMissing naming its package."""
    path = find_program(program)
    if path is not None:
        return path
    tool = _BY_PROGRAM.get(program)
    package = tool.package if tool else program
    raise HostToolMissing(
        f"host program {program!r} is not installed",
        hint=f"run `make host-packages` or `apt-get install {package}`",
    )


def run(
    argv: Sequence[str],
    *,
    what: str,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    input_bytes: bytes | None = None,
    timeout_s: float | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a host program (argv list, never a shell) and raise ToolFailed on failure.

    ``what`` names the step for the error message ("unpack kernel source").
    """
    argv = list(argv)
    argv[0] = require(argv[0]) if "/" not in argv[0] else argv[0]
    try:
        result = subprocess.run(
            argv,
            cwd=cwd,
            env=env,
            input=input_bytes,
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ToolFailed(f"{what}: {argv[0]} timed out after {timeout_s} s") from exc
    except OSError as exc:
        raise ToolFailed(f"{what}: cannot start {argv[0]}: {exc}") from exc
    if result.returncode != 0:
        raise ToolFailed(
            f"{what}: {os.path.basename(argv[0])} exited with {result.returncode}",
            stderr_tail=tail(result.stderr or result.stdout),
        )
    return result


def tail(data: bytes, lines: int = 20) -> str:
    text = data.decode("utf-8", "replace").rstrip()
    return "\n".join(text.splitlines()[-lines:])


def missing_packages(packages: Iterable[str]) -> list[str]:
    """Packages from ``packages`` that dpkg does not report as installed."""
    missing = []
    for package in packages:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package],
            capture_output=True,
            check=False,
        )
        if b"install ok installed" not in result.stdout:
            missing.append(package)
    return missing


def provided_elsewhere(package: str) -> bool:
    """Every program pyro wants from ``package`` is on this host already, from another
    package (nodesource's ``nodejs`` brings ``npm``, which Debian's ``npm`` conflicts
    with): installing it would change nothing pyro uses, or fail."""
    programs = [tool.program for tool in HOST_TOOLS if tool.package == package]
    return bool(programs) and all(find_program(program) for program in programs)


def install_packages(packages: Sequence[str]) -> list[str]:
    """apt-get install whatever of ``packages`` is missing (and not provided by another
    package); returns what was installed."""
    missing = [p for p in missing_packages(packages) if not provided_elsewhere(p)]
    if not missing:
        return []
    if os.geteuid() != 0:
        raise HostToolMissing(
            f"packages missing: {' '.join(missing)}",
            hint=f"run as root: apt-get install {' '.join(missing)}",
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-q"], what="apt-get update", env=env)
    run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        what="apt-get install",
        env=env,
    )
    return missing
