"""The configurations `pyro host connect` writes, as the hosts themselves read them.

The hosts' own CLIs come from npm at the versions pinned in tests/npm/hosts (`make
npm-packages` installs them). Each runs with a fresh HOME and no account, inside a network
namespace of its own (`unshare --net`: loopback only, so nothing a host tries to reach
leaves the machine), and starts the server it was given: `pyro mcp serve` over stdio,
which answers `initialize` and `tools/list` without any VM.

- Claude Code: `claude mcp get pyro` reads the file and health-checks the server
  (starts it, initializes); a project's `.mcp.json` is listed as pending approval.
- Codex: `codex mcp get pyro --json` is Codex's own parse of config.toml; `codex exec`
  then creates a session, which with `required = true` waits for pyro to start and
  fails when it cannot (the model is never reached: there is no network).
- OpenCode: `opencode debug config` is OpenCode's parse (it validates the schema: a
  command that is not an array is refused), `opencode mcp list` connects to the server.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from pyro_mcp.mcp_profiles import DEFAULT_PROFILE

ROOT = Path(__file__).resolve().parents[2]
MODULES = ROOT / "tests" / "npm" / "hosts" / "node_modules"
CLIS = {  # OpenCode's own binary package has no npm bin link
    "claude": MODULES / ".bin" / "claude",
    "codex": MODULES / ".bin" / "codex",
    "opencode": MODULES / "opencode-linux-x64" / "bin" / "opencode",
}
PACKAGES = json.loads((ROOT / "tests" / "npm" / "hosts" / "package.json").read_text())
ANSI = re.compile(r"\x1b\[[0-9;]*m")
HOST_TIMEOUT_S = 180  # a bound on each host command, not a measurement

pytestmark = pytest.mark.skipif(
    not MODULES.is_dir(),
    reason="the hosts' CLIs are not installed: run `make npm-packages` "
    "(or `npm ci --prefix tests/npm/hosts`)",
)


@pytest.fixture(scope="module")
def offline() -> list[str]:
    """The prefix that runs a command in a new network namespace."""
    probe = subprocess.run(["unshare", "--net", "--", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a network namespace here: {probe.stderr.decode().strip()}")
    return ["unshare", "--net", "--"]


class Machine:
    """A fresh HOME, a project directory and pyro's directories, all under tmp_path."""

    def __init__(self, tmp_path: Path, offline: list[str]) -> None:
        self.home = tmp_path / "home"
        self.project = tmp_path / "project"
        self.offline = offline
        for directory in (self.home, self.project, tmp_path / "tmp", tmp_path / "cache"):
            directory.mkdir()
        self.env = {
            "HOME": str(self.home),
            "PATH": os.environ.get("PATH", os.defpath),
            "LANG": "C.UTF-8",
            "TMPDIR": str(tmp_path / "tmp"),
            "PYRO_CACHE_DIR": str(tmp_path / "cache"),
            "PYRO_STATE_DIR": str(tmp_path / "state"),
            "PYRO_RUN_DIR": str(tmp_path / "run"),
            "PYRO_KEY_DIR": str(tmp_path / "keys"),
            # The code under test serves (Claude Code and OpenCode pass this on).
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
            "DISABLE_AUTOUPDATER": "1",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "OPENCODE_DISABLE_AUTOUPDATE": "1",
        }

    def pyro(self, *args: str) -> dict[str, Any]:
        argv = [sys.executable, "-m", "pyro_mcp.cli.main", *args, "--json"]
        done = self.run(argv, offline=False)
        assert done.returncode == 0, done.stdout + done.stderr
        return dict(json.loads(done.stdout))

    def host(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run([str(CLIS[name]), *args])

    def run(self, argv: list[str], *, offline: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.offline, *argv] if offline else argv,
            cwd=self.project,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=HOST_TIMEOUT_S,
            check=False,
        )

    def serve_args(self, profile: str = DEFAULT_PROFILE) -> list[str]:
        return ["mcp", "serve", "--profile", profile, "--root", str(self.project)]

    def pinned(self) -> dict[str, str]:
        return {k: v for k, v in self.env.items() if k.startswith("PYRO_")}


@pytest.fixture
def machine(tmp_path: Path, offline: list[str]) -> Machine:
    return Machine(tmp_path, offline)


def test_the_pinned_versions_are_the_installed_ones() -> None:
    for package, version in PACKAGES["dependencies"].items():
        installed = MODULES / package / "package.json"
        assert json.loads(installed.read_text())["version"] == version, package


def test_claude_code_starts_the_server_of_its_user_config(machine: Machine) -> None:
    added = machine.host("claude", "mcp", "add", "-s", "user", "other", "--", "/bin/true")
    assert added.returncode == 0, added.stderr  # Claude Code wrote its own ~/.claude.json
    connected = machine.pyro("host", "connect", "claude-code", "--profile", "vm-run")
    command = connected["entry"]["command"]
    got = machine.host("claude", "mcp", "get", "pyro")
    text = got.stdout
    assert got.returncode == 0, got.stderr
    assert "Scope: User config" in text
    assert "Status: ✔ Connected" in text
    assert f"Command: {command}\n" in text
    assert f"Args: {' '.join(machine.serve_args('vm-run'))}\n" in text
    for name, value in machine.pinned().items():
        assert f"{name}={value}" in text
    listed = machine.host("claude", "mcp", "list").stdout
    assert "other: /bin/true" in listed  # the server Claude Code added is still there
    assert machine.pyro("host", "connect", "claude-code", "--profile", "vm-run")["changed"] is False


def test_a_claude_code_local_entry_wins_and_the_doctor_says_so(machine: Machine) -> None:
    machine.pyro("host", "connect", "claude-code")
    added = machine.host("claude", "mcp", "add", "pyro", "--", "/bin/true")  # local: default
    assert added.returncode == 0, added.stderr
    got = machine.host("claude", "mcp", "get", "pyro").stdout
    assert "Scope: Local config" in got and "Command: /bin/true" in got
    report = machine.pyro("host", "doctor", "claude-code")["hosts"]["claude-code"]
    assert [p["fix"] for p in report["problems"]] == [
        f"claude mcp remove pyro -s local (run in {machine.project})"
    ]


def test_claude_code_reads_a_project_mcp_json(machine: Machine) -> None:
    written = machine.pyro("host", "connect", "claude-code", "--scope", "project")
    assert written["file"] == str(machine.project / ".mcp.json")
    got = machine.host("claude", "mcp", "get", "pyro")
    assert got.returncode == 0, got.stderr
    assert "Scope: Project config (shared via .mcp.json)" in got.stdout
    assert f"Args: {' '.join(machine.serve_args())}\n" in got.stdout
    assert "Pending approval" in got.stdout  # as pyro's note says


def test_codex_reads_a_project_config_only_once_the_project_is_trusted(machine: Machine) -> None:
    written = machine.pyro("host", "connect", "codex", "--scope", "project")
    assert written["file"] == str(machine.project / ".codex" / "config.toml")
    assert written["notes"] == ["Codex reads .codex/config.toml only in a project you have trusted"]
    listed = machine.host("codex", "mcp", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [server["name"] for server in json.loads(listed.stdout)] == []
    (machine.home / ".codex").mkdir(exist_ok=True)
    trust = f'[projects."{machine.project}"]\ntrust_level = "trusted"\n'
    (machine.home / ".codex" / "config.toml").write_text(trust)
    listed = machine.host("codex", "mcp", "list", "--json")
    assert [server["name"] for server in json.loads(listed.stdout)] == ["pyro"]


def _codex_session(machine: Machine) -> tuple[bool, str]:
    """Whether `codex exec` got as far as a session (its required servers started), and
    its stderr. Stopped once it has: the turn would only wait for the network."""
    argv = [str(CLIS["codex"]), "exec", "--skip-git-repo-check", "--json", "hello"]
    process = subprocess.Popen(
        [*machine.offline, *argv],
        cwd=machine.project,
        env=machine.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stdout is not None and process.stderr is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    selector.register(process.stderr, selectors.EVENT_READ)
    out, err = b"", b""
    deadline = time.monotonic() + HOST_TIMEOUT_S
    started = False
    try:
        while not started and time.monotonic() < deadline and selector.get_map():
            for key, _ in selector.select(timeout=1):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                elif key.fileobj is process.stdout:
                    out += chunk
                else:
                    err += chunk
            started = b'"type":"thread.started"' in out
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        selector.close()
    return started, err.decode(errors="replace")


def test_codex_parses_the_entry_and_waits_for_the_required_server(machine: Machine) -> None:
    (machine.home / ".codex").mkdir()
    (machine.home / ".codex" / "config.toml").write_text('# mine\nmodel = "o3"\n')
    connected = machine.pyro("host", "connect", "codex")
    got = machine.host("codex", "mcp", "get", "pyro", "--json")
    assert got.returncode == 0, got.stderr
    parsed = json.loads(got.stdout)
    assert parsed["enabled"] is True
    assert parsed["transport"] == {
        "type": "stdio",
        "command": connected["entry"]["command"],
        "args": machine.serve_args(),
        "env": machine.pinned(),
        "env_vars": [],
        "cwd": None,
    }
    config = (machine.home / ".codex" / "config.toml").read_text()
    assert config.startswith('# mine\nmodel = "o3"\n')
    assert tomllib.loads(config)["mcp_servers"]["pyro"]["required"] is True
    started, stderr = _codex_session(machine)
    assert started, stderr
    # The same entry with a command that cannot start: the session is refused.
    broken = config.replace(json.dumps(connected["entry"]["command"]), '"/nonexistent/pyro"')
    (machine.home / ".codex" / "config.toml").write_text(broken)
    started, stderr = _codex_session(machine)
    assert not started
    assert "required MCP servers failed to initialize" in stderr


def test_opencode_validates_and_connects_to_the_server(machine: Machine) -> None:
    added = machine.host("opencode", "mcp", "add", "other", "--", "/bin/true")
    assert added.returncode == 0, added.stderr  # OpenCode wrote its own opencode.jsonc
    connected = machine.pyro("host", "connect", "opencode")
    argv = connected["entry"]["command"]
    assert argv[1:] == machine.serve_args()
    assert connected["file"] == str(machine.home / ".config" / "opencode" / "opencode.jsonc")
    config = machine.host("opencode", "debug", "config")
    assert config.returncode == 0, config.stderr
    servers = json.loads(config.stdout)["mcp"]
    assert servers["pyro"] == {
        "type": "local",
        "command": argv,
        "environment": machine.pinned(),
        "enabled": True,
    }
    assert servers["other"]["command"] == ["/bin/true"]
    listed = ANSI.sub("", machine.host("opencode", "mcp", "list").stdout)
    assert re.search(r"✓ pyro\s+connected", listed), listed
    assert " ".join(argv) in listed


def test_opencode_reads_a_project_opencode_json(machine: Machine) -> None:
    written = machine.pyro("host", "connect", "opencode", "--scope", "project")
    assert written["file"] == str(machine.project / "opencode.json")
    config = machine.host("opencode", "debug", "config")
    assert config.returncode == 0, config.stderr
    assert json.loads(config.stdout)["mcp"]["pyro"]["command"][1:] == machine.serve_args()


def test_opencode_refuses_what_its_schema_does_not_allow(machine: Machine) -> None:
    """The check above can fail: OpenCode rejects an entry of the wrong shape."""
    directory = machine.home / ".config" / "opencode"
    directory.mkdir(parents=True)
    (directory / "opencode.json").write_text(
        json.dumps({"mcp": {"pyro": {"type": "local", "command": "/bin/pyro mcp serve"}}})
    )
    config = machine.host("opencode", "debug", "config")
    assert "Configuration is invalid" in ANSI.sub("", config.stdout + config.stderr)
    assert "mcp.pyro.command" in ANSI.sub("", config.stdout + config.stderr)
