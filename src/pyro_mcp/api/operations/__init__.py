"""The operation modules: each registers its operations when it is imported.

Importing this package alone imports none of them, so a caller that needs one operation
(the CLI running one command) pays for that module only;
:func:`pyro_mcp.api.registry.all_operations` imports every module found here.
"""
