"""``pyro demo``: a first run anyone can repeat, with what to try next."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Annotated

from pyro_mcp.api.context import Context
from pyro_mcp.api.operations.vm import vm_run
from pyro_mcp.api.registry import EVERY, Arg, operation

if TYPE_CHECKING:
    from pyro_mcp.api.results import DemoResult

DEMO_ENVIRONMENT = "debian:12"
DEMO_COMMAND = ["git", "--version"]
NEXT_STEPS = (
    "pyro run debian:12 -- uname -a",
    "pyro workspace create debian:12 --name demo",
    "pyro workspace exec demo -- sh -c 'echo hello > note.txt && cat note.txt'",
    "pyro workspace diff demo",
    "pyro workspace delete demo",
    "pyro mcp serve (or: pyro host connect claude-code)",
)


@operation(
    cli=("demo",),
    sdk="demo",
    progress=True,
    title="Run the demo in a fresh microVM",
    open_world=True,
)
def demo(
    ctx: Context,
    network: Annotated[
        bool, Arg("give the VM egress to the internet and show its address", surfaces=EVERY)
    ] = False,
) -> DemoResult:
    """Boot a fresh microVM of debian:12, run ``git --version`` in it, and discard it.

    The same every time: the result carries git's version line, the phase timings and
    the commands to try next. ``network`` gives the VM egress (as ``pyro run --network``)
    and shows its address. Errors as for ``pyro run`` (RuntimeMissing with the command
    that installs debian:12 when it is not installed).
    """
    quiet = dataclasses.replace(ctx, output=None)  # its output is in the summary
    ran = vm_run(quiet, DEMO_ENVIRONMENT, list(DEMO_COMMAND), network=network)
    return {
        "environment": DEMO_ENVIRONMENT,
        "command": list(DEMO_COMMAND),
        "exit_code": ran["exit_code"],
        "stdout": ran["stdout"],
        "stderr": ran["stderr"],
        "duration_ms": ran["duration_ms"],
        "timings_ms": ran["timings_ms"],
        "boot": ran["boot"],
        "backend": ran["backend"],
        "network": ran["network"],
        "next": list(NEXT_STEPS),
    }
