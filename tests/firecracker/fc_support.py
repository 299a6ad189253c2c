"""Helpers shared by the Firecracker tests and the tiny-guest benchmark.

``build_tiny_guest`` assembles and links ``tiny_guest.S`` into a minimal ELF64 ``vmlinux``:
one PT_LOAD segment at physical 0x100000 with the entry point there (Firecracker's loader
rejects an entry below 1 MiB, "Invalid entry address"). Firecracker jumps to it in 64-bit
long mode with paging set up, as for a Linux kernel.
"""

from __future__ import annotations

import itertools
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.leftovers import process_running

from pyro_mcp.vmm.firecracker import FirecrackerVM

HERE = Path(__file__).resolve().parent
TINY_MARKER = "PYRO-TINY-READY"
LOAD_ADDRESS = 0x100000

VMFactory = Callable[..., FirecrackerVM]
"""``make_vm(jailed=, jailer=, kernel=, disk=, disk_format=, serial_input=, mem_mib=)``."""


class ToolMissing(Exception):
    """``as`` or ``ld`` is not installed."""


def elf_load_segments(path: Path) -> tuple[int, list[int]]:
    """(entry, physical addresses of PT_LOAD segments) of an ELF64 little-endian file."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise AssertionError(f"{path} is not an ELF64 file")
    entry, phoff = struct.unpack_from("<QQ", data, 24)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    loads = []
    for index in range(phnum):
        p_type, _flags, _offset, _vaddr, paddr = struct.unpack_from(
            "<IIQQQ", data, phoff + index * phentsize
        )
        if p_type == 1:  # PT_LOAD
            loads.append(paddr)
    return entry, loads


def build_tiny_guest(directory: Path, load_address: int = LOAD_ADDRESS) -> Path:
    """Assemble and link tiny_guest.S into ``directory/vmlinux`` at ``load_address``."""
    for tool in ("as", "ld"):
        if shutil.which(tool) is None:
            raise ToolMissing(f"`{tool}` is missing (apt-get install binutils)")
    obj, image = directory / "tiny_guest.o", directory / "vmlinux"
    subprocess.run(["as", "--64", "-o", str(obj), str(HERE / "tiny_guest.S")], check=True)
    ld_help = subprocess.run(["ld", "--help"], capture_output=True, text=True).stdout
    quiet = ["--no-warn-rwx-segments"] if "--no-warn-rwx-segments" in ld_help else []
    # -N: one RWX segment, no page-aligned ELF headers loaded below the text.
    argv = [
        "ld", "-m", "elf_x86_64", "-static", "-nostdlib", "-N", *quiet,
        "--build-id=none", "-z", "noexecstack",
        f"-Ttext={load_address:#x}", "-e", "_start", "-o", str(image), str(obj),
    ]  # fmt: skip
    subprocess.run(argv, check=True)
    entry, loads = elf_load_segments(image)
    if entry != load_address or loads != [load_address]:
        raise RuntimeError(f"{image}: entry {entry:#x}, PT_LOAD at {[hex(a) for a in loads]}")
    return image


def vmm_processes(vm_id: str) -> list[int]:
    """Live processes started with ``--id <vm_id>`` (Firecracker directly, or the jailer's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        named = any(a == b"--id" and b == vm_id.encode() for a, b in itertools.pairwise(argv))
        if named and process_running(int(entry.name)):
            found.append(int(entry.name))
    return found


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields
