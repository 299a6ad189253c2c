"""What the guest's resolver answers, and what it lets into the allow set; no sockets.

- a name the :class:`Policy` does not allow: REFUSED, and no upstream query;
- class IN only (others REFUSED); opcode QUERY only (others NOTIMP);
- A: resolved upstream; the guest gets the CNAME chain and the A records answering the
  name (nothing else of the upstream answer), and those addresses go to the allow set;
- AAAA: an empty NOERROR answer (the guest has IPv4 only);
- any other type: NOTIMP.

docs/network.md, "DNS and host allowlists", says why and where the limits are.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, replace
from ipaddress import IPv4Address

from pyro_mcp.errors import InvalidArgument
from pyro_mcp.network.dns import (
    CLASS_IN,
    OPCODE_QUERY,
    RCODE_NOERROR,
    RCODE_NXDOMAIN,
    RCODE_SERVFAIL,
    TYPE_A,
    TYPE_AAAA,
    TYPE_CNAME,
    MalformedMessage,
    Message,
    Name,
    Question,
    Record,
    name_key,
)

MAX_CNAME_CHAIN = 8  # links followed from the queried name to the A records

# ---------------------------------------------------------------------------------------
# Policy


_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


def parse_allow_host(entry: str) -> str:
    """An ``--allow-host`` value, checked and normalized: lower case, no trailing dot.

    ``example.com`` allows that name only; ``*.example.com`` allows its subdomains, at any
    depth, and not ``example.com`` itself. Raises InvalidArgument naming the entry.
    """
    text = entry.strip().lower().removesuffix(".")
    wildcard = text.startswith("*.")
    host = text[2:] if wildcard else text
    if not host or host == "*":
        raise InvalidArgument(
            f"allow-host {entry!r} is not a domain",
            hint="omit every allowlist to allow all names",
        )
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        raise InvalidArgument(
            f"allow-host {entry!r} is an address", hint="use --allow-cidr for addresses"
        )
    if not host.isascii():
        raise InvalidArgument(
            f"allow-host {entry!r} is not ASCII", hint="write the name's xn-- (IDNA) form"
        )
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise InvalidArgument(
            f"allow-host {entry!r} is not a domain name",
            hint="letters, digits, '-' and '_' in labels of 1 to 63; '*.' only in front",
        )
    return text


def _host_text(name: Name) -> str | None:
    """The name in lower case when every label could be in an allowlist entry."""
    # Label by label: a wire label may hold a dot, and ``(b"a.example",)`` is not a.example.
    try:
        labels = [label.decode("ascii").lower() for label in name]
    except UnicodeDecodeError:
        return None
    if not labels or not all(_LABEL.fullmatch(label) for label in labels):
        return None
    return ".".join(labels)


class Verdict(enum.Enum):
    RESOLVE = "resolve"  # ask upstream for the A records
    EMPTY = "empty"  # NOERROR without records (AAAA: the guest has IPv4 only)
    REFUSE = "refuse"
    NOT_IMPLEMENTED = "not_implemented"
    BAD_VERSION = "bad_version"  # an EDNS version other than 0


class Policy:
    """Which names the guest may resolve: ``allow_hosts`` None answers every name; a
    tuple (maybe empty) answers only the names its entries match (:func:`parse_allow_host`);
    matching is case-insensitive and ignores a trailing dot."""

    def __init__(self, allow_hosts: tuple[str, ...] | None) -> None:
        self.allow_hosts = (
            None if allow_hosts is None else tuple(parse_allow_host(e) for e in allow_hosts)
        )
        entries = self.allow_hosts or ()
        self._exact = frozenset(e for e in entries if not e.startswith("*."))
        self._parents = frozenset(e[2:] for e in entries if e.startswith("*."))

    def allows(self, name: Name) -> bool:
        if self.allow_hosts is None:
            return True
        host = _host_text(name)
        if host is None:
            return False
        if host in self._exact:
            return True
        labels = host.split(".")
        return any(".".join(labels[i:]) in self._parents for i in range(1, len(labels)))

    def decide(self, query: Message) -> Verdict:
        """What to do with a parsed query (:func:`parse_query`)."""
        question = query.questions[0]
        if query.edns is not None and query.edns.version != 0:
            return Verdict.BAD_VERSION
        if query.opcode != OPCODE_QUERY:
            return Verdict.NOT_IMPLEMENTED
        if question.qclass != CLASS_IN or not self.allows(question.name):
            return Verdict.REFUSE
        if question.qtype == TYPE_A:
            return Verdict.RESOLVE
        if question.qtype == TYPE_AAAA:
            return Verdict.EMPTY
        return Verdict.NOT_IMPLEMENTED


# ---------------------------------------------------------------------------------------
# Upstream answers


@dataclass(frozen=True)
class Resolution:
    """What an upstream answer says about one question, reduced to what the guest gets."""

    rcode: int
    records: tuple[Record, ...] = ()
    """The CNAME chain from the queried name, then the A records of its end."""
    addresses: tuple[IPv4Address, ...] = ()
    ttl_s: int | None = None
    """The shortest TTL among ``records``: how long the whole answer holds."""


def resolve_from_answer(question: Question, response: Message) -> Resolution:
    """Reduce ``response`` (to an A query for ``question``) to what answers the name.

    Only records owned by the queried name or a target along its CNAME chain count; the
    rest of the answer (other names, authority, additional) is dropped. An rcode other than
    NOERROR or NXDOMAIN becomes SERVFAIL. Raises MalformedMessage when the response does
    not answer the question, or its chain forks, loops or runs past :data:`MAX_CNAME_CHAIN`.
    """
    if not response.is_response or response.opcode != OPCODE_QUERY:
        raise MalformedMessage("upstream sent no query response")
    expected = (name_key(question.name), question.qtype, question.qclass)
    if [(name_key(q.name), q.qtype, q.qclass) for q in response.questions] != [expected]:
        raise MalformedMessage("upstream answered another question")
    if response.rcode not in (RCODE_NOERROR, RCODE_NXDOMAIN):
        return Resolution(RCODE_SERVFAIL)
    answers = [r for r in response.answers if r.rclass == CLASS_IN]
    current = name_key(question.name)
    seen = {current}
    chain: list[Record] = []
    while True:
        cnames = [r for r in answers if r.rtype == TYPE_CNAME and name_key(r.name) == current]
        if not cnames:
            break
        if len(cnames) > 1:
            raise MalformedMessage("two CNAME records for one name")
        target = cnames[0].target
        if target is None:  # only a Record built by hand lacks it; the parser decodes it
            raise MalformedMessage("CNAME record without a target")
        current = name_key(target)
        if current in seen:
            raise MalformedMessage("CNAME loop")
        if len(chain) == MAX_CNAME_CHAIN:
            raise MalformedMessage("CNAME chain too long")
        seen.add(current)
        chain.append(cnames[0])
    a_records = [r for r in answers if r.rtype == TYPE_A and name_key(r.name) == current]
    records = (*chain, *a_records)
    addresses = tuple(dict.fromkeys(IPv4Address(r.rdata) for r in a_records))
    ttl = min((r.ttl for r in records), default=None)
    return Resolution(response.rcode, records, addresses, ttl)


def with_ttl(records: tuple[Record, ...], ttl_s: int) -> tuple[Record, ...]:
    return tuple(replace(record, ttl=ttl_s) for record in records)


# ---------------------------------------------------------------------------------------
# The allow set


@dataclass(frozen=True)
class Admission:
    new: tuple[IPv4Address, ...]
    """Addresses to add to the set, each with ``timeout_s``."""
    timeout_s: int
    answer_ttl_s: int
    """The TTL to tell the guest: never beyond the end of any address's set element."""


class AllowSetLedger:
    """What this resolver has put in the allow set, and until when (monotonic seconds).

    ``nft add element`` leaves an element already in the set as it is (its timeout runs
    on), so re-adding an address does not extend it: the guest must then not be told to
    keep the address longer than its element lives. The ledger assumes the resolver is the
    only writer of the set's elements. An element is taken to live ``GRACE_S`` past its
    computed end (the kernel's clock and ours differ a little); it is re-added only after.
    """

    GRACE_S = 1.0

    def __init__(self, *, floor_s: int, cap_s: int, max_elements: int) -> None:
        if not 0 < floor_s <= cap_s:
            raise InvalidArgument("the TTL floor must be positive and at most the cap")
        self.floor_s = floor_s
        self.cap_s = cap_s
        self.max_elements = max_elements
        self._ends: dict[IPv4Address, float] = {}

    def plan(self, addresses: tuple[IPv4Address, ...], ttl_s: int, now: float) -> Admission | None:
        """What adding an answer's addresses takes; None when the ledger is full."""
        self._ends = {a: end for a, end in self._ends.items() if now < end + self.GRACE_S}
        timeout = min(max(ttl_s, self.floor_s), self.cap_s)
        answer_ttl = min(ttl_s, self.cap_s)
        new = []
        for address in addresses:
            end = self._ends.get(address)
            if end is None:
                new.append(address)
            else:
                answer_ttl = min(answer_ttl, max(0, int(end - now)))
        if len(self._ends) + len(new) > self.max_elements:
            return None
        return Admission(tuple(new), timeout, answer_ttl)

    def record(self, admission: Admission, started: float) -> None:
        """The set now holds ``admission.new``: added no earlier than ``started``."""
        for address in admission.new:
            end = started + admission.timeout_s
            self._ends[address] = min(end, self._ends.get(address, end))

    def __len__(self) -> int:
        return len(self._ends)
