"""``pyro serve``: the REST API, MCP and the dashboard in one uvicorn process.

Secure by default: every route needs the token (:mod:`.guard`), the listener is loopback
unless told otherwise, and a non-loopback address is refused without TLS
(``--tls-cert``/``--tls-key``) or an explicit ``--insecure``. Host paths that clients name
(seeds, sync, export) are confined to ``--root`` (default: the current directory), as for
``pyro mcp serve``.
"""

from __future__ import annotations

import sys
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from pyro_mcp.mcp_profiles import DEFAULT_PROFILE
from pyro_mcp.mcp_server import build_server, confined_context, operations_for
from pyro_mcp.runtime.loopback import is_loopback_host, parse_address
from pyro_mcp.runtime.paths import state_dir
from pyro_mcp.serve import dashboard, openapi, rest
from pyro_mcp.serve.guard import COOKIE, Guard, Token, allowed_hosts, load_token

DEFAULT_LISTEN = "127.0.0.1:8765"
LOGIN_PATH = "/login"


@dataclass(frozen=True)
class Listener:
    host: str
    port: int
    tls: bool

    @property
    def origin(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{shown}:{self.port}"


def build_app(
    listener: Listener,
    token: str,
    *,
    profile: str = DEFAULT_PROFILE,
    roots: Sequence[str | Path] | None = None,
) -> Guard:
    """The whole server as one ASGI app, behind its :class:`Guard`."""
    make_context = confined_context(roots or [Path.cwd()])
    ops = operations_for(profile)
    hosts = allowed_hosts(listener.host, listener.port)
    scheme = "https" if listener.tls else "http"
    # The guard checks Host and Origin for every route, /mcp included.
    mcp = build_server(profile, make_context=make_context).streamable_http_app(
        streamable_http_path="/mcp",
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        host=listener.host,
    )
    document = openapi.document(ops, profile)

    async def openapi_json(_request: Request) -> Response:
        return JSONResponse(document)

    async def login(request: Request) -> Response:
        # Reached only with the right token (the guard saw to it): keep it in a cookie and
        # go on without it in the address bar.
        target = request.query_params.get("next", "/")
        if not target.startswith("/") or target.startswith("//"):
            target = "/"
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE,
            request.query_params["token"],
            httponly=True,
            samesite="strict",
            secure=listener.tls,
            path="/",
        )
        return response

    routes: list[BaseRoute] = [
        Route(f"{rest.PREFIX}/openapi.json", openapi_json, methods=["GET"]),
        *rest.routes(ops, make_context, profile),
        Route(LOGIN_PATH, login, methods=["GET"]),
        *dashboard.routes(ops, make_context),
        Mount("/", app=mcp),  # /mcp, and its lifespan (the session manager)
    ]
    app = Starlette(routes=routes, lifespan=mcp.router.lifespan_context)
    return Guard(app, token, hosts, scheme=scheme, token_query_paths=frozenset({LOGIN_PATH}))


def serve(
    listen: str = DEFAULT_LISTEN,
    *,
    profile: str = DEFAULT_PROFILE,
    roots: Sequence[str | Path] | None = None,
    token_file: Path | None = None,
    insecure: bool = False,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> None:
    """Run the server until interrupted (SystemExit with the reason for what it refuses)."""
    import uvicorn

    host, port = parse_address(listen, flag="--listen")
    if (tls_cert is None) != (tls_key is None):
        raise SystemExit("pyro: error: --tls-cert and --tls-key go together")
    listener = Listener(host, port, tls=tls_cert is not None)
    if not is_loopback_host(host) and not listener.tls and not insecure:
        raise SystemExit(
            f"pyro: error: {host} is not a loopback address: serving it without TLS sends "
            "the token in the clear (give --tls-cert and --tls-key, or --insecure on a "
            "network you trust)"
        )
    try:
        token = load_token(state_dir(), token_file)
    except Exception as exc:  # a token file we cannot use: say why, start nothing
        raise SystemExit(f"pyro: error: {exc}") from exc
    print(announcement(listener, token), file=sys.stderr, flush=True)
    config: dict[str, Any] = {"host": host, "port": port, "log_level": "info", "lifespan": "on"}
    if listener.tls:
        config.update(ssl_certfile=str(tls_cert), ssl_keyfile=str(tls_key))
    uvicorn.run(build_app(listener, token.value, profile=profile, roots=roots), **config)


def announcement(listener: Listener, token: Token) -> str:
    """What ``pyro serve`` prints as it starts: where it is and, the first time, the token."""
    lines = [
        f"pyro serve: {listener.origin}/ (REST {rest.PREFIX}, OpenAPI "
        f"{rest.PREFIX}/openapi.json, MCP /mcp, the dashboard /)"
    ]
    if token.created:
        query = urllib.parse.urlencode({"token": token.value})
        lines += [
            f"  open {listener.origin}{LOGIN_PATH}?{query}",
            f"  (a new token, shown this once; it is kept in {token.path}, mode 0600; "
            "programs send it as Authorization: Bearer TOKEN)",
        ]
    else:
        lines.append(f"  the token is in {token.path} (Authorization: Bearer TOKEN)")
    return "\n".join(lines)
