"""Lifecycle VMs (``pyro vm ...``) on a real guest: one VM walked through every state,
its TTL, and what unknown ids get. Nothing of a VM may be left once it is gone."""

from __future__ import annotations

import pytest
from tests.leftovers import leftovers, records_left_after_ttl

from pyro_mcp.api import Context
from pyro_mcp.api.operations import vm_lifecycle as vm
from pyro_mcp.errors import Expired, InvalidState, NotFound

pytestmark = pytest.mark.guest


def test_a_vm_is_created_started_runs_commands_stops_starts_again_and_is_deleted(
    ws_ctx: Context,
) -> None:
    created = vm.vm_create(ws_ctx, "debian:12")
    vid = created["vm_id"]
    assert (created["state"], created["ttl_seconds"], created["vmm_pid"]) == (
        "created",
        600.0,
        None,
    )
    assert not (ws_ctx.paths.run_root / vid).exists()  # nothing boots at create

    started = vm.vm_start(ws_ctx, vid)
    assert started["state"] == "started" and started["vmm_pid"]
    assert started["boot"]["mode"] == "warm", started["boot"]  # a root disk never booted
    shell = vm.vm_exec(ws_ctx, vid, "echo $((6 * 7)) && cat /etc/debian_version >/dev/null")
    assert (shell["vm_id"], shell["stdout"], shell["exit_code"]) == (vid, "42\n", 0)
    argv = vm.vm_exec(ws_ctx, vid, ["sh", "-c", 'echo "$1" >&2; exit 4', "sh", "$HOME"])
    assert (argv["stderr"], argv["exit_code"], argv["timed_out"]) == ("$HOME\n", 4, False)
    vm.vm_exec(ws_ctx, vid, ["sh", "-c", "echo kept > /root/mark"])  # stop flushes it
    status = vm.vm_status(ws_ctx, vid)
    assert (status["state"], status["environment"], status["network_enabled"]) == (
        "started",
        "debian:12",
        False,
    )
    assert status["expires_at"] == created["expires_at"]

    stopped = vm.vm_stop(ws_ctx, vid)
    assert (stopped["state"], stopped["vmm_pid"]) == ("stopped", None)
    assert leftovers(ws_ctx.paths.run_root, [vid]) == []  # its VMM and run dir went
    with pytest.raises(InvalidState) as refused:
        vm.vm_exec(ws_ctx, vid, "true")
    assert refused.value.message == f"VM {vid} is stopped; exec needs it started"
    assert refused.value.hint == f"run `pyro vm start {vid}`"

    restarted = vm.vm_start(ws_ctx, vid)
    assert restarted["state"] == "started"
    assert restarted["boot"] == {
        "mode": "cold",
        "reason": "a stopped VM boots from its own disks",
        "template": None,
    }
    again = vm.vm_exec(ws_ctx, vid, ["cat", "/root/mark"])  # its root disk was kept
    assert (again["stdout"], again["exit_code"]) == ("kept\n", 0)

    assert vm.vm_delete(ws_ctx, vid) == {"deleted": vid}
    assert leftovers(ws_ctx.paths.run_root, [vid]) == []
    assert not (ws_ctx.state_dir / "workspaces" / vid).exists()
    with pytest.raises(NotFound):
        vm.vm_status(ws_ctx, vid)


def test_a_vm_whose_ttl_ran_out_is_deleted_and_every_call_on_it_says_it_expired(
    ws_ctx: Context,
) -> None:
    vid = vm.vm_create(ws_ctx, "debian:12", ttl_seconds=1)["vm_id"]
    assert records_left_after_ttl(ws_ctx.state_dir) == []  # the keeper deletes it on time
    for call in (
        lambda: vm.vm_status(ws_ctx, vid),
        lambda: vm.vm_exec(ws_ctx, vid, "true"),
        lambda: vm.vm_start(ws_ctx, vid),
    ):
        with pytest.raises(Expired) as caught:
            call()
        assert caught.value.message.startswith(f"VM {vid} expired at ")
        assert caught.value.message.endswith(" (its TTL ran out) and was deleted")
    assert vm.vm_reap_expired(ws_ctx) == {"deleted": [], "count": 0}  # nothing is left
    assert not (ws_ctx.state_dir / "workspaces" / vid).exists()
    assert leftovers(ws_ctx.paths.run_root, [vid]) == []


def test_an_unknown_vm_id_is_not_found_by_every_vm_call(ws_ctx: Context) -> None:
    for call in (vm.vm_start, vm.vm_stop, vm.vm_delete, vm.vm_status, vm.vm_network_info):
        with pytest.raises(NotFound) as caught:
            call(ws_ctx, "0123456789ab")
        assert caught.value.message == "no VM '0123456789ab'"
    with pytest.raises(NotFound, match="no VM 'nope'"):
        vm.vm_exec(ws_ctx, "nope", "true")
