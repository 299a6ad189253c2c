"""Put the hostile agent (tests/hostile_agent.py) into a real workspace guest.

Root in a guest owns its root disk: replacing the agent is what a hostile guest can do.
``install`` copies the hostile module over pyro's agent (keeping the real one beside it,
which the hostile one imports), kills the running agent so the guest's init starts the
hostile one, and returns a function that sets its mode.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from pyro_mcp.api import Context
from pyro_mcp.api.operations import workspace_content as wc
from pyro_mcp.api.operations.workspaces import open_workspaces
from pyro_mcp.errors import PyroError
from pyro_mcp.vmm.attach import AgentEndpoint, attach

HOSTILE_SOURCE = Path(__file__).resolve().parents[1] / "hostile_agent.py"
AGENT_DIR = "/opt/pyro/pyro_mcp/guest_agent"

SetMode = Callable[..., None]


def endpoint(ctx: Context, wid: str) -> AgentEndpoint:
    with open_workspaces(ctx) as workspaces:
        record = workspaces.store.get(wid)
    assert record.agent_endpoint, record
    return AgentEndpoint.from_str(record.agent_endpoint)


def _agent_pid(ctx: Context, wid: str) -> int:
    with attach(endpoint(ctx, wid)) as client:
        return int(client.hello_info["pid"])


def _console_tail(ctx: Context, wid: str, size: int = 4000) -> str:
    """The end of the workspace's guest console (what its init said), to explain a failure."""
    with open_workspaces(ctx) as workspaces:
        run_dir = workspaces.store.get(wid).run_dir
    try:
        with open(Path(str(run_dir)) / "console.log", "rb") as console:
            console.seek(0, 2)
            console.seek(max(0, console.tell() - size))
            return console.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(no console log: {exc})"


def install(ctx: Context, wid: str) -> SetMode:
    """Replace the workspace's agent with the hostile one; its mode setter."""
    old_pid = _agent_pid(ctx, wid)
    wc.workspace_file_write(ctx, wid, ".pyro-hostile.py", text=HOSTILE_SOURCE.read_text())
    script = (
        f"d={AGENT_DIR}; cp $d/agent.py $d/real_agent.py && "
        "mv /workspace/.pyro-hostile.py $d/agent.py && "
        f"(sleep 0.5; kill {old_pid}) >/dev/null 2>&1 &"
    )
    ran = wc.workspace_exec(ctx, wid, ["sh", "-c", script])
    assert ran["exit_code"] == 0, ran
    deadline = time.monotonic() + 60
    seen: object = None
    while True:  # the guest's init starts the (now hostile) agent again
        try:
            pid = _agent_pid(ctx, wid)
            if pid != old_pid:
                break
            seen = f"PID {pid} still answers"
        except PyroError as exc:
            seen = exc
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"the hostile agent never came up (last: {seen}); the guest's console:\n"
                + _console_tail(ctx, wid)
            )
        time.sleep(0.2)

    def set_mode(mode: str, **options: object) -> None:
        with attach(endpoint(ctx, wid)) as client:
            client.call("hostile_mode", {"mode": mode, **options}, timeout_s=10)

    set_mode("honest")  # the call exists only in the hostile agent: it is in place
    return set_mode
