"""Export from a workspace to the host: empty directories, and what an export leaves out.

The workspace is ``served_workspace`` (the real agent in this process, over a temporary
``/workspace``), driven through the SDK as a user would.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from tests.unit.served_workspace import ServedWorkspace, served_workspace

from pyro_mcp.sdk import Pyro
from pyro_mcp.workspace.exporting import extract_export

__all__ = ["served_workspace"]  # the fixture, imported for the tests below


def test_an_empty_directory_exports_as_an_empty_directory(
    served_workspace: ServedWorkspace, tmp_path: Path
) -> None:
    (served_workspace.root / "empty").mkdir()
    out = tmp_path / "out"
    result = Pyro().export_workspace(served_workspace.id, "empty", output_path=str(out))
    assert (result["type"], result["entries"], result["skipped"]) == ("dir", 0, 0)
    assert out.is_dir() and list(out.iterdir()) == []


def test_special_files_left_out_of_an_export_are_counted_and_named(
    served_workspace: ServedWorkspace, tmp_path: Path
) -> None:
    tree = served_workspace.root / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "keep.txt").write_text("kept\n")
    os.mkfifo(tree / "sub" / "pipe")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tree / "sock"))
        out = tmp_path / "out"
        result = Pyro().export_workspace(served_workspace.id, "tree", output_path=str(out))
    assert result["skipped"] == 2
    assert sorted(result["skipped_paths"]) == ["sock", "sub/pipe"]
    assert (out / "keep.txt").read_text() == "kept\n"
    assert sorted(p.name for p in out.rglob("*")) == ["keep.txt", "sub"]


def test_an_empty_archive_of_a_directory_export_makes_an_empty_directory(
    tmp_path: Path,
) -> None:
    end_of_archive = b"\0" * 10240
    out = tmp_path / "out"
    result = extract_export([end_of_archive], out, kind="dir")
    assert result == {"output": str(out), "type": "dir", "entries": 0, "files": 0, "bytes": 0}
    assert stat.S_ISDIR(out.lstat().st_mode) and list(out.iterdir()) == []
