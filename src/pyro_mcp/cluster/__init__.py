"""pyro on a Ray cluster: one pyro node per KVM host, the same operations, placement by
capacity, and a node that is gone reported as such (``pip install 'pyro-mcp[ray]'``).

    from pyro_mcp.cluster import connect
    cluster = connect("127.0.0.1:6379")       # or $PYRO_CLUSTER
    ws = cluster.create_workspace("debian:12")  # on the node that can best take it
    cluster.exec_workspace(ws["workspace_id"], "uname -a")  # on the node that owns it
    for outcome in cluster.map_runs([{"environment": "debian:12", "command": "true"}] * 20):
        ...

See :mod:`pyro_mcp.cluster.client` (routing, placement, lost nodes) and
:mod:`pyro_mcp.cluster.node` (what runs on each host). docs/scale-out.md says how to run one.
"""

from __future__ import annotations

from pyro_mcp.cluster.client import CLUSTER_ENV, NODE_RESOURCE, Cluster, connect

__all__ = ["CLUSTER_ENV", "NODE_RESOURCE", "Cluster", "connect"]
