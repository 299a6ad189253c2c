"""VMM backends: one package per VMM, behind the interface in :mod:`pyro_mcp.vmm.base`."""
