"""Firecracker's network device with the jailer (root only), on the tiny guest.

Firecracker opens its TAP by name when it is configured, so a jailed Firecracker must
run in the network namespace pyro made the TAP in: the jailer's ``--netns``. The tiny
guest has no network driver; what is proven here is the VMM's side (the TAP found and
opened in the right namespace, the link given back on kill). The guest's side of the
link is proven under QEMU (tests/guest/test_network.py).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fc_support import TINY_MARKER
from tests import net_topology as net

from pyro_mcp.network import leases, nft
from pyro_mcp.network.link import attach_network
from pyro_mcp.network.policy import parse_policy
from pyro_mcp.network.tap import tap_exists
from pyro_mcp.runtime.binaries import BinarySet
from pyro_mcp.vmm.base import Disk, VMSpec
from pyro_mcp.vmm.firecracker import FirecrackerVM, JailerConfig

pytestmark = [
    pytest.mark.firecracker,
    pytest.mark.skipif(os.geteuid() != 0, reason="the jailer and TAP devices need root"),
]


@pytest.fixture
def pyro_namespace() -> Iterator[str]:
    """A bare namespace for pyro's host side of networking; removed afterwards."""
    name = f"pyt{os.getpid() % 100000}-fc"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("PYRO_NET_NAMESPACE", name)
            yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        subprocess.run(["rm", "-rf", f"/run/pyro-mcp/network/{name}"], capture_output=True)
    assert net.namespaces_left(name) == []


def test_a_jailed_firecracker_opens_its_tap_in_pyros_namespace_and_gives_it_back(
    pyro_namespace: str,
    fc_binaries: BinarySet,
    tiny_kernel: Path,
    tiny_disk: Path,
    short_dir: Path,
) -> None:
    vm_id = f"t{os.getpid()}net"
    run_dir = short_dir / vm_id
    run_dir.mkdir()
    owner = JailerConfig.for_vm(vm_id).uid
    network = attach_network(vm_id, run_dir, parse_policy("egress"), persistent_owner=owner)
    link = network.link
    assert link is not None and network.nic.fd is None  # persistent: opened by name
    spec = VMSpec(
        vm_id=vm_id,
        run_dir=run_dir,
        kernel=tiny_kernel,
        root_disk=Disk(tiny_disk, "raw"),
        mem_mib=128,
        nic=network.nic,
    )
    vm = FirecrackerVM(spec, fc_binaries, serial_input=True)  # the jailer, chosen as root
    try:
        # Without --netns, Firecracker in the host's namespace would make itself a new,
        # unconnected TAP of that name there: the guest would boot with a dead link.
        vm.start()
        vm.wait_for_console(TINY_MARKER, timeout_s=10)
        assert vm.pid is not None
        assert (
            os.stat(f"/proc/{vm.pid}/ns/net").st_ino
            == os.stat(f"/run/netns/{pyro_namespace}").st_ino
        )
        assert not tap_exists_in_host_namespace(link.tap)
    finally:
        vm.kill()

    assert not tap_exists(link.tap)
    assert leases.find(vm_id) is None
    assert link.chain not in _chains()


def tap_exists_in_host_namespace(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _chains() -> set[str]:
    table = nft._table_items() or []
    return {item["chain"]["name"] for item in table if "chain" in item}
