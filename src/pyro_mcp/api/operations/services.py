"""Workspace services: long-lived processes with typed readiness probes."""

import posixpath
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

from pyro_mcp.api.context import Context
from pyro_mcp.api.operations.network_args import PUBLISH, publish_service_ports
from pyro_mcp.api.operations.shells import SIGNAL
from pyro_mcp.api.operations.vm import COMMAND
from pyro_mcp.api.operations.workspace_content import CWD, ENV, SECRET_ENV
from pyro_mcp.api.operations.workspaces import FULL, WORKSPACE, open_workspaces, parse_pairs
from pyro_mcp.api.registry import EVERY, STREAMED, Arg, Surface, operation
from pyro_mcp.errors import GuestError, InvalidArgument, InvalidState
from pyro_mcp.workspace import secret_delivery
from pyro_mcp.workspace.paths import guest_path

if TYPE_CHECKING:
    from ipaddress import IPv4Address

    from pyro_mcp.api.results import (
        ServiceListResult,
        ServiceLogsResult,
        ServiceStartResult,
        ServiceStatusResult,
        ServiceStopResult,
    )
    from pyro_mcp.workspace.lifecycle import Workspaces

NAME = Arg(
    "service name (unique in the workspace)", surfaces=EVERY, positional=True, name="service_name"
)
CALL_MARGIN_S = 15.0


def ready_probe(
    ready_file: str | None,
    ready_tcp: str | None,
    ready_http: str | None,
    ready_command: str | None,
) -> dict[str, Any] | None:
    """The probe spec the agent checks, from the CLI-style options (at most one)."""
    given = [v for v in (ready_file, ready_tcp, ready_http, ready_command) if v is not None]
    if len(given) > 1:
        raise InvalidArgument(
            "give at most one of ready_file, ready_tcp, ready_http, ready_command"
        )
    if ready_file is not None:
        # Only checked for existence, anywhere in the guest; relative means /workspace.
        return {"type": "file", "path": posixpath.join("/workspace", ready_file)}
    if ready_tcp is not None:
        host, sep, port = ready_tcp.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise InvalidArgument(
                f"ready_tcp takes HOST:PORT with a port 1-65535, got {ready_tcp!r}"
            )
        return {"type": "tcp", "host": host.strip("[]"), "port": int(port)}
    if ready_http is not None:
        parts = urlsplit(ready_http)
        if parts.scheme != "http" or not parts.hostname:
            raise InvalidArgument(f"ready_http takes an http:// URL, got {ready_http!r}")
        try:
            parts.port  # noqa: B018 - raises on a port out of range
        except ValueError as exc:
            raise InvalidArgument(f"ready_http has a bad port: {ready_http!r}") from exc
        return {"type": "http", "url": ready_http}
    if ready_command is not None:
        if not ready_command.strip():
            raise InvalidArgument("ready_command is empty")
        return {"type": "command", "shell": ready_command}
    return None


# pyro-mcp 3.x's readiness object: its type and the one key that type takes.
READINESS_KEYS = {"file": "path", "tcp": "address", "http": "url", "command": "command"}
READINESS = Arg(
    'readiness as one object: {"type": "file", "path": P}, {"type": "tcp", "address": '
    '"HOST:PORT"}, {"type": "http", "url": U} or {"type": "command", "command": C} '
    "(the same probes as ready_file, ready_tcp, ready_http, ready_command)",
    surfaces=Surface.SDK | Surface.MCP,
)


def readiness_options(readiness: dict[str, str]) -> dict[str, str]:
    """``readiness`` as the ``ready_*`` option it stands for (InvalidArgument naming what
    is wrong with it)."""
    kind = readiness.get("type")
    if kind not in READINESS_KEYS:
        raise InvalidArgument(
            f"readiness type must be one of {', '.join(map(repr, READINESS_KEYS))}, got {kind!r}"
        )
    key = READINESS_KEYS[kind]
    extra = sorted(set(readiness) - {"type", key})
    if key not in readiness or extra:
        raise InvalidArgument(
            f'readiness of type {kind!r} takes exactly "type" and "{key}"'
            + (f", not {', '.join(map(repr, extra))}" if extra else "")
        )
    return {f"ready_{kind}": readiness[key]}


FOLLOW_MAX_S = 7 * 24 * 3600.0


@operation(
    cli=("workspace", "service", "start"),
    sdk="start_service",
    profiles=FULL,
    title="Start a service in a workspace",
    open_world=True,
)
def service_start(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    name: Annotated[str, NAME],
    command: Annotated[str | list[str], COMMAND],
    cwd: Annotated[str | None, CWD] = None,
    env: Annotated[list[str] | None, ENV] = None,
    secret_env: Annotated[list[str] | dict[str, str] | None, SECRET_ENV] = None,
    ready_file: Annotated[
        str | None, Arg("ready when this file exists", surfaces=EVERY, path=True)
    ] = None,
    ready_tcp: Annotated[
        str | None, Arg("ready when HOST:PORT accepts a connection", surfaces=EVERY)
    ] = None,
    ready_http: Annotated[
        str | None, Arg("ready when this http:// URL answers 2xx/3xx", surfaces=EVERY)
    ] = None,
    ready_command: Annotated[
        str | None, Arg("ready when this shell command exits 0", surfaces=EVERY)
    ] = None,
    readiness: Annotated[dict[str, str] | None, READINESS] = None,
    ready_timeout_seconds: Annotated[
        float,
        Arg(
            "give up on readiness after this long",
            surfaces=EVERY,
            minimum=0,
            exclusive_minimum=True,
            maximum=3600,
        ),
    ] = 30.0,
    ready_interval_ms: Annotated[
        int, Arg("time between readiness checks", surfaces=EVERY, minimum=10, maximum=60_000)
    ] = 200,
    restart: Annotated[
        str,
        Arg("restart policy when it exits non-zero", surfaces=EVERY, choices=("no", "on-failure")),
    ] = "no",
    publish: Annotated[list[str] | None, PUBLISH] = None,
) -> "ServiceStartResult":
    """Start a named long-lived process in the workspace; returns once it is ready.

    ``command`` is a shell command line (run with ``/bin/sh -lc``) or an argv list.
    Secrets named by ``secret_env`` are in its environment at every (re)start and show
    as ``***`` in its logs and status.
    Errors: a ``not_ready`` guest error naming the probe, the time waited and the last
    probe error (with the service's log tail); ``exited_before_ready`` with its exit
    code; ``exists`` for a name already running; InvalidArgument for a bad probe or a
    ``secret_env`` naming a secret the workspace does not have.
    ``publish`` ports (on a workspace with the egress+published-ports policy) are
    published before it starts and removed when it stops or exits; Conflict when a host
    port is taken.
    """
    from pyro_mcp.guest.client import command_fields
    from pyro_mcp.network.ports import check_publish_list

    entries = check_publish_list(publish)
    args: dict[str, Any] = {
        "name": name,
        **command_fields(command),
        "cwd": guest_path(cwd) if cwd else "/workspace",
        "env": parse_pairs(env, "env"),
        "ready_timeout_s": ready_timeout_seconds,
        "ready_interval_ms": ready_interval_ms,
        "restart": restart,
    }
    options = {
        "ready_file": ready_file,
        "ready_tcp": ready_tcp,
        "ready_http": ready_http,
        "ready_command": ready_command,
    }
    if readiness is not None:
        if any(value is not None for value in options.values()):
            raise InvalidArgument("give readiness or a ready_* option, not both")
        options.update(readiness_options(readiness))
    probe = ready_probe(**options)
    if probe is not None:
        args["ready"] = probe
    with open_workspaces(ctx) as workspaces:
        mapping = secret_delivery.env_mapping(
            workspaces.store, workspace, secret_env, env_keys=args["env"]
        )
        if mapping:
            args["secret_env"] = mapping
        return _start(workspaces, workspace, args, ready_timeout_seconds, entries)


def _start(
    workspaces: "Workspaces",
    workspace: str,
    args: dict[str, Any],
    ready_timeout_seconds: float,
    publish: "list[tuple[IPv4Address, int, int]]",
) -> dict[str, Any]:
    with workspaces.agent(workspace, "service start") as agent:
        record = workspaces.store.get(workspace)
        published = publish_service_ports(record, str(args["name"]), publish)
        try:
            value, _ = agent.call(
                "service_start", args, timeout_s=ready_timeout_seconds + CALL_MARGIN_S
            )
        finally:
            workspaces.mirror_services(record.id, agent)  # a failed start unpublishes
        return {
            **value,
            "published_ports": [port.to_dict() for port in published],
            **_keys(record.id, str(args["name"])),
        }


def _keys(workspace_id: str, name: str) -> dict[str, str]:
    """pyro-mcp 3.x's keys of a service result, from what the host knows (they go last:
    a guest's answer cannot replace them)."""
    return {"workspace_id": workspace_id, "service_name": name}


UP_STATES = ("running", "ready")  # up: without a probe, or with one that passed


def _listing(workspace_id: str, services: list[dict[str, Any]]) -> dict[str, Any]:
    running = sum(1 for service in services if service.get("state") in UP_STATES)
    return {
        "services": [{**s, **_keys(workspace_id, str(s.get("name")))} for s in services],
        "workspace_id": workspace_id,
        "count": len(services),
        "running_count": running,
    }


@operation(
    cli=("workspace", "service", "list"),
    sdk="list_services",
    profiles=FULL,
    title="List a workspace's services",
    read_only=True,
)
def service_list(ctx: Context, workspace: Annotated[str, WORKSPACE]) -> "ServiceListResult":
    """The workspace's services with their state, pid, exit code, start time and restarts."""
    with open_workspaces(ctx) as workspaces:
        record = workspaces.store.get(workspace)
        if record.state.value != "running":
            listing = _listing(record.id, list(record.services.values()))
            return {**listing, "as_of": "last seen running"}
        with workspaces.agent(workspace, "service list") as agent:
            record = workspaces.mirror_services(record.id, agent)
        return _listing(record.id, list(record.services.values()))


@operation(
    cli=("workspace", "service", "status"),
    sdk="service_status",
    profiles=FULL,
    title="Show a service's status",
    read_only=True,
)
def service_status(
    ctx: Context, workspace: Annotated[str, WORKSPACE], name: Annotated[str, NAME]
) -> "ServiceStatusResult":
    """One service's state, pid, exit code, start time, restarts, probe and the ports it
    published."""
    from pyro_mcp.network import nft
    from pyro_mcp.network.link import link_of

    with open_workspaces(ctx) as workspaces, workspaces.agent(workspace, "service status") as agent:
        value, _ = agent.call("service_status", {"name": name}, timeout_s=30)
        workspace_id = workspaces.store.get(workspace).id
        link = link_of(workspace_id)
        mine = nft.published(link) if link is not None else []
        ports = [port.to_dict() for port in mine if port.owner == f"service:{name}"]
        return {**value, "published_ports": ports, **_keys(workspace_id, name)}


@operation(
    cli=("workspace", "service", "logs"),
    sdk="service_logs",
    profiles=FULL,
    title="Show a service's output",
    read_only=True,
)
def service_logs(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    name: Annotated[str, NAME],
    tail_lines: Annotated[
        int, Arg("the last N lines", surfaces=EVERY, minimum=0, maximum=1_000_000)
    ] = 100,
    all: Annotated[bool, Arg("every line still kept (logs are bounded)", surfaces=EVERY)] = False,
    stream: Annotated[
        str, Arg("which output", surfaces=EVERY, choices=("stdout", "stderr", "both"))
    ] = "both",
    follow: Annotated[
        bool, Arg("keep printing new lines until the service exits", surfaces=STREAMED)
    ] = False,
) -> "ServiceLogsResult":
    """A service's output (kept under /run/pyro in the guest, outside /workspace)."""
    args = {"name": name, "tail_lines": tail_lines, "all": all, "stream": stream}
    with open_workspaces(ctx) as workspaces, workspaces.agent(workspace, "service logs") as agent:
        try:
            if follow and ctx.output is not None:
                value, _ = agent.call(
                    "service_logs",
                    {**args, "follow": True},
                    on_data=ctx.output,
                    timeout_s=FOLLOW_MAX_S,  # until the service ends; the agent's keepalives
                )  # tell a quiet service from a stalled agent
            else:
                value, _ = agent.call("service_logs", args, timeout_s=60)
        except GuestError as exc:
            record = workspaces.store.get(workspace)
            if exc.guest_code == "not_found" and name in record.services:
                raise InvalidState(
                    f"service {name!r} ran before workspace {record.id} last started: its "
                    "output was kept in the guest's memory (/run) and went with that boot"
                ) from None
            raise
        return {**value, **_keys(workspaces.store.get(workspace).id, name)}


@operation(
    cli=("workspace", "service", "stop"),
    sdk="stop_service",
    profiles=FULL,
    title="Stop a service",
    destructive=True,
    idempotent=True,
)
def service_stop(
    ctx: Context,
    workspace: Annotated[str, WORKSPACE],
    name: Annotated[str, NAME],
    signal: Annotated[str, Arg("signal sent first", surfaces=EVERY, **SIGNAL)] = "TERM",
    grace_seconds: Annotated[
        float, Arg("then KILL after this long", surfaces=EVERY, minimum=0, maximum=600)
    ] = 10.0,
) -> "ServiceStopResult":
    """Stop a service: the signal, then KILL after the grace period."""
    with open_workspaces(ctx) as workspaces, workspaces.agent(workspace, "service stop") as agent:
        record = workspaces.store.get(workspace)
        value, _ = agent.call(
            "service_stop",
            {"name": name, "signal": signal, "grace_s": grace_seconds},
            timeout_s=grace_seconds + CALL_MARGIN_S,
        )
        workspaces.mirror_services(record.id, agent)
        return {**value, **_keys(record.id, name)}
