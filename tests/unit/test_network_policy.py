"""Network policies, the address plan and published-port specs: checked before anything
is made, each bad value named."""

from __future__ import annotations

import ipaddress

import pytest

from pyro_mcp.api.operations.network_args import run_policy
from pyro_mcp.errors import InvalidArgument
from pyro_mcp.network.addresses import Link, slot_count
from pyro_mcp.network.policy import NetworkPolicy, parse_policy
from pyro_mcp.network.ports import check_publish_list, parse_publish


def test_a_policy_round_trips_through_the_store() -> None:
    policy = parse_policy("egress", ["10.77.0.9/24", "10.77.0.0/24"], ["Web.Test.", "*.x.test"])
    assert policy.allow_cidrs == (ipaddress.IPv4Network("10.77.0.0/24"),)  # one entry
    assert policy.allow_hosts == ("web.test", "*.x.test")
    assert policy.restricted and policy.enabled and not policy.publishes
    assert NetworkPolicy.from_dict(policy.to_dict()) == policy


@pytest.mark.parametrize(
    ("mode", "cidrs", "hosts", "message"),
    [
        ("on", [], [], "network policy must be one of off, egress, egress"),
        ("off", ["10.0.0.0/8"], [], "an allowlist needs a network"),
        ("egress", ["10.0.0.0/33"], [], "'10.0.0.0/33' is not an IPv4"),
        ("egress", ["::1/128"], [], "is not an IPv4"),
        ("egress", ["0.0.0.0/0"], [], "cannot be allowed"),
        ("egress", ["127.0.0.1"], [], "cannot be allowed"),
        ("egress", [], ["1.2.3.4"], "is an address"),
        ("egress", [], ["bad name"], "is not a domain"),
        ("egress", "10.0.0.0/8", [], "allow_cidr must be a list"),
        ("egress", [5], [], "entries are strings"),
        ("egress", [f"10.0.{n}.0/24" for n in range(65)], [], "at most 64"),
    ],
)
def test_a_bad_policy_is_refused_naming_what_is_wrong(
    mode: str, cidrs: object, hosts: object, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_policy(mode, cidrs, hosts)


def test_a_one_shot_run_has_no_ports_to_publish() -> None:
    assert run_policy(True, None, None, None).mode == "egress"
    assert run_policy(False, None, None, None).mode == "off"
    with pytest.raises(InvalidArgument, match="cannot publish ports"):
        run_policy(False, "egress+published-ports", None, None)
    with pytest.raises(InvalidArgument, match="network policy says off"):
        run_policy(True, "off", None, None)


def test_every_slot_has_its_own_addresses_names_and_mac() -> None:
    links = [Link.of(slot) for slot in (0, 1, 255, slot_count() - 1)]
    assert [str(link.guest) for link in links] == [
        "10.241.0.2",
        "10.241.0.6",
        "10.241.3.254",
        "10.241.255.254",
    ]
    assert len({link.tap for link in links}) == len({link.mac for link in links}) == 4
    assert all(len(link.tap) <= 15 for link in links)
    assert links[1].kernel_arg() == "pyro.net=10.241.0.6/30,10.241.0.5,02:70:79:00:00:01"
    with pytest.raises(InvalidArgument, match="outside the pool"):
        Link.of(slot_count())


def test_a_pool_that_is_not_private_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYRO_NET_POOL", "8.8.0.0/16")
    with pytest.raises(InvalidArgument, match="must be a private IPv4 network"):
        Link.of(0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8080:80", (ipaddress.IPv4Address("127.0.0.1"), 8080, 80)),
        ("0:80", (ipaddress.IPv4Address("127.0.0.1"), 0, 80)),
        ("0.0.0.0:9000:9000", (ipaddress.IPv4Address("0.0.0.0"), 9000, 9000)),
    ],
)
def test_publish_specs(text: str, expected: tuple[object, ...]) -> None:
    assert parse_publish(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("80", "is not \\[HOST_IP:\\]HOST_PORT:GUEST_PORT"),
        ("a:b:c:d", "is not \\[HOST_IP:\\]HOST_PORT:GUEST_PORT"),
        ("70000:80", "port '70000' is not a number 0-65535"),
        ("8080:0", "port '0' is not a number 1-65535"),
        ("localhost:8080:80", "'localhost' is not an IPv4 address"),
        ("-1:80", "is not a number"),
    ],
)
def test_bad_publish_specs_are_named(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_publish(text)


def test_at_most_32_published_ports() -> None:
    with pytest.raises(InvalidArgument, match="at most 32"):
        check_publish_list([f"{9000 + n}:80" for n in range(33)])
