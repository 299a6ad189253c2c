"""The guest resolver's configuration: a strict JSON object the host writes, one per VM
link; and the host's upstream nameservers."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pyro_mcp.errors import InvalidArgument, NotFound
from pyro_mcp.network.dns_policy import parse_allow_host
from pyro_mcp.network.nft_elements import check_set

Endpoint = tuple[str, int]


@dataclass(frozen=True)
class ResolverConfig:
    """What ``python -m pyro_mcp.network.resolver CONFIG_PATH`` reads (as JSON: tuples are
    lists; unknown keys are refused)."""

    listen: Endpoint
    """Where the guest asks, UDP and TCP: the gateway address of its link, port 53."""
    upstreams: tuple[Endpoint, ...]
    """Nameservers permitted queries go to, tried in turn (:func:`host_upstreams`)."""
    allow_hosts: tuple[str, ...] | None = None
    """None answers every name; otherwise only what these entries match (maybe none)."""
    nft_set: tuple[str, str, str] | None = None
    """(family, table, set) the answered addresses are added to; None adds nothing."""
    nft_command: tuple[str, ...] = ("nft",)
    """The nft program's argv prefix (tests put a recorder here)."""
    upstream_timeout_s: float = 2.0
    """How long one attempt waits for an upstream answer."""
    upstream_attempts: int = 3
    """Attempts per query, each at the next upstream, before SERVFAIL."""
    max_in_flight: int = 64
    """Queries being answered at once; a query beyond it is dropped."""
    max_tcp_connections: int = 16
    """Open TCP connections from the guest; one beyond it is closed at once."""
    tcp_idle_timeout_s: float = 10.0
    """A TCP connection silent (or not reading) this long is closed."""
    rate_per_s: float = 200.0
    """Queries per second answered on average (a token bucket); beyond it dropped."""
    rate_burst: int = 400
    """Queries answered in a burst before the rate applies."""
    ttl_floor_s: int = 30
    """The shortest timeout an address gets in the set (a TTL below it is raised)."""
    ttl_cap_s: int = 86400
    """The longest timeout in the set, and the longest TTL told to the guest."""
    max_set_elements: int = 4096
    """Addresses this resolver keeps in the set at once; an answer needing more fails."""

    def __post_init__(self) -> None:
        _check_endpoint("listen", self.listen)
        if not self.upstreams:
            raise InvalidArgument("resolver config: upstreams is empty")
        for upstream in self.upstreams:
            _check_endpoint("upstreams", upstream)
        for entry in self.allow_hosts or ():
            parse_allow_host(entry)
        if self.nft_set is not None:
            check_set(*self.nft_set)
        if not self.nft_command:
            raise InvalidArgument("resolver config: nft_command is empty")
        for name in ("upstream_timeout_s", "tcp_idle_timeout_s", "rate_per_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise InvalidArgument(f"resolver config: {name} must be positive")
        for name in (
            "upstream_attempts",
            "max_in_flight",
            "max_tcp_connections",
            "rate_burst",
            "ttl_floor_s",
            "max_set_elements",
        ):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"resolver config: {name} must be at least 1")
        if self.ttl_cap_s < self.ttl_floor_s:
            raise InvalidArgument("resolver config: ttl_cap_s is below ttl_floor_s")

    @classmethod
    def from_json(cls, data: object) -> ResolverConfig:
        """Read the JSON object; raises InvalidArgument naming the key that is wrong."""
        if not isinstance(data, dict):
            raise InvalidArgument("resolver config: not a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise InvalidArgument(f"resolver config: unknown keys {unknown}")
        missing = sorted(k for k in ("listen", "upstreams") if k not in data)
        if missing:
            raise InvalidArgument(f"resolver config: missing keys {missing}")
        values: dict[str, Any] = {}
        for key, value in data.items():
            values[key] = _read_value(key, value, str(known[key].type))
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _read_value(key: str, value: object, declared: str) -> object:
    """``value`` as the field declared ``declared`` (the annotation's text) wants it."""

    def wrong(expected: str) -> InvalidArgument:
        return InvalidArgument(f"resolver config: {key} must be {expected}")

    if declared == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong("a number")
        return float(value)
    if declared == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("a whole number")
        return value
    if declared == "Endpoint":
        return _endpoint(value, wrong)
    if declared == "tuple[Endpoint, ...]":
        if not isinstance(value, list):
            raise wrong("a list of [address, port]")
        return tuple(_endpoint(item, wrong) for item in value)
    if value is None and declared.endswith("| None"):
        return None
    if declared in ("tuple[str, ...]", "tuple[str, ...] | None"):
        return _strings(value, wrong)
    if declared == "tuple[str, str, str] | None":
        strings = _strings(value, wrong)
        if len(strings) != 3:
            raise wrong("null or [family, table, set]")
        return strings
    raise TypeError(f"resolver config: no reader for {key} ({declared})")  # a new field


def _strings(value: object, wrong: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise wrong("a list of strings")
    return tuple(value)


def _endpoint(value: object, wrong: Any) -> Endpoint:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], str)
        or isinstance(value[1], bool)
        or not isinstance(value[1], int)
    ):
        raise wrong("[address, port]")
    return (value[0], value[1])


def _check_endpoint(key: str, endpoint: Endpoint) -> None:
    address, port = endpoint
    try:
        ipaddress.ip_address(address)
    except ValueError as exc:
        raise InvalidArgument(f"resolver config: {key}: {address!r} is not an IP address") from exc
    if not 1 <= port <= 65535:
        raise InvalidArgument(f"resolver config: {key}: port {port} is not 1 to 65535")


def host_upstreams(path: str | Path = "/etc/resolv.conf") -> list[Endpoint]:
    """The host's nameservers, in the file's order, each on port 53 (a stub such as
    127.0.0.53 included: the resolver runs in the host's network namespace).

    Lines that are not ``nameserver ADDRESS`` with an IP address are skipped. Raises
    NotFound when the file is missing or names no nameserver.
    """
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        raise NotFound(f"cannot read {path}: {exc.strerror}") from exc
    found: list[Endpoint] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                ipaddress.ip_address(words[1])
            except ValueError:
                continue
            found.append((words[1], 53))
    if not found:
        raise NotFound(f"{path} names no nameserver", hint="the guest's DNS needs an upstream")
    return found
