"""Temporary files in the guest are named so that no two calls share one: every channel
of a VM is served by the same agent process, and call ids restart on each channel."""

from __future__ import annotations

import os
from pathlib import Path

from pyro_mcp.guest.client import AgentClient
from pyro_mcp.guest_agent.calls import Call


def test_temporary_names_of_calls_with_the_same_id_differ() -> None:
    names = {Call.temp_name("put") for _ in range(1000)}
    assert len(names) == 1000 and all(n.startswith(".pyro-put-") for n in names)


def test_a_temporary_file_another_channels_call_holds_does_not_fail_a_link(
    agent_client: AgentClient, tmp_path: Path
) -> None:
    # What a call with the next id on another channel would be writing right now, under
    # the names a process id and a call id alone make.
    for ident in range(1, 20):
        (tmp_path / f".pyro-link-{os.getpid()}-{ident}-0").write_text("another call's")
    agent_client.apply_tree(str(tmp_path), symlinks=[{"path": "l", "target": "t"}])
    assert os.readlink(tmp_path / "l") == "t"
