"""The operation modules: each registers its operations when it is imported.

Importing this package alone imports none of them, so a caller that needs one operation
(the CLI running one command) pays for that module only;
:func:`pyro_mcp.api.registry.all_operations` imports every module found here.

These modules do not defer their annotations (no ``from __future__ import annotations``):
the registry reads every operation's parameter annotations as it registers it, and
evaluating them as the module runs costs far less than compiling their text then. A type
that is only imported for type checking is written as a string (``vm: "VM"``).
"""
