"""Connecting MCP hosts (Claude Code, Codex, OpenCode) to pyro's MCP server.

One module per host says where its configuration lives and how it spells a stdio
server; :mod:`.server` says what pyro wants any host to start, :mod:`.config_files`
how a file is changed without losing the user's settings, :mod:`.connect` and
:mod:`.doctor` what the ``pyro host`` commands do.
"""

from pyro_mcp.hosts.connect import HOSTS, connect, print_config
from pyro_mcp.hosts.doctor import diagnose, repair
from pyro_mcp.hosts.server import Setup, this_pyro

__all__ = ["HOSTS", "Setup", "connect", "diagnose", "print_config", "repair", "this_pyro"]
