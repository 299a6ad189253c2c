"""Adding addresses to an nftables set, each with a timeout (one ``nft`` call, an argv)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from ipaddress import IPv4Address

from pyro_mcp.errors import HostToolMissing, InvalidArgument, OperationTimeout, ToolFailed

NFT_FAMILIES = frozenset({"ip", "ip6", "inet", "arp", "bridge", "netdev"})
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
NFT_RUN_TIMEOUT_S = 10.0


def check_set(table_family: str, table: str, set_name: str) -> None:
    """Raises InvalidArgument for a family nft does not know, or a table or set name that
    is not a plain identifier (nothing nft could read as syntax)."""
    if table_family not in NFT_FAMILIES:
        raise InvalidArgument(f"nft family {table_family!r} is not one of {sorted(NFT_FAMILIES)}")
    for what, value in (("table", table), ("set", set_name)):
        if not _IDENTIFIER.fullmatch(value):
            raise InvalidArgument(f"nft {what} name {value!r} is not a plain identifier")


def element_argv(
    table_family: str,
    table: str,
    set_name: str,
    addresses: Sequence[IPv4Address],
    timeout_s: int,
    *,
    nft: Sequence[str] = ("nft",),
) -> list[str]:
    """``[*nft, "add", "element", FAMILY, TABLE, SET, "{ 1.2.3.4 timeout 300s, ... }"]``.

    Raises InvalidArgument as :func:`check_set`, for a timeout below 1 s, or no addresses.
    """
    check_set(table_family, table, set_name)
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int) or timeout_s < 1:
        raise InvalidArgument(
            f"an element timeout is a whole number of seconds >= 1: {timeout_s!r}"
        )
    if not addresses:
        raise InvalidArgument("no addresses to add")
    elements = ", ".join(f"{IPv4Address(a)} timeout {timeout_s}s" for a in addresses)
    return [*nft, "add", "element", table_family, table, set_name, "{ " + elements + " }"]


def add_set_elements(
    table_family: str,
    table: str,
    set_name: str,
    addresses: Sequence[IPv4Address],
    timeout_s: int,
    *,
    nft: Sequence[str] = ("nft",),
) -> None:
    """Add ``addresses`` to the set, each expiring after ``timeout_s`` seconds; nothing
    when ``addresses`` is empty. An address already in the set keeps its own timeout.

    ``nft`` is the program's argv prefix (a test puts a recorder there). Raises
    HostToolMissing without nft, ToolFailed when it exits non-zero (with its stderr),
    OperationTimeout past :data:`NFT_RUN_TIMEOUT_S`, InvalidArgument as
    :func:`element_argv`.
    """
    if not addresses:
        return
    argv = element_argv(table_family, table, set_name, addresses, timeout_s, nft=nft)
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=NFT_RUN_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError as exc:
        raise HostToolMissing(
            f"{argv[0]} is not installed", hint="apt-get install nftables"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise OperationTimeout(f"nft add element ran past {NFT_RUN_TIMEOUT_S:g} s") from exc
    if done.returncode != 0:
        raise ToolFailed(
            f"nft add element to {table_family} {table} {set_name} exited {done.returncode}",
            stderr_tail=done.stderr.decode(errors="replace")[-2000:],
        )
