"""``pyro serve``: one authenticated HTTP server for the REST API (``/api/v1``), MCP
(``/mcp``) and the dashboard (``/``), generated from the operation registry.

:mod:`.guard` checks every request (token, Host, Origin), :mod:`.rest` makes one route
per operation and :mod:`.openapi` its document, :mod:`.app` puts them together and runs
them under uvicorn.
"""
