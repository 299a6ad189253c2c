"""The dashboard at ``/``: server-rendered pages of what the operations report.

This first page lists the workspaces (state, environment, age, TTL, labels, services)
from ``workspace_list``, every value escaped. Everything it shows comes from the same
operations the REST API serves, so a secret value never reaches it either.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from pyro_mcp import __version__
from pyro_mcp.api.context import Context
from pyro_mcp.api.registry import OPERATIONS, Surface, all_operations
from pyro_mcp.errors import PyroError

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pyro-mcp</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; color: #222 }}
table {{ border-collapse: collapse }} td, th {{ padding: .3em .8em; text-align: left;
border-bottom: 1px solid #ddd }} code {{ font-size: 13px }}
</style></head>
<body><h1>pyro-mcp {version}</h1>
<h2>Workspaces</h2>
{body}
<p>REST API: <a href="/api/v1/openapi.json"><code>/api/v1/openapi.json</code></a>
&middot; MCP: <code>/mcp</code></p>
</body></html>
"""


def routes(make_context: Callable[[], Context]) -> list[Route]:
    async def index(_request: Request) -> Response:
        try:
            listed = await anyio.to_thread.run_sync(lambda: _workspaces(make_context()))
        except PyroError as exc:
            body = f"<p>cannot list the workspaces: {html.escape(str(exc))}</p>"
        else:
            body = workspace_table(listed, now=time.time())
        return HTMLResponse(PAGE.format(version=html.escape(__version__), body=body))

    return [Route("/", index, methods=["GET"])]


def _workspaces(ctx: Context) -> list[dict[str, Any]]:
    if "workspace_list" not in OPERATIONS:
        all_operations()
    result = OPERATIONS["workspace_list"].call(ctx, Surface.MCP)
    return list(result["workspaces"])


def workspace_table(rows: list[dict[str, Any]], *, now: float) -> str:
    """The workspaces as an HTML table (every value escaped)."""
    if not rows:
        return "<p>No workspaces yet: <code>pyro workspace create debian:12</code></p>"
    head = "".join(
        f"<th>{h}</th>"
        for h in ("id", "name", "state", "environment", "age", "ttl", "labels", "services")
    )
    lines = [f"<table><thead><tr>{head}</tr></thead><tbody>"]
    for row in rows:
        labels = ", ".join(f"{k}={v}" for k, v in sorted((row.get("labels") or {}).items()))
        cells = (
            row.get("id"),
            row.get("name") or "",
            row.get("state"),
            row.get("environment"),
            _age(row.get("created_at"), now),
            _ttl(row.get("expires_at"), now),
            labels,
            _services(row.get("services")),
        )
        tds = "".join(f"<td>{html.escape(str(cell))}</td>" for cell in cells)
        lines.append(f'<tr data-workspace="{html.escape(str(row.get("id")))}">{tds}</tr>')
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _services(services: Any) -> str:
    if not isinstance(services, dict) or not services:
        return "none"
    states = [str(s.get("state")) for s in services.values() if isinstance(s, dict)]
    return f"{len(states)} ({', '.join(sorted(set(states)))})"


def _age(created_at: Any, now: float) -> str:
    return _span(now - created_at) if isinstance(created_at, int | float) else "?"


def _ttl(expires_at: Any, now: float) -> str:
    if not isinstance(expires_at, int | float):
        return "none"
    left = expires_at - now
    return _span(left) + " left" if left > 0 else "expired"


def _span(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"
