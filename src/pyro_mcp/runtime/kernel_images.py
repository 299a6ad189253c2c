"""Binary formats of guest kernel files: ELF vmlinux, bzImage, LZ4 payloads, initramfs.

Pure functions over bytes (or a read-only mmap of a file); no subprocesses. They answer
"is this file what its name says?" for verification, and find the pieces the cloud
kernel path cuts out of Debian's packaged bzImage.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

Buffer = bytes | mmap.mmap

ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_EM_X86_64 = 62
ET_REL = 1
ET_EXEC = 2
_PT_NOTE = 4
_SHT_NOBITS = 8

# PVH boot entry: an ELF note named "Xen" of type XEN_ELFNOTE_PHYS32_ENTRY.
_PVH_NOTE_NAME = b"Xen"
_PVH_NOTE_TYPE = 18

BZIMAGE_MAGIC = b"HdrS"
BZIMAGE_MAGIC_OFFSET = 0x202
_BOOT_FLAG_OFFSET = 0x1FE

# LZ4 "legacy" frames, the format the kernel's compressor writes: a magic, then blocks of
# [u32 compressed size][data], each at most LZ4_compressBound(8 MiB) long.
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
_LZ4_LEGACY_MAX_BLOCK = 8 * 1024 * 1024 + (8 * 1024 * 1024) // 255 + 16

CPIO_NEWC_MAGIC = b"070701"
GZIP_MAGIC = b"\x1f\x8b"


@contextmanager
def mapped(path: Path) -> Iterator[Buffer]:
    """A read-only view of a file (empty bytes for an empty file)."""
    with path.open("rb") as handle:
        if path.stat().st_size == 0:
            yield b""
            return
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
            yield view


# --- ELF --------------------------------------------------------------------------------


def _u16(data: Buffer, offset: int) -> int:
    return int(struct.unpack_from("<H", data, offset)[0])


def _u32(data: Buffer, offset: int) -> int:
    return int(struct.unpack_from("<I", data, offset)[0])


def _u64(data: Buffer, offset: int) -> int:
    return int(struct.unpack_from("<Q", data, offset)[0])


def elf_header_problems(data: Buffer, *, elf_type: int = ET_EXEC) -> list[str]:
    """Why ``data`` is not a little-endian x86-64 ELF of ``elf_type``; [] if it is."""
    if len(data) < 64 or data[:4] != ELF_MAGIC:
        return ["not an ELF file (no \\x7fELF magic)"]
    problems = []
    if data[4] != _ELFCLASS64 or data[5] != _ELFDATA2LSB:
        problems.append("not a 64-bit little-endian ELF")
    if _u16(data, 0x12) != _EM_X86_64:
        problems.append(f"ELF machine is {_u16(data, 0x12)}, not x86-64 ({_EM_X86_64})")
    if _u16(data, 0x10) != elf_type:
        problems.append(f"ELF type is {_u16(data, 0x10)}, expected {elf_type}")
    return problems


def _program_headers(data: Buffer) -> Iterator[tuple[int, int, int]]:
    """(p_type, p_offset, p_filesz) of each program header."""
    phoff, phentsize, phnum = _u64(data, 0x20), _u16(data, 0x36), _u16(data, 0x38)
    for index in range(phnum):
        base = phoff + index * phentsize
        if base + 40 > len(data):
            return
        yield _u32(data, base), _u64(data, base + 8), _u64(data, base + 32)


def _section_headers(data: Buffer) -> Iterator[tuple[int, int, int, int]]:
    """(sh_name, sh_type, sh_offset, sh_size) of each section header."""
    shoff, shentsize, shnum = _u64(data, 0x28), _u16(data, 0x3A), _u16(data, 0x3C)
    if shoff == 0:
        return
    for index in range(shnum):
        base = shoff + index * shentsize
        if base + 40 > len(data):
            return
        yield (
            _u32(data, base),
            _u32(data, base + 4),
            _u64(data, base + 24),
            _u64(data, base + 32),
        )


def elf_notes(data: Buffer) -> Iterator[tuple[bytes, int, bytes]]:
    """(name, type, descriptor) of every note in the PT_NOTE segments."""
    for p_type, offset, size in _program_headers(data):
        if p_type != _PT_NOTE:
            continue
        position, end = offset, min(offset + size, len(data))
        while position + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", data, position)
            name_start = position + 12
            desc_start = name_start + ((namesz + 3) & ~3)
            next_note = desc_start + ((descsz + 3) & ~3)
            if next_note > end:
                break
            name = bytes(data[name_start : name_start + namesz]).rstrip(b"\0")
            yield name, note_type, bytes(data[desc_start : desc_start + descsz])
            position = next_note


def has_pvh_entry(data: Buffer) -> bool:
    """True when the ELF carries the PVH entry note (QEMU -kernel / Firecracker boot)."""
    return any(
        name == _PVH_NOTE_NAME and note_type == _PVH_NOTE_TYPE
        for name, note_type, _ in elf_notes(data)
    )


def vmlinux_problems(data: Buffer, *, require_pvh: bool) -> list[str]:
    """Why ``data`` is not a bootable x86-64 vmlinux; [] if it is."""
    problems = elf_header_problems(data)
    if problems:
        return problems
    if require_pvh and not has_pvh_entry(data):
        problems.append("ELF has no PVH entry note (Xen note type 18)")
    return problems


def elf_file_end(data: Buffer) -> int:
    """The offset just past the last byte any ELF header, segment or section uses."""
    end = 64
    shoff, shentsize, shnum = _u64(data, 0x28), _u16(data, 0x3A), _u16(data, 0x3C)
    phoff, phentsize, phnum = _u64(data, 0x20), _u16(data, 0x36), _u16(data, 0x38)
    end = max(end, phoff + phentsize * phnum)
    if shoff:
        end = max(end, shoff + shentsize * shnum)
    for _, offset, size in _program_headers(data):
        end = max(end, offset + size)
    for _, sh_type, offset, size in _section_headers(data):
        if sh_type != _SHT_NOBITS:
            end = max(end, offset + size)
    return end


def elf_section(data: Buffer, wanted: str) -> bytes | None:
    """The contents of the section named ``wanted``, or None."""
    sections = list(_section_headers(data))
    shstrndx = _u16(data, 0x3E)
    if shstrndx >= len(sections):
        return None
    _, _, names_offset, names_size = sections[shstrndx]
    names = bytes(data[names_offset : names_offset + names_size])
    for name_index, sh_type, offset, size in sections:
        end = names.find(b"\0", name_index)
        name = names[name_index : end if end >= 0 else None].decode("latin-1")
        if name == wanted and sh_type != _SHT_NOBITS:
            return bytes(data[offset : offset + size])
    return None


def module_info(ko: Buffer) -> dict[str, list[str]]:
    """The ``key=value`` strings of a kernel module's .modinfo section, by key."""
    problems = elf_header_problems(ko, elf_type=ET_REL)
    if problems:
        raise ValueError("; ".join(problems))
    section = elf_section(ko, ".modinfo") or b""
    info: dict[str, list[str]] = {}
    for entry in section.split(b"\0"):
        key, sep, value = entry.decode("utf-8", "replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


# --- bzImage and its LZ4 payload --------------------------------------------------------


def bzimage_problems(data: Buffer) -> list[str]:
    """Why ``data`` is not an x86 bzImage; [] if it is."""
    if len(data) < BZIMAGE_MAGIC_OFFSET + 4:
        return ["file too short to be a bzImage"]
    problems = []
    if data[BZIMAGE_MAGIC_OFFSET : BZIMAGE_MAGIC_OFFSET + 4] != BZIMAGE_MAGIC:
        problems.append("no 'HdrS' setup header magic at 0x202 (not a bzImage)")
    if data[_BOOT_FLAG_OFFSET : _BOOT_FLAG_OFFSET + 2] != b"\x55\xaa":
        problems.append("no 0x55AA boot flag at 0x1FE (not a bzImage)")
    return problems


def lz4_legacy_stream_end(data: Buffer, start: int) -> int:
    """The end of the LZ4 legacy stream that begins (with its magic) at ``start``.

    Stops at the first length that cannot be a block: the kernel appends the
    uncompressed size after the stream, and the lz4 program rejects trailing bytes.
    """
    if data[start : start + 4] != LZ4_LEGACY_MAGIC:
        raise ValueError(f"no LZ4 legacy magic at offset {start}")
    position = start + 4
    while position + 4 <= len(data):
        size = _u32(data, position)
        if size == 0 or size > _LZ4_LEGACY_MAX_BLOCK or position + 4 + size > len(data):
            break
        if data[position : position + 4] == LZ4_LEGACY_MAGIC:
            break
        position += 4 + size
    return position


def lz4_legacy_streams(data: Buffer) -> Iterator[tuple[int, int]]:
    """(start, end) of every plausible LZ4 legacy stream in ``data``, in file order."""
    start = data.find(LZ4_LEGACY_MAGIC)
    while start >= 0:
        end = lz4_legacy_stream_end(data, start)
        if end > start + 4:
            yield start, end
        start = data.find(LZ4_LEGACY_MAGIC, start + 1)


# --- initramfs --------------------------------------------------------------------------


def initramfs_problems(data: Buffer) -> list[str]:
    """Why ``data`` is not a newc cpio archive (plain or gzip); [] if it is."""
    if data[:6] == CPIO_NEWC_MAGIC or data[:2] == GZIP_MAGIC:
        return []
    return ["not a newc cpio archive (no 070701 magic) nor gzip"]
