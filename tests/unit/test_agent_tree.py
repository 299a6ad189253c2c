"""Tree and archive operations of the guest agent, over a socketpair, on temporary trees."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
import time
from pathlib import Path
from typing import Any, Literal

import pytest
from tests.unit.conftest import InProcessAgent

from pyro_mcp.errors import GuestError
from pyro_mcp.guest.client import AgentClient
from pyro_mcp.guest_agent import ops_tree

SETTLE_S = ops_tree.RACY_NS / 1e9 + 0.05  # files this old are cached on first sight


@pytest.fixture
def client(agent_client: AgentClient) -> AgentClient:
    ops_tree.clear_digest_cache()
    return agent_client


@pytest.fixture
def root(tmp_path: Path) -> Path:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    return workspace


def _refused(code: str, call: Any, *args: Any, **kwargs: Any) -> GuestError:
    with pytest.raises(GuestError) as caught:
        call(*args, **kwargs)
    assert caught.value.guest_code == code, caught.value.message
    return caught.value


def _sample(root: Path) -> None:
    (root / "src").mkdir(mode=0o750)
    (root / "src").chmod(0o750)
    (root / "src" / "main.py").write_bytes(b"print('hi')\n")
    (root / "src" / "main.py").chmod(0o640)
    (root / "run.sh").write_bytes(b"#!/bin/sh\necho run\n")
    (root / "run.sh").chmod(0o755)
    (root / "empty").mkdir()
    (root / "empty").chmod(0o700)
    (root / "link").symlink_to("src/main.py")
    (root / "escape").symlink_to("/etc/passwd")
    os.mkfifo(root / "pipe", 0o600)


# --- tree_manifest -------------------------------------------------------------------


def test_manifest_lists_every_path_exactly(client: AgentClient, root: Path) -> None:
    _sample(root)
    entries, counts = client.manifest(str(root))
    by_path = {entry["path"]: entry for entry in entries}
    assert [entry["path"] for entry in entries] == sorted(by_path)
    assert sorted(by_path) == [
        "empty",
        "escape",
        "link",
        "pipe",
        "run.sh",
        "src",
        "src/main.py",
    ]
    main = root / "src" / "main.py"
    assert by_path["src/main.py"] == {
        "path": "src/main.py",
        "type": "file",
        "mode": 0o640,
        "size": len(b"print('hi')\n"),
        "mtime_ns": main.stat().st_mtime_ns,
        "sha256": hashlib.sha256(b"print('hi')\n").hexdigest(),
    }
    assert by_path["run.sh"]["mode"] == 0o755
    assert by_path["src"]["type"] == "dir" and by_path["src"]["mode"] == 0o750
    assert by_path["src"]["size"] == 0 and "sha256" not in by_path["src"]
    assert by_path["empty"]["mode"] == 0o700
    assert by_path["link"]["type"] == "symlink"
    assert by_path["link"]["target"] == "src/main.py"
    assert by_path["link"]["size"] == len("src/main.py")
    assert "sha256" not in by_path["link"]
    assert by_path["escape"]["target"] == "/etc/passwd"  # listed, never followed
    assert by_path["pipe"]["type"] == "fifo" and by_path["pipe"]["mode"] == 0o600
    assert counts["entries"] == 7
    assert (counts["files"], counts["dirs"], counts["symlinks"], counts["other"]) == (2, 2, 2, 1)
    assert counts["bytes"] == main.stat().st_size + (root / "run.sh").stat().st_size
    assert counts["root"] == os.path.realpath(root)


def test_manifest_of_a_subdir_without_hashes(client: AgentClient, root: Path) -> None:
    _sample(root)
    entries, counts = client.manifest(str(root), "src", hash=False)
    assert [entry["path"] for entry in entries] == ["src", "src/main.py"]
    assert all("sha256" not in entry for entry in entries)
    assert counts["path"] == "src" and counts["hashed"] == 0
    same, _ = client.manifest(str(root), f"{root}/src", hash=False)
    assert same == entries


def test_manifest_streams_in_whole_line_chunks(client: AgentClient, root: Path) -> None:
    for index in range(3000):
        (root / f"{'n' * 150}-{index:05d}").write_bytes(b"")
    frames: list[bytes] = []
    client.call("tree_manifest", {"root": str(root)}, on_data=lambda _s, d: frames.append(d))
    assert len(frames) > 1
    assert all(len(frame) <= 256 << 10 and frame.endswith(b"\n") for frame in frames)


def test_second_manifest_uses_the_cache_and_edits_are_rehashed(
    client: AgentClient, root: Path
) -> None:
    for index in range(20):
        (root / f"f{index}").write_bytes(b"x" * 100)
    time.sleep(SETTLE_S)
    first, counts = client.manifest(str(root))
    assert (counts["hashed"], counts["cached"]) == (20, 0)
    second, counts = client.manifest(str(root))
    assert (counts["hashed"], counts["cached"]) == (0, 20)
    assert second == first
    target = root / "f3"
    before = target.stat()
    target.write_bytes(b"y" * 100)  # in place: same size, same inode
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    third, counts = client.manifest(str(root))
    assert (counts["hashed"], counts["cached"]) == (1, 19)
    changed = {entry["path"]: entry for entry in third}["f3"]
    assert changed["sha256"] == hashlib.sha256(b"y" * 100).hexdigest()
    assert changed["mtime_ns"] == before.st_mtime_ns + 1_000_000_000


def test_files_written_just_before_a_manifest_are_not_cached(
    client: AgentClient, root: Path
) -> None:
    (root / "fresh").write_bytes(b"new")
    _, counts = client.manifest(str(root))
    assert counts["hashed"] == 1
    _, counts = client.manifest(str(root))
    assert counts["hashed"] == 1  # still within the racy window: hashed again, not trusted


def test_manifest_refuses_paths_outside_the_root(client: AgentClient, root: Path) -> None:
    (root / "out").symlink_to(root.parent)
    _refused("outside_root", client.manifest, str(root), "../")
    _refused("outside_root", client.manifest, str(root), "out")
    _refused("outside_root", client.manifest, str(root), "/etc")
    _refused("not_found", client.manifest, str(root), "missing")
    _refused("not_found", client.manifest, str(root / "nope"))


# --- list_dir ------------------------------------------------------------------------


def test_list_dir_flat_and_recursive(client: AgentClient, root: Path) -> None:
    _sample(root)
    flat, info = client.list_dir(str(root))
    assert [entry["path"] for entry in flat] == [
        "empty",
        "escape",
        "link",
        "pipe",
        "run.sh",
        "src",
    ]
    assert info == {"path": "", "count": 6, "truncated": False}
    assert all("sha256" not in entry for entry in flat)
    manifest, _ = client.manifest(str(root), hash=False)
    deep, _ = client.list_dir(str(root), recursive=True)
    assert deep == manifest
    inner, info = client.list_dir(str(root), "src")
    assert [entry["path"] for entry in inner] == ["src/main.py"] and info["path"] == "src"
    assert inner[0]["mode"] == 0o640
    capped, info = client.list_dir(str(root), recursive=True, max_entries=3)
    assert info["truncated"] and info["count"] == len(capped) == 3
    _refused("not_a_directory", client.list_dir, str(root), "run.sh")
    _refused("outside_root", client.list_dir, str(root), "escape")


def test_list_dir_stays_under_the_frame_header_limit(client: AgentClient, root: Path) -> None:
    for index in range(5000):
        (root / f"{'p' * 200}{index:05d}").write_bytes(b"")
    entries, info = client.list_dir(str(root))
    assert info["truncated"] and 0 < info["count"] == len(entries) < 5000


# --- remove_paths --------------------------------------------------------------------


def test_remove_paths_removes_links_not_their_targets(client: AgentClient, root: Path) -> None:
    _sample(root)
    outside = root.parent / "keep"
    outside.mkdir()
    (outside / "file").write_text("k")
    (root / "outlink").symlink_to(outside)
    result = client.remove_paths(str(root), ["outlink", "escape", f"{root}/run.sh"])
    assert result["removed"] == 3
    assert (outside / "file").read_text() == "k"
    assert not (root / "outlink").is_symlink() and not (root / "run.sh").exists()
    assert Path("/etc/passwd").exists()


def test_remove_paths_needs_recursive_for_directories(client: AgentClient, root: Path) -> None:
    _sample(root)
    _refused("is_a_directory", client.remove_paths, str(root), ["pipe", "src"])
    assert (root / "pipe").exists()  # nothing removed when any path is refused
    assert client.remove_paths(str(root), ["src"], recursive=True)["removed"] == 1
    assert not (root / "src").exists()
    _refused("not_found", client.remove_paths, str(root), ["src"])
    result = client.remove_paths(str(root), ["src", "pipe"], missing_ok=True)
    assert result == {"removed": 1, "missing": ["src"]}


def test_remove_paths_refuses_the_root_and_escapes(client: AgentClient, root: Path) -> None:
    _sample(root)
    (root / "up").symlink_to(root.parent)
    victim = root.parent / "victim"
    victim.write_text("v")
    for paths in ([str(root)], ["."], ["src/.."], ["../victim"], ["up/victim"], ["/etc/hosts"]):
        _refused(
            "invalid_argument" if paths[0] in (str(root), ".", "src/..") else "outside_root",
            client.remove_paths,
            str(root),
            paths,
            recursive=True,
        )
    assert victim.exists() and (root / "src").exists()


# --- apply_tree ----------------------------------------------------------------------


def test_apply_tree_builds_dirs_symlinks_and_modes_exactly(client: AgentClient, root: Path) -> None:
    (root / "old").mkdir()
    (root / "old" / "file").write_text("x")
    (root / "swap").symlink_to("/etc")  # becomes a directory with content below
    (root / "keep.txt").write_text("keep")
    result = client.apply_tree(
        str(root),
        removes=["old", "swap", "never-existed"],
        dirs=[
            {"path": "swap", "mode": 0o755},
            {"path": "a/b/c", "mode": 0o500},
            {"path": "a", "mode": 0o711},
            {"path": "a/b", "mode": 0o555},
        ],
        symlinks=[
            {"path": "a/b/c/up", "target": "../../.."},
            {"path": "a/abs", "target": "/etc/hostname"},
            {"path": "swap/inner", "target": "../keep.txt"},
        ],
        chmods=[{"path": "keep.txt", "mode": 0o600}, {"path": "a/abs", "mode": 0o644}],
    )
    assert result == {
        "removed": 2,
        "dirs_created": 4,
        "symlinks": 3,
        "specials": 0,
        "sockets_skipped": 0,
        "chmods": 5,
        "skipped": 1,
    }
    assert not (root / "old").exists()
    assert (root / "swap").is_dir() and not (root / "swap").is_symlink()
    modes = {rel: (root / rel).stat().st_mode & 0o7777 for rel in ("a", "a/b", "a/b/c", "keep.txt")}
    assert modes == {"a": 0o711, "a/b": 0o555, "a/b/c": 0o500, "keep.txt": 0o600}
    assert os.readlink(root / "a/b/c/up") == "../../.."
    assert os.readlink(root / "a/abs") == "/etc/hostname"  # a target is data
    assert (root / "swap" / "inner").read_text() == "keep"
    entries, _ = client.manifest(str(root), hash=False)
    assert [entry["path"] for entry in entries] == [
        "a",
        "a/abs",
        "a/b",
        "a/b/c",
        "a/b/c/up",
        "keep.txt",
        "swap",
        "swap/inner",
    ]


def test_apply_tree_replaces_symlinks_and_refuses_escapes(client: AgentClient, root: Path) -> None:
    (root / "l").symlink_to("one")
    client.apply_tree(str(root), symlinks=[{"path": "l", "target": "two"}])
    assert os.readlink(root / "l") == "two"
    (root / "out").symlink_to(root.parent)
    _refused("outside_root", client.apply_tree, str(root), dirs=[{"path": "out/x", "mode": 0o755}])
    _refused(
        "outside_root", client.apply_tree, str(root), symlinks=[{"path": "../x", "target": "y"}]
    )
    _refused("invalid_argument", client.apply_tree, str(root), removes=["."])
    _refused("invalid_argument", client.apply_tree, str(root), chmods=[{"path": "l", "mode": -1}])
    (root / "d").mkdir()
    _refused("exists", client.apply_tree, str(root), symlinks=[{"path": "d", "target": "x"}])
    (root / "f").write_text("")
    _refused("exists", client.apply_tree, str(root), dirs=[{"path": "f", "mode": 0o755}])
    assert not (root.parent / "x").exists()


# --- archives ------------------------------------------------------------------------


def _archive(client: AgentClient, root: Path, path: str) -> tuple[bytes, dict[str, Any]]:
    with client.archive_stream(str(root), path, timeout_s=60) as call:
        data = b"".join(chunk for _stream, _offset, chunk in call)
        info = call.value or {}
    return data, info


def _snapshot(top: Path) -> dict[str, tuple[str, int, str, int]]:
    """Type, mode, content or target, and mtime (s) of every file, dir and link under top."""
    found = {}
    for path in sorted(top.rglob("*")):
        info = path.lstat()
        if path.is_symlink():
            found[str(path.relative_to(top))] = ("link", 0, os.readlink(path), 0)
        elif path.is_dir():
            found[str(path.relative_to(top))] = ("dir", info.st_mode & 0o7777, "", 0)
        elif path.is_file():
            data = hashlib.sha256(path.read_bytes()).hexdigest()
            found[str(path.relative_to(top))] = (
                "file",
                info.st_mode & 0o7777,
                data,
                info.st_mtime_ns // 10**9,
            )
    return found


def test_archive_round_trip_keeps_modes_links_and_mtimes(client: AgentClient, root: Path) -> None:
    _sample(root)
    (root / "escape").unlink()  # archive_put refuses links out of the root (tested below)
    (root / "src" / "big.bin").write_bytes(os.urandom(3 << 20))
    (root / "src" / "hard").hardlink_to(root / "src" / "main.py")
    (root / "src" / "main.py").chmod(0o4750)
    os.utime(root / "run.sh", ns=(0, 1_600_000_000_000_000_000))
    data, info = _archive(client, root, ".")
    assert info["skipped"] == 1 and info["hardlinks"] == 1  # the fifo; the hard link
    assert info["bytes"] == len(data) and info["type"] == "dir"
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
    assert "pipe" not in names and all(not name.startswith(("/", "..")) for name in names)
    result = client.archive_put(
        str(root),
        "restored",
        [data[i : i + 70000] for i in range(0, len(data), 70000)],
        1 << 30,
        1000,
    )
    assert result["created"] and result["dest"] == "restored"
    assert (result["files"], result["symlinks"], result["hardlinks"]) == (3, 1, 1)
    restored = root / "restored"
    original = {k: v for k, v in _snapshot(root).items() if not k.startswith("restored")}
    assert _snapshot(restored) == original
    assert restored.stat().st_mode & 0o7777 == 0o755
    assert (restored / "src" / "hard").stat().st_ino == (restored / "src" / "main.py").stat().st_ino
    assert not [p for p in root.iterdir() if p.name.startswith(".pyro-")]


def test_archive_of_a_single_file(client: AgentClient, root: Path) -> None:
    (root / "note.txt").write_text("hello")
    data, info = _archive(client, root, "note.txt")
    assert info["type"] == "file" and info["files"] == 1
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["note.txt"]
    _refused("outside_root", _archive, client, root, "../")
    _refused("not_found", _archive, client, root, "missing")


WriteMode = Literal["w", "w:gz", "w:bz2", "w:xz"]


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]], mode: WriteMode = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for member, content in members:
            tar.addfile(member, io.BytesIO(content) if content is not None else None)
    return buffer.getvalue()


def _file(name: str, content: bytes = b"data") -> tuple[tarfile.TarInfo, bytes]:
    member = tarfile.TarInfo(name)
    member.size = len(content)
    return member, content


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.linkname = linkname
    return member, None


def test_archive_put_merges_and_accepts_compressed_tars(client: AgentClient, root: Path) -> None:
    dest = root / "dest"
    (dest / "sub").mkdir(parents=True)
    (dest / "sub" / "old.txt").write_text("old")
    (dest / "same.txt").write_text("before")
    modes: tuple[WriteMode, ...] = ("w:gz", "w:bz2", "w:xz")
    for index, mode in enumerate(modes):
        data = _tar([_file("same.txt", b"after"), _file("sub/new.txt", b"new")], mode)
        result = client.archive_put(str(root), "dest", [data], 1 << 20, 100)
        assert result["compression"] == mode[2:] and not result["created"]
        assert result["replaced"] == (["same.txt"] if index == 0 else ["same.txt", "sub/new.txt"])
    assert (dest / "same.txt").read_text() == "after"
    assert (dest / "sub" / "old.txt").read_text() == "old"
    assert (dest / "sub" / "new.txt").read_text() == "new"
    assert sorted(p.name for p in dest.iterdir()) == ["same.txt", "sub"]
    conflict = _tar([_file("sub", b"a file where a directory is")])
    _refused("exists", client.archive_put, str(root), "dest", [conflict], 1 << 20, 100)
    assert (dest / "sub").is_dir()


def _tree_state(top: Path) -> dict[str, tuple[object, ...]]:
    """Every path under ``top`` (links not followed) with its type, mode, link count and
    content (a file's digest, a link's target): what any write would change."""
    state: dict[str, tuple[object, ...]] = {}
    for directory, dirs, files in os.walk(top):
        for name in dirs + files:
            path = Path(directory, name)
            info = path.lstat()
            if path.is_symlink():
                content: object = os.readlink(path)
            elif path.is_file():
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                content = None
            state[str(path.relative_to(top))] = (info.st_mode, info.st_nlink, content)
    return state


def _assert_refused_and_clean(
    client: AgentClient,
    root: Path,
    code: str,
    data: bytes,
    max_bytes: int = 1 << 30,
    max_entries: int = 1000,
) -> None:
    """archive_put of ``data`` into ``root``/in/dest is refused with ``code``, and nothing
    under the root's parent changed (nor was anything staged there left)."""
    before = _tree_state(root.parent)
    _refused(code, client.archive_put, str(root), "in/dest", [data], max_bytes, max_entries)
    assert _tree_state(root.parent) == before
    assert not (root / "in").exists()


def test_malicious_archives_are_refused_and_leave_nothing(client: AgentClient, root: Path) -> None:
    # What an escape would reach lies beside the root, where the check sees every change.
    outside = root.parent / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not yours\n")
    (root / "existing").mkdir()
    (root / "existing" / "kept.txt").write_bytes(b"kept\n")
    first = _file("ok.txt")
    cases: list[tuple[str, list[tuple[tarfile.TarInfo, bytes | None]]]] = [
        ("outside_root", [first, _file("../evil.txt")]),
        ("outside_root", [first, _file("../../../evil.txt")]),
        ("outside_root", [first, _file("a/../../../../outside/evil.txt")]),
        ("outside_root", [first, _file(f"{outside}/evil.txt")]),
        ("outside_root", [_special("out", tarfile.SYMTYPE, str(outside)), _file("out/evil.txt")]),
        ("outside_root", [first, _special("out", tarfile.SYMTYPE, str(outside))]),
        ("outside_root", [first, _special("up", tarfile.SYMTYPE, "../../../..")]),
        ("outside_root", [first, _special("h", tarfile.LNKTYPE, "../../../outside/secret")]),
        ("outside_root", [first, _special("h", tarfile.LNKTYPE, str(outside / "secret"))]),
        ("unsupported_member", [first, _special("dev", tarfile.CHRTYPE)]),
        ("unsupported_member", [first, _special("blk", tarfile.BLKTYPE)]),
        ("unsupported_member", [first, _special("fifo", tarfile.FIFOTYPE)]),
        ("invalid_archive", [first, _special("h", tarfile.LNKTYPE, "not-in-archive")]),
    ]
    for code, members in cases:
        _assert_refused_and_clean(client, root, code, _tar(members))
    _assert_refused_and_clean(client, root, "invalid_archive", b"not a tar at all" * 100)
    _assert_refused_and_clean(client, root, "invalid_archive", _tar([first])[:700])
    assert sorted(_tree_state(root.parent)) == [
        "outside",
        "outside/secret",
        "workspace",
        "workspace/existing",
        "workspace/existing/kept.txt",
    ]
    assert (outside / "secret").stat().st_nlink == 1


def test_symlink_chains_are_resolved_as_they_will_be(client: AgentClient, root: Path) -> None:
    # "b" points at the root; "a" goes up from there: lexically inside, really outside.
    sneaky = _tar(
        [
            _special("x/y/a", tarfile.SYMTYPE, "../b/../etc"),
            _special("x/b", tarfile.SYMTYPE, "/" + str(root).strip("/")),
        ]
    )
    _assert_refused_and_clean(client, root, "outside_root", sneaky)
    fine = _tar([_special("x/a", tarfile.SYMTYPE, "../b/c"), _special("b", tarfile.SYMTYPE, "d")])
    client.archive_put(str(root), "in/dest", [fine], 1 << 20, 10)
    assert os.readlink(root / "in/dest/x/a") == "../b/c"


def test_archive_bombs_stop_at_the_limits(client: AgentClient, root: Path) -> None:
    many = _tar([_file(f"f{index}", b"") for index in range(200)], "w:gz")
    _assert_refused_and_clean(client, root, "too_large", many, max_entries=100)
    zeros = io.BytesIO()
    with tarfile.open(fileobj=zeros, mode="w:gz") as tar:
        member = tarfile.TarInfo("zeros")
        member.size = 64 << 20
        tar.addfile(member, io.BytesIO(bytes(64 << 20)))
    assert len(zeros.getvalue()) < 1 << 20  # 64 MiB in well under 1 MiB
    _assert_refused_and_clean(client, root, "too_large", zeros.getvalue(), max_bytes=1 << 20)
    several = _tar([_file(f"f{index}", bytes(400 << 10)) for index in range(4)], "w:gz")
    _assert_refused_and_clean(client, root, "too_large", several, max_bytes=1 << 20)
    # A pax header claiming a gigantic size is refused before it is read into memory.
    header = tarfile.TarInfo("h")
    header.type = tarfile.XHDTYPE
    header.size = 1 << 30
    raw = header.tobuf(tarfile.USTAR_FORMAT) + bytes(64 << 20)
    _assert_refused_and_clean(client, root, "too_large", gzip.compress(raw, 1))


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar makes the sparse archive")
def test_a_sparse_file_bomb_is_refused(client: AgentClient, root: Path, tmp_path: Path) -> None:
    sparse = tmp_path / "src" / "sparse"
    sparse.parent.mkdir()
    with open(sparse, "wb") as handle:
        handle.truncate(8 << 30)
    archive = tmp_path / "sparse.tgz"
    subprocess.run(["tar", "-C", str(sparse.parent), "-cSzf", str(archive), "sparse"], check=True)
    data = archive.read_bytes()
    assert len(data) < 64 << 10
    _assert_refused_and_clean(client, root, "too_large", data, max_bytes=1 << 30)


def test_archive_put_into_the_root_and_bad_arguments(client: AgentClient, root: Path) -> None:
    result = client.archive_put(str(root), str(root), [_tar([_file("top.txt")])], 1 << 20, 10)
    assert result["dest"] == "" and (root / "top.txt").read_bytes() == b"data"
    (root / "out").symlink_to(root.parent)
    _refused("outside_root", client.archive_put, str(root), "out/x", [b""], 1 << 20, 10)
    _refused("not_a_directory", client.archive_put, str(root), "top.txt", [b""], 1 << 20, 10)
    _refused("invalid_argument", client.archive_put, str(root), "d", [b""], -1, 10)
    client.ping()  # late input frames of refused calls are dropped quietly


# --- several channels to one VM ------------------------------------------------------


def test_connections_of_one_vm_share_the_digest_cache(root: Path) -> None:
    ops_tree.clear_digest_cache()
    for index in range(30):
        (root / f"f{index}").write_bytes(b"z" * (index + 1))  # empty files are never read
    time.sleep(SETTLE_S)
    one, two = InProcessAgent(), InProcessAgent()
    try:
        first, counts_one = one.client.manifest(str(root))
        second, counts_two = two.client.manifest(str(root))
    finally:
        one.close()
        two.close()
    assert counts_one["hashed"] == 30 and counts_two["cached"] == 30 and first == second


def test_every_pyro_agent_port_is_found(tmp_path: Path) -> None:
    from pyro_mcp.guest_agent import agent as agent_module

    names = {"vport0p1": "pyro.agent.0", "vport0p2": "pyro.agent.1", "vport0p3": "pyro.agent"}
    names |= {"vport0p4": "org.qemu.guest_agent.0", "vport0p5": "pyro.agentx", "vport0p6": ""}
    for entry, name in names.items():
        (tmp_path / entry).mkdir()
        (tmp_path / entry / "name").write_text(name + "\n")
    (tmp_path / "vport0p7").mkdir()  # its name is not known yet
    assert agent_module._virtio_ports("pyro.agent", str(tmp_path)) == {
        "pyro.agent.0": "/dev/vport0p1",
        "pyro.agent.1": "/dev/vport0p2",
        "pyro.agent": "/dev/vport0p3",
    }


def test_each_port_gets_its_own_server_and_the_restart_notice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pyro_mcp.guest_agent import agent as agent_module

    scans = [
        {"pyro.agent.0": "/dev/vport0p1"},
        {"pyro.agent.0": "/dev/vport0p1", "pyro.agent.1": "/dev/vport0p2"},
    ]
    late = {**scans[1], "pyro.agent.2": "/dev/vport0p3"}
    served: list[tuple[str, bool]] = []
    all_served = threading.Event()

    def serve_port(path: str, restarted: bool) -> None:
        served.append((path, restarted))
        if len(served) == 3:
            all_served.set()

    monkeypatch.setenv("PYRO_RESTARTS", "1")
    monkeypatch.setattr(agent_module, "PORT_SCAN_S", 0.2)
    monkeypatch.setattr(
        agent_module, "_virtio_ports", lambda _name: scans.pop(0) if scans else late
    )
    monkeypatch.setattr(agent_module, "_serve_port", serve_port)
    threading.Thread(target=agent_module.serve_virtio_serial, daemon=True).start()
    assert all_served.wait(timeout=10)
    time.sleep(0.5)  # the scan is over: the thread only waits now, patches can go
    assert sorted(served) == [
        ("/dev/vport0p1", True),
        ("/dev/vport0p2", True),
        ("/dev/vport0p3", True),
    ]


@pytest.mark.parametrize(
    "item",
    [
        {
            "path": "a/b.txt",
            "type": "file",
            "mode": 420,
            "size": 3,
            "mtime_ns": 1,
            "sha256": "0" * 64,
        },
        {"path": 'q"uo\\te\n', "type": "dir", "mode": 493, "size": 0, "mtime_ns": -5},
        {
            "path": "caf\udce9",
            "type": "symlink",
            "mode": 511,
            "size": 4,
            "mtime_ns": 0,
            "target": "é/x",
        },
        {"path": "null", "type": "chardev", "mode": 384, "size": 0, "mtime_ns": 7, "rdev": [1, 3]},
    ],
)
def test_a_manifest_line_is_exactly_what_json_would_write(item: dict[str, Any]) -> None:
    line = ops_tree.entry_line(item)
    assert line == json.dumps(item, separators=(",", ":")).encode() + b"\n"
    assert json.loads(line) == item  # names that are not UTF-8 come back as they were
