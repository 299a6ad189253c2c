"""The cluster's own logic, without Ray: the directory of owners, and the clear errors a
client gets before it reaches any node."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from pyro_mcp.cluster.directory import Directory
from pyro_mcp.errors import InvalidArgument, NodeLost, RuntimeMissing


def test_the_directory_finds_a_workspace_by_id_or_name_and_forgets_it() -> None:
    directory = Directory()
    directory.add_node("n1", "kvm-01")
    directory.record("workspace", "0123456789ab", "app", "n1")
    directory.record("vm", "0123456789ab", None, "n2")  # another kind: its own ids
    assert directory.lookup("workspace", "0123456789ab") == ("0123456789ab", "n1")
    assert directory.lookup("workspace", "app") == ("0123456789ab", "n1")
    assert directory.lookup("vm", "0123456789ab") == ("0123456789ab", "n2")
    assert directory.lookup("workspace", "nope") is None
    directory.rename("workspace", "0123456789ab", "web")
    assert directory.lookup("workspace", "app") is None
    assert directory.lookup("workspace", "web") == ("0123456789ab", "n1")
    assert directory.on_node("n1") == [("workspace", "0123456789ab", "web")]
    directory.forget("workspace", "0123456789ab")
    assert directory.lookup("workspace", "web") is None
    assert directory.on_node("n1") == [] and directory.node_names() == {"n1": "kvm-01"}


def test_a_node_lost_error_names_its_node() -> None:
    lost = NodeLost("workspace x is lost: its node kvm-01 is gone", node="kvm-01")
    assert lost.to_dict() == {
        "error": "node_lost",
        "message": "workspace x is lost: its node kvm-01 is gone",
        "node": "kvm-01",
    }


def test_a_cluster_address_that_nothing_answers_is_a_clear_error_at_once() -> None:
    from pyro_mcp.cluster import connect

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(RuntimeMissing, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        connect(f"127.0.0.1:{port}")
    with pytest.raises(InvalidArgument, match="no cluster address"):
        connect("")


def test_the_cli_says_so_for_a_cluster_that_does_not_answer() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-m", "pyro_mcp.cli.main", "--cluster", f"127.0.0.1:{port}",
         "workspace", "list"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith(f"pyro: error: no Ray cluster answers at 127.0.0.1:{port}")
    assert "Traceback" not in done.stderr
