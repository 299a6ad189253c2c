"""MCP profiles: which tools an MCP client sees (the SDK itself is imported elsewhere)."""

PROFILES = ("vm-run", "workspace-core", "workspace-full")
DEFAULT_PROFILE = "workspace-core"
