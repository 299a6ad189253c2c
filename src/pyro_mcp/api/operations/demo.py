"""``pyro demo``: a first run anyone can repeat, with what to try next."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Annotated

from pyro_mcp.api import ollama
from pyro_mcp.api.context import Context
from pyro_mcp.api.operations.vm import vm_run
from pyro_mcp.api.registry import EVERY, Arg, operation

if TYPE_CHECKING:
    from pyro_mcp.api.results import DemoOllamaResult, DemoResult

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


@operation(
    cli=("demo", "ollama"),
    sdk="demo_ollama",
    progress=True,
    title="Let a model on Ollama drive pyro's tools",
    open_world=True,
)
def demo_ollama(
    ctx: Context,
    base_url: Annotated[str, Arg("the Ollama server's URL", surfaces=EVERY)] = (
        ollama.DEFAULT_BASE_URL
    ),
    model: Annotated[
        str, Arg("the model to ask (one trained to call tools)", surfaces=EVERY)
    ] = ollama.DEFAULT_MODEL,
    verbose: Annotated[
        bool,
        Arg("also print the model's words and each call's arguments", surfaces=EVERY, short="v"),
    ] = False,
) -> DemoOllamaResult:
    """Give a model on an Ollama server pyro's vm-run tools and a task, and let it work.

    The model is asked to run ``git --version`` in a fresh debian:12 microVM with
    ``vm_run`` and to say which version it found; each tool call it makes runs as an MCP
    client's would (its arguments checked, an error returned to it as text it can read).
    Returns its answer, the rounds it took and each tool call with its outcome. Errors:
    ModelServerError when no server answers at ``base_url`` or it answers something
    unusable, NotFound when it lacks the model (the hint: ``ollama pull``),
    OperationTimeout when a reply takes longer than 300 s.
    """
    base_url = ollama.check_base_url(base_url)
    quiet = dataclasses.replace(ctx, output=None)  # a command's output is the model's to read
    return ollama.converse(quiet, base_url, model, say=ctx.progress, verbose=verbose)
