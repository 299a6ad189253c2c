"""What a pyro without the rights guest networking needs is told (run as ``nobody``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _as_unprivileged(code: str) -> str:
    """Run ``code`` as a user without capabilities; its one line of output."""
    prefix = NOBODY if os.geteuid() == 0 else []
    done = subprocess.run(
        [*prefix, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYRO_NET_NAMESPACE": ""},
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


SHOW_ERROR = """
from pyro_mcp.errors import PyroError
try:
    {call}
except PyroError as exc:
    print(type(exc).__name__, "|", exc)
else:
    print("no error")
"""


def test_guest_networking_without_net_admin_is_refused_before_anything_is_made() -> None:
    out = _as_unprivileged(
        SHOW_ERROR.format(
            call="import pathlib, tempfile; from pyro_mcp.network.link import attach_network; "
            "from pyro_mcp.network.policy import parse_policy; "
            "attach_network('vm-u', pathlib.Path(tempfile.mkdtemp()), parse_policy('egress'), "
            "root=pathlib.Path(tempfile.mkdtemp()))"
        )
    )
    assert out == (
        "NetworkUnavailable | guest networking needs root (CAP_NET_ADMIN): TAP devices and"
        " nftables rules (run pyro as root, or use --network-policy off)"
    )


def test_a_privileged_host_port_without_the_right_to_bind_it_is_refused() -> None:
    out = _as_unprivileged(
        SHOW_ERROR.format(
            call="from pyro_mcp.network.ports import check_free, check_publish_list; "
            "check_free(check_publish_list(['127.0.0.1:80:8080']))"
        )
    )
    assert out == (
        "InvalidArgument | host port 80 is privileged (below 1024) and pyro may not bind it"
        " (choose a port of 1024 or above, or 0 to pick a free one)"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="root binds privileged ports")
def test_root_may_publish_a_privileged_host_port() -> None:
    from pyro_mcp.network.ports import check_free, check_publish_list

    check_free(check_publish_list(["127.0.0.1:1:8080"]))  # nothing listens on port 1
