"""Host operations: connect MCP hosts (Claude Code, Codex, OpenCode) to ``pyro mcp serve``.

Not MCP tools: they edit the configuration of the host that would call them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pyro_mcp import hosts
from pyro_mcp.api.context import Context
from pyro_mcp.api.registry import EVERY, Arg, operation
from pyro_mcp.hosts.base import SCOPES
from pyro_mcp.mcp_profiles import DEFAULT_PROFILE, PROFILES

if TYPE_CHECKING:
    from pyro_mcp.api.results import (
        HostConnectResult,
        HostDoctorResult,
        HostPrintConfigResult,
        HostRepairResult,
    )

HOST_NAMES = tuple(hosts.HOSTS)

Host = Annotated[str, Arg("the MCP host", surfaces=EVERY, positional=True, choices=HOST_NAMES)]
SomeHost = Annotated[
    str | None,
    Arg("the MCP host (default: every one)", surfaces=EVERY, positional=True, choices=HOST_NAMES),
]
Profile = Annotated[str, Arg("which tools the server offers", surfaces=EVERY, choices=PROFILES)]
Root = Annotated[
    str | None,
    Arg(
        "the host directory the server lets the agent name for seeds, sync and export "
        "(default: the current directory, written as an absolute path)",
        surfaces=EVERY,
        metavar="DIR",
        path=True,
    ),
]


def _setup(ctx: Context) -> hosts.Setup:
    return hosts.Setup.current(ctx.paths.cache_dir, ctx.state_dir, ctx.paths.run_root)


@operation(
    cli=("host", "print-config"),
    sdk="print_host_config",
    title="Print an MCP host's entry for pyro",
    read_only=True,
)
def host_print_config(
    ctx: Context, host: Host, profile: Profile = DEFAULT_PROFILE, root: Root = None
) -> HostPrintConfigResult:
    """Print the configuration that connects a host to this pyro's MCP server.

    The text to paste into the host's user configuration (``file``): JSON for Claude
    Code's ``~/.claude.json`` (or a project's ``.mcp.json``) under ``mcpServers``, a
    ``[mcp_servers.pyro]`` table for Codex's ``~/.codex/config.toml``, JSON under ``mcp``
    for OpenCode's ``opencode.json``. It starts this pyro (its absolute path) as
    ``mcp serve --profile PROFILE --root DIR``, with the cache, state, run and key
    directories this pyro uses pinned in its environment.

    Errors: InvalidArgument for a root that does not exist or is not a directory.
    """
    return hosts.print_config(_setup(ctx), host, profile, root)


@operation(
    cli=("host", "connect"),
    sdk="connect_host",
    title="Connect an MCP host to pyro",
    idempotent=True,
)
def host_connect(
    ctx: Context,
    host: Host,
    profile: Profile = DEFAULT_PROFILE,
    root: Root = None,
    scope: Annotated[
        str,
        Arg(
            "user: the host's own file, for every project; project: the project file in "
            "the current directory, for the host started there",
            surfaces=EVERY,
            choices=SCOPES,
        ),
    ] = "user",
    print_only: Annotated[
        bool, Arg("print the configuration instead (as print-config)", surfaces=EVERY, flag="print")
    ] = False,
) -> HostConnectResult:
    """Write this pyro's MCP server into a host's configuration file.

    Claude Code: ``~/.claude.json`` (``$CLAUDE_CONFIG_DIR/.claude.json``), or ``.mcp.json``
    in the project. Codex: ``$CODEX_HOME/config.toml`` (``~/.codex``), or
    ``.codex/config.toml`` in the project. OpenCode: ``~/.config/opencode/opencode.json``
    (``$XDG_CONFIG_HOME``), or ``opencode.json`` in the project. The ``pyro`` entry is
    merged in: the host's other servers and settings stay, and keys of its own in the
    entry too. A changed file is written atomically after a backup (``NAME.pyro.bak``);
    it keeps its mode, made 0600 when it holds secrets. Nothing is written when the entry
    is already as wanted (``changed`` false): running it twice changes nothing.

    Errors: InvalidState naming the file and line when the file cannot be parsed (it is
    left as it is); InvalidArgument for a root that does not exist; Conflict when the
    host kept rewriting the file meanwhile.
    """
    if print_only:
        return hosts.print_config(_setup(ctx), host, profile, root, scope)
    return hosts.connect(_setup(ctx), host, profile, root, scope)


@operation(
    cli=("host", "doctor"),
    sdk="doctor_hosts",
    title="Check MCP hosts' entries for pyro",
    read_only=True,
)
def host_doctor(ctx: Context, host: SomeHost = None) -> HostDoctorResult:
    """Check each host's pyro entry as the host will start the server.

    Per host: ``found`` (an entry in its user or this directory's project file), ``ok``
    and ``problems``, each with its ``fix``: the entry's command exists, is executable and
    is this pyro; it runs ``mcp serve`` with a known profile and an existing root
    directory; the runtime cache is there and the state directory writable in the
    environment the host gives the server (Codex passes on only a few variables; a host
    may set another HOME), and each of ``PYRO_CACHE_DIR``/``PYRO_STATE_DIR``/
    ``PYRO_RUN_DIR``/``PYRO_KEY_DIR`` is pinned where it would resolve elsewhere; Codex's
    entry has ``required = true``.
    """
    return hosts.diagnose(_setup(ctx), [host] if host else list(HOST_NAMES))


@operation(
    cli=("host", "repair"),
    sdk="repair_hosts",
    title="Repair MCP hosts' entries for pyro",
    idempotent=True,
)
def host_repair(ctx: Context, host: SomeHost = None) -> HostRepairResult:
    """Fix what ``pyro host doctor`` finds in each host's pyro entry, and say what changed.

    Points the entry at this pyro, keeps its profile and roots where they are valid (else
    the default profile, the current directory), pins the directories this pyro uses where
    the entry's are missing or unusable, sets ``required = true`` for Codex. Written as
    ``connect`` writes (merged, atomic, a backup). ``problems`` lists what is still wrong.
    """
    return hosts.repair(_setup(ctx), [host] if host else list(HOST_NAMES))
