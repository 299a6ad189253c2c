"""A VM's link, made and released in a private network namespace (no VM needed): the
lease, the TAP, the nftables policy and the resolver all appear, and all go, whichever
way the VM ends; a stale lease is reclaimed with what it left."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyro_mcp.errors import HostToolMissing, NetworkUnavailable
from pyro_mcp.network import leases, nft
from pyro_mcp.network.addresses import Link
from pyro_mcp.network.link import attach_network, release_network
from pyro_mcp.network.policy import parse_policy
from pyro_mcp.network.tap import tap_exists
from pyro_mcp.vmm.identity import ProcessIdentity


@pytest.fixture
def namespace(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"pyu{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    monkeypatch.setenv("PYRO_NET_NAMESPACE", name)
    monkeypatch.setenv("PYRO_DNS_UPSTREAMS", "127.0.0.1:5399")
    try:
        yield name
    finally:
        for lease in leases.held():
            release_network(lease.vm_id)
        subprocess.run(["ip", "netns", "delete", name], check=False)
        shutil.rmtree(f"/run/pyro-mcp/network/{name}", ignore_errors=True)


def _run_dir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def _egress_link_of_an_ended_vm(vm_id: str, run_dir: Path) -> tuple[Link, ProcessIdentity]:
    """An egress link as its VM's end leaves it (the TAP's fd closed), and its resolver."""
    network = attach_network(vm_id, run_dir, parse_policy("egress"))
    assert network.nic.fd is not None
    os.close(network.nic.fd)
    [lease] = [lease for lease in leases.held() if lease.vm_id == vm_id]
    resolver = ProcessIdentity.from_dict(lease.resolver)
    assert resolver is not None
    return network.link, resolver


def test_a_link_is_made_whole_and_released_whole(namespace: str, tmp_path: Path) -> None:
    policy = parse_policy("egress", ["10.77.0.0/24"], ["web.test"])
    network = attach_network("vm-one", _run_dir(tmp_path, "vm-one"), policy)
    link = network.link
    [lease] = leases.held()
    assert (lease.vm_id, lease.slot) == ("vm-one", link.slot)
    assert tap_exists(link.tap) and nft.vm_present(link)
    resolver = ProcessIdentity.from_dict(lease.resolver)
    assert resolver is not None and resolver.alive()
    assert network.nic.fd is not None
    os.close(network.nic.fd)  # what a VMM's end does to its TAP
    assert not tap_exists(link.tap)
    release_network("vm-one")
    assert leases.held() == [] and not nft.vm_present(link) and not resolver.alive()


def test_two_vms_get_two_links(namespace: str, tmp_path: Path) -> None:
    policy = parse_policy("egress")
    one = attach_network("vm-a", _run_dir(tmp_path, "a"), policy)
    two = attach_network("vm-b", _run_dir(tmp_path, "b"), policy)
    assert one.link.slot != two.link.slot and one.link.guest != two.link.guest
    for network in (one, two):
        assert network.nic.fd is not None
        os.close(network.nic.fd)


def test_a_stale_lease_is_reclaimed_with_what_it_left(namespace: str, tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path, "gone")
    stale = attach_network("vm-gone", run_dir, parse_policy("egress"))
    shutil.rmtree(run_dir)  # its VM ended without releasing (a crash of every process)
    resolver = ProcessIdentity.from_dict(leases.held()[0].resolver)
    assert stale.nic.fd is not None
    os.close(stale.nic.fd)
    fresh = attach_network("vm-new", _run_dir(tmp_path, "new"), parse_policy("egress"))
    assert [lease.vm_id for lease in leases.held()] == ["vm-new"]
    assert fresh.link.slot == stale.link.slot  # the slot was free again
    assert resolver is not None and not resolver.alive()
    assert fresh.nic.fd is not None
    os.close(fresh.nic.fd)


def test_a_link_that_cannot_be_made_leaves_nothing(
    namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyro_mcp.network import resolver_process

    def fail(*_args: object) -> dict[str, int]:
        raise NetworkUnavailable("the resolver would not start")

    monkeypatch.setattr(resolver_process, "start", fail)
    with pytest.raises(NetworkUnavailable, match="would not start"):
        attach_network("vm-x", _run_dir(tmp_path, "x"), parse_policy("egress"))
    assert leases.held() == [] and nft.published() == []
    assert not tap_exists("pyro-t0")


def test_without_nftables_a_link_is_refused_naming_the_package_and_leaves_nothing(
    namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyro_mcp.runtime import host_tools

    found = host_tools.find_program
    monkeypatch.setattr(
        host_tools, "find_program", lambda name: None if name == "nft" else found(name)
    )
    with pytest.raises(HostToolMissing) as caught:
        attach_network("vm-n", _run_dir(tmp_path, "n"), parse_policy("egress"))
    assert str(caught.value) == (
        "host program 'nft' is not installed"
        " (run `make host-packages` or `apt-get install nftables`)"
    )
    assert leases.held() == [] and not tap_exists("pyro-t0")


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root pyro drops the resolver's rights")
def test_the_resolver_runs_as_its_own_uid_with_only_the_two_capabilities_it_needs(
    namespace: str, tmp_path: Path
) -> None:
    from pyro_mcp.network.resolver_process import resolver_uid

    link, resolver = _egress_link_of_an_ended_vm("vm-r", _run_dir(tmp_path, "r"))
    status = dict(
        line.split(":\t", 1)
        for line in Path(f"/proc/{resolver.pid}/status").read_text().splitlines()
    )
    uid = str(resolver_uid(link))
    assert status["Uid"].split() == [uid] * 4 and status["Gid"].split() == [uid] * 4
    assert status["Groups"].strip() == ""
    net_admin_and_bind = (1 << 12) | (1 << 10)
    assert int(status["CapEff"], 16) == net_admin_and_bind
    assert int(status["CapBnd"], 16) == net_admin_and_bind


def test_a_link_whose_namespace_was_removed_is_still_released(
    namespace: str, tmp_path: Path
) -> None:
    # The namespace goes first (a test's or an operator's teardown): its TAP and nftables
    # rules go with it, but the resolver is a host process and the lease a host file.
    _, resolver = _egress_link_of_an_ended_vm("vm-gone", _run_dir(tmp_path, "gone"))
    assert resolver.alive()
    subprocess.run(["ip", "netns", "delete", namespace], check=True)
    release_network("vm-gone")
    assert not resolver.alive()
    assert leases.held() == []
    assert not leases.namespace_state_dir().exists()  # the last link took what pyro kept


def test_what_pyro_kept_of_a_namespace_goes_only_with_the_namespace_and_its_last_lease(
    namespace: str, tmp_path: Path
) -> None:
    kept = leases.namespace_state_dir()
    _egress_link_of_an_ended_vm("vm-held", _run_dir(tmp_path, "held"))
    assert not leases.forget_namespace(namespace)  # the namespace is still there
    subprocess.run(["ip", "netns", "delete", namespace], check=True)
    assert not leases.forget_namespace(namespace)  # its releaser still needs the table
    assert [lease.vm_id for lease in leases.held()] == ["vm-held"]
    release_network("vm-held")
    assert not kept.exists()
