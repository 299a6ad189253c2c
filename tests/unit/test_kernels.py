"""Guest kernels without building one: keys, config checks, file formats, the cache."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pyro_mcp.errors import BuildError, InvalidArgument, ToolFailed
from pyro_mcp.runtime import initramfs, kernel_artifact, kernel_packages, kernel_source, kernels
from pyro_mcp.runtime.digests import sha256_bytes
from pyro_mcp.runtime.kernel_cloud import extract_vmlinux
from pyro_mcp.runtime.kernel_images import (
    LZ4_LEGACY_MAGIC,
    bzimage_problems,
    elf_file_end,
    has_pvh_entry,
    initramfs_problems,
    lz4_legacy_stream_end,
    module_info,
    vmlinux_problems,
)
from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.runtime.pins import LINUX_SOURCE_PACKAGE, LINUX_SOURCE_VERSION

# --- synthetic files --------------------------------------------------------------------


def make_elf(
    *,
    elf_type: int = 2,
    notes: tuple[tuple[bytes, int, bytes], ...] = (),
    sections: dict[str, bytes] | None = None,
    body: bytes = b"",
) -> bytes:
    """A small but well-formed little-endian x86-64 ELF64."""
    sections = dict(sections or {})
    note_data = b""
    for name, note_type, desc in notes:
        raw_name = name + b"\0"
        note_data += struct.pack("<III", len(raw_name), len(desc), note_type)
        note_data += raw_name + b"\0" * (-len(raw_name) % 4)
        note_data += desc + b"\0" * (-len(desc) % 4)
    phnum = 1 if notes else 0
    offset = 64 + 56 * phnum
    note_offset = offset
    offset += len(note_data)
    offset += len(body)
    names = b"\0"
    placed = []
    for section_name, data in sections.items():
        placed.append((len(names), offset, data))
        names += section_name.encode() + b"\0"
        offset += len(data)
    shstr_name = len(names)
    names += b".shstrtab\0"
    shstr_offset = offset
    offset += len(names)
    shoff = offset
    shnum = len(placed) + 2
    header = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    header += struct.pack(
        "<HHIQQQIHHHHHH",
        elf_type, 62, 1, 0, 64 if notes else 0, shoff, 0, 64, 56, phnum, 64, shnum, shnum - 1,
    )  # fmt: skip
    out = header
    if notes:
        out += struct.pack("<IIQQQQQQ", 4, 4, note_offset, 0, 0, len(note_data), len(note_data), 4)
    out += note_data + body
    for _, _, data in placed:
        out += data
    out += names
    out += b"\0" * 64  # section 0
    for name_index, data_offset, data in placed:
        out += struct.pack("<IIQQQQIIQQ", name_index, 1, 0, 0, data_offset, len(data), 0, 0, 1, 0)
    out += struct.pack("<IIQQQQIIQQ", shstr_name, 3, 0, 0, shstr_offset, len(names), 0, 0, 1, 0)
    return out


PVH_NOTE = (b"Xen", 18, struct.pack("<I", 0x1000000))


def make_vmlinux(body: bytes = b"kernel text" * 10) -> bytes:
    return make_elf(notes=(PVH_NOTE,), body=body)


def make_bzimage(payload: bytes = b"") -> bytes:
    data = bytearray(0x400)
    data[0x1FE:0x200] = b"\x55\xaa"
    data[0x202:0x206] = b"HdrS"
    return bytes(data) + payload


def source_meta(directory: Path, **overrides: Any) -> dict[str, Any]:
    """Metadata of a source kernel built from today's pins, for files in ``directory``."""
    key = directory.name.split("-", 1)[1].ljust(64, "0")
    meta: dict[str, Any] = {
        "flavor": "source",
        "package": LINUX_SOURCE_PACKAGE,
        "version": LINUX_SOURCE_VERSION,
        "wanted_version": LINUX_SOURCE_VERSION,
        "pinned": True,
        "key": key,
        "builder_revision": kernel_source.SOURCE_BUILDER_REVISION,
        "recipe_sha256": sha256_bytes(kernel_source.guest_config_fragment()),
        "release": "6.1.192",
        "build_seconds": 301.5,
        "created_at": 1000.0,
        "vmlinux": "vmlinux",
        "bzimage": "bzImage",
        "initramfs": None,
        "files": {
            name: kernel_artifact.file_record(directory / name) for name in ("vmlinux", "bzImage")
        },
    }
    meta.update(overrides)
    return meta


def install_fake_kernel(paths: RuntimePaths, name: str = "source-0123456789abcdef") -> Path:
    directory = paths.kernels_dir / name
    directory.mkdir(parents=True)
    (directory / "vmlinux").write_bytes(make_vmlinux())
    (directory / "bzImage").write_bytes(make_bzimage(b"payload"))
    kernel_artifact.write_metadata(directory, source_meta(directory))
    return directory


@pytest.fixture
def paths(tmp_path: Path) -> RuntimePaths:
    paths = RuntimePaths(tmp_path / "cache")
    paths.ensure()
    return paths


# --- cache keys and build parameters ----------------------------------------------------


def test_cache_key_changes_with_the_config_fragment_and_version() -> None:
    key = kernel_source.source_cache_key("linux-source-6.1", "6.1.192-2", b"CONFIG_A=y\n")
    assert key == kernel_source.source_cache_key("linux-source-6.1", "6.1.192-2", b"CONFIG_A=y\n")
    assert key != kernel_source.source_cache_key("linux-source-6.1", "6.1.192-2", b"CONFIG_B=y\n")
    assert key != kernel_source.source_cache_key("linux-source-6.1", "6.1.190-1", b"CONFIG_A=y\n")
    assert len(key) == 64


def test_build_jobs_are_conservative_and_overridable(monkeypatch: pytest.MonkeyPatch) -> None:
    gib = 1 << 30
    assert kernel_source.default_build_jobs(2, 23 * gib) == 2
    assert kernel_source.default_build_jobs(16, 9 * gib) == 4
    assert kernel_source.default_build_jobs(8, gib) == 1
    monkeypatch.setenv("PYRO_KERNEL_BUILD_JOBS", "7")
    assert kernel_source.build_jobs() == 7
    assert kernel_source.build_jobs(3) == 3
    monkeypatch.setenv("PYRO_KERNEL_BUILD_JOBS", "many")
    with pytest.raises(InvalidArgument, match="PYRO_KERNEL_BUILD_JOBS"):
        kernel_source.build_jobs()
    with pytest.raises(InvalidArgument):
        kernel_source.build_jobs(0)


def test_fragment_ships_as_package_data_with_the_essential_options() -> None:
    options = kernel_source.parse_config(kernel_source.guest_config_fragment().decode())
    for name in (
        "CONFIG_64BIT",
        "CONFIG_PVH",
        "CONFIG_PCI",
        "CONFIG_ACPI",
        "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
        "CONFIG_VIRTIO_BLK",
        "CONFIG_VIRTIO_NET",
        "CONFIG_VIRTIO_VSOCKETS",
        "CONFIG_VIRTIO_CONSOLE",
        "CONFIG_EXT4_FS",
        "CONFIG_DEVTMPFS_MOUNT",
        "CONFIG_SERIAL_8250_CONSOLE",
    ):
        assert options[name] == "y", name
    assert options["CONFIG_MODULES"] is None
    assert options["CONFIG_BLK_DEV_INITRD"] is None
    assert "m" not in options.values()


def test_config_check_names_options_that_did_not_stick() -> None:
    fragment = 'CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_D="x"\n'
    final = 'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\nCONFIG_D="x"\n'
    assert kernel_source.config_problems(fragment, final) == [
        "CONFIG_B=y requested, got not set",
        "CONFIG_C should be unset but is y",
    ]
    assert kernel_source.config_problems(fragment, 'CONFIG_A=y\nCONFIG_B=y\nCONFIG_D="x"') == []
    with pytest.raises(ValueError, match="line 1"):
        kernel_source.parse_config("VIRTIO=y\n")


# --- file formats -----------------------------------------------------------------------


def test_vmlinux_check_wants_an_x86_64_elf_with_a_pvh_note() -> None:
    assert vmlinux_problems(make_vmlinux(), require_pvh=True) == []
    assert has_pvh_entry(make_vmlinux())
    plain = make_elf(body=b"x" * 100)
    assert vmlinux_problems(plain, require_pvh=False) == []
    assert vmlinux_problems(plain, require_pvh=True) == [
        "ELF has no PVH entry note (Xen note type 18)"
    ]
    assert vmlinux_problems(b"MZ" + b"\0" * 100, require_pvh=False) == [
        "not an ELF file (no \\x7fELF magic)"
    ]
    relocatable = make_elf(elf_type=1)
    assert "ELF type is 1" in vmlinux_problems(relocatable, require_pvh=False)[0]


def test_bzimage_check_reads_the_setup_header_magic() -> None:
    assert bzimage_problems(make_bzimage()) == []
    broken = bytearray(make_bzimage())
    broken[0x202:0x206] = b"XXXX"
    assert bzimage_problems(bytes(broken)) == [
        "no 'HdrS' setup header magic at 0x202 (not a bzImage)"
    ]
    assert bzimage_problems(b"short") == ["file too short to be a bzImage"]


def test_elf_end_ignores_trailing_bytes() -> None:
    elf = make_vmlinux()
    assert elf_file_end(elf + b"\0" * 4096) == len(elf)


def test_lz4_stream_end_stops_before_the_appended_size() -> None:
    blocks = struct.pack("<I", 5) + b"abcde" + struct.pack("<I", 3) + b"xyz"
    uncompressed_size = struct.pack("<I", 50_000_000)
    data = b"junk" + LZ4_LEGACY_MAGIC + blocks + uncompressed_size + b"tail"
    assert lz4_legacy_stream_end(data, 4) == 4 + 4 + len(blocks)
    with pytest.raises(ValueError):
        lz4_legacy_stream_end(data, 0)


@pytest.mark.skipif(shutil.which("lz4") is None, reason="needs the lz4 program")
def test_vmlinux_is_cut_out_of_an_lz4_bzimage(tmp_path: Path) -> None:
    vmlinux = make_vmlinux(body=os.urandom(3000) + b"\0" * 50_000)
    raw = tmp_path / "vmlinux.bin"
    raw.write_bytes(vmlinux + b"\0" * 1000)  # padding after the ELF, as objcopy leaves it
    compressed = subprocess.run(
        ["lz4", "-l", "-9", "-c", str(raw)], check=True, capture_output=True
    ).stdout
    assert compressed.startswith(LZ4_LEGACY_MAGIC)
    # A stray magic in the setup code must not confuse the search.
    bzimage = make_bzimage(LZ4_LEGACY_MAGIC + b"\xff" * 8 + compressed + struct.pack("<I", 51000))
    assert extract_vmlinux(bzimage) == vmlinux
    with pytest.raises(BuildError, match="no LZ4"):
        extract_vmlinux(make_bzimage(b"\0" * 64))


def test_module_info_reads_the_modinfo_section() -> None:
    ko = make_elf(
        elf_type=1,
        sections={".text": b"\x90" * 8, ".modinfo": b"license=GPL\0depends=virtio,virtio_ring\0"},
    )
    info = module_info(ko)
    assert info["depends"] == ["virtio,virtio_ring"]
    assert info["license"] == ["GPL"]
    with pytest.raises(ValueError):
        module_info(make_vmlinux())


# --- the initramfs ----------------------------------------------------------------------


def write_module_tree(root: Path, modules: dict[str, list[str]], builtin: list[str]) -> None:
    for path, deps in modules.items():
        info = f"name={initramfs.module_name(path)}\0depends={','.join(deps)}\0"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(make_elf(elf_type=1, sections={".modinfo": info.encode()}))
    (root / "modules.builtin").write_text("".join(f"{path}\n" for path in builtin))


def test_module_order_follows_dependencies_and_skips_builtins(tmp_path: Path) -> None:
    write_module_tree(
        tmp_path,
        {
            "kernel/drivers/virtio/virtio.ko": [],
            "kernel/drivers/virtio/virtio_ring.ko": [],
            "kernel/drivers/virtio/virtio_mmio.ko": ["virtio_ring", "virtio"],
            "kernel/drivers/block/virtio_blk.ko": ["virtio_ring", "virtio"],
            "kernel/net/vmw_vsock/vsock.ko": [],
            "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko": ["vsock"],
            "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko": [
                "vmw_vsock_virtio_transport_common",
                "virtio_ring",
                "vsock",
                "virtio",
            ],
            "kernel/drivers/char/hw_random/virtio-rng.ko": ["virtio_ring", "virtio"],
        },
        builtin=["kernel/fs/ext4/ext4.ko"],
    )
    tree = initramfs.read_module_tree(tmp_path)
    order = initramfs.load_order(
        tree, ["virtio_mmio", "virtio_blk", "vmw_vsock_virtio_transport", "virtio_rng", "ext4"]
    )
    names = [initramfs.module_name(path) for path in order]
    assert sorted(names) == sorted(set(names))
    for module, deps in (
        ("virtio_mmio", ["virtio", "virtio_ring"]),
        ("vmw_vsock_virtio_transport", ["vsock", "vmw_vsock_virtio_transport_common"]),
        ("vmw_vsock_virtio_transport_common", ["vsock"]),
    ):
        assert all(names.index(dep) < names.index(module) for dep in deps)
    assert "ext4" not in names
    assert "kernel/drivers/char/hw_random/virtio-rng.ko" in order
    with pytest.raises(BuildError, match="virtio_net"):
        initramfs.load_order(tree, ["virtio_net"])


def test_module_order_prefers_modules_dep_when_shipped(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(
        "kernel/b.ko: kernel/a.ko\nkernel/a.ko:\nkernel/c.ko: kernel/b.ko kernel/a.ko\n"
    )
    tree = initramfs.read_module_tree(tmp_path)
    assert initramfs.load_order(tree, ["c"]) == ["kernel/a.ko", "kernel/b.ko", "kernel/c.ko"]


def test_initramfs_archive_is_newc_and_deterministic() -> None:
    entries = initramfs.initramfs_entries(b"BUSYBOX", {"a.ko": b"A" * 5, "b.ko": b"B"})
    archive = initramfs.newc_archive(entries)
    assert archive == initramfs.newc_archive(entries)
    assert initramfs_problems(archive) == []
    names = []
    position = 0
    while True:
        assert archive[position : position + 6] == b"070701"
        fields = [int(archive[position + 6 + 8 * i : position + 14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        name = archive[position + 110 : position + 110 + namesize - 1].decode()
        names.append(name)
        position += 110 + namesize
        position += -position % 4
        if name == "TRAILER!!!":
            break
        position += size + (-size % 4)
    assert position == len(archive)
    assert names.index("bin") < names.index("bin/busybox")
    assert {"init", "dev/console", "bin/sh", "lib/modules/load-order"} <= set(names)
    load_order = next(e for e in entries if e.name == initramfs.LOAD_ORDER_FILE)
    assert load_order.data == b"a.ko\nb.ko\n"


def test_init_script_is_valid_shell() -> None:
    result = subprocess.run(["sh", "-n"], input=initramfs.INIT_SCRIPT.encode(), check=False)
    assert result.returncode == 0


# --- metadata, verification, the cache --------------------------------------------------


def test_metadata_round_trip(paths: RuntimePaths) -> None:
    directory = install_fake_kernel(paths)
    meta = kernel_artifact.read_metadata(directory)
    assert meta is not None and meta["schema"] == kernel_artifact.METADATA_SCHEMA
    artifact = kernel_artifact.artifact_from_metadata(directory, meta)
    assert artifact.flavor == "source" and artifact.pinned
    assert artifact.vmlinux == directory / "vmlinux"
    assert artifact.initramfs is None
    assert artifact.release == "6.1.192"
    assert artifact.boot_args() == []
    data = json.loads(json.dumps(artifact.to_dict()))
    assert data["files"]["vmlinux"]["size"] == (directory / "vmlinux").stat().st_size
    assert kernels.verify_kernel(artifact) == []
    assert kernels.installed_kernel(paths, "source") == artifact
    assert kernels.installed_kernel(paths, "cloud") is None


def test_corrupted_artifact_is_detected(paths: RuntimePaths) -> None:
    directory = install_fake_kernel(paths)
    artifact = kernels.installed_kernel(paths, "source")
    assert artifact is not None
    data = bytearray((directory / "vmlinux").read_bytes())
    data[-1] ^= 0xFF
    (directory / "vmlinux").write_bytes(bytes(data))
    problems = kernels.verify_kernel(artifact)
    assert len(problems) == 1 and problems[0].startswith("vmlinux: sha256")
    assert kernels.verify_kernel(artifact, deep=False) == []
    (directory / "bzImage").write_bytes(b"not a kernel" * 100)
    assert kernels.installed_kernel(paths, "source") is None  # size differs: cheap check
    problems = kernels.verify_kernel(artifact, deep=False)
    assert any("HdrS" in problem for problem in problems)
    (directory / "bzImage").unlink()
    assert "bzImage: missing" in kernels.verify_kernel(artifact)


def test_damaged_cache_entry_is_removed_for_a_rebuild(paths: RuntimePaths) -> None:
    directory = install_fake_kernel(paths)
    meta = kernel_artifact.read_metadata(directory)
    assert meta is not None
    key = meta["key"]
    messages: list[str] = []
    assert kernel_artifact.cached_artifact(paths, "source", key, messages.append) is not None
    (directory / "vmlinux").write_bytes(b"\x7fELF truncated")
    assert kernel_artifact.cached_artifact(paths, "source", key, messages.append) is None
    assert not directory.exists()
    assert "damaged" in messages[-1]


def test_installed_kernel_ignores_stale_recipes_and_incomplete_dirs(paths: RuntimePaths) -> None:
    directory = install_fake_kernel(paths)
    kernel_artifact.write_metadata(directory, source_meta(directory, recipe_sha256="0" * 64))
    assert kernels.installed_kernel(paths, "source") is None
    (paths.kernels_dir / "source-ffffffffffffffff").mkdir()  # no kernel.json: never valid
    assert kernels.installed_kernel(paths, "source") is None


def test_interrupted_build_leftovers_are_cleared_under_the_lock(paths: RuntimePaths) -> None:
    leftover = paths.work_dir / "kernel-source-0123456789abcdef-x1y2"
    (leftover / "src").mkdir(parents=True)
    with kernel_artifact.build_lock(paths, "source", lambda message: None):
        assert not leftover.exists()
    assert list(paths.kernels_dir.iterdir()) == []


def test_staged_directory_is_installed_atomically(paths: RuntimePaths) -> None:
    with kernel_artifact.scratch_dir(paths, "source", "ab" * 32) as scratch:
        staging = scratch / "source-abababababababab"
        staging.mkdir()
        (staging / "vmlinux").write_bytes(b"x")
        kernel_artifact.install_staged(staging, paths.kernels_dir / staging.name)
        assert (paths.kernels_dir / staging.name / "vmlinux").read_bytes() == b"x"
    assert not scratch.exists()


def test_cloud_artifact_asks_for_its_initramfs_init() -> None:
    artifact = kernel_artifact.KernelArtifact(
        flavor="cloud",
        package="linux-image-6.1.0-56-cloud-amd64",
        version="6.1.192-2",
        pinned=True,
        key="c" * 64,
        directory=Path("/k"),
        vmlinux=Path("/k/vmlinux"),
        bzimage=Path("/k/bzImage"),
        initramfs=Path("/k/initramfs.cpio"),
        files={},
        release="6.1.0-56-cloud-amd64",
        build_seconds=9.0,
    )
    assert artifact.boot_args() == ["rdinit=/init"]
    assert artifact.to_dict()["initramfs"] == "/k/initramfs.cpio"


# --- flavors and package resolution -----------------------------------------------------


def test_flavor_comes_from_argument_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYRO_KERNEL_FLAVOR", raising=False)
    assert kernels.default_flavor() == kernels.DEFAULT_KERNEL_FLAVOR == "source"
    monkeypatch.setenv("PYRO_KERNEL_FLAVOR", "cloud")
    assert kernels.default_flavor() == "cloud"
    assert kernels.resolve_flavor("source") == "source"
    with pytest.raises(InvalidArgument, match="unknown kernel flavor 'arm'"):
        kernels.resolve_flavor("arm")


def test_ensure_kernel_returns_an_installed_pinned_kernel_without_apt(
    paths: RuntimePaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_fake_kernel(paths)

    def no_apt(*args: object, **kwargs: object) -> None:
        raise AssertionError("apt must not be asked")

    monkeypatch.setattr(kernel_packages, "run", no_apt)
    assert kernels.ensure_kernel(paths, "source").release == "6.1.192"
    with pytest.raises(InvalidArgument):
        kernels.ensure_kernel(paths, "nope")


def test_missing_pinned_version_falls_back_to_the_candidate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        spec = argv[-1]
        if spec == "linux-source-6.1=6.1.192-2":
            raise ToolFailed("E: Version '6.1.192-2' for 'linux-source-6.1' was not found")
        line = "'http://deb/pool/linux-source-6.1_6.1.199-1_all.deb' "
        line += "linux-source-6.1_6.1.199-1_all.deb 150000000 SHA256:00\n"
        return subprocess.CompletedProcess(argv, 0, line.encode(), b"")

    monkeypatch.setattr(kernel_packages, "run", fake_run)
    resolved = kernel_packages.resolve_package("linux-source-6.1", "6.1.192-2", tmp_path)
    assert (resolved.version, resolved.wanted, resolved.pinned) == ("6.1.199-1", "6.1.192-2", False)
    assert resolved.to_dict()["pinned"] is False
    (tmp_path / "linux-source-6.1_6.1.192-2_all.deb").write_bytes(b"cached")
    resolved = kernel_packages.resolve_package("linux-source-6.1", "6.1.192-2", tmp_path)
    assert resolved.pinned  # a download kept from before counts, even offline


def test_unknown_package_says_to_update_apt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        raise ToolFailed("E: Unable to locate package")

    monkeypatch.setattr(kernel_packages, "run", fake_run)
    with pytest.raises(BuildError) as info:
        kernel_packages.resolve_package("linux-source-9", None, tmp_path)
    assert info.value.hint is not None and "apt-get update" in info.value.hint
