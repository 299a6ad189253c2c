"""The guest's DNS resolver: ``python -m pyro_mcp.network.resolver CONFIG_PATH|-``
(``-``: the config on stdin).

One process per VM link, started and ended by the host. It listens on UDP and TCP at the
link's gateway address (the guest's ``/etc/resolv.conf`` names it), answers what the
:class:`~pyro_mcp.network.dns_policy.Policy` allows from the upstream nameservers, and
puts each answer's addresses into the VM's nftables allow set *before* the guest gets the
answer (so its first connection finds them there). It prints ``ready`` on stdout once both
sockets are bound, ends cleanly on SIGTERM (or SIGINT), and logs only counts: on stderr,
every minute while they change and once at the end, as JSON.

Against a hostile guest: queries are parsed strictly (dns.py) and a malformed one is
counted and dropped; at most ``max_in_flight`` queries are answered at once and
``rate_per_s`` (burst ``rate_burst``) per second, the rest dropped; TCP connections are
bounded in number and idle time; UDP answers above the query's limit go out truncated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import signal
import struct
import sys
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, cast

from pyro_mcp.errors import PyroError
from pyro_mcp.network.dns import (
    MAX_MESSAGE_BYTES,
    MAX_QUERY_BYTES,
    RCODE_BADVERS,
    RCODE_NOERROR,
    RCODE_NOTIMP,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    MalformedMessage,
    Message,
    Question,
    build_response,
    build_upstream_query,
    encode_within,
    parse_message,
    parse_query,
    udp_limit,
)
from pyro_mcp.network.dns_policy import (
    AllowSetLedger,
    Policy,
    Resolution,
    Verdict,
    resolve_from_answer,
    with_ttl,
)
from pyro_mcp.network.nft_elements import add_set_elements
from pyro_mcp.network.resolver_config import Endpoint, ResolverConfig

log = logging.getLogger("pyro_mcp.network.resolver")

OnAllowed = Callable[[list[IPv4Address], int], None]
"""Called with an answer's addresses new to the set and their timeout in seconds; it
blocks (it runs in a worker thread) and raises when they could not be added."""

COUNTS_INTERVAL_S = 60.0
_LENGTH = struct.Struct("!H")


@dataclass
class Counts:
    udp_queries: int = 0
    tcp_queries: int = 0
    malformed: int = 0
    dropped_rate: int = 0
    dropped_busy: int = 0
    tcp_refused: int = 0
    refused: int = 0
    not_implemented: int = 0
    resolved: int = 0
    upstream_failures: int = 0
    set_added: int = 0
    set_failures: int = 0
    internal_errors: int = 0


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = float(burst)
        self.last = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class _UpstreamDatagram(asyncio.DatagramProtocol):
    """One upstream UDP query's socket: the first response with its id is the answer."""

    def __init__(self, query_id: int, answer: asyncio.Future[Message]) -> None:
        self.query_id = query_id
        self.answer = answer

    def datagram_received(self, data: bytes, addr: object) -> None:
        with contextlib.suppress(MalformedMessage):
            message = parse_message(data)
            if message.id == self.query_id and message.is_response and not self.answer.done():
                self.answer.set_result(message)

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable
        if not self.answer.done():
            self.answer.set_exception(exc)


class Upstreams:
    """The upstream nameservers: each attempt at the next one, over UDP, then TCP when
    the UDP answer is truncated; every attempt bounded by ``timeout_s``."""

    def __init__(self, servers: tuple[Endpoint, ...], timeout_s: float, attempts: int) -> None:
        self.servers = servers
        self.timeout_s = timeout_s
        self.attempts = attempts
        self._next = 0

    async def resolve(self, question: Question) -> Resolution | None:
        """The reduced answer, or None when every attempt failed."""
        for _ in range(self.attempts):
            server = self.servers[self._next % len(self.servers)]
            self._next += 1
            try:
                response = await asyncio.wait_for(self._ask_udp(server, question), self.timeout_s)
                if response.truncated:
                    response = await asyncio.wait_for(
                        self._ask_tcp(server, question), self.timeout_s
                    )
                return resolve_from_answer(question, response)
            except (OSError, TimeoutError, MalformedMessage, asyncio.IncompleteReadError):
                continue
        return None

    async def _ask_udp(self, server: Endpoint, question: Question) -> Message:
        loop = asyncio.get_running_loop()
        query_id = secrets.randbits(16)
        answer: asyncio.Future[Message] = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UpstreamDatagram(query_id, answer), remote_addr=server
        )
        try:
            transport.sendto(build_upstream_query(question, query_id))
            return await answer
        finally:
            transport.close()

    async def _ask_tcp(self, server: Endpoint, question: Question) -> Message:
        query_id = secrets.randbits(16)
        query = build_upstream_query(question, query_id)
        reader, writer = await asyncio.open_connection(*server)
        try:
            writer.write(_LENGTH.pack(len(query)) + query)
            await writer.drain()
            (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
            response = parse_message(await reader.readexactly(length))
        finally:
            writer.close()
        if response.id != query_id or not response.is_response:
            raise MalformedMessage("upstream TCP answer with another id")
        return response


class _GuestDatagram(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a datagram endpoint's transport (3.11's class does not derive from the ABC)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.resolver.counts.udp_queries += 1
        if self.resolver.admit():
            self.resolver.spawn(self._answer(data, addr))

    async def _answer(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = await self.resolver.answer(data, over_udp=True)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


class Resolver:
    """The resolver of one VM link (see the module docstring); ``on_allowed`` None adds
    no addresses anywhere (no allowlist)."""

    def __init__(
        self,
        config: ResolverConfig,
        on_allowed: OnAllowed | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.on_allowed = on_allowed
        self.clock = clock
        self.policy = Policy(config.allow_hosts)
        self.upstreams = Upstreams(
            config.upstreams, config.upstream_timeout_s, config.upstream_attempts
        )
        self.ledger = AllowSetLedger(
            floor_s=config.ttl_floor_s,
            cap_s=config.ttl_cap_s,
            max_elements=config.max_set_elements,
        )
        self.bucket = TokenBucket(config.rate_per_s, config.rate_burst, clock)
        self.counts = Counts()
        self._in_flight = 0
        self._tcp_connections = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="nft")

    # -- admission -----------------------------------------------------------------------

    def admit(self) -> bool:
        """Whether one more query may be answered now (in-flight bound, then the rate);
        when it may, it is in flight until :meth:`answer` has answered it."""
        if self._in_flight >= self.config.max_in_flight:
            self.counts.dropped_busy += 1
            return False
        if not self.bucket.take():
            self.counts.dropped_rate += 1
            return False
        self._in_flight += 1
        return True

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- answering -----------------------------------------------------------------------

    async def answer(self, data: bytes, *, over_udp: bool) -> bytes | None:
        """The reply to one guest message :meth:`admit` let in, or None to drop it
        (malformed: counted)."""
        try:
            try:
                query = parse_query(data)
            except MalformedMessage:
                self.counts.malformed += 1
                return None
            try:
                response = await self._respond(query)
            except Exception as exc:  # a bug must cost one answer, not the resolver
                self.counts.internal_errors += 1
                log.error("internal error answering a query (%s)", type(exc).__name__)
                response = build_response(query, RCODE_SERVFAIL)
        finally:
            self._in_flight -= 1
        return encode_within(response, udp_limit(query) if over_udp else MAX_MESSAGE_BYTES)

    async def _respond(self, query: Message) -> Message:
        verdict = self.policy.decide(query)
        if verdict is Verdict.REFUSE:
            self.counts.refused += 1
            return build_response(query, RCODE_REFUSED)
        if verdict is Verdict.NOT_IMPLEMENTED:
            self.counts.not_implemented += 1
            return build_response(query, RCODE_NOTIMP)
        if verdict is Verdict.BAD_VERSION:
            return build_response(query, RCODE_BADVERS)
        if verdict is Verdict.EMPTY:
            return build_response(query, RCODE_NOERROR)
        resolution = await self.upstreams.resolve(query.questions[0])
        if resolution is None:
            self.counts.upstream_failures += 1
            return build_response(query, RCODE_SERVFAIL)
        self.counts.resolved += 1
        if resolution.ttl_s is None:
            return build_response(query, resolution.rcode)
        ttl = min(resolution.ttl_s, self.config.ttl_cap_s)
        if resolution.addresses and self.on_allowed is not None:
            admitted = await self._add_to_set(self.on_allowed, resolution.addresses, ttl)
            if admitted is None:
                return build_response(query, RCODE_SERVFAIL)
            ttl = admitted
        return build_response(query, resolution.rcode, with_ttl(resolution.records, ttl))

    async def _add_to_set(
        self, on_allowed: OnAllowed, addresses: tuple[IPv4Address, ...], ttl_s: int
    ) -> int | None:
        """Put an answer's addresses in the set; the TTL to tell the guest, or None when
        they could not be added (the guest gets SERVFAIL: it could not connect anyway)."""
        started = self.clock()
        plan = self.ledger.plan(addresses, ttl_s, started)
        if plan is None:
            self.counts.set_failures += 1
            log.warning("the allow set is full (%d addresses)", len(self.ledger))
            return None
        if plan.new:
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(
                    self._workers, on_allowed, list(plan.new), plan.timeout_s
                )
            except Exception as exc:  # the hook is replaceable: any failure fails one answer
                self.counts.set_failures += 1
                code = exc.code if isinstance(exc, PyroError) else type(exc).__name__
                log.warning("adding to the allow set failed (%s)", code)
                return None
            self.ledger.record(plan, started)
            self.counts.set_added += len(plan.new)
        return plan.answer_ttl_s

    # -- TCP -------------------------------------------------------------------------------

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tcp_connections >= self.config.max_tcp_connections:
            self.counts.tcp_refused += 1
            writer.close()
            return
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)  # ended with the others on stop
        self._tcp_connections += 1
        idle = self.config.tcp_idle_timeout_s
        try:
            while True:
                (length,) = _LENGTH.unpack(await asyncio.wait_for(reader.readexactly(2), idle))
                if length > MAX_QUERY_BYTES:
                    self.counts.malformed += 1
                    break
                data = await asyncio.wait_for(reader.readexactly(length), idle)
                self.counts.tcp_queries += 1
                if not self.admit():
                    continue
                reply = await self.answer(data, over_udp=False)
                if reply is None:
                    break  # a stream after a malformed message cannot be trusted
                writer.write(_LENGTH.pack(len(reply)) + reply)
                await asyncio.wait_for(writer.drain(), idle)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tcp_connections -= 1
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    # -- the process ---------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event, ready: Callable[[], None]) -> None:
        """Listen, call ``ready`` once both sockets are bound, answer until ``stop``."""
        loop = asyncio.get_running_loop()
        host, port = self.config.listen
        udp, _ = await loop.create_datagram_endpoint(
            lambda: _GuestDatagram(self), local_addr=(host, port)
        )
        tcp = await asyncio.start_server(self._serve_tcp, host, port, limit=4096)
        ready()
        counts_task = loop.create_task(self._log_counts())
        try:
            await stop.wait()
        finally:
            udp.close()
            tcp.close()
            counts_task.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, counts_task, return_exceptions=True)
            self._workers.shutdown(wait=True, cancel_futures=True)
            log.info("stopped %s", json.dumps(asdict(self.counts)))

    async def _log_counts(self) -> None:
        last = asdict(self.counts)
        while True:
            await asyncio.sleep(COUNTS_INTERVAL_S)
            now = asdict(self.counts)
            if now != last:
                log.info("counts %s", json.dumps(now))
                last = now


async def _run(resolver: Resolver) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await resolver.serve(stop, ready=_say_ready)


def _say_ready() -> None:
    with contextlib.suppress(BrokenPipeError):  # a host that stopped reading still ends us
        print("ready", flush=True)


def _set_hook(config: ResolverConfig) -> OnAllowed | None:
    if config.nft_set is None:
        return None
    family, table, set_name = config.nft_set

    def add(addresses: list[IPv4Address], timeout_s: int) -> None:
        add_set_elements(family, table, set_name, addresses, timeout_s, nft=config.nft_command)

    return add


def main(argv: list[str] | None = None) -> int:
    """Exit 0 after SIGTERM; 2 for a bad config, 1 when a socket cannot be bound."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="pyro-dns: %(message)s", stream=sys.stderr)
    if len(args) != 1:
        log.error("usage: python -m pyro_mcp.network.resolver CONFIG_PATH|-")
        return 2
    try:
        text = sys.stdin.read() if args[0] == "-" else Path(args[0]).read_text()
        config = ResolverConfig.from_json(json.loads(text))
    except (OSError, ValueError, PyroError) as exc:
        log.error("cannot read the config %s: %s", args[0], exc)
        return 2
    try:
        asyncio.run(_run(Resolver(config, _set_hook(config))))
    except OSError as exc:
        log.error("cannot listen on %s port %d: %s", *config.listen, exc.strerror)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
