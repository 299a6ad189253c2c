"""A hostile guest costs the host nothing: real guests whose agent was replaced by one that
lies (tests/hostile_agent.py), driven through the ``pyro`` CLI in a child process whose own
peak RSS is measured.

The bound every scenario must stay under is ``PEAK_RSS_BOUND_MIB`` (what a ``pyro`` process
needs anyway is about a third of it), and every call ends well within its deadline.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.guest import hostile
from tests.guest.measure import Measured, pyro_cli

from pyro_mcp.api import Context
from pyro_mcp.api.operations import workspace_content as wc
from pyro_mcp.api.operations import workspaces as ws
from pyro_mcp.runtime.paths import RuntimePaths

pytestmark = pytest.mark.guest

PEAK_RSS_BOUND_MIB = 150


@pytest.fixture
def victim_and_attacker(ws_ctx: Context, tmp_path: Path) -> Iterator[tuple[str, str, bytes]]:
    seed = tmp_path / "victim-seed"
    seed.mkdir()
    secret = (
        b"the victim's secret: " + hashlib.sha256(tmp_path.name.encode()).digest().hex().encode()
    )
    (seed / "secret.txt").write_bytes(secret)
    victim = ws.workspace_create(ws_ctx, "debian:12", seed_path=str(seed), name="victim")["id"]
    attacker = ws.workspace_create(ws_ctx, "debian:12", name="attacker")["id"]
    yield victim, attacker, secret


HostileGuest = tuple[Context, str, hostile.SetMode]


@pytest.fixture(scope="module")
def hostile_guest(
    runtime: RuntimePaths, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HostileGuest]:
    """One workspace with the hostile agent, shared by the scenarios that only read."""
    from pyro_mcp.api.operations.workspaces import open_workspaces

    ctx = Context(paths=runtime, state_dir=tmp_path_factory.mktemp("hostile") / "state")
    wid = ws.workspace_create(ctx, "debian:12", name="hostile")["id"]
    wc.workspace_file_write(ctx, wid, "notes.txt", text="a file to read\n")
    set_mode = hostile.install(ctx, wid)
    yield ctx, wid, set_mode
    with open_workspaces(ctx) as workspaces:
        for record in workspaces.store.list():
            workspaces.delete(record.id)


def _bounded(measured: Measured) -> None:
    print(f"[hostile] host pyro peak RSS {measured.peak_mib:.1f} MiB, {measured.seconds:.1f} s")
    assert measured.peak_mib < PEAK_RSS_BOUND_MIB, measured


def test_an_exec_flood_is_cut_off_at_once_in_bounded_memory(hostile_guest: HostileGuest) -> None:
    ctx, wid, set_mode = hostile_guest
    set_mode("flood_exec")
    ran = pyro_cli(ctx, "workspace", "exec", wid, "--output-cap-bytes", "1048576", "--", "true")
    set_mode("honest")
    assert ran.code == 1 and "more stdout than the 1048576-byte cap" in ran.stderr, ran
    _bounded(ran)


def test_a_file_read_returns_at_most_max_bytes_whatever_the_agent_sends(
    hostile_guest: HostileGuest,
) -> None:
    ctx, wid, set_mode = hostile_guest
    set_mode("flood_file", flood_bytes=128 << 20)
    read = pyro_cli(
        ctx, "workspace", "file", "read", wid, "notes.txt", "--max-bytes", "10", "--json"
    )
    set_mode("honest")
    assert read.code == 0, read
    result = json.loads(read.stdout)
    assert (result["content"], result["truncated"]) == ("y" * 10, True)
    _bounded(read)


def test_a_stalled_agent_fails_each_call_within_its_deadline(hostile_guest: HostileGuest) -> None:
    ctx, wid, set_mode = hostile_guest
    set_mode("stall")
    try:
        ran = pyro_cli(ctx, "workspace", "exec", wid, "--", "true", PYRO_AGENT_IDLE_S="3")
        read = pyro_cli(ctx, "workspace", "file", "read", wid, "notes.txt", PYRO_AGENT_IDLE_S="3")
    finally:
        set_mode("honest")
    for measured in (ran, read):
        assert measured.code == 1 and "sent nothing for 3 s (it has stalled)" in measured.stderr
        _bounded(measured)


def test_a_torn_frame_fails_its_call_and_the_next_call_works(hostile_guest: HostileGuest) -> None:
    ctx, wid, set_mode = hostile_guest
    set_mode("tear")
    torn = pyro_cli(ctx, "workspace", "exec", wid, "--", "true", PYRO_AGENT_IDLE_S="5")
    after = pyro_cli(ctx, "workspace", "exec", wid, "--", "echo", "after")
    assert torn.code == 1 and "guest operation exec" in torn.stderr, torn
    assert (after.code, after.stdout) == (0, "after\n"), after
    _bounded(torn)


def test_a_manifest_without_end_is_refused_at_the_entry_limit(hostile_guest: HostileGuest) -> None:
    ctx, wid, set_mode = hostile_guest
    set_mode("flood_manifest")
    try:  # the limit is lowered here only to keep the test short; memory does not grow with it
        diffed = pyro_cli(ctx, "workspace", "diff", wid, PYRO_MAX_MANIFEST_ENTRIES="200000")
    finally:
        set_mode("honest")
    assert diffed.code == 1 and "more than 200000 entries" in diffed.stderr, diffed
    _bounded(diffed)


def test_an_export_whose_tar_declares_a_huge_header_is_refused(
    hostile_guest: HostileGuest, tmp_path: Path
) -> None:
    ctx, wid, set_mode = hostile_guest
    set_mode("bomb_archive")
    try:
        out = tmp_path / "out"
        exported = pyro_cli(ctx, "workspace", "export", wid, ".", "--output", str(out))
    finally:
        set_mode("honest")
    assert exported.code == 1 and "1048576" in exported.stderr, exported
    assert not out.exists() and list(tmp_path.iterdir()) == []
    _bounded(exported)


def test_sparse_data_that_lies_about_its_size_is_refused(hostile_guest: HostileGuest) -> None:
    ctx, wid, set_mode = hostile_guest
    set_mode("huge_size", size=1 << 60)
    try:
        taken = pyro_cli(ctx, "workspace", "snapshot", "create", wid, "lying")
    finally:
        set_mode("honest")
    assert taken.code == 1 and "larger than" in taken.stderr, taken
    assert "lying" not in {s["name"] for s in wc.snapshot_list(ctx, wid)["snapshots"]}
    _bounded(taken)


def test_a_guest_never_gets_another_workspaces_content_by_naming_its_digest(
    ws_ctx: Context, victim_and_attacker: tuple[str, str, bytes]
) -> None:
    victim, attacker, secret = victim_and_attacker
    set_mode = hostile.install(ws_ctx, attacker)
    wc.workspace_file_write(ws_ctx, attacker, "stolen.txt", text="decoy\n")
    # The attacker's agent claims its decoy holds the victim's secret.
    set_mode("lie_digest", path="stolen.txt", digest=hashlib.sha256(secret).hexdigest())
    taken = wc.snapshot_create(ws_ctx, attacker, "grab")
    assert taken["fetched"] >= 1  # its own store lacks that digest: the host fetched it
    set_mode("honest")
    ws.workspace_delete(ws_ctx, victim)  # and after the victim is gone, still nothing
    wc.workspace_file_delete(ws_ctx, attacker, "stolen.txt")
    wc.workspace_reset(ws_ctx, attacker, snapshot="grab")
    restored = wc.workspace_file_read(ws_ctx, attacker, "stolen.txt")["content"]
    assert restored == "decoy\n"
