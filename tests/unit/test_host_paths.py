"""Host paths named by MCP clients stay under the configured roots."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyro_mcp.api.context import HostPathPolicy
from pyro_mcp.errors import InvalidArgument, OutsideRoot
from pyro_mcp.storage.host_files import HostPath


def test_paths_under_a_root_are_allowed_and_carry_their_root(tmp_path: Path) -> None:
    (tmp_path / "project").mkdir()
    policy = HostPathPolicy.confined_to([tmp_path])
    assert policy.check(str(tmp_path / "project"), "seed") == HostPath(
        tmp_path / "project", tmp_path
    )
    assert policy.check(str(tmp_path / "new-output"), "export output") == HostPath(
        tmp_path / "new-output", tmp_path
    )
    assert policy.check(str(tmp_path / "project" / ".." / "x/"), "seed") == HostPath(
        tmp_path / "x", tmp_path
    )


def test_a_symlinked_parent_is_resolved_and_a_symlinked_last_component_is_kept(
    tmp_path: Path,
) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to("real")
    (tmp_path / "real" / "link").symlink_to("file")
    policy = HostPathPolicy.confined_to([tmp_path])
    # The parent is resolved once, at the check; the last component is named, not
    # followed: an export never writes through a link, a seed never reads through one.
    assert policy.check(str(tmp_path / "alias" / "out"), "export output") == HostPath(
        tmp_path / "real" / "out", tmp_path
    )
    assert policy.check(str(tmp_path / "alias" / "link"), "export output") == HostPath(
        tmp_path / "real" / "link", tmp_path
    )


def test_traversal_and_symlink_escapes_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "escape").symlink_to("/etc")
    policy = HostPathPolicy.confined_to([root])
    for value in (f"{root}/../outside", "/etc/passwd", f"{root}/escape/passwd", f"{root}/escape"):
        with pytest.raises(OutsideRoot, match="outside the allowed host roots"):
            policy.check(value, "seed")


def test_an_empty_path_is_refused_whatever_the_policy(tmp_path: Path) -> None:
    for policy in (HostPathPolicy.confined_to([tmp_path]), HostPathPolicy()):
        with pytest.raises(InvalidArgument, match="seed path is empty"):
            policy.check("", "seed")


def test_without_roots_any_path_is_the_callers_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert HostPathPolicy().check("/etc", "seed") == HostPath(Path("/etc"), None)
    monkeypatch.chdir(tmp_path)
    assert HostPathPolicy().check("out", "export output") == HostPath(tmp_path / "out", None)
