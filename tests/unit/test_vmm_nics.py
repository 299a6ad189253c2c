"""How each backend gives a guest its network device (the link itself is
tests/unit/test_network_links.py; the guest's end, tests/guest/test_network.py)."""

from __future__ import annotations

from pathlib import Path

from pyro_mcp.network.addresses import Link
from pyro_mcp.runtime.doctor import network_findings
from pyro_mcp.vmm.base import Disk, Nic, VMSpec
from pyro_mcp.vmm.firecracker.config import vm_config
from pyro_mcp.vmm.qemu.vm import kernel_command_line, qemu_argv


def _spec(nic: Nic | None, tmp_path: Path, fmt: str = "qcow2") -> VMSpec:
    return VMSpec(
        vm_id="abc123",
        run_dir=tmp_path / "run",
        kernel=tmp_path / "vmlinux",
        root_disk=Disk(tmp_path / "root", fmt),
        nic=nic,
    )


def test_qemu_gets_the_open_tap_and_the_guest_its_link(tmp_path: Path) -> None:
    link = Link.of(7)
    nic = Nic(link.tap, link.mac, link.kernel_arg(), fd=9)
    argv = qemu_argv(_spec(nic, tmp_path), "tcg")
    assert argv[argv.index("-netdev") + 1] == "tap,id=net0,fd=9"
    assert f"virtio-net-device,netdev=net0,mac={link.mac}" in argv
    assert (
        f"pyro.net=10.241.0.30/30,10.241.0.29,{link.mac}"
        in kernel_command_line(_spec(nic, tmp_path), "tcg").split()
    )


def test_without_a_nic_a_guest_has_no_network_device(tmp_path: Path) -> None:
    argv = qemu_argv(_spec(None, tmp_path), "tcg")
    assert "-netdev" not in argv and not any("virtio-net" in word for word in argv)
    assert "pyro.net=" not in kernel_command_line(_spec(None, tmp_path), "tcg")
    assert "network-interfaces" not in vm_config(_spec(None, tmp_path, "raw"))


def test_firecracker_opens_its_tap_by_name(tmp_path: Path) -> None:
    link = Link.of(3)
    config = vm_config(_spec(Nic(link.tap, link.mac, link.kernel_arg()), tmp_path, "raw"))
    assert config["network-interfaces"] == [
        {"iface_id": "eth0", "host_dev_name": "pyro-t3", "guest_mac": link.mac}
    ]
    assert link.kernel_arg() in config["boot-source"]["boot_args"].split()


def test_the_doctor_names_what_networking_lacks_and_the_fix() -> None:
    lacking = {"ip": None, "nft": None, "tun": False, "net_admin": False, "ip_forward": "0"}
    found = network_findings(lacking)
    assert any("nft is missing" in f and "make host-packages" in f for f in found)
    assert any("ip is missing" in f for f in found)
    assert any("/dev/net/tun is missing" in f and "modprobe tun" in f for f in found)
    assert any("IPv4 forwarding is off" in f for f in found)
    assert any("lacks CAP_NET_ADMIN" in f and "run pyro as root" in f for f in found)
    ready = {"ip": "/usr/bin/ip", "nft": "/usr/sbin/nft", "tun": True, "net_admin": True}
    ready["ip_forward"] = "1"
    assert network_findings(ready) == []
