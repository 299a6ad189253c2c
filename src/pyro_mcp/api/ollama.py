"""A model on an Ollama server driving pyro's tools (``pyro demo ollama``).

The model gets the MCP ``vm-run`` profile's tools (``vm_run``, ``env_list``), described by
the same declarations as the MCP server's, and a task: run ``git --version`` in a fresh
microVM and say which version it found. Each tool call it makes runs as an MCP client's
call would (arguments checked, errors returned to the model as text it can read); the
loop ends when the model answers without calling a tool.

Everything the server sends is bounded: the size of a reply, the number of rounds and of
tool calls in a round, and the text of each tool result sent back.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from pyro_mcp.api.context import Context
from pyro_mcp.api.registry import Operation, Surface, all_operations
from pyro_mcp.api.validation import arguments_schema
from pyro_mcp.errors import (
    InvalidArgument,
    ModelServerError,
    NotFound,
    OperationTimeout,
    PyroError,
    TooLarge,
)

DEFAULT_BASE_URL = "http://127.0.0.1:11434"
DEFAULT_MODEL = "llama3.2:3b"
PROFILE = "vm-run"  # the tools the model is offered: what this MCP profile serves
TASK = (
    "Use the vm_run tool to run the command `git --version` in a fresh debian:12 "
    "microVM. Then answer in one sentence: which version of git does the VM have?"
)
MAX_ROUNDS = 8  # model replies, tool calls included
MAX_CALLS_PER_ROUND = 4
MAX_REPLY_BYTES = 4 << 20
MAX_TOOL_RESULT_CHARS = 16_000  # of each tool result sent back to the model
REQUEST_TIMEOUT_S = 300.0  # one reply: a small model on a CPU can take minutes


def tools(profile: str = PROFILE) -> list[Operation]:
    """The operations the model may call: the MCP profile's tools."""
    return sorted((op for op in all_operations() if profile in op.profiles), key=lambda o: o.name)


def tool_spec(op: Operation, profile: str = PROFILE) -> dict[str, Any]:
    """``op`` as Ollama's chat API takes a tool: a function with a JSON schema."""
    return {
        "type": "function",
        "function": {
            "name": op.name,
            "description": op.doc,
            "parameters": arguments_schema(op.mcp_params(profile)),
        },
    }


def check_base_url(base_url: str) -> str:
    """``base_url`` without a trailing slash (InvalidArgument unless http(s)://host[:port])."""
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidArgument(
            f"base_url must be an http:// or https:// URL of an Ollama server, got {base_url!r}",
            hint=f"Ollama listens on {DEFAULT_BASE_URL} by default",
        )
    if parts.query or parts.fragment:
        raise InvalidArgument(f"base_url takes no query or fragment, got {base_url!r}")
    return base_url.rstrip("/")


def chat(base_url: str, body: dict[str, Any], timeout_s: float | None = None) -> Any:
    """One reply of ``POST {base_url}/api/chat`` (not streamed), decoded; within
    ``timeout_s`` (default :data:`REQUEST_TIMEOUT_S`)."""
    timeout_s = REQUEST_TIMEOUT_S if timeout_s is None else timeout_s
    request = urllib.request.Request(
        f"{base_url}/api/chat",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            raw = reply.read(MAX_REPLY_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise _refused(base_url, str(body.get("model")), exc) from exc
    except TimeoutError as exc:
        raise OperationTimeout(
            f"the Ollama server at {base_url} sent no reply in {timeout_s:g} s",
            hint="a first reply loads the model: try again, or a smaller --model",
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ModelServerError(
            f"no Ollama server answers at {base_url} ({reason})",
            hint="start one with `ollama serve`, or give its address with --base-url",
        ) from exc
    if len(raw) > MAX_REPLY_BYTES:
        raise TooLarge(f"the Ollama server at {base_url} sent more than {MAX_REPLY_BYTES} bytes")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ModelServerError(f"the server at {base_url} did not answer JSON") from exc


def _refused(base_url: str, model: str, exc: urllib.error.HTTPError) -> PyroError:
    try:
        detail = str(json.loads(exc.read(64 << 10)).get("error", ""))[:500]
    except (ValueError, AttributeError, OSError):
        detail = ""
    if exc.code == 404 and "not found" in detail:
        return NotFound(
            f"the Ollama server at {base_url} has no model {model!r}",
            hint=f"pull it with `ollama pull {model}`, or choose another with --model",
        )
    said = f": {detail}" if detail else ""
    return ModelServerError(f"the Ollama server at {base_url} answered HTTP {exc.code}{said}")


def converse(
    ctx: Context,
    base_url: str,
    model: str,
    *,
    say: Callable[[str], None],
    verbose: bool = False,
    chat: Callable[[str, dict[str, Any]], Any] = chat,
) -> dict[str, Any]:
    """Let ``model`` work on :data:`TASK` with the tools until it answers.

    ``say`` is told each step: each round and each call with how it ended and, when
    ``verbose``, the model's words and each call's arguments. Returns the answer, the
    rounds taken and every tool call with its outcome.
    """
    offered = {op.name: op for op in tools()}
    specs = [tool_spec(op) for op in offered.values()]
    messages: list[dict[str, Any]] = [{"role": "user", "content": TASK}]
    calls: list[dict[str, Any]] = []
    for round_number in range(1, MAX_ROUNDS + 1):
        say(f"asking {model} (round {round_number})")
        body = {"model": model, "messages": messages, "tools": specs, "stream": False}
        reply = chat(base_url, body)
        content, requested = _message(base_url, reply)
        if content and verbose:
            say(f"{model}: {content}")
        messages.append({"role": "assistant", "content": content, "tool_calls": requested})
        if not requested:
            return {
                "base_url": base_url,
                "model": model,
                "task": TASK,
                "answer": content,
                "rounds": round_number,
                "tool_calls": calls,
            }
        for name, arguments in requested_calls(base_url, requested):
            if verbose:
                say(f"{model} calls {name} {json.dumps(arguments)}")
            outcome, record = _run_tool(ctx, offered, name, arguments)
            say(f"{name}: {record['outcome']}")
            calls.append(record)
            text = json.dumps(outcome, default=str)[:MAX_TOOL_RESULT_CHARS]
            messages.append({"role": "tool", "tool_name": name, "content": text})
    raise ModelServerError(
        f"{model} made {MAX_ROUNDS} rounds of tool calls without answering",
        hint="try a model that is better at tool calling, with --model",
    )


def _message(base_url: str, reply: Any) -> tuple[str, list[Any]]:
    """The reply's text and its tool calls (ModelServerError unless shaped as Ollama's)."""
    message = reply.get("message") if isinstance(reply, dict) else None
    if not isinstance(message, dict):
        raise ModelServerError(f"the reply of {base_url} has no message")
    content = message.get("content") or ""
    requested = message.get("tool_calls") or []
    if not isinstance(content, str) or not isinstance(requested, list):
        raise ModelServerError(f"the reply of {base_url} is not shaped as Ollama's chat reply")
    return content, requested


def requested_calls(base_url: str, requested: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    """The (name, arguments) of each tool call a reply asks for, at most
    :data:`MAX_CALLS_PER_ROUND` (arguments may come as an object or as JSON text)."""
    if len(requested) > MAX_CALLS_PER_ROUND:
        raise ModelServerError(
            f"the model asked for {len(requested)} tool calls at once "
            f"(at most {MAX_CALLS_PER_ROUND})"
        )
    found: list[tuple[str, dict[str, Any]]] = []
    for call in requested:
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        arguments = function.get("arguments", {}) if isinstance(function, dict) else None
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                arguments = None
        if not isinstance(name, str) or not isinstance(arguments, dict):
            raise ModelServerError(f"a tool call in the reply of {base_url} is malformed")
        found.append((name, arguments))
    return found


def _run_tool(
    ctx: Context, offered: dict[str, Operation], name: str, arguments: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one call as an MCP client's would: (what the model reads, the call's record)."""
    record: dict[str, Any] = {"name": name, "arguments": arguments}
    op = offered.get(name)
    if op is None:
        outcome: dict[str, Any] = {
            "error": "unknown_tool",
            "message": f"there is no tool {name!r}; the tools are {', '.join(offered)}",
        }
        return outcome, {**record, "ok": False, "outcome": outcome["message"]}
    try:
        result = op.call(ctx, Surface.MCP, **arguments)
    except PyroError as exc:
        return exc.to_dict(), {**record, "ok": False, "outcome": str(exc)}
    ended = f"exit code {result['exit_code']}" if "exit_code" in result else "done"
    return dict(result), {**record, "ok": True, "outcome": ended}
