"""``pyro serve`` over real HTTP, no VM: the token, Host and Origin on every route, the
login cookie, errors with their statuses, host paths confined to the root, the OpenAPI
document, MCP at /mcp, and what the server refuses to start with."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from bench.serve import Served, free_port, pyro_serve
from openapi_spec_validator import validate

from pyro_mcp.api.result_shapes import output_schema
from pyro_mcp.mcp_server import operations_for
from pyro_mcp.serve import rest

MCP_INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "0"},
    },
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("serve")
    env = {"PYRO_CACHE_DIR": str(work / "cache"), "PYRO_RUN_DIR": str(work / "run")}
    with pyro_serve(work, env=env) as server:
        yield server


def _every_route(served: Served) -> list[tuple[str, str]]:
    """(method, path) of every route the app has (read from the app itself, so a route
    added later is checked too), path parameters filled in; MCP's endpoint too."""
    from starlette.routing import Mount, Route

    from pyro_mcp.serve.app import Listener, build_app

    guard = build_app(Listener("127.0.0.1", 1, tls=False), "t" * 32)
    found: list[tuple[str, str]] = []
    for route in guard.app.routes:  # type: ignore[attr-defined]
        if isinstance(route, Route):
            path = route.path.replace("{workspace_id}", "0123456789ab")
            path = path.replace("{name:path}", "vendor/xterm.js")
            found += [(method, path) for method in sorted(route.methods or ()) if method != "HEAD"]
        elif isinstance(route, Mount):
            found.append(("POST", "/mcp"))
    return found


def test_the_route_list_holds_each_kind_of_route(served: Served) -> None:
    routes = _every_route(served)
    for expected in [
        ("POST", "/api/v1/workspace_exec"), ("POST", "/api/v1/workspace_exec/stream"),
        ("GET", "/api/v1/openapi.json"), ("GET", "/"), ("GET", "/login"), ("POST", "/mcp"),
        ("GET", "/workspaces/0123456789ab"), ("GET", "/events/workspaces"),
        ("GET", "/static/vendor/xterm.js"), ("GET", "/events/terminal/0123456789ab"),
    ]:  # fmt: skip
        assert expected in routes


# --- the token -------------------------------------------------------------------------


def test_the_first_start_makes_a_private_token_shows_it_once_and_the_next_reuses_it(
    tmp_path: Path,
) -> None:
    with pyro_serve(tmp_path) as first:
        token_file = tmp_path / "state" / "serve" / "token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
        assert f"{first.url}/login?token={first.token}" in first.stderr
    with pyro_serve(tmp_path / "again", state_dir=tmp_path / "state") as second:
        assert second.token == first.token
        assert first.token not in second.stderr
        assert f"the token is in {token_file}" in second.stderr


@pytest.mark.parametrize("sent", [None, "Bearer wrong-token-wrong-token", "Basic abc", "Bearer"])
def test_every_route_refuses_a_missing_or_wrong_token(served: Served, sent: str | None) -> None:
    headers = {} if sent is None else {"Authorization": sent}
    routes = _every_route(served)
    assert len(routes) > 100  # every operation twice, and the rest
    for method, path in routes:
        answer = httpx.request(method, served.url + path, headers=headers, json={})
        assert answer.status_code == 401, (method, path)
        assert answer.headers["www-authenticate"] == 'Bearer realm="pyro"'
        assert answer.json()["error"] == "unauthorized"


def test_a_token_file_is_used_when_given_and_refused_when_others_can_read_it(
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("a-token-of-my-own-choosing\n")
    token_file.chmod(0o644)
    refused = _start_and_fail(tmp_path, "--token-file", str(token_file))
    assert "is readable by others (mode 644)" in refused and "chmod 600" in refused
    token_file.chmod(0o600)
    with pyro_serve(tmp_path, "--token-file", str(token_file)) as server:
        assert server.token == "a-token-of-my-own-choosing"
        assert not (tmp_path / "state" / "serve" / "token").exists()


# --- Host and Origin ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "http://127.0.0.1:1"},  # another port: another origin
        {"Origin": "null"},
        {"Host": "evil.example"},  # a name rebound to this address
        {"Host": "127.0.0.1:1"},
    ],
)
def test_a_foreign_origin_or_host_is_refused_with_the_token(
    served: Served, headers: dict[str, str]
) -> None:
    with served.client() as client:
        for method, path in _every_route(served)[::9]:
            answer = client.request(method, path, headers=headers, json={})
            assert answer.status_code == 403, (method, path, headers)
            assert answer.json()["error"] == "forbidden"


def test_its_own_origin_and_loopback_names_are_accepted(served: Served) -> None:
    port = served.url.rsplit(":", 1)[1]
    with served.client() as client:
        for host in ("127.0.0.1", "localhost"):
            origin = f"http://{host}:{port}"
            answer = client.get("/", headers={"Host": f"{host}:{port}", "Origin": origin})
            assert answer.status_code == 200, host


# --- the dashboard's login ---------------------------------------------------------------


def test_the_login_address_sets_a_strict_cookie_that_then_authorizes(served: Served) -> None:
    answer = httpx.get(f"{served.url}/login", params={"token": served.token, "next": "//evil"})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/"  # never off this server
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"pyro_token={served.token};")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    page = httpx.get(served.url + "/", cookies={"pyro_token": served.token})
    assert page.status_code == 200 and "<h1>Workspaces</h1>" in page.text
    assert httpx.get(served.url + "/", cookies={"pyro_token": "x" * 43}).status_code == 401
    wrong = httpx.get(f"{served.url}/login", params={"token": "nope"})
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers


# --- calls and their errors --------------------------------------------------------------


def test_a_call_answers_the_operations_result(served: Served) -> None:
    with served.client() as client:
        answer = client.post("/api/v1/env_list", json={})
        assert answer.status_code == 200
        names = [row["name"] for row in answer.json()["environments"]]
        assert names == ["debian:12-base", "debian:12", "debian:12-build"]
        assert client.post("/api/v1/workspace_list").json() == {"workspaces": [], "count": 0}


@pytest.mark.parametrize(
    ("path", "body", "status", "error", "says"),
    [
        ("workspace_status", b"{not json", 400, "invalid_argument", "the request body is not JSON"),
        ("workspace_status", b"[1]", 400, "invalid_argument", "must be a JSON object of arguments"),
        ("workspace_status", b"{}", 400, "invalid_argument", "workspace_status needs workspace_id"),
        (
            "vm_run",
            b'{"environment": "debian:12", "command": "true", "timeout": 5}',
            400,
            "invalid_argument",
            "vm_run has no parameter 'timeout' (did you mean 'timeout_seconds'?)",
        ),
        (
            "vm_run",
            b'{"environment": "debian:12", "command": "true", "timeout_seconds": NaN}',
            400,
            "invalid_argument",
            "timeout_seconds",
        ),
        (
            "workspace_status",
            b'{"workspace_id": "0123456789ab"}',
            404,
            "not_found",
            "no workspace '0123456789ab'",
        ),
        ("vm_run", b'{"environment": "nope:1", "command": "true"}', 404, "not_found", "nope:1"),
    ],
)
def test_a_bad_call_gets_its_status_and_a_message_naming_what_is_wrong(
    served: Served, path: str, body: bytes, status: int, error: str, says: str
) -> None:
    with served.client() as client:
        answer = client.post(f"/api/v1/{path}", content=body)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"] == error
    assert says in answer.json()["message"]


def test_an_errors_hint_names_the_operation_to_call_not_a_cli_command(served: Served) -> None:
    with served.client() as client:
        answer = client.post("/api/v1/workspace_status", json={"workspace_id": "0123456789ab"})
    assert answer.json()["hint"] == "list workspaces with `workspace_list`"


def test_a_body_larger_than_the_limit_is_refused_before_it_is_read(served: Served) -> None:
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(
            b"POST /api/v1/env_list HTTP/1.1\r\n"
            + f"Host: {host}:{port}\r\nAuthorization: Bearer {served.token}\r\n".encode()
            + f"Content-Length: {rest.MAX_REQUEST_BYTES + 1}\r\n\r\n".encode()
            + b"{"
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413 ")
    assert json.loads(body)["error"] == "too_large"


def test_a_host_path_outside_the_root_is_refused(served: Served) -> None:
    with served.client() as client:
        answer = client.post(
            "/api/v1/workspace_create", json={"environment": "debian:12", "seed_path": "/etc"}
        )
    assert answer.status_code == 403
    assert answer.json()["error"] == "outside_root"


def test_status_codes_follow_the_kind_of_error() -> None:
    from pyro_mcp import errors

    expected = {  # docs/serve.md's table
        errors.InvalidArgument: 400, errors.OutsideRoot: 403, errors.NotFound: 404,
        errors.Expired: 410, errors.InvalidState: 409, errors.Conflict: 409,
        errors.TooLarge: 413, errors.Cancelled: 499, errors.AgentUnavailable: 502,
        errors.ProtocolViolation: 502, errors.RuntimeMissing: 503,
        errors.NetworkUnavailable: 503, errors.OperationTimeout: 504, errors.VMError: 500,
        errors.BootTimeout: 500, errors.PyroError: 500,
    }  # fmt: skip
    for kind, status in expected.items():
        assert rest.status_of(kind("x")) == status, kind.__name__
    assert rest.status_of(errors.GuestError("x", guest_code="denied")) == 502


# --- the OpenAPI document, MCP ------------------------------------------------------------


def test_the_openapi_document_is_valid_and_describes_every_operation(served: Served) -> None:
    document = served.client().get("/api/v1/openapi.json").json()
    validate(document)  # openapi-spec-validator: OpenAPI 3.1 and its JSON schemas
    ops = operations_for("workspace-full")
    ids = {call["post"]["operationId"] for call in document["paths"].values()}
    assert ids == {op.name for op in ops} | {f"{op.name}_stream" for op in ops}
    exec_call = document["paths"]["/api/v1/workspace_exec"]["post"]
    ok = exec_call["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == output_schema(next(op for op in ops if op.name == "workspace_exec"))
    arguments = exec_call["requestBody"]["content"]["application/json"]["schema"]
    assert arguments["required"] == ["workspace_id", "command"]
    assert arguments["additionalProperties"] is False
    assert document["security"] == [{"bearer": []}]
    logs = document["paths"]["/api/v1/service_logs"]["post"]["requestBody"]
    logs_stream = document["paths"]["/api/v1/service_logs/stream"]["post"]["requestBody"]
    assert "follow" not in logs["content"]["application/json"]["schema"]["properties"]
    assert "follow" in logs_stream["content"]["application/json"]["schema"]["properties"]


def test_follow_is_taken_by_the_stream_route_only(served: Served) -> None:
    body = {"workspace_id": "0123456789ab", "service_name": "web", "follow": True}
    with served.client() as client:
        called = client.post("/api/v1/service_logs", json=body)
        with client.stream("POST", "/api/v1/service_logs/stream", json=body) as streamed:
            events = streamed.read().decode()
    assert called.status_code == 400 and called.json()["error"] == "invalid_argument"
    assert "'follow'" in called.json()["message"]
    assert streamed.status_code == 200  # the arguments passed: the workspace is what is missing
    assert "event: error" in events and "no workspace '0123456789ab'" in events


def test_mcp_is_served_at_mcp_behind_the_same_token(served: Served) -> None:
    with served.client() as client:
        answer = client.post("/mcp", json=MCP_INIT, headers=MCP_HEADERS)
    assert answer.status_code == 200, answer.text
    text = answer.text
    payload: Any = (
        json.loads(text[text.index("{") :].splitlines()[0]) if "data:" in text else answer.json()
    )
    assert payload["result"]["serverInfo"]["name"] == "pyro-mcp"
    assert payload["result"]["capabilities"]["tools"] == {"listChanged": False}


# --- what it will not start with ----------------------------------------------------------


def _start_and_fail(work: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pyro_mcp.cli.main", "serve", *args],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYRO_STATE_DIR": str(work / "state")},
    )  # fmt: skip
    assert done.returncode != 0
    return done.stderr


def test_a_non_loopback_address_without_tls_is_refused_unless_insecure(tmp_path: Path) -> None:
    port = free_port()
    said = _start_and_fail(tmp_path, "--listen", f"0.0.0.0:{port}")
    assert "0.0.0.0 is not a loopback address" in said and "--insecure" in said
    assert not (tmp_path / "state" / "serve" / "token").exists()  # nothing was started


@pytest.mark.parametrize("listen", ["8765", "127.0.0.1:", "127.0.0.1:99999", "127.0.0.1:x"])
def test_a_bad_listen_address_is_a_clear_error(tmp_path: Path, listen: str) -> None:
    assert "--listen takes HOST:PORT" in _start_and_fail(tmp_path, "--listen", listen)


def test_tls_needs_both_the_certificate_and_the_key(tmp_path: Path) -> None:
    said = _start_and_fail(tmp_path, "--tls-cert", str(tmp_path / "c.pem"))
    assert "--tls-cert and --tls-key go together" in said


def _self_signed(work: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made here."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = work / "cert.pem", work / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_over_tls_the_cookie_is_secure_and_the_origin_is_https(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    trusted = ssl.create_default_context(cafile=str(cert))
    with pyro_serve(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key)) as server:
        assert server.url.startswith("https://")
        login = httpx.get(f"{server.url}/login", params={"token": server.token}, verify=trusted)
        assert "Secure" in login.headers["set-cookie"]
        bearer = {"Authorization": f"Bearer {server.token}"}
        own = server.url  # https://127.0.0.1:PORT
        page = httpx.get(own + "/", headers={**bearer, "Origin": own}, verify=trusted)
        assert page.status_code == 200
        plain = own.replace("https://", "http://")
        refused = httpx.get(own + "/", headers={**bearer, "Origin": plain}, verify=trusted)
        assert refused.status_code == 403


def test_the_dashboard_escapes_every_value_it_shows() -> None:
    from pyro_mcp.serve.dashboard import workspace_table

    row = {
        "id": "0123456789ab", "name": "<script>alert(1)</script>", "state": "running",
        "environment": "debian:12", "created_at": 1000.0, "expires_at": 1000.0 + 7200,
        "labels": {"team": '"><img src=x>'}, "services": {"web": {"state": "ready"}},
    }  # fmt: skip
    table = workspace_table([row], now=1000.0 + 90)
    assert "<script>" not in table and "<img" not in table
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in table
    assert "<td>1 min</td><td>1 h left</td>" in table
    assert "<td>1 (ready)</td>" in table


def test_a_vmms_host_cpu_and_memory_are_read_from_proc() -> None:
    from pyro_mcp.serve.dashboard import vmm_usage

    sum(range(200_000))  # some CPU time of our own
    mine = vmm_usage(os.getpid())
    assert mine is not None
    assert mine["cpu_s"] > 0 and mine["rss_bytes"] > 10 << 20  # this interpreter's
    assert vmm_usage(None) is None and vmm_usage(0) is None and vmm_usage(2**22 + 7) is None


# --- the dashboard's files and actions ----------------------------------------------------

VENDORED = Path(__file__).resolve().parents[2] / "src/pyro_mcp/serve/static/vendor"


def test_the_pages_scripts_are_the_packages_own_and_nothing_else_is_served(
    served: Served,
) -> None:
    with served.client() as client:
        xterm = client.get("/static/vendor/xterm.js")
        ours = client.get("/static/dashboard.js")
        css = client.get("/static/vendor/xterm.css")
        refused = [
            client.get(path).status_code
            for path in (
                "/static/../serve/app.py", "/static/%2e%2e/app.py", "/static/vendor/../../app.py",
                "/static/guard.py", "/static/vendor/xterm.js.map", "/static/",
            )
        ]  # fmt: skip
    assert xterm.status_code == 200 and xterm.headers["content-type"].startswith("text/javascript")
    assert xterm.content == (VENDORED / "xterm.js").read_bytes()
    assert ours.status_code == 200 and "pyro-mcp dashboard" in ours.text
    assert css.headers["content-type"].startswith("text/css")
    assert refused == [404] * len(refused)


def test_the_vendored_files_are_what_the_lock_file_pins() -> None:
    root = VENDORED.parents[4]
    done = subprocess.run(
        [sys.executable, str(root / "web" / "vendor.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout
    lock = json.loads((root / "web" / "package-lock.json").read_text())
    pinned = lock["packages"]["node_modules/@xterm/xterm"]
    installed = json.loads((root / "web/node_modules/@xterm/xterm/package.json").read_text())
    assert installed["version"] == pinned["version"]


def test_a_built_wheel_carries_the_vendored_files(tmp_path: Path) -> None:
    import zipfile

    root = VENDORED.parents[4]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "-q", "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("pyro_mcp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"pyro_mcp/serve/static/vendor/xterm.js", "pyro_mcp/serve/static/vendor/xterm.css",
            "pyro_mcp/serve/static/dashboard.js"} <= names  # fmt: skip


def test_the_buttons_are_the_registrys_workspace_actions() -> None:
    import dataclasses
    import html as htmllib
    import re

    from pyro_mcp.serve.dashboard import action_buttons

    ops = operations_for("workspace-full")
    buttons = [
        {k: htmllib.unescape(v) for k, v in re.findall(r'([\w-]+)="([^"]*)"', tag)}
        for tag in re.findall(r"<button [^>]*>", action_buttons(ops))
    ]
    tools = [b["data-tool"] for b in buttons]
    assert set(tools) == {op.name for op in ops if op.workspace_action}
    assert {"workspace_stop", "workspace_start", "workspace_delete", "workspace_reset",
            "snapshot_create"} <= set(tools)  # fmt: skip
    by_tool = {b["data-tool"]: b for b in buttons}
    assert by_tool["workspace_delete"]["data-confirm"] == "yes"
    assert by_tool["workspace_start"]["data-confirm"] == ""
    assert json.loads(by_tool["snapshot_create"]["data-asks"]) == [
        {"name": "snapshot_name", "help": "checkpoint name"}
    ]
    assert tools.index("workspace_start") < tools.index("workspace_delete")  # destructive last
    # An operation declared a workspace action gets its button with no glue of its own.
    stop = next(op for op in ops if op.name == "workspace_stop")
    new = dataclasses.replace(stop, name="workspace_tidy")
    assert 'data-tool="workspace_tidy"' in action_buttons([*ops, new])


def test_a_workspace_action_must_take_the_workspace_and_change_something() -> None:
    from pyro_mcp.api.registry import operation

    with pytest.raises(TypeError, match="title"):
        operation(cli=("x",), sdk="x", workspace_action=True)
    with pytest.raises(TypeError, match="title and changes"):
        operation(cli=("x",), sdk="x", title="X", read_only=True, workspace_action=True)
