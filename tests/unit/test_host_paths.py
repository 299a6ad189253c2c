"""Host paths named by MCP clients stay under the configured roots."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyro_mcp.api.context import HostPathPolicy
from pyro_mcp.errors import OutsideRoot


def test_paths_under_a_root_are_allowed(tmp_path: Path) -> None:
    (tmp_path / "project").mkdir()
    policy = HostPathPolicy.confined_to([tmp_path])
    assert policy.check(str(tmp_path / "project"), "seed") == tmp_path / "project"
    assert policy.check(str(tmp_path / "new-output"), "export output") == tmp_path / "new-output"


def test_traversal_and_symlink_escapes_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "escape").symlink_to("/etc")
    policy = HostPathPolicy.confined_to([root])
    for value in (f"{root}/../outside", "/etc/passwd", f"{root}/escape/passwd"):
        with pytest.raises(OutsideRoot, match="outside the allowed host roots"):
            policy.check(value, "seed")


def test_without_roots_any_path_is_the_callers_own(tmp_path: Path) -> None:
    assert HostPathPolicy().check("/etc", "seed") == Path("/etc")
