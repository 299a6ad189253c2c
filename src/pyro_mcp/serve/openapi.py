"""The OpenAPI 3.1 document of the REST API (``GET /api/v1/openapi.json``), generated from
the same declarations as the routes: each operation's arguments (as its MCP tool takes
them), its result (its MCP output schema), its errors, and the bearer token."""

from __future__ import annotations

from typing import Any

from pyro_mcp import __version__
from pyro_mcp.api.registry import Operation, Param
from pyro_mcp.api.result_shapes import output_schema
from pyro_mcp.api.validation import arguments_schema
from pyro_mcp.serve.rest import PREFIX

ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {"type": "string", "description": "the kind: not_found, invalid_argument..."},
        "message": {"type": "string"},
        "hint": {"type": "string", "description": "what to do about it, when pyro knows"},
    },
    "required": ["error", "message"],
}
ERROR_REF = {"$ref": "#/components/schemas/Error"}
EVENTS_DESCRIPTION = (
    "Server-sent events as the call runs: `progress` ({message}), `output` ({stream, "
    "text}: a command's stdout or stderr as it arrives), then `result` (what the call "
    "route answers) or `error` (the error, with the status the call route would give)."
)


def _body(params: tuple[Param, ...]) -> dict[str, Any]:
    return {
        "required": False,
        "content": {"application/json": {"schema": arguments_schema(params)}},
    }


def document(ops: list[Operation], profile: str) -> dict[str, Any]:
    """The OpenAPI document of the routes of ``ops`` (served in ``profile``)."""
    paths: dict[str, Any] = {}
    for op in ops:
        body = _body(op.mcp_params(profile))
        errors = {"default": {"$ref": "#/components/responses/Error"}}
        summary = op.effects.title if op.effects is not None else op.summary
        paths[f"{PREFIX}/{op.name}"] = {
            "post": {
                "operationId": op.name,
                "summary": summary,
                "description": op.doc,
                "requestBody": body,
                "responses": {
                    "200": {
                        "description": "the result",
                        "content": {"application/json": {"schema": output_schema(op)}},
                    },
                    **errors,
                },
            }
        }
        paths[f"{PREFIX}/{op.name}/stream"] = {
            "post": {
                "operationId": f"{op.name}_stream",
                "summary": f"{summary}, as events",
                "description": EVENTS_DESCRIPTION,
                "requestBody": _body(op.stream_params(profile)),
                "responses": {
                    "200": {
                        "description": "the call's events",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **errors,
                },
            }
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pyro-mcp",
            "version": __version__,
            "description": "Disposable, hardware-isolated Linux machines for coding agents: "
            f"the operations of the {profile} profile.",
        },
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR_SCHEMA},
            "responses": {
                "Error": {
                    "description": "the call failed (the status says how: 400 a bad "
                    "argument, 401 no token, 404 unknown, 409 wrong state, ...)",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    },
                }
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
