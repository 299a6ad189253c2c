"""What the code offers, the docs name: every environment variable pyro reads on the host
is in the README's configuration table, and every `pyro env` command in docs/environments.md."""

from __future__ import annotations

import re
from pathlib import Path

from pyro_mcp.api.registry import all_operations

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "pyro_mcp"
GUEST_SIDE = ("guest", "guest_agent")  # read inside the VM, set by pyro itself


def _host_variables() -> set[str]:
    names: set[str] = set()
    for path in SRC.rglob("*.py"):
        if path.relative_to(SRC).parts[0] in GUEST_SIDE:
            continue
        names |= set(re.findall(r'"((?:PYRO|DOCKERHUB)_[A-Z0-9_]+)"', path.read_text()))
    return names


def _configuration_table() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]


def test_every_host_environment_variable_is_in_the_readme_configuration_table() -> None:
    table = _configuration_table()
    missing = sorted(name for name in _host_variables() if f"`{name}`" not in table)
    assert missing == []
    assert {"PYRO_REGISTRY", "PYRO_OCI_UPLOAD_CHUNK_SIZE_BYTES"} <= _host_variables()


def test_every_env_command_is_in_the_environments_doc() -> None:
    text = (ROOT / "docs" / "environments.md").read_text()
    commands = [op.cli[1] for op in all_operations() if op.cli and op.cli[0] == "env"]
    assert len(commands) == 8
    missing = [c for c in commands if f"pyro env {c}" not in text and f"`{c} NAME`" not in text]
    assert missing == []
