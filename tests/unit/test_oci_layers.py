"""Applying hostile OCI layers: whiteouts, metadata kept, nothing written outside the tree;
reading OCI layouts and docker archives; what the agent needs in an image."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard
from tests.oci_images import write_layout

from pyro_mcp.errors import IntegrityError, InvalidArgument, TooLarge
from pyro_mcp.runtime.oci import guest_needs, layout
from pyro_mcp.runtime.oci.layers import Limits, apply_layers
from pyro_mcp.runtime.oci.layout import Layer

Entry = tuple[str, str, bytes | str]  # (name, kind, data or link target)


def tar_bytes(entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                name, data = entry
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def info(name: str, kind: bytes, **fields: object) -> tarfile.TarInfo:
    entry = tarfile.TarInfo(name)
    entry.type = kind
    entry.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for key, value in fields.items():
        setattr(entry, key, value)
    return entry


def layer(tmp: Path, data: bytes, compress: str = "gzip") -> Layer:
    if compress == "gzip":
        data = gzip.compress(data)
    elif compress == "zstd":
        data = zstandard.ZstdCompressor().compress(data)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = tmp / digest.removeprefix("sha256:")
    path.write_bytes(data)
    return Layer(path, digest, "application/vnd.oci.image.layer.v1.tar+gzip", len(data))


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """(root, a sentinel directory beside it that must stay empty)."""
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    return root, outside


def test_whiteout_removes_a_lower_file_and_opaque_keeps_only_this_layers(
    tmp_path: Path, tree: tuple[Path, Path]
) -> None:
    root, _ = tree
    lower = tar_bytes(
        [info("etc", tarfile.DIRTYPE), ("etc/motd", b"hi"), ("etc/keep", b"k"),
         info("data", tarfile.DIRTYPE), ("data/old", b"o")]
    )  # fmt: skip
    upper = tar_bytes(
        [("etc/.wh.motd", b""), ("data/new", b"n"), ("data/.wh..wh..opq", b""), ("marker", b"m")]
    )
    apply_layers([layer(tmp_path, lower), layer(tmp_path, upper, "zstd")], root)
    assert not (root / "etc/motd").exists()
    assert (root / "etc/keep").read_bytes() == b"k"
    assert sorted(os.listdir(root / "data")) == ["new"]  # opaque: lower's 'old' gone
    assert (root / "marker").read_bytes() == b"m"
    assert not any(name.startswith(".wh.") for _d, _s, files in os.walk(root) for name in files)


def test_owner_mode_hard_link_symlink_xattr_and_device_are_kept(
    tmp_path: Path, tree: tuple[Path, Path]
) -> None:
    root, _ = tree
    tool = info("bin/tool", tarfile.REGTYPE, size=3, mode=0o4755, uid=1000, gid=1001, mtime=1234)
    tool.pax_headers = {"SCHILY.xattr.user.note": "kept", "SCHILY.xattr.security.selinux": "x"}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info("bin", tarfile.DIRTYPE))
        tar.addfile(tool, io.BytesIO(b"abc"))
        tar.addfile(info("bin/same", tarfile.LNKTYPE, linkname="bin/tool"))
        tar.addfile(info("bin/link", tarfile.SYMTYPE, linkname="/etc/passwd"))
        tar.addfile(info("dev", tarfile.DIRTYPE))
        tar.addfile(info("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666))
    apply_layers([layer(tmp_path, buffer.getvalue())], root)
    stat = os.stat(root / "bin/tool")
    assert (stat.st_mode & 0o7777, stat.st_uid, stat.st_gid, stat.st_mtime) == (
        0o4755, 1000, 1001, 1234
    )  # fmt: skip
    assert os.stat(root / "bin/same").st_ino == stat.st_ino
    assert os.readlink(root / "bin/link") == "/etc/passwd"  # stored, not followed
    assert os.getxattr(root / "bin/tool", "user.note") == b"kept"
    assert "security.selinux" not in os.listxattr(root / "bin/tool")
    assert os.major(os.stat(root / "dev/null").st_rdev) == 1


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([("../escape", b"x")], "'../escape' has a '..' component; refused"),
        ([("/etc/escape", b"x")], "'/etc/escape' is an absolute path; refused"),
        (
            [info("a", tarfile.SYMTYPE, linkname="OUTSIDE"), ("a/evil", b"x")],
            "'a/evil' goes through the symlink 'a'; refused",
        ),
        (
            [info("b", tarfile.SYMTYPE, linkname="../outside"), ("b/evil", b"x")],
            "'b/evil' goes through the symlink 'b'; refused",
        ),
        (
            [info("c", tarfile.LNKTYPE, linkname="../outside/file")],
            "(link target) has a '..' component; refused",
        ),
        (
            [info("d", tarfile.LNKTYPE, linkname="nowhere")],
            "is a hard link to 'nowhere', which is not in the image; refused",
        ),
    ],
)
def test_entries_that_could_leave_the_tree_are_refused(
    tmp_path: Path, tree: tuple[Path, Path], entries: list[object], message: str
) -> None:
    root, outside = tree
    fixed = [
        info(e.name, e.type, linkname=str(outside) if e.linkname == "OUTSIDE" else e.linkname)
        if isinstance(e, tarfile.TarInfo)
        else e
        for e in entries
    ]
    with pytest.raises(InvalidArgument) as caught:
        apply_layers([layer(tmp_path, tar_bytes(fixed))], root)  # type: ignore[arg-type]
    assert message in caught.value.message
    assert caught.value.message.startswith("layer 1 (sha256:")
    assert os.listdir(outside) == []
    assert not (tmp_path / "escape").exists()


def test_a_symlink_from_a_lower_layer_is_not_followed_by_an_upper_one(
    tmp_path: Path, tree: tuple[Path, Path]
) -> None:
    root, outside = tree
    lower = tar_bytes([info("etc", tarfile.SYMTYPE, linkname=str(outside))])
    upper = tar_bytes([("etc/passwd", b"root::0:0::/:/bin/sh\n")])
    with pytest.raises(InvalidArgument) as caught:
        apply_layers([layer(tmp_path, lower), layer(tmp_path, upper)], root)
    assert caught.value.message.startswith("layer 2 (sha256:")
    assert "'etc/passwd' goes through the symlink 'etc'; refused" in caught.value.message
    assert os.listdir(outside) == []


def test_a_10_gib_sparse_file_is_refused_before_its_data_is_read(
    tmp_path: Path, tree: tuple[Path, Path]
) -> None:
    root, _ = tree
    source = tmp_path / "src"
    source.mkdir()
    subprocess.run(["truncate", "-s", "10G", str(source / "big")], check=True)
    archive = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "-cf", str(archive), "-C", str(source), "big"], check=True)
    assert archive.stat().st_size < 1 << 20
    with pytest.raises(TooLarge) as caught:
        apply_layers([layer(tmp_path, archive.read_bytes(), "none")], root)
    assert caught.value.message.endswith(
        "'big' is 10.0 GiB, more than the 4.0 GiB a file in an imported image may be"
    )
    assert not (root / "big").exists()


def test_a_mostly_zero_file_stays_sparse_and_limits_count_the_total(
    tmp_path: Path, tree: tuple[Path, Path]
) -> None:
    root, _ = tree
    data = b"head" + bytes(64 << 20) + b"tail"
    apply_layers([layer(tmp_path, tar_bytes([("zeros", data)]))], root)
    stat = os.stat(root / "zeros")
    assert stat.st_size == len(data)
    assert stat.st_blocks * 512 < 1 << 20
    assert (root / "zeros").read_bytes()[-4:] == b"tail"
    with pytest.raises(TooLarge) as caught:
        apply_layers(
            [layer(tmp_path, tar_bytes([("a", b"x" * 600), ("b", b"y" * 600)]))],
            tmp_path / "root",
            limits=Limits(max_file_bytes=1000, max_total_bytes=1000),
        )
    assert caught.value.message == "the image's files add up to more than 0.0 GiB"


def test_a_truncated_layer_is_corrupt_not_half_taken(
    tmp_path: Path, tree: tuple[Path, Path]
) -> None:
    root, _ = tree
    whole = gzip.compress(tar_bytes([("file", os.urandom(200_000))]))
    cut = tmp_path / "cut"
    cut.write_bytes(whole[: len(whole) // 2])
    broken = Layer(cut, "sha256:" + "a" * 64, "application/vnd.oci.image.layer.v1.tar+gzip", 1)
    with pytest.raises(IntegrityError) as caught:
        apply_layers([broken], root)
    assert caught.value.message.startswith("layer 1 (sha256:aaaaaaaaaaaa) is truncated or corrupt")


# --- OCI layout and docker archive ------------------------------------------------------


def test_an_oci_layout_is_read_and_its_blobs_verified(tmp_path: Path) -> None:
    digests = write_layout(tmp_path / "img", [tar_bytes([("a", b"1")])])
    image = layout.read_oci_layout(tmp_path / "img", tag="1")
    assert image.manifest_digest == digests["manifest"]
    assert [layer.digest for layer in image.layers] == [digests["layer"]]
    blob = tmp_path / "img/blobs/sha256" / digests["layer"][7:]
    blob.write_bytes(blob.read_bytes() + b"tampered")
    with pytest.raises(IntegrityError) as caught:
        layout.read_oci_layout(tmp_path / "img")
    assert caught.value.message.endswith(
        f"layer 1 does not match its digest {digests['layer']}; refused"
    )


def test_an_image_for_another_architecture_is_refused(tmp_path: Path) -> None:
    write_layout(tmp_path / "img", [tar_bytes([("a", b"1")])], arch="arm64")
    with pytest.raises(InvalidArgument) as caught:
        image = layout.read_oci_layout(tmp_path / "img")
        layout.check_platform(image.config, what="the image")
    assert caught.value.message == (
        "the image is an image for linux/arm64; pyro runs linux/amd64 guests"
    )
    index = {"manifests": [{"digest": "sha256:" + "b" * 64,
                            "platform": {"os": "linux", "architecture": "arm64"}}]}  # fmt: skip
    with pytest.raises(InvalidArgument) as listed:
        layout.select_platform(index, what="REF")
    assert listed.value.message == (
        "REF has no linux/amd64 image (it has linux/arm64); pyro runs linux/amd64 guests"
    )


def docker_archive(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            entry = tarfile.TarInfo(name)
            entry.size = len(data)
            tar.addfile(entry, io.BytesIO(data))


def test_a_docker_archive_is_read_and_a_member_leaving_it_refused(tmp_path: Path) -> None:
    layer_tar = tar_bytes([("hello", b"world")])
    diff_id = "sha256:" + hashlib.sha256(layer_tar).hexdigest()
    config = json.dumps({"os": "linux", "architecture": "amd64", "rootfs": {"diff_ids": [diff_id]}})
    manifest = json.dumps([{"Config": "c.json", "Layers": ["l1/layer.tar"]}])
    archive = tmp_path / "image.tar"
    docker_archive(archive, {"manifest.json": manifest.encode(), "c.json": config.encode(),
                             "l1/layer.tar": layer_tar})  # fmt: skip
    image = layout.read_docker_archive(archive, tmp_path / "work")
    root = tmp_path / "root"
    root.mkdir()
    apply_layers(image.layers, root)
    assert (root / "hello").read_bytes() == b"world"
    bad = tmp_path / "bad.tar"
    docker_archive(bad, {"manifest.json": manifest.encode(), "../c.json": b"{}"})
    with pytest.raises(InvalidArgument) as caught:
        layout.read_docker_archive(bad, tmp_path / "work2")
    assert caught.value.message.endswith("member '../c.json' leaves the archive; refused")


# --- what the agent needs ----------------------------------------------------------------


def fake_python_tree(root: Path, *, without: str | None = None) -> None:
    (root / "usr/bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    for name in ("sh", "python3.11"):
        (root / "usr/bin" / name).write_text("#!\n")
        (root / "usr/bin" / name).chmod(0o755)
    (root / "usr/bin/python3").symlink_to("python3.11")
    lib = root / "usr/lib/python3.11"
    (lib / "lib-dynload").mkdir(parents=True)
    for module in guest_needs.agent_modules():
        if module != without:
            (lib / f"{module}.py").write_text("")


def test_what_the_agent_needs_is_named_when_missing(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert guest_needs.missing_for_agent(empty) == [
        "/bin/sh is missing (shell commands and services need it)",
        "no usable python3: /usr/bin/python3 is missing or not executable (the pyro agent "
        "runs on the image's own Python >= 3.10 with its standard library; install python3 "
        "in the image)",
    ]
    partial = tmp_path / "partial"
    fake_python_tree(partial, without="json")
    assert guest_needs.missing_for_agent(partial) == [
        "python3's standard library lacks json (in usr/lib/python3.11; a -minimal Python is "
        "not enough)"
    ]
    whole = tmp_path / "whole"
    fake_python_tree(whole)
    assert guest_needs.missing_for_agent(whole) == []
    assert "json" in guest_needs.agent_modules() and "pyro_mcp" not in guest_needs.agent_modules()
