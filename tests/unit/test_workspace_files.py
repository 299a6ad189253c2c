"""Workspace files on the host: manifests, blobs, diffs, patches, seeds, exports, disks.

Archives are real tar files built here (hostile ones included), disks are real ext4 images
made by mke2fs and read back with debugfs, and rendered diffs are checked with git apply.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from pyro_mcp.errors import (
    Conflict,
    InvalidArgument,
    NotFound,
    OutsideRoot,
    PyroError,
    TooLarge,
)
from pyro_mcp.runtime.digests import sha256_bytes, sha256_file
from pyro_mcp.runtime.host_tools import find_program
from pyro_mcp.storage import disk_create, disk_export, workspace_disk
from pyro_mcp.workspace import exporting, seeds
from pyro_mcp.workspace.blobs import BlobStore
from pyro_mcp.workspace.diffing import render_diff
from pyro_mcp.workspace.manifest import (
    DEFAULT_MAX_ENTRIES,
    Entry,
    compare,
    manifest_of_directory,
    validate_manifest,
)
from pyro_mcp.workspace.patching import PatchError, parse_patch, plan_patch

needs_e2fsprogs = pytest.mark.skipif(
    find_program("mke2fs") is None or find_program("debugfs") is None,
    reason="needs e2fsprogs (mke2fs, debugfs)",
)
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

SHA_A = "a" * 64
SHA_B = "b" * 64


# --- helpers ----------------------------------------------------------------------------


def tar_bytes(members: Sequence[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w") -> bytes:
    """An archive holding exactly ``members`` (names and types as given, unchecked)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode, format=tarfile.PAX_FORMAT) as archive:  # type: ignore[call-overload]
        for info, data in members:
            if data is not None:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                archive.addfile(info)
    return buffer.getvalue()


def member(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    *,
    linkname: str = "",
    mode: int = 0o644,
    mtime: int = 1_700_000_000,
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = mode
    info.mtime = mtime
    return info


def file_member(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, mode=mode), data


def dir_member(name: str, mode: int = 0o755) -> tuple[tarfile.TarInfo, None]:
    return member(name, tarfile.DIRTYPE, mode=mode), None


def link_member(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    return member(name, tarfile.SYMTYPE, linkname=target, mode=0o777), None


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def read_tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def chunks_of(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


def entry_file(path: str, data: bytes, mode: int = 0o644) -> Entry:
    return Entry(path, "file", mode, len(data), 0, sha256_bytes(data))


# --- manifests --------------------------------------------------------------------------


def test_an_entry_round_trips_through_its_wire_form() -> None:
    entries = [
        Entry("a.txt", "file", 0o644, 3, 5, SHA_A),
        Entry("d", "dir", 0o755, 0, 6),
        Entry("d/l", "symlink", 0o777, 5, 7, target="../a.txt"),
    ]
    wire = [e.to_dict() for e in entries]
    assert "target" not in wire[0] and "sha256" not in wire[1]
    assert validate_manifest(wire) == entries
    assert validate_manifest(list(reversed(wire))) == entries  # sorted by path


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/etc/passwd", OutsideRoot),
        ("../outside", OutsideRoot),
        ("a/../../b", OutsideRoot),
        ("a//b", InvalidArgument),
        ("./a", InvalidArgument),
        ("a/", InvalidArgument),
        ("", InvalidArgument),
        ("a\x00b", InvalidArgument),
        ("bad\ud800", InvalidArgument),  # a surrogate that stands for no byte
        ("x" * 256, InvalidArgument),
    ],
)
def test_a_guest_manifest_with_a_bad_path_is_refused(path: str, error: type[PyroError]) -> None:
    with pytest.raises(error):
        validate_manifest([{"path": path, "type": "dir", "mode": 0o755}])


@pytest.mark.parametrize(
    ("entries", "words"),
    [
        ([{"path": "a", "type": "other", "mode": 0}], "type must be one of"),
        ([{"path": "a", "type": "chardev", "mode": 0}], "rdev"),
        ([{"path": "a", "type": "fifo", "mode": 0, "rdev": [1, 3]}], "only devices"),
        ([{"path": "a", "type": "file", "mode": 0o644}], "sha256"),
        ([{"path": "a", "type": "file", "mode": 0o644, "sha256": "XYZ"}], "sha256"),
        ([{"path": "a", "type": "symlink", "mode": 0o777}], "target"),
        ([{"path": "a", "type": "dir", "mode": 0o755, "target": "x"}], "only symlinks"),
        ([{"path": "a", "type": "dir", "mode": 0o755, "owner": 0}], "unknown fields"),
        ([{"path": "a", "type": "dir", "mode": 0o70000}], "mode"),
        ([{"path": "a", "type": "dir", "mode": True}], "mode"),
        ([{"path": "a", "type": "dir", "mode": 0o755, "size": -1}], "size"),
        (
            [{"path": "a", "type": "dir", "mode": 0o755}, {"path": "a", "type": "dir", "mode": 0}],
            "twice",
        ),
        (
            [
                {"path": "a", "type": "file", "mode": 0o644, "sha256": SHA_A},
                {"path": "a/b", "type": "dir", "mode": 0o755},
            ],
            "below 'a', which is a file",
        ),
        ("not a list", "must be a list"),
    ],
)
def test_a_malformed_guest_manifest_is_refused_with_the_reason(entries: object, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        validate_manifest(entries)


def test_a_manifest_longer_than_the_limit_is_too_large() -> None:
    entries = [{"path": f"f{i}", "type": "dir", "mode": 0o755} for i in range(11)]
    with pytest.raises(TooLarge):
        validate_manifest(entries, max_entries=10)


def test_the_manifest_of_a_host_directory_does_not_follow_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write_tree(outside, {"secret": b"s"})
    root = tmp_path / "root"
    write_tree(root, {"a.txt": b"hello\n", "sub/b": b"b"})
    (root / "sub" / "b").chmod(0o600)
    os.symlink(str(outside), root / "out")
    entries = manifest_of_directory(root)
    assert [(e.path, e.type) for e in entries] == [
        ("a.txt", "file"),
        ("out", "symlink"),
        ("sub", "dir"),
        ("sub/b", "file"),
    ]
    by_path = {e.path: e for e in entries}
    assert by_path["a.txt"].sha256 == sha256_bytes(b"hello\n")
    assert by_path["a.txt"].size == 6
    assert by_path["sub/b"].mode == 0o600
    assert by_path["out"].target == str(outside)
    assert by_path["sub"].mtime_ns == (root / "sub").stat().st_mtime_ns


def test_compare_sorts_changes_into_added_modified_deleted_and_type_changed() -> None:
    before = [
        entry_file("same.txt", b"x"),
        Entry("same-but-touched", "file", 0o644, 1, 1, SHA_A),
        entry_file("content.txt", b"old"),
        entry_file("mode.sh", b"#!", 0o644),
        Entry("link", "symlink", 0o777, 1, 0, target="a"),
        entry_file("gone.txt", b"bye"),
        entry_file("becomes-dir", b"f"),
        Entry("dir", "dir", 0o755, 4096, 1),
    ]
    after = [
        entry_file("same.txt", b"x"),
        Entry("same-but-touched", "file", 0o644, 1, 999, SHA_A),
        entry_file("content.txt", b"new"),
        entry_file("mode.sh", b"#!", 0o755),
        Entry("link", "symlink", 0o777, 1, 0, target="b"),
        Entry("becomes-dir", "dir", 0o755, 0, 0),
        Entry("dir", "dir", 0o755, 8192, 2),
        entry_file("new.txt", b"hi"),
    ]
    changes = compare(before, after)
    assert changes.added == ["new.txt"]
    assert changes.modified == ["content.txt", "link", "mode.sh"]
    assert changes.deleted == ["gone.txt"]
    assert changes.type_changed == ["becomes-dir"]
    assert changes.counts() == {"added": 1, "modified": 3, "deleted": 1, "type_changed": 1}
    assert changes.total == 6
    mode = next(c for c in changes.items() if c.path == "mode.sh")
    assert mode.mode_changed and not mode.content_changed
    assert changes.before["gone.txt"].sha256 == sha256_bytes(b"bye")
    assert "gone.txt" not in changes.after
    assert compare(after, after).total == 0


# --- blobs ------------------------------------------------------------------------------


def test_blobs_are_stored_once_under_their_digest_and_read_back(
    store: BlobStore, tmp_path: Path
) -> None:
    data = b"some content\n" * 1000
    sha = store.put_bytes(data)
    assert sha == sha256_bytes(data)
    assert store.put_bytes(data) == sha
    source = tmp_path / "file"
    source.write_bytes(data)
    assert store.put_file(source) == sha256_file(source) == sha
    assert list(store) == [sha]
    assert store.has(sha) and store.size(sha) == len(data)
    assert store.get_bytes(sha) == data
    with store.open(sha) as handle:
        assert handle.read(4) == b"some"
    assert store.path(sha) == tmp_path / "blobs" / sha[:2] / sha
    assert not os.access(store.path(sha), os.W_OK) or os.geteuid() == 0
    assert stat.S_IMODE(store.path(sha).stat().st_mode) == 0o444
    assert store.put_bytes(b"") == sha256_bytes(b"")
    assert store.get_bytes(sha256_bytes(b"")) == b""


def test_a_missing_blob_is_not_found_and_a_bad_digest_is_refused(store: BlobStore) -> None:
    with pytest.raises(NotFound, match=SHA_A):
        store.get_bytes(SHA_A)
    with pytest.raises(NotFound):
        store.size(SHA_A)
    assert not store.has(SHA_A)
    for bad in ("abc", "A" * 64, "../" + "a" * 61, "g" * 64):
        with pytest.raises(InvalidArgument):
            store.path(bad)


def test_a_failed_write_leaves_neither_a_blob_nor_a_temporary_file(store: BlobStore) -> None:
    with pytest.raises(TooLarge):
        store.put_stream([b"x" * 600, b"x" * 600], max_bytes=1000)

    def broken() -> Iterator[bytes]:
        yield b"partial"
        raise OSError("the guest went away")

    with pytest.raises(OSError, match="went away"):
        store.put_stream(broken())
    assert list(store) == []
    assert list(store.tmp_dir.iterdir()) == []


def test_zero_runs_are_stored_as_holes(store: BlobStore) -> None:
    size = 32 << 20
    sha = store.put_stream(chunks_of(bytes(size - 1) + b"!", 1 << 20))
    assert store.size(sha) == size
    assert store.path(sha).stat().st_blocks * 512 <= 2 << 20  # the last chunk only
    with store.open(sha) as handle:
        handle.seek(size - 1)
        assert handle.read() == b"!"


def test_manifests_are_canonical_json_blobs(store: BlobStore) -> None:
    entries = [entry_file("b", b"2"), Entry("a", "dir", 0o755, 0, 1), entry_file("a/x", b"1")]
    sha = store.put_manifest(entries)
    assert store.put_manifest(list(reversed(entries))) == sha
    assert store.put_manifest([e.to_dict() for e in entries]) == sha
    assert store.get_manifest(sha) == [entries[1], entries[2], entries[0]]  # tree order
    lines = store.get_bytes(sha).decode().splitlines()
    assert lines[0] == '{"format":"pyro-manifest/2"}'
    assert lines[1] == '{"mode":493,"mtime_ns":1,"path":"a","size":0,"type":"dir"}'
    assert len(lines) == 4 and " " not in "".join(lines)
    with pytest.raises(InvalidArgument, match="not a"):
        store.get_manifest(store.put_bytes(b'{"entries": []}'))
    with pytest.raises(InvalidArgument, match="out of tree order"):
        store.get_manifest(
            store.put_bytes(
                b"".join(
                    [
                        lines[0].encode() + b"\n",
                        *(line.encode() + b"\n" for line in (lines[1], lines[3], lines[2])),
                    ]
                )
            )
        )
    with pytest.raises(InvalidArgument, match="not JSON"):
        store.get_manifest(store.put_bytes(b"\x00binary"))
    with pytest.raises(OutsideRoot):
        store.put_manifest([{"path": "../x", "type": "dir", "mode": 0}])


def test_gc_keeps_what_is_asked_and_reports_what_it_freed(store: BlobStore) -> None:
    keep = store.put_bytes(b"keep me")
    drop = [store.put_bytes(b"drop %d" % i) for i in range(3)]
    store.tmp_dir.mkdir(parents=True, exist_ok=True)
    stale = store.tmp_dir / "blob-stale"
    stale.write_bytes(b"half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh = store.tmp_dir / "blob-fresh"
    fresh.write_bytes(b"being written")
    removed, freed = store.gc({keep})
    assert (removed, freed) == (3, sum(len(b"drop %d" % i) for i in range(3)))
    assert list(store) == [keep]
    assert not any(store.has(sha) for sha in drop)
    assert not stale.exists() and fresh.exists()
    assert store.gc({keep}) == (0, 0)


# --- diffs ------------------------------------------------------------------------------


class Trees:
    """Two in-memory trees and the readers render_diff takes, counting what is read."""

    def __init__(self, before: dict[str, bytes], after: dict[str, bytes]) -> None:
        self.blobs = {sha256_bytes(d): d for d in before.values()}
        self.after = after
        self.read_before: list[str] = []
        self.read_after: list[str] = []
        self.before_entries = [entry_file(p, d) for p, d in before.items()]
        self.after_entries = [entry_file(p, d) for p, d in after.items()]

    def get_before(self, sha: str) -> bytes:
        self.read_before.append(sha)
        return self.blobs[sha]

    def get_after(self, path: str) -> bytes:
        self.read_after.append(path)
        return self.after[path]

    def render(self, **limits: int) -> dict[str, Any]:
        changes = compare(self.before_entries, self.after_entries)
        return render_diff(changes, self.get_before, self.get_after, **limits)


def test_a_diff_has_git_style_headers_for_every_kind_of_change() -> None:
    lines = b"".join(b"line %d\n" % i for i in range(1, 11))
    trees = Trees(
        {"keep.txt": lines, "gone.txt": b"bye\n", "mode.sh": b"#!/bin/sh\n"},
        {
            "keep.txt": lines.replace(b"line 5\n", b"line five\n"),
            "new.txt": b"hello",
            "mode.sh": b"#!/bin/sh\n",
        },
    )
    trees.after_entries = [
        e if e.path != "mode.sh" else Entry("mode.sh", "file", 0o755, e.size, 0, e.sha256)
        for e in trees.after_entries
    ]
    result = trees.render()
    assert result["summary"] == {"added": 1, "modified": 2, "deleted": 1, "type_changed": 0}
    assert result["truncated"] is False
    assert result["patch"] == (
        "diff --git a/gone.txt b/gone.txt\n"
        "deleted file mode 100644\n"
        "--- a/gone.txt\n"
        "+++ /dev/null\n"
        "@@ -1 +0,0 @@\n"
        "-bye\n"
        "diff --git a/keep.txt b/keep.txt\n"
        "--- a/keep.txt\n"
        "+++ b/keep.txt\n"
        "@@ -2,7 +2,7 @@\n"
        " line 2\n line 3\n line 4\n-line 5\n+line five\n line 6\n line 7\n line 8\n"
        "diff --git a/mode.sh b/mode.sh\n"
        "old mode 100644\n"
        "new mode 100755\n"
        "diff --git a/new.txt b/new.txt\n"
        "new file mode 100644\n"
        "--- /dev/null\n"
        "+++ b/new.txt\n"
        "@@ -0,0 +1 @@\n"
        "+hello\n"
        "\\ No newline at end of file\n"
    )
    files = {f["path"]: f for f in result["files"]}
    assert files["mode.sh"]["mode_change"] == {"old": "100644", "new": "100755"}
    assert files["new.txt"]["status"] == "added" and files["new.txt"]["binary"] is False
    assert "".join(f["patch"] for f in result["files"] if f["patch"]) == result["patch"]
    # Only changed content is read, and mode-only changes read nothing.
    assert sorted(trees.read_after) == ["keep.txt", "new.txt"]
    assert len(trees.read_before) == 2


def test_binary_files_are_reported_not_diffed() -> None:
    trees = Trees(
        {"img.png": b"\x89PNG\x00\x01", "latin1.txt": "caf\xe9\n".encode("latin-1")},
        {"img.png": b"\x89PNG\x00\x02", "latin1.txt": "caf\xe8\n".encode("latin-1")},
    )
    result = trees.render()
    assert result["patch"] == (
        "diff --git a/img.png b/img.png\n"
        "Binary files a/img.png and b/img.png differ\n"
        "diff --git a/latin1.txt b/latin1.txt\n"
        "Binary files a/latin1.txt and b/latin1.txt differ\n"
    )
    assert all(f["binary"] for f in result["files"])
    added = Trees({}, {"blob.bin": b"\x00" * 10}).render()
    assert "Binary files /dev/null and b/blob.bin differ\n" in str(added["patch"])


def test_a_type_change_is_shown_as_a_deletion_then_an_addition() -> None:
    before = [entry_file("x", b"was a file\n")]
    after = [Entry("x", "symlink", 0o777, 6, 0, target="target")]
    changes = compare(before, after)
    blobs = {sha256_bytes(b"was a file\n"): b"was a file\n"}
    result = render_diff(changes, blobs.__getitem__, lambda p: pytest.fail(f"read {p}"))
    assert result["patch"] == (
        "diff --git a/x b/x\n"
        "deleted file mode 100644\n"
        "--- a/x\n+++ /dev/null\n@@ -1 +0,0 @@\n-was a file\n"
        "diff --git a/x b/x\n"
        "new file mode 120000\n"
        "--- /dev/null\n+++ b/x\n@@ -0,0 +1 @@\n+target\n\\ No newline at end of file\n"
    )
    assert result["summary"]["type_changed"] == 1


def test_directories_are_listed_without_a_patch() -> None:
    changes = compare([], [Entry("newdir", "dir", 0o755, 0, 0)])
    result = render_diff(changes, lambda s: b"", lambda p: b"")
    assert result["files"] == [
        {
            "path": "newdir",
            "status": "added",
            "type": "dir",
            "binary": False,
            "patch": None,
            "mode_change": None,
            "truncated": False,
        }
    ]
    assert result["patch"] == ""


def test_patch_caps_keep_whole_hunks_and_say_what_was_cut() -> None:
    old = b"".join(b"line %03d\n" % i for i in range(200))
    new = old.replace(b"line 010\n", b"ten\n").replace(b"line 150\n", b"one-fifty\n")
    trees = Trees({"a.txt": old, "b.txt": old}, {"a.txt": new, "b.txt": new})
    full = trees.render()
    assert full["truncated"] is False
    a_patch = full["files"][0]["patch"]
    first_hunk_end = a_patch.index("@@ -148")
    capped = trees.render(max_file_patch_bytes=first_hunk_end + 10)
    a_file = capped["files"][0]
    assert a_file["truncated"] is True and capped["truncated"] is True
    assert a_file["patch"] == a_patch[:first_hunk_end]
    total_cap = trees.render(max_total_patch_bytes=len(a_patch) + 20)
    assert total_cap["files"][0]["truncated"] is False
    assert total_cap["files"][1]["patch"] is None
    assert total_cap["files"][1]["truncated"] is True
    assert total_cap["patch"] == a_patch
    # What is kept still applies: the first hunk alone.
    plan = plan_patch(str(a_file["patch"]), {"a.txt": old}.get)
    assert plan.writes["a.txt"] == old.replace(b"line 010\n", b"ten\n")
    big = Trees({"big": b"x\n" * 100}, {"big": b"y\n" * 100})
    too_big = big.render(max_read_bytes=50)
    assert too_big["files"][0]["truncated"] is True
    assert big.read_after == [] and big.read_before == []


def test_a_rendered_diff_applies_with_plan_patch_and_git_apply(tmp_path: Path) -> None:
    before = {
        "README.md": b"# Title\n\nSome text.\n",
        "src/main.py": b"".join(b"x = %d\n" % i for i in range(30)),
        "src/old.py": b"print('old')\n",
        "no-eol.txt": b"first\nlast",
    }
    after = {
        "README.md": b"# New title\n\nSome text.\nMore.\n",
        "src/main.py": b"".join(b"x = %d\n" % (i * (i != 3)) for i in range(30)) + b"y = 1\n",
        "src/new.py": b"print('new')\n",
        "no-eol.txt": b"first\nlast line",
    }
    trees = Trees(before, after)
    patch = str(trees.render()["patch"])
    plan = plan_patch(patch, before.get)
    assert plan.writes == {k: v for k, v in after.items()}
    assert plan.deletes == ["src/old.py"]
    if shutil.which("git") is None:
        return
    repo = tmp_path / "repo"
    write_tree(repo, before)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (tmp_path / "change.patch").write_text(patch)
    subprocess.run(["git", "apply", str(tmp_path / "change.patch")], cwd=repo, check=True)
    shutil.rmtree(repo / ".git")
    assert read_tree(repo) == after


def test_paths_with_quotes_and_line_ends_are_quoted_and_parse_back() -> None:
    name = 'we"ird\tname\n.txt'
    trees = Trees({name: b"a\n"}, {name: b"b\n"})
    patch = str(trees.render()["patch"])
    assert patch.startswith('diff --git "a/we\\"ird\\tname\\n.txt" "b/we\\"ird\\tname\\n.txt"\n')
    assert plan_patch(patch, {name: b"a\n"}.get).writes == {name: b"b\n"}


# --- patches ----------------------------------------------------------------------------


GIT_PATCH = """From 1234 Mon Sep 17 00:00:00 2001
Subject: [PATCH] a commit message is skipped

diff --git a/src/app.py b/src/app.py
index 83db48f..bf269f4 100644
--- a/src/app.py
+++ b/src/app.py
@@ -1,4 +1,4 @@
 import os
-print("hello")
+print("hello, world")
 x = 1
 def main():
diff --git a/docs/new.md b/docs/new.md
new file mode 100644
index 0000000..e69de29
--- /dev/null
+++ b/docs/new.md
@@ -0,0 +1,2 @@
+# New
+page
diff --git a/old.txt b/old.txt
deleted file mode 100644
--- a/old.txt
+++ /dev/null
@@ -1,2 +0,0 @@
-one
-two
"""


def test_a_git_patch_modifies_creates_and_deletes_files_in_memory() -> None:
    files = {
        "src/app.py": b'import os\nprint("hello")\nx = 1\ndef main():\n    pass\n',
        "old.txt": b"one\ntwo\n",
    }
    reads: list[str] = []

    def read(path: str) -> bytes | None:
        reads.append(path)
        return files.get(path)

    plan = plan_patch(GIT_PATCH, read)
    assert plan.writes == {
        "src/app.py": b'import os\nprint("hello, world")\nx = 1\ndef main():\n    pass\n',
        "docs/new.md": b"# New\npage\n",
    }
    assert plan.deletes == ["old.txt"]
    assert plan.created == ["docs/new.md"] and plan.modified == ["src/app.py"]
    assert plan.modes == {"docs/new.md": 0o644}
    assert plan.summary() == {
        "files": 3,
        "created": ["docs/new.md"],
        "modified": ["src/app.py"],
        "deleted": ["old.txt"],
        "hunks": 3,
    }
    assert sorted(reads) == ["docs/new.md", "old.txt", "src/app.py"]  # once each


def test_a_hunk_is_found_at_an_offset_like_patch_does() -> None:
    body = b"".join(b"row %d\n" % i for i in range(1, 21))
    patch = (
        "--- a/t.txt\n+++ b/t.txt\n"
        "@@ -5,3 +5,3 @@\n row 5\n-row 6\n+ROW 6\n row 7\n"
        "@@ -15,3 +15,3 @@\n row 15\n-row 16\n+ROW 16\n row 17\n"
    )
    shifted = b"added 1\nadded 2\n" + body
    result = plan_patch(patch, {"t.txt": shifted}.get).writes["t.txt"]
    assert result == shifted.replace(b"row 6\n", b"ROW 6\n").replace(b"row 16\n", b"ROW 16\n")


def test_a_hunk_that_does_not_match_names_the_file_hunk_header_and_line() -> None:
    patch = (
        "--- a/t.txt\n+++ b/t.txt\n@@ -1,2 +1,2 @@\n a\n-b\n+B\n@@ -5,3 +5,3 @@\n e\n-f\n+F\n g\n"
    )
    content = b"a\nb\nc\nd\ne\nchanged\ng\n"
    with pytest.raises(PatchError) as caught:
        plan_patch(patch, {"t.txt": content}.get)
    error = caught.value
    assert isinstance(error, InvalidArgument)
    assert (error.path, error.hunk, error.header) == ("t.txt", 2, "@@ -5,3 +5,3 @@")
    assert "t.txt: hunk #2 @@ -5,3 +5,3 @@ does not apply" in error.message
    assert "expected 'f' at line 6, found 'changed'" in error.message
    assert error.to_dict()["hunk"] == "2"


def test_a_patch_applies_all_or_nothing() -> None:
    patch = (
        "--- a/one.txt\n+++ b/one.txt\n@@ -1 +1 @@\n-1\n+one\n"
        "--- a/two.txt\n+++ b/two.txt\n@@ -1 +1 @@\n-2\n+two\n"
    )
    with pytest.raises(PatchError, match=r"two\.txt: hunk #1"):
        plan_patch(patch, {"one.txt": b"1\n", "two.txt": b"not 2\n"}.get)


def test_no_newline_markers_are_honoured_both_ways() -> None:
    patch = "--- a/f\n+++ b/f\n@@ -1,2 +1,2 @@\n a\n-b\n\\ No newline at end of file\n+b\n"
    assert plan_patch(patch, {"f": b"a\nb"}.get).writes == {"f": b"a\nb\n"}
    with pytest.raises(PatchError, match="no newline at end"):
        plan_patch(patch, {"f": b"a\nb\n"}.get)
    back = "--- a/f\n+++ b/f\n@@ -1 +1 @@\n-b\n+b\n\\ No newline at end of file\n"
    assert plan_patch(back, {"f": b"b\n"}.get).writes == {"f": b"b"}


def test_plain_diff_output_with_timestamps_applies(tmp_path: Path) -> None:
    write_tree(tmp_path / "a", {"x.txt": b"1\n2\n3\n", "gone": b"bye\n"})
    write_tree(tmp_path / "b", {"x.txt": b"1\ntwo\n3\n", "sub/fresh": b"new\n"})
    result = subprocess.run(
        ["diff", "-ruN", "a", "b"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 1 and "\t" in result.stdout.splitlines()[1]
    plan = plan_patch(result.stdout, {"x.txt": b"1\n2\n3\n", "gone": b"bye\n"}.get)
    assert plan.writes == {"x.txt": b"1\ntwo\n3\n", "sub/fresh": b"new\n"}
    assert plan.deletes == ["gone"]


@needs_git
def test_real_git_diff_output_applies(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    before = {"a.py": b"".join(b"v%d\n" % i for i in range(40)), "b.txt": b"x", "c": b"bye\n"}
    write_tree(repo, before)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "base"], check=True)
    write_tree(repo, {"a.py": before["a.py"].replace(b"v3\n", b"three\n") + b"end\n"})
    write_tree(repo, {"b.txt": b"x\ny", "d/e f.txt": b"spaced\n"})
    (repo / "c").unlink()
    (repo / "a.py").chmod(0o755)
    subprocess.run([*git, "add", "-A"], check=True)
    patch = subprocess.run(
        [*git, "diff", "--cached"], capture_output=True, text=True, check=True
    ).stdout
    plan = plan_patch(patch, before.get)
    assert plan.writes["a.py"] == (repo / "a.py").read_bytes()
    assert plan.writes["b.txt"] == b"x\ny"
    assert plan.writes["d/e f.txt"] == b"spaced\n"
    assert plan.deletes == ["c"]
    assert plan.modes["a.py"] == 0o755


@pytest.mark.parametrize(
    "header",
    [
        "--- /etc/passwd\n+++ /etc/passwd\n",
        "--- a/../escape\n+++ b/../escape\n",
        "--- a/x/../../escape\n+++ b/x/../../escape\n",
        "diff --git a/../x b/../x\n--- a/../x\n+++ b/../x\n",
    ],
)
def test_patch_paths_are_confined(header: str) -> None:
    with pytest.raises(OutsideRoot):
        plan_patch(header + "@@ -1 +1 @@\n-a\n+b\n", lambda p: b"a\n")


def test_prefixes_are_stripped_and_renames_are_followed() -> None:
    assert parse_patch("--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n")[0].path == "x"
    assert parse_patch("--- x\n+++ x\n@@ -1 +1 @@\n-a\n+b\n")[0].path == "x"
    rename = (
        "diff --git a/old name.txt b/new name.txt\n"
        "similarity index 80%\n"
        "rename from old name.txt\n"
        "rename to new name.txt\n"
        "--- a/old name.txt\n+++ b/new name.txt\n"
        "@@ -1,2 +1,2 @@\n keep\n-a\n+b\n"
    )
    plan = plan_patch(rename, {"old name.txt": b"keep\na\n"}.get)
    assert plan.writes == {"new name.txt": b"keep\nb\n"}
    assert plan.deletes == ["old name.txt"]


@pytest.mark.parametrize(
    ("patch", "files", "words"),
    [
        ("just some text\n", {}, "no file changes"),
        ("--- a/x\n+++ b/x\n@@ -1,3 +1,3 @@\n a\n-b\n", {"x": b"a\nb\n"}, "ends before"),
        ("--- a/x\n+++ b/x\n@@ -1 +1 @@\n?odd\n", {"x": b"a\n"}, "not context"),
        ("--- /dev/null\n+++ b/x\n@@ -0,0 +1 @@\n+a\n", {"x": b"here"}, "already exists"),
        ("--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n", {}, "does not exist"),
        ("--- a/x\n+++ /dev/null\n@@ -1 +0,0 @@\n-a\n", {"x": b"a\nmore\n"}, "does not remove"),
        (
            "diff --git a/i.png b/i.png\nindex 1..2 100644\n"
            "Binary files a/i.png and b/i.png differ\n",
            {"i.png": b"\x00"},
            "binary",
        ),
        (
            "diff --git a/l b/l\nnew file mode 120000\n--- /dev/null\n+++ b/l\n@@ -0,0 +1 @@\n+t\n",
            {},
            "symlink",
        ),
    ],
)
def test_a_patch_that_cannot_apply_says_why(
    patch: str, files: dict[str, bytes], words: str
) -> None:
    with pytest.raises(PatchError, match=words):
        plan_patch(patch, files.get)


def test_an_oversized_patch_is_refused() -> None:
    with pytest.raises(TooLarge):
        plan_patch("--- a/x\n+++ b/x\n" + "x" * 2000, lambda p: None, max_patch_bytes=1000)


def test_a_git_mode_change_and_an_empty_new_file_need_no_hunks() -> None:
    patch = (
        "diff --git a/run.sh b/run.sh\nold mode 100644\nnew mode 100755\n"
        "diff --git a/empty b/empty\nnew file mode 100600\nindex 0000000..e69de29\n"
    )
    plan = plan_patch(patch, {"run.sh": b"#!/bin/sh\n"}.get)
    assert plan.writes == {"run.sh": b"#!/bin/sh\n", "empty": b""}
    assert plan.modes == {"run.sh": 0o755, "empty": 0o600}


# --- seeds ------------------------------------------------------------------------------


def test_a_directory_seed_is_staged_with_its_modes_mtimes_and_blobs(
    tmp_path: Path, store: BlobStore
) -> None:
    source = tmp_path / "project"
    write_tree(source, {"README": b"hi\n", "bin/run": b"#!/bin/sh\n", "empty/.keep": b""})
    (source / "bin" / "run").chmod(0o750)
    (source / "bin").chmod(0o700)
    os.symlink("../README", source / "bin" / "readme-link")
    os.utime(source / "README", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    staging = tmp_path / "staging"
    entries = seeds.ingest_seed(source, staging, store)
    assert entries == manifest_of_directory(source)
    assert read_tree(staging) == read_tree(source)
    assert stat.S_IMODE(staging.stat().st_mode) == 0o700
    assert stat.S_IMODE((staging / "bin").stat().st_mode) == 0o700
    assert stat.S_IMODE((staging / "bin" / "run").stat().st_mode) == 0o750
    assert (staging / "README").stat().st_mtime_ns == 1_600_000_000_123_456_789
    assert os.readlink(staging / "bin" / "readme-link") == "../README"
    for entry in entries:
        if entry.type == "file":
            assert store.get_bytes(entry.sha256 or "") == (source / entry.path).read_bytes()


@pytest.mark.parametrize(
    ("suffix", "mode"),
    [
        (".tar", "w"),
        (".tar.gz", "w:gz"),
        (".tgz", "w:gz"),
        (".tar.bz2", "w:bz2"),
        (".tar.xz", "w:xz"),
    ],
)
def test_tar_seeds_in_every_compression_are_ingested(
    tmp_path: Path, store: BlobStore, suffix: str, mode: str
) -> None:
    archive = tmp_path / f"seed{suffix}"
    archive.write_bytes(
        tar_bytes(
            [
                dir_member("./"),
                file_member("./src/main.py", b"print(1)\n", 0o755),
                dir_member("./src/", 0o750),
                link_member("./src/alias.py", "main.py"),
                (member("./src/hard.py", tarfile.LNKTYPE, linkname="./src/main.py"), None),
                file_member("data/zeros.bin", bytes(3 << 20)),
            ],
            mode,
        )
    )
    staging = tmp_path / "staging"
    entries = seeds.ingest_seed(archive, staging, store)
    by_path = {e.path: e for e in entries}
    assert sorted(by_path) == [
        "data",
        "data/zeros.bin",
        "src",
        "src/alias.py",
        "src/hard.py",
        "src/main.py",
    ]
    assert by_path["src"].mode == 0o750 and by_path["src/main.py"].mode == 0o755
    assert by_path["data"].mode == 0o755  # created implicitly
    assert by_path["src/hard.py"].sha256 == by_path["src/main.py"].sha256
    assert (staging / "src" / "hard.py").read_bytes() == b"print(1)\n"
    assert (staging / "src" / "main.py").stat().st_mtime_ns == 1_700_000_000 * 10**9
    assert os.readlink(staging / "src" / "alias.py") == "main.py"
    zeros = staging / "data" / "zeros.bin"
    assert zeros.stat().st_size == 3 << 20 and zeros.stat().st_blocks * 512 < 1 << 20
    assert store.size(by_path["data/zeros.bin"].sha256 or "") == 3 << 20


HOSTILE = [
    ("dotdot", [file_member("../evil", b"x")], OutsideRoot, "../evil"),
    ("deep dotdot", [file_member("a/../../evil", b"x")], OutsideRoot, "a/../../evil"),
    ("absolute", [file_member("/etc/cron.d/evil", b"x")], OutsideRoot, "/etc/cron.d/evil"),
    ("absolute link", [link_member("passwd", "/etc/passwd")], OutsideRoot, "passwd"),
    ("link up", [link_member("up", "../../outside")], OutsideRoot, "up"),
    (
        "link through a link",
        [link_member("d", "."), link_member("x", "d/../outside")],
        OutsideRoot,
        "'x'",
    ),
    (
        "link chain",
        [dir_member("a"), link_member("a/b", ".."), link_member("c", "a/b/..")],
        OutsideRoot,
        "'c'",
    ),
    (
        "write through a link",
        [dir_member("sub"), link_member("l", "sub"), file_member("l/file", b"x")],
        OutsideRoot,
        "l/file",
    ),
    (
        "link then file of the same name",
        [link_member("f", "sub"), file_member("f", b"x")],
        InvalidArgument,
        "'f' appears twice",
    ),
    (
        "hardlink out",
        [(member("h", tarfile.LNKTYPE, linkname="../../etc/shadow"), None)],
        OutsideRoot,
        "'h'",
    ),
    (
        "hardlink absolute",
        [(member("h", tarfile.LNKTYPE, linkname="/etc/shadow"), None)],
        OutsideRoot,
        "'h'",
    ),
    (
        "hardlink to nothing",
        [(member("h", tarfile.LNKTYPE, linkname="missing"), None)],
        OutsideRoot,
        "'h'",
    ),
    ("char device", [(member("null", tarfile.CHRTYPE), None)], InvalidArgument, "device node"),
    ("block device", [(member("sda", tarfile.BLKTYPE), None)], InvalidArgument, "device node"),
    ("fifo", [(member("pipe", tarfile.FIFOTYPE), None)], InvalidArgument, "'pipe' is a fifo"),
    (
        "symlink loop",
        [link_member("a", "b/x"), link_member("b", "a/y")],
        InvalidArgument,
        "loop",
    ),
]


@pytest.mark.parametrize(
    ("members", "error", "names"),
    [pytest.param(m, e, n, id=i) for i, m, e, n in HOSTILE],
)
def test_a_hostile_archive_is_refused_naming_the_entry_and_leaves_nothing(
    tmp_path: Path,
    store: BlobStore,
    members: list[tuple[tarfile.TarInfo, bytes | None]],
    error: type[PyroError],
    names: str,
) -> None:
    archive = tmp_path / "seed.tar"
    archive.write_bytes(tar_bytes([file_member("fine.txt", b"ok"), *members]))
    staging = tmp_path / "staging"
    with pytest.raises(error) as caught:
        seeds.ingest_seed(archive, staging, store)
    assert names in str(caught.value)
    assert not staging.exists()
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()


def test_an_archive_with_too_many_entries_is_refused(tmp_path: Path, store: BlobStore) -> None:
    archive = tmp_path / "bomb.tar.gz"
    archive.write_bytes(tar_bytes([file_member(f"f{i}", b"") for i in range(300)], "w:gz"))
    staging = tmp_path / "staging"
    with pytest.raises(TooLarge, match=r"more than 100 entries \(reached at 'f100'\)"):
        seeds.ingest_seed(archive, staging, store, max_entries=100)
    assert not staging.exists()
    assert DEFAULT_MAX_ENTRIES == 100_000 and seeds.DEFAULT_MAX_BYTES == 2 << 30
    assert len(seeds.ingest_seed(archive, staging, store, max_entries=300)) == 300


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
def test_a_sparse_size_bomb_is_refused_before_its_data_is_read(
    tmp_path: Path, store: BlobStore
) -> None:
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    with (bomb / "huge").open("wb") as handle:
        handle.truncate(8 << 30)  # 8 GiB of holes: a few hundred bytes once compressed
    archive = tmp_path / "bomb.tgz"
    subprocess.run(["tar", "-C", str(bomb), "-cSzf", str(archive), "huge"], check=True)
    assert archive.stat().st_size < 10_000
    staging = tmp_path / "staging"
    with pytest.raises(TooLarge, match=r"'huge' \(8589934592 bytes\).*2147483648-byte limit"):
        seeds.ingest_seed(archive, staging, store)  # the default cap: 2 GiB
    assert not staging.exists()
    assert list(store) == []


def test_a_compressed_bomb_stops_at_the_byte_cap(tmp_path: Path, store: BlobStore) -> None:
    archive = tmp_path / "zeros.tar.gz"
    parts = [file_member(f"part{i}", bytes(4 << 20)) for i in range(6)]
    archive.write_bytes(tar_bytes(parts, "w:gz"))
    staging = tmp_path / "staging"
    with pytest.raises(TooLarge, match=r"'part2' \(4194304 bytes\)"):
        seeds.ingest_seed(archive, staging, store, max_bytes=10 << 20)
    assert not staging.exists()


def test_a_forged_size_header_is_refused_without_reading_data(
    tmp_path: Path, store: BlobStore
) -> None:
    info = member("forged")
    info.size = 100 << 30  # claims 100 GiB; only a header follows
    archive = tmp_path / "forged.tar"
    archive.write_bytes(info.tobuf(tarfile.GNU_FORMAT) + bytes(1024))
    with pytest.raises(TooLarge, match="'forged'"):
        seeds.ingest_seed(archive, tmp_path / "staging", store)
    small = member("short")
    small.size = 5000
    archive.write_bytes(small.tobuf(tarfile.GNU_FORMAT) + b"x" * 100)
    with pytest.raises(InvalidArgument):
        seeds.ingest_seed(archive, tmp_path / "staging", store)
    assert not (tmp_path / "staging").exists()


def test_a_corrupt_or_foreign_file_is_not_taken_for_a_seed(
    tmp_path: Path, store: BlobStore
) -> None:
    good = tar_bytes([file_member("a", b"x" * 100_000)], "w:gz")
    truncated = tmp_path / "cut.tgz"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(seeds.CorruptArchive):
        seeds.ingest_seed(truncated, tmp_path / "s1", store)
    text = tmp_path / "notes.txt"
    text.write_text("not an archive\n" * 100)
    with pytest.raises(InvalidArgument, match="not"):
        seeds.ingest_seed(text, tmp_path / "s2", store)
    with pytest.raises(NotFound):
        seeds.ingest_seed(tmp_path / "missing", tmp_path / "s3", store)
    assert not any((tmp_path / s).exists() for s in ("s1", "s2", "s3"))


def test_a_directory_seed_with_special_files_or_escaping_links_is_refused(
    tmp_path: Path, store: BlobStore
) -> None:
    source = tmp_path / "src"
    write_tree(source, {"ok.txt": b"fine"})
    os.mkfifo(source / "pipe")
    with pytest.raises(InvalidArgument, match="'pipe' is a fifo"):
        seeds.ingest_seed(source, tmp_path / "staging", store)
    (source / "pipe").unlink()
    os.symlink("/etc", source / "etc")
    with pytest.raises(OutsideRoot, match="'etc'"):
        seeds.ingest_seed(source, tmp_path / "staging", store)
    (source / "etc").unlink()
    os.symlink("../../..", source / "up")
    with pytest.raises(OutsideRoot, match="'up'"):
        seeds.check_directory(source)
    (source / "up").unlink()
    os.symlink("ok.txt", source / "alias")
    assert seeds.check_directory(source) == seeds.TreeStats(entries=2, bytes=4)
    assert not (tmp_path / "staging").exists()


def test_a_seed_over_the_limits_is_refused_by_check_directory(tmp_path: Path) -> None:
    source = tmp_path / "src"
    write_tree(source, {f"f{i}": b"12345" for i in range(10)})
    with pytest.raises(TooLarge, match="entries"):
        seeds.check_directory(source, max_entries=5)
    with pytest.raises(TooLarge, match="byte limit"):
        seeds.check_directory(source, max_bytes=20)


def test_an_empty_seed_is_an_empty_private_directory(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    assert seeds.empty_seed(staging) == []
    assert list(staging.iterdir()) == []
    assert stat.S_IMODE(staging.stat().st_mode) == 0o700
    with pytest.raises(InvalidArgument, match="already exists"):
        seeds.empty_seed(staging)


# --- exports ----------------------------------------------------------------------------


def test_a_directory_export_lands_whole_with_modes_and_without_setuid(tmp_path: Path) -> None:
    data = tar_bytes(
        [
            dir_member(".", 0o750),
            file_member("./bin/tool", b"#!/bin/sh\n", 0o4755),
            file_member("./notes.txt", b"notes\n", 0o600),
            link_member("./bin/alias", "tool"),
        ],
        "w:gz",
    )
    output = tmp_path / "out"
    result = exporting.extract_export(chunks_of(data, 7), output)
    assert result == {"output": str(output), "type": "dir", "entries": 4, "files": 2, "bytes": 16}
    assert read_tree(output) == {"bin/tool": b"#!/bin/sh\n", "notes.txt": b"notes\n"}
    assert stat.S_IMODE(output.stat().st_mode) == 0o750
    assert stat.S_IMODE((output / "bin" / "tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((output / "notes.txt").stat().st_mode) == 0o600
    assert os.readlink(output / "bin" / "alias") == "tool"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left


def test_an_archive_shaped_like_the_guest_agents_exports_as_a_directory(
    tmp_path: Path,
) -> None:
    # archive_get names members relative to the directory, with no "." entry, and sends
    # later names of a hardlinked file as links to the first.
    data = tar_bytes(
        [
            dir_member("pkg"),
            file_member("pkg/mod.py", b"x = 1\n"),
            (member("pkg/same.py", tarfile.LNKTYPE, linkname="pkg/mod.py"), None),
        ]
    )
    output = tmp_path / "tree"
    result = exporting.extract_export([data], output, kind="dir")
    assert result["type"] == "dir" and result["files"] == 2
    assert read_tree(output) == {"pkg/mod.py": b"x = 1\n", "pkg/same.py": b"x = 1\n"}
    assert stat.S_IMODE(output.stat().st_mode) == 0o755
    one_file = tar_bytes([file_member("only.txt", b"1")])
    exporting.extract_export([one_file], tmp_path / "dir-of-one", kind="dir")
    assert read_tree(tmp_path / "dir-of-one") == {"only.txt": b"1"}


def test_a_single_file_export_writes_just_the_file(tmp_path: Path) -> None:
    data = tar_bytes([file_member("report.csv", b"a,b\n1,2\n", 0o640)])
    output = tmp_path / "copy.csv"
    result = exporting.extract_export([data], output)
    assert result["type"] == "file" and result["bytes"] == 8
    assert output.read_bytes() == b"a,b\n1,2\n"
    assert stat.S_IMODE(output.stat().st_mode) == 0o640
    two_files = tar_bytes([file_member("a", b"1"), file_member("b", b"2")])
    with pytest.raises(InvalidArgument, match="exactly one regular file"):
        exporting.extract_export([two_files], tmp_path / "two", kind="file")
    as_dir = exporting.extract_export([data], tmp_path / "as-dir", kind="dir")
    assert as_dir["type"] == "dir" and (tmp_path / "as-dir" / "report.csv").is_file()


def test_an_existing_output_is_refused_unless_forced(tmp_path: Path) -> None:
    output = tmp_path / "out"
    write_tree(output, {"old.txt": b"old"})
    data = tar_bytes([dir_member("."), file_member("new.txt", b"new")])
    with pytest.raises(Conflict, match=str(output)):
        exporting.extract_export([data], output)
    assert read_tree(output) == {"old.txt": b"old"}
    exporting.extract_export([data], output, force=True)
    assert read_tree(output) == {"new.txt": b"new"}
    link = tmp_path / "link"
    os.symlink(str(tmp_path / "elsewhere"), link)
    with pytest.raises(Conflict):
        exporting.extract_export([data], link)
    with pytest.raises(NotFound):
        exporting.extract_export([data], tmp_path / "no" / "such" / "dir")


def test_a_failed_export_leaves_the_host_unchanged(tmp_path: Path) -> None:
    hostile = tar_bytes([dir_member("."), file_member("ok", b"1"), file_member("../../x", b"2")])
    with pytest.raises(OutsideRoot, match=r"\.\./\.\./x"):
        exporting.extract_export([hostile], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    existing = tmp_path / "keep"
    write_tree(existing, {"precious": b"p"})
    device = tar_bytes([dir_member("."), (member("dev/null", tarfile.CHRTYPE), None)])
    with pytest.raises(InvalidArgument, match="device node"):
        exporting.extract_export([device], existing, force=True)
    assert read_tree(existing) == {"precious": b"p"}
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]

    def dropped() -> Iterator[bytes]:
        yield tar_bytes([dir_member("."), file_member("a", b"x" * 100_000)])[:20_000]
        raise ConnectionError("the guest agent went away")

    with pytest.raises(ConnectionError):
        exporting.extract_export(dropped(), tmp_path / "partial")
    with pytest.raises(TooLarge):
        exporting.extract_export(
            [tar_bytes([file_member("a", b"x" * 5000)])], tmp_path / "big", max_bytes=1000
        )
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]


# --- workspace disks --------------------------------------------------------------------


def make_disk(tmp_path: Path, files: dict[str, bytes], size_mib: int = 16) -> Path:
    staging = tmp_path / "staging"
    write_tree(staging, files)
    image = tmp_path / "workspace.ext4"
    disk_create.create_workspace_disk(image, size_mib, staging)
    return image


def fsck_clean(image: Path) -> bool:
    e2fsck = find_program("e2fsck")
    assert e2fsck is not None
    return subprocess.run([e2fsck, "-fn", str(image)], capture_output=True).returncode == 0


@needs_e2fsprogs
def test_a_workspace_disk_holds_the_seed_and_reads_back_offline(tmp_path: Path) -> None:
    image = make_disk(
        tmp_path,
        {
            "README.md": b"# hi\n",
            "src/app.py": b"print('app')\n" * 100,
            "src/with space.txt": b"s",
            'src/q"uote': b"q",
        },
    )
    staging = tmp_path / "staging"
    (staging / "src" / "app.py").chmod(0o755)
    os.symlink("app.py", staging / "src" / "short")
    os.symlink("x" * 100, staging / "src" / "long")
    image.unlink()
    disk_create.create_workspace_disk(image, 16, staging)
    assert image.stat().st_size == 16 << 20
    assert image.stat().st_blocks * 512 < 8 << 20  # sparse
    assert fsck_clean(image)
    top = workspace_disk.disk_list(image, "/")
    assert [(e["name"], e["type"]) for e in top] == [
        ("README.md", "file"),
        ("src", "dir"),
    ]
    listing = {e["path"]: e for e in workspace_disk.disk_list(image, "src", recursive=False)}
    assert sorted(listing) == [
        "/src/app.py",
        "/src/long",
        '/src/q"uote',
        "/src/short",
        "/src/with space.txt",
    ]
    assert listing["/src/app.py"]["mode"] == 0o755
    assert listing["/src/app.py"]["size"] == 1300
    assert listing["/src/short"]["target"] == "app.py"
    assert listing["/src/long"]["target"] == "x" * 100
    everything = workspace_disk.disk_list(image, "/", recursive=True)
    assert "/src/with space.txt" in [e["path"] for e in everything]
    assert workspace_disk.disk_list(image, "/README.md")[0]["size"] == 5
    assert workspace_disk.disk_read(image, "/src/app.py", 1 << 20) == b"print('app')\n" * 100
    assert workspace_disk.disk_read(image, "src/app.py", 5) == b"print"
    assert workspace_disk.disk_read(image, 'src/q"uote', 10) == b"q"
    assert workspace_disk.disk_read(image, "src/with space.txt", 10) == b"s"
    info = workspace_disk.disk_stat(image, "/README.md")
    assert info["type"] == "file" and info["mode"] == 0o644
    assert info["mtime_ns"] // 10**9 == (staging / "README.md").stat().st_mtime_ns // 10**9


@needs_e2fsprogs
def test_disk_readers_refuse_escapes_and_report_missing_paths(tmp_path: Path) -> None:
    image = make_disk(tmp_path, {"a/b.txt": b"b"})
    os.symlink("b.txt", tmp_path / "staging" / "a" / "link")
    image.unlink()
    disk_create.create_workspace_disk(image, 16, tmp_path / "staging")
    with pytest.raises(OutsideRoot):
        workspace_disk.disk_list(image, "/../etc")
    with pytest.raises(OutsideRoot):
        workspace_disk.disk_read(image, "a/../../etc/passwd", 10)
    assert workspace_disk.disk_path("a/../a/./b.txt") == "/a/b.txt"
    with pytest.raises(NotFound, match="/nope"):
        workspace_disk.disk_list(image, "/nope")
    with pytest.raises(NotFound):
        workspace_disk.disk_read(image, "a/missing.txt", 10)
    with pytest.raises(InvalidArgument, match="is a directory"):
        workspace_disk.disk_read(image, "a", 10)
    with pytest.raises(InvalidArgument, match=r"symbolic link to 'b\.txt'"):
        workspace_disk.disk_read(image, "a/link", 10)
    with pytest.raises(InvalidArgument):
        workspace_disk.disk_read(image, "a/b.txt", 0)
    with pytest.raises(InvalidArgument):
        workspace_disk.disk_read(image, "a/b\n.txt", 10)
    with pytest.raises(NotFound):
        workspace_disk.disk_list(tmp_path / "missing.ext4", "/")
    many = tmp_path / "many"
    write_tree(many, {f"d/f{i}": b"" for i in range(30)})
    many_image = tmp_path / "many.ext4"
    disk_create.create_workspace_disk(many_image, 16, many)
    with pytest.raises(TooLarge, match="more than 10 entries"):
        workspace_disk.disk_list(many_image, "/", recursive=True, max_entries=10)


@needs_e2fsprogs
def test_a_seed_that_does_not_fit_says_how_much_disk_it_needs(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    write_tree(staging, {"big.bin": os.urandom(20 << 20)})
    image = tmp_path / "small.ext4"
    with pytest.raises(TooLarge, match="needs about") as caught:
        disk_create.create_workspace_disk(image, 16, staging)
    assert not image.exists() and list(tmp_path.iterdir()) == [staging]
    assert caught.value.hint is not None
    need = int(caught.value.hint.rsplit("least ", 1)[1].split()[0])
    assert 20 < need < 64
    disk_create.create_workspace_disk(image, need, staging)
    assert fsck_clean(image)
    assert workspace_disk.disk_stat(image, "big.bin")["size"] == 20 << 20


@needs_e2fsprogs
def test_a_seed_that_fills_the_disk_at_mke2fs_time_is_too_large(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    write_tree(staging, {"a.bin": os.urandom(14 << 20)})  # fits the byte count, not the metadata
    with pytest.raises(TooLarge, match="does not fit in a 16 MiB workspace disk"):
        disk_create.create_workspace_disk(tmp_path / "d.ext4", 16, staging)
    assert not (tmp_path / "d.ext4").exists()


@needs_e2fsprogs
def test_many_small_files_get_enough_inodes(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    for i in range(6000):
        (staging / f"f{i}").touch()
    image = tmp_path / "many.ext4"
    disk_create.create_workspace_disk(image, 16, staging)  # 16 MiB has 4096 inodes by default
    assert fsck_clean(image)
    assert len(workspace_disk.disk_list(image, "/")) == 6000  # lost+found is dropped


@needs_e2fsprogs
def test_an_empty_disk_and_bad_sizes(tmp_path: Path) -> None:
    image = tmp_path / "empty.ext4"
    disk_create.create_workspace_disk(image, 8)
    assert workspace_disk.disk_list(image, "/") == []  # not even lost+found
    with pytest.raises(Conflict):
        disk_create.create_workspace_disk(image, 8)
    for bad in (0, 7, True):
        with pytest.raises(InvalidArgument):
            disk_create.create_workspace_disk(tmp_path / "bad.ext4", bad)
    with pytest.raises(NotFound):
        disk_create.create_workspace_disk(tmp_path / "x.ext4", 8, tmp_path / "nope")


@needs_e2fsprogs
def test_disk_export_copies_the_image_sparsely_and_respects_force(tmp_path: Path) -> None:
    image = make_disk(tmp_path, {"a": b"a"})
    output = tmp_path / "export.ext4"
    assert disk_export.disk_export(image, output) == output
    assert output.read_bytes() == image.read_bytes()
    assert output.stat().st_blocks * 512 < 8 << 20
    with pytest.raises(Conflict, match="already exists"):
        disk_export.disk_export(image, output)
    output.write_bytes(b"stale")
    disk_export.disk_export(image, output, force=True)
    assert output.stat().st_size == image.stat().st_size
    with pytest.raises(InvalidArgument, match="itself"):
        disk_export.disk_export(image, image, force=True)
    with pytest.raises(NotFound):
        disk_export.disk_export(tmp_path / "missing", tmp_path / "o")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "export.ext4",
        "staging",
        "workspace.ext4",
    ]


@needs_e2fsprogs
def test_a_seed_round_trips_from_archive_to_disk_to_manifest(
    tmp_path: Path, store: BlobStore
) -> None:
    archive = tmp_path / "seed.tar.xz"
    archive.write_bytes(
        tar_bytes(
            [dir_member("proj"), file_member("proj/x.py", b"x = 1\n", 0o600)],
            "w:xz",
        )
    )
    staging = tmp_path / "staging"
    entries = seeds.ingest_seed(archive, staging, store)
    image = tmp_path / "disk.ext4"
    disk_create.create_workspace_disk(image, 16, staging)
    listed = workspace_disk.disk_list(image, "/proj")
    assert [(e["name"], e["mode"], e["size"]) for e in listed] == [("x.py", 0o600, 6)]
    file_entry = next(e for e in entries if e.type == "file")
    disk_bytes = workspace_disk.disk_read(image, "proj/x.py", 100)
    assert sha256_bytes(disk_bytes) == file_entry.sha256
    assert store.get_manifest(store.put_manifest(entries)) == entries


# --- a file's bytes in a result ------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "encoding"),
    [
        (b"ship it\n", "utf-8"),
        ("caf\u00e9 \u2713".encode(), "utf-8"),
        (b"", "utf-8"),
        (b"\xff\xfe not utf-8", "base64"),
        (b"text\x00with a NUL", "base64"),  # valid UTF-8, but a binary file
        (b"\x1b[31mred\x1b[0m", "utf-8"),  # an escape is text: printed as is, not altered
    ],
)
def test_a_files_bytes_come_back_exactly_from_its_result(data: bytes, encoding: str) -> None:
    from pyro_mcp.workspace.content import content_bytes, content_fields

    fields = content_fields(data)
    assert fields["encoding"] == encoding
    assert content_bytes(fields) == data
