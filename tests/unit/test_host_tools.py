"""Missing host programs are named with the Debian package that brings them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pyro_mcp.errors import HostToolMissing, ToolFailed
from pyro_mcp.runtime import env_obtain, environments, host_tools
from pyro_mcp.runtime.paths import RuntimePaths


def test_a_missing_program_names_its_package_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_tools, "find_program", lambda program: None)
    with pytest.raises(HostToolMissing) as caught:
        host_tools.require("debootstrap")
    assert "debootstrap" in caught.value.message
    assert caught.value.hint is not None
    assert "apt-get install debootstrap" in caught.value.hint
    assert "make host-packages" in caught.value.hint


def test_pulling_an_environment_without_debootstrap_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = host_tools.find_program
    monkeypatch.setattr(
        host_tools, "find_program", lambda p: None if p == "debootstrap" else real(p)
    )
    paths = RuntimePaths(tmp_path / "cache", tmp_path / "run")
    with pytest.raises(HostToolMissing, match="debootstrap") as caught:
        env_obtain.pull_environment(paths, "debian:12-base")
    assert "apt-get install debootstrap" in str(caught.value)
    assert not any(info.installed for info in environments.list_environments(paths))


def test_a_failing_program_reports_its_exit_code_and_stderr_tail() -> None:
    with pytest.raises(ToolFailed) as caught:
        host_tools.run(["sh", "-c", "echo boom >&2; exit 4"], what="demo step")
    assert "demo step" in caught.value.message and "exited with 4" in caught.value.message
    assert caught.value.stderr_tail == "boom"


def test_every_needed_package_is_listed_once() -> None:
    packages = host_tools.host_packages()
    assert packages == sorted(set(packages))
    assert {"qemu-system-x86", "debootstrap", "e2fsprogs"} <= set(packages)


def test_a_package_whose_programs_another_package_provides_is_not_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[list[str]] = []
    monkeypatch.setattr(host_tools, "missing_packages", lambda packages: list(packages))
    monkeypatch.setattr(
        host_tools, "find_program", lambda program: "/usr/bin/npm" if program == "npm" else None
    )
    monkeypatch.setattr(host_tools.os, "geteuid", lambda: 0)

    def run(argv: list[str], **kwargs: Any) -> None:
        asked.append(argv)

    monkeypatch.setattr(host_tools, "run", run)
    installed = host_tools.install_packages(["npm", "nodejs", "libelf-dev"])
    assert installed == ["nodejs", "libelf-dev"]  # npm's program is there already
    assert asked[-1][-2:] == ["nodejs", "libelf-dev"]
