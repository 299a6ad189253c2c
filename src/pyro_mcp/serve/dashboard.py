"""The dashboard: server-rendered pages, kept live by a small script of our own
(``static/dashboard.js``, served from the package: no CDN, nothing from elsewhere).

- ``/``: the workspaces (state, environment, age, TTL, labels, services), rendered on the
  server and then updated from ``/events/workspaces`` as they change.
- ``/workspaces/<id>``: its state, services with their log tails, published ports as
  links, the command journal with a chart of how long each command took, its VMM's host
  CPU and memory as a chart, checkpoints, the diff against the baseline, a terminal
  (xterm.js on a PTY shell: :mod:`pyro_mcp.serve.terminal`), and a button per
  workspace action of the registry (``workspace_action``: stop, start, checkpoint,
  reset, delete...; a destructive one asks for a confirmation, and each asks for the
  other arguments it needs), updated from ``/events/workspaces/<id>``.

Every value reaches the page escaped (server side) or as text (the script never writes
markup from data). Scripts and styles come from the package: ours, and xterm.js as
vendored from npm when the package was built (``web/vendor.py``). What the pages show
comes from the operations the REST API serves, and the actions call that API, so the
redaction of secrets applies here as everywhere.
Server-rendered pages with progressive enhancement were chosen over a bundled app: no
build step for the pages, and every page works (read-only) before its script runs.
"""

from __future__ import annotations

import html
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Route

from pyro_mcp import __version__
from pyro_mcp.api.context import Context
from pyro_mcp.api.registry import OPERATIONS, Operation, Surface, all_operations
from pyro_mcp.errors import InvalidState, NotFound, PyroError
from pyro_mcp.serve import terminal

POLL_S = 0.25  # how often the event streams look for a change
LOG_TAIL_LINES = 20
JOURNAL_ENTRIES = 20
STYLE = """
body { font: 14px system-ui, sans-serif; margin: 2em; color: #222 }
table { border-collapse: collapse } td, th { padding: .3em .8em; text-align: left;
border-bottom: 1px solid #ddd; vertical-align: top } code, pre { font-size: 13px }
pre { background: #f6f6f6; padding: .5em; max-height: 24em; overflow: auto }
#terminal { display: inline-block; padding: 4px; background: #000 }
"""
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{style}</style><link rel="stylesheet" href="/static/vendor/xterm.css">
<script src="/static/vendor/xterm.js" defer></script>
<script src="/static/dashboard.js" defer></script></head>
<body data-page="{page}" data-workspace="{workspace}"><p><a href="/">pyro-mcp {version}</a>
<span id="status"></span></p>
{body}
<p>REST API: <a href="/api/v1/openapi.json"><code>/api/v1/openapi.json</code></a>
&middot; MCP: <code>/mcp</code></p>
</body></html>
"""
WORKSPACE_BODY = """<h1>Workspace {id}</h1>
<p>state <b id="state">{state}</b> &middot;
environment <span id="environment">{environment}</span></p>
<p id="actions">{actions}</p>
<h2>Resources</h2><p>host CPU of its VMM <b id="cpu">-</b>, resident memory <b id="rss">-</b></p>
<svg id="chart" width="480" height="80" role="img" aria-label="CPU and memory over time">
<polyline id="cpu-line" fill="none" stroke="#c33" points=""/>
<polyline id="rss-line" fill="none" stroke="#36c" points=""/></svg>
<h2>Services</h2><div id="services"></div>
<h2>Published ports</h2><ul id="ports"></ul>
<h2>Terminal</h2><div id="terminal"></div>
<h2>Commands</h2>
<svg id="timings" width="480" height="60" role="img" aria-label="how long each command took">
</svg><table><thead><tr><th>command</th><th>exit</th><th>took</th>
<th>stdout</th><th>stderr</th></tr></thead><tbody id="journal"></tbody></table>
<h2>Checkpoints</h2><ul id="checkpoints"></ul>
<h2>Changes since the baseline</h2><pre id="diff"></pre>
"""
LIST_HEADS = ("id", "name", "state", "environment", "age", "ttl", "labels", "services")


def routes(ops: list[Operation], make_context: Callable[[], Context]) -> list[Route]:
    """The pages, their event streams, the terminal and the static files; the buttons
    are the workspace actions among ``ops`` (the served profile's)."""
    buttons = action_buttons(ops)

    def call(name: str, **arguments: Any) -> Any:
        if name not in OPERATIONS:
            all_operations()
        return OPERATIONS[name].call(make_context(), Surface.MCP, **arguments)

    async def index(_request: Request) -> Response:
        try:
            listed = await anyio.to_thread.run_sync(lambda: call("workspace_list"))
        except PyroError as exc:
            body = f"<p>cannot list the workspaces: {html.escape(str(exc))}</p>"
        else:
            body = "<h1>Workspaces</h1>\n" + workspace_table(listed["workspaces"], now=time.time())
        return _page("pyro-mcp", "list", "", body)

    async def workspace_page(request: Request) -> Response:
        wid = request.path_params["workspace_id"]
        try:
            status = await anyio.to_thread.run_sync(
                lambda: call("workspace_status", workspace_id=wid)
            )
        except PyroError as exc:
            text = f"<h1>No such workspace</h1><p>{html.escape(str(exc))}</p>"
            return _page("pyro-mcp", "missing", "", text, status=404)
        body = WORKSPACE_BODY.format(
            id=html.escape(status["workspace_id"]),
            state=html.escape(str(status["state"])),
            environment=html.escape(str(status["environment"])),
            actions=buttons,
        )
        return _page(
            f"pyro-mcp: {status['workspace_id']}", "workspace", status["workspace_id"], body
        )

    async def list_events(request: Request) -> Response:
        return _events(request, lambda: call("workspace_list"))

    async def workspace_events(request: Request) -> Response:
        wid = request.path_params["workspace_id"]
        return _events(request, lambda: workspace_view(call, wid))

    files = static_files()

    async def static(request: Request) -> Response:
        found = files.get(request.path_params["name"])
        if found is None:
            return Response("not found", status_code=404, media_type="text/plain")
        data, media_type = found
        return Response(data, media_type=media_type, headers={"Cache-Control": "no-store"})

    return [
        Route("/", index, methods=["GET"]),
        Route("/workspaces/{workspace_id}", workspace_page, methods=["GET"]),
        Route("/events/workspaces", list_events, methods=["GET"]),
        Route("/events/workspaces/{workspace_id}", workspace_events, methods=["GET"]),
        *terminal.routes(call),
        Route("/static/{name:path}", static, methods=["GET"]),
    ]


MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".txt": "text/plain"}


def static_files() -> dict[str, tuple[bytes, str]]:
    """What ``/static/`` serves: the package's ``serve/static`` files (and ``vendor/``
    under it) by name, read once; no other path reaches the disk."""
    root = resources.files("pyro_mcp.serve").joinpath("static")
    found: dict[str, tuple[bytes, str]] = {}
    for prefix, directory in (("", root), ("vendor/", root.joinpath("vendor"))):
        if not directory.is_dir():
            continue
        for entry in directory.iterdir():
            suffix = Path(entry.name).suffix
            if entry.is_file() and suffix in MEDIA_TYPES:
                found[prefix + entry.name] = (entry.read_bytes(), MEDIA_TYPES[suffix])
    return found


def workspace_actions(ops: list[Operation]) -> list[Operation]:
    """The workspace actions among ``ops``: those that only add or change first, the
    destructive ones after."""
    actions = [op for op in ops if op.workspace_action]
    return sorted(actions, key=lambda op: bool(op.effects and op.effects.destructive))


def action_buttons(ops: list[Operation]) -> str:
    """A button per workspace action: its title, the tool it calls, whether it asks for
    a confirmation (destructive) and the other arguments it asks for (its required ones
    besides the workspace)."""
    buttons = []
    for op in workspace_actions(ops):
        assert op.effects is not None  # a workspace action has a title
        asks = [
            {"name": p.name, "help": p.arg.help}
            for p in op.params_on(Surface.MCP)
            if p.required and p.name != "workspace_id"
        ]
        attributes = {
            "id": f"action-{op.name}",
            "class": "action",
            "data-tool": op.name,
            "data-title": op.effects.title,
            "data-confirm": "yes" if op.effects.destructive else "",
            "data-asks": json.dumps(asks),
        }
        text = " ".join(f'{k}="{html.escape(v, quote=True)}"' for k, v in attributes.items())
        buttons.append(f"<button {text}>{html.escape(op.effects.title)}</button>")
    return "\n".join(buttons)


def workspace_view(call: Callable[..., Any], wid: str) -> dict[str, Any]:
    """What a workspace's page shows: its status, services with log tails, the last
    commands and the checkpoints."""
    status = call("workspace_status", workspace_id=wid)
    running = status["state"] == "running"
    services = []
    for name, service in sorted((status.get("services") or {}).items()):
        log = ""
        if running:
            try:
                lines = call(
                    "service_logs", workspace_id=wid, service_name=name, tail_lines=LOG_TAIL_LINES
                )
            except InvalidState as exc:  # its output went with an earlier boot: say so
                log = f"({exc})"
            else:
                log = "".join(line["text"] for line in lines["lines"])
        services.append({"name": name, "state": service["state"], "log": log})
    commands = call("workspace_logs", workspace_id=wid, limit=JOURNAL_ENTRIES)["commands"]
    snapshots = call("snapshot_list", workspace_id=wid)["snapshots"]
    usage = vmm_usage(status.get("vmm_pid")) if running else None
    return {
        "status": status,
        "services": services,
        "commands": commands,
        "snapshots": snapshots,
        "usage": usage,
    }


def vmm_usage(pid: Any) -> dict[str, float] | None:
    """The host CPU time (seconds, user + system) and resident memory (bytes) of the VMM
    process ``pid`` (our own record's, on the host), None when it cannot be read."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        statm = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    ticks = os.sysconf("SC_CLK_TCK")
    cpu_s = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return {
        "at": time.time(),
        "cpu_s": cpu_s,
        "rss_bytes": int(statm[1]) * os.sysconf("SC_PAGE_SIZE"),
    }


def _page(title: str, page: str, workspace: str, body: str, *, status: int = 200) -> Response:
    text = PAGE.format(
        title=html.escape(title),
        style=STYLE,
        page=page,
        workspace=html.escape(workspace),
        version=html.escape(__version__),
        body=body,
    )
    return HTMLResponse(text, status_code=status)


def _events(request: Request, gather: Callable[[], Any]) -> StreamingResponse:
    """An event stream sending ``update`` with what ``gather`` returns each time it
    changes (``gone`` when what it watches no longer exists, ``error`` on another error)."""

    async def stream() -> AsyncIterator[str]:
        last = None
        while not await request.is_disconnected():
            try:
                now = json.dumps(await anyio.to_thread.run_sync(gather), default=str)
            except NotFound as exc:
                yield f"event: gone\ndata: {json.dumps(exc.to_dict())}\n\n"
                return
            except PyroError as exc:
                now = None
                yield f"event: error\ndata: {json.dumps(exc.to_dict())}\n\n"
            if now is not None and now != last:
                last = now
                yield f"event: update\ndata: {now}\n\n"
            await anyio.sleep(POLL_S)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )


def workspace_table(rows: list[dict[str, Any]], *, now: float) -> str:
    """The workspaces as an HTML table (every value escaped), its body updated live."""
    head = "".join(f"<th>{h}</th>" for h in LIST_HEADS)
    lines = [f'<table><thead><tr>{head}</tr></thead><tbody id="workspaces">']
    for row in rows:
        labels = ", ".join(f"{k}={v}" for k, v in sorted((row.get("labels") or {}).items()))
        wid = html.escape(str(row.get("id")))
        cells = (
            f'<a href="/workspaces/{wid}">{wid}</a>',
            html.escape(str(row.get("name") or "")),
            html.escape(str(row.get("state"))),
            html.escape(str(row.get("environment"))),
            _age(row.get("created_at"), now),
            _ttl(row.get("expires_at"), now),
            html.escape(labels),
            html.escape(_services(row.get("services"))),
        )
        tds = "".join(f"<td>{cell}</td>" for cell in cells)
        lines.append(f'<tr data-workspace="{wid}">{tds}</tr>')
    lines.append("</tbody></table>")
    hidden = " hidden" if rows else ""
    lines.append(
        f'<p id="empty"{hidden}>No workspaces yet: <code>pyro workspace create debian:12</code></p>'
    )
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
