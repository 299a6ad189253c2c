"""Code that runs inside a pyro guest: the init (PID 1) and, later, the agent.

Everything in this package is stdlib-only Python (plus ``pyro_mcp.guest.protocol``) and is
copied into every environment image under ``/opt/pyro`` (run with
``PYTHONPATH=/opt/pyro``). ``/sbin/pyro-init`` imports :mod:`.init` through this package
on every boot, so keep this file free of imports: anything added here slows down every
cold start.
"""
