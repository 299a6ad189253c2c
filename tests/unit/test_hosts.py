"""`pyro host`: the entry each host gets, merged into its file without losing the user's
settings, written once (idempotent) with a backup, refused when the file does not parse;
the doctor's findings and the repair that clears them. The hosts' own CLIs read these
files in tests/hosts."""

from __future__ import annotations

import json
import os
import stat
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from pyro_mcp import InvalidArgument, InvalidState, Pyro
from pyro_mcp.cli.main import main
from pyro_mcp.hosts import config_files, connect, diagnose, print_config, repair, toml_text
from pyro_mcp.hosts.server import Launcher, Setup, read_serve_args, this_pyro

HOSTS = ("claude-code", "codex", "opencode")


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    """A pyro script, its directories and a home, all under tmp_path; cwd: a project."""
    home, project = tmp_path / "home", tmp_path / "project"
    for directory in (home, project, tmp_path / "cache", tmp_path / "bin"):
        directory.mkdir()
    pyro = tmp_path / "bin" / "pyro"
    pyro.write_text("#!/bin/sh\n")
    pyro.chmod(0o755)
    here = {
        "PYRO_CACHE_DIR": tmp_path / "cache",
        "PYRO_STATE_DIR": tmp_path / "state",
        "PYRO_RUN_DIR": tmp_path / "run",
        "PYRO_KEY_DIR": tmp_path / "keys",
    }
    environ = {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    return Setup(Launcher(str(pyro)), here, environ, project)


def _home(setup: Setup) -> Path:
    return Path(setup.environ["HOME"])


def _user_file(setup: Setup, host: str) -> Path:
    return {
        "claude-code": _home(setup) / ".claude.json",
        "codex": _home(setup) / ".codex" / "config.toml",
        "opencode": _home(setup) / ".config" / "opencode" / "opencode.json",
    }[host]


def _servers(host: str, path: Path) -> dict[str, Any]:
    text = path.read_text()
    if host == "codex":
        return dict(tomllib.loads(text)["mcp_servers"])
    key = "mcpServers" if host == "claude-code" else "mcp"
    return dict(json.loads(text)[key])


def _argv(host: str, entry: dict[str, Any]) -> list[str]:
    if host == "opencode":
        return list(entry["command"])
    return [entry["command"], *entry["args"]]


def _env(host: str, entry: dict[str, Any]) -> dict[str, str]:
    return dict(entry["environment" if host == "opencode" else "env"])


def _pinned(setup: Setup) -> dict[str, str]:
    return {name: str(path) for name, path in setup.here.items()}


@pytest.mark.parametrize("host", HOSTS)
def test_connect_writes_this_pyro_with_profile_root_and_pinned_directories(
    setup: Setup, host: str
) -> None:
    result = connect(setup, host, "workspace-full", None, "user")
    entry = _servers(host, _user_file(setup, host))["pyro"]
    assert result["changed"] is True
    assert result["file"] == str(_user_file(setup, host))
    assert _argv(host, entry) == [
        setup.launcher.command,
        *("mcp", "serve", "--profile", "workspace-full", "--root", str(setup.cwd)),
    ]
    assert _env(host, entry) == _pinned(setup)
    if host == "codex":
        assert entry["required"] is True
    if host == "opencode":
        assert (entry["type"], entry["enabled"]) == ("local", True)
    if host == "claude-code":
        assert entry["type"] == "stdio"


@pytest.mark.parametrize("host", HOSTS)
def test_print_config_is_the_entry_connect_writes(setup: Setup, host: str) -> None:
    printed = print_config(setup, host, "vm-run", str(setup.cwd))
    snippet = printed["text"]
    parsed = tomllib.loads(snippet) if host == "codex" else json.loads(snippet)
    connect(setup, host, "vm-run", None, "user")
    written = _user_file(setup, host)
    assert printed["file"] == str(written)
    if host == "codex":
        assert parsed["mcp_servers"]["pyro"] == _servers(host, written)["pyro"]
    else:
        assert parsed == json.loads(written.read_text())


def test_a_relative_root_is_written_absolute_and_a_missing_root_is_refused(setup: Setup) -> None:
    (setup.cwd / "data").mkdir()
    connect(setup, "codex", "workspace-core", "data", "user")
    entry = _servers("codex", _user_file(setup, "codex"))["pyro"]
    assert read_serve_args(entry["args"]).roots == [str(setup.cwd / "data")]  # type: ignore[union-attr]
    with pytest.raises(InvalidArgument, match=r"root .*/nowhere does not exist"):
        connect(setup, "codex", "workspace-core", "nowhere", "user")
    (setup.cwd / "file").write_text("")
    with pytest.raises(InvalidArgument, match="is not a directory"):
        connect(setup, "claude-code", "workspace-core", "file", "user")


@pytest.mark.parametrize("host", HOSTS)
def test_connect_twice_changes_nothing(setup: Setup, host: str) -> None:
    connect(setup, host, "workspace-core", None, "user")
    path = _user_file(setup, host)
    before = (path.read_bytes(), path.stat().st_mtime_ns, path.stat().st_ino)
    again = connect(setup, host, "workspace-core", None, "user")
    assert (again["changed"], again["changes"], again["backup"]) == (False, [], None)
    assert (path.read_bytes(), path.stat().st_mtime_ns, path.stat().st_ino) == before
    assert not path.with_name(path.name + ".pyro.bak").exists()


def test_claude_code_keeps_the_account_the_projects_and_other_servers(setup: Setup) -> None:
    path = _user_file(setup, "claude-code")
    other = {"type": "stdio", "command": "npx", "args": ["x"], "env": {"API_KEY": "s3cret"}}
    document = {
        "numStartups": 7,
        "oauthAccount": {"emailAddress": "a@example.invalid"},
        "projects": {"/p": {"mcpServers": {"local": {"command": "y"}}, "allowedTools": []}},
        "mcpServers": {"other": other, "pyro": {"command": "/old/pyro", "timeout": 30}},
    }
    path.write_text(json.dumps(document))
    path.chmod(0o644)
    result = connect(setup, "claude-code", "workspace-core", None, "user")
    written = json.loads(path.read_text())
    pyro = written["mcpServers"].pop("pyro")
    document["mcpServers"].pop("pyro")  # type: ignore[attr-defined]
    assert written == document
    assert pyro["timeout"] == 30  # the entry's own keys stay
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds secrets: made private
    backup = Path(result["backup"])
    assert json.loads(backup.read_text())["mcpServers"]["pyro"]["command"] == "/old/pyro"
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert 'command: "/old/pyro" -> ' + json.dumps(setup.launcher.command) in result["changes"]


def test_codex_keeps_every_other_line_of_the_users_file(setup: Setup) -> None:
    path = _user_file(setup, "codex")
    path.parent.mkdir()
    head = '# my settings\nmodel = "o3"  # the best\n\n[mcp_servers.docs]\ncommand = "docs"\n\n'
    old = '[mcp_servers.pyro]\ncommand = "/old/pyro"\nstartup_timeout_sec = 40\n\n'
    old += '[mcp_servers.pyro.env]\nPYRO_BACKEND = "qemu"\n\n'
    tail = '[profiles.fast]\nmodel = "o4-mini"  # keep me\n'
    path.write_text(head + old + tail)
    connect(setup, "codex", "workspace-core", None, "user")
    text = path.read_text()
    assert text.startswith(head) and text.endswith(tail)
    entry = tomllib.loads(text)["mcp_servers"]["pyro"]
    assert entry["startup_timeout_sec"] == 40
    assert entry["env"] == {"PYRO_BACKEND": "qemu", **_pinned(setup)}
    assert tomllib.loads(text)["profiles"] == {"fast": {"model": "o4-mini"}}


def test_codex_refuses_a_pyro_table_it_cannot_edit_and_leaves_the_file(setup: Setup) -> None:
    path = _user_file(setup, "codex")
    path.parent.mkdir()
    path.write_text('mcp_servers = { pyro = { command = "x" } }\n')
    with pytest.raises(InvalidState, match=r"config\.toml: mcp_servers\.pyro is written in a form"):
        connect(setup, "codex", "workspace-core", None, "user")
    assert path.read_text() == 'mcp_servers = { pyro = { command = "x" } }\n'


@pytest.mark.parametrize(
    ("host", "text", "where"),
    [
        ("claude-code", '{\n  "mcpServers": {\n    "a": 1,,\n  }\n}\n', "line 3, column 12"),
        ("codex", 'model = "o3"\n[mcp_servers.pyro\n', "line 2"),
        ("opencode", '{\n  // fine\n  "mcp": {\n    "a": [1 2]\n  }\n}\n', "line 4"),
    ],
)
def test_a_file_that_does_not_parse_is_refused_naming_file_and_line(
    setup: Setup, host: str, text: str, where: str
) -> None:
    path = _user_file(setup, host)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    with pytest.raises(InvalidState) as caught:
        connect(setup, host, "workspace-core", None, "user")
    assert caught.value.message.startswith(f"{path}: ")
    assert where in caught.value.message
    assert path.read_text() == text
    assert not path.with_name(path.name + ".pyro.bak").exists()
    report = diagnose(setup, [host])["hosts"][host]
    assert report["problems"][0]["file"] == str(path)
    assert where in report["problems"][0]["problem"]


def test_opencode_reads_comments_and_trailing_commas_and_edits_a_lone_jsonc(setup: Setup) -> None:
    directory = _home(setup) / ".config" / "opencode"
    directory.mkdir(parents=True)
    commented = directory / "opencode.jsonc"
    commented.write_text('{\n  // theme\n  "theme": "x, // not a comment",\n  "mcp": {},\n}\n')
    result = connect(setup, "opencode", "workspace-core", None, "user")
    assert result["file"] == str(commented)
    assert not (directory / "opencode.json").exists()
    written = json.loads(commented.read_text())
    assert written["theme"] == "x, // not a comment"
    assert "pyro" in written["mcp"]
    assert "// theme" in Path(result["backup"]).read_text()


def test_a_new_project_file_is_shared_and_its_notes_say_what_the_host_asks(
    setup: Setup,
) -> None:
    old_umask = os.umask(0o022)
    try:
        result = connect(setup, "claude-code", "workspace-core", None, "project")
    finally:
        os.umask(old_umask)
    path = setup.cwd / ".mcp.json"
    assert result["file"] == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert "approve" in result["notes"][0]
    report = diagnose(setup, ["claude-code"])["hosts"]["claude-code"]
    assert (report["entries"], report["ok"]) == ([{"scope": "project", "file": str(path)}], True)
    user = connect(setup, "codex", "workspace-core", None, "user")
    assert user["mode"] == "0600"  # a user's file is private from the start
    assert connect(setup, "codex", "workspace-core", None, "project")["file"] == str(
        setup.cwd / ".codex" / "config.toml"
    )
    assert connect(setup, "opencode", "workspace-core", None, "project")["file"] == str(
        setup.cwd / "opencode.json"
    )


def test_the_hosts_own_variables_move_their_user_files(setup: Setup, tmp_path: Path) -> None:
    environ = {
        **setup.environ,
        "CLAUDE_CONFIG_DIR": str(tmp_path / "claude"),
        "CODEX_HOME": str(tmp_path / "codex"),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
    }
    moved = Setup(setup.launcher, setup.here, environ, setup.cwd)
    files = [connect(moved, host, "workspace-core", None, "user")["file"] for host in HOSTS]
    assert files == [
        str(tmp_path / "claude" / ".claude.json"),
        str(tmp_path / "codex" / "config.toml"),
        str(tmp_path / "xdg" / "opencode" / "opencode.json"),
    ]


def test_a_file_reached_through_a_symlink_is_changed_where_it_points(setup: Setup) -> None:
    real = setup.cwd.parent / "dotfiles" / "claude.json"
    real.parent.mkdir()
    real.write_text('{"theme": "dark"}')
    link = _user_file(setup, "claude-code")
    link.symlink_to(real)
    connect(setup, "claude-code", "workspace-core", None, "user")
    assert link.is_symlink()
    assert json.loads(real.read_text())["theme"] == "dark"
    assert "pyro" in json.loads(real.read_text())["mcpServers"]


def test_a_change_made_by_the_host_meanwhile_is_kept(setup: Setup) -> None:
    path = _user_file(setup, "claude-code")
    path.write_text('{"numStartups": 1}')
    real_load = config_files.load
    calls = []

    def load_then_host_writes(target: Path) -> config_files.Loaded:
        loaded = real_load(target)
        calls.append(target)
        if len(calls) == 1:  # the host rewrites the file just after pyro read it
            target.write_text('{"numStartups": 2, "theme": "light"}')
        return loaded

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config_files, "load", load_then_host_writes)
        connect(setup, "claude-code", "workspace-core", None, "user")
    written = json.loads(path.read_text())
    assert (written["numStartups"], written["theme"]) == (2, "light")
    assert "pyro" in written["mcpServers"]
    assert len(calls) == 2


@pytest.mark.parametrize("host", HOSTS)
def test_doctor_finds_nothing_wrong_after_connect(setup: Setup, host: str) -> None:
    assert diagnose(setup, [host])["hosts"][host] == {
        "found": False,
        "ok": False,
        "entries": [],
        "problems": [
            {
                "scope": None,
                "file": None,
                "problem": _not_found(setup, host),
                "fix": f"pyro host connect {host}",
            }
        ],
    }
    connect(setup, host, "workspace-core", None, "user")
    report = diagnose(setup, [host])
    assert report["hosts"][host]["problems"] == []
    assert (report["hosts"][host]["found"], report["hosts"][host]["ok"], report["ok"]) == (
        True,
        True,
        True,
    )


def _not_found(setup: Setup, host: str) -> str:
    project = {
        "claude-code": setup.cwd / ".mcp.json",
        "codex": setup.cwd / ".codex" / "config.toml",
        "opencode": setup.cwd / "opencode.json",
    }[host]
    return f"no pyro entry in {_user_file(setup, host)} or {project}"


def _write_claude_entry(setup: Setup, entry: dict[str, Any]) -> None:
    _user_file(setup, "claude-code").write_text(json.dumps({"mcpServers": {"pyro": entry}}))


def _problems(setup: Setup, host: str) -> list[str]:
    return [p["problem"] for p in diagnose(setup, [host])["hosts"][host]["problems"]]


def test_doctor_names_what_is_wrong_with_the_command(setup: Setup, tmp_path: Path) -> None:
    args = ["mcp", "serve", "--root", str(setup.cwd)]
    pinned = _pinned(setup)
    _write_claude_entry(setup, {"command": "/gone/pyro", "args": args, "env": pinned})
    assert _problems(setup, "claude-code") == ["command /gone/pyro does not exist"]
    other = tmp_path / "other" / "pyro"
    other.parent.mkdir()
    other.write_text("#!/bin/sh\n")
    _write_claude_entry(setup, {"command": str(other), "args": args, "env": pinned})
    assert _problems(setup, "claude-code") == [f"command {other} is not executable"]
    other.chmod(0o755)
    assert _problems(setup, "claude-code") == [
        f"the entry starts {other}, not this pyro ({setup.launcher.command})"
    ]
    _write_claude_entry(setup, {"command": "no-such-pyro", "args": args, "env": pinned})
    assert _problems(setup, "claude-code") == [
        "command 'no-such-pyro' is not on the PATH the host gives it"
    ]
    _write_claude_entry(setup, {"command": "bin/pyro", "args": args, "env": pinned})
    assert _problems(setup, "claude-code") == [
        "command bin/pyro is relative to wherever the host starts"
    ]
    _write_claude_entry(setup, {"type": "http", "url": "http://127.0.0.1:1/mcp"})
    assert _problems(setup, "claude-code") == ["the pyro entry is a 'http' server, not stdio"]
    _write_claude_entry(setup, {"args": args})
    assert _problems(setup, "claude-code") == [
        "the pyro entry needs a command, a list of args and env"
    ]


@pytest.mark.parametrize("host", ["codex", "opencode"])
def test_a_disabled_entry_is_reported_and_enabled_again(setup: Setup, host: str) -> None:
    connect(setup, host, "workspace-core", None, "user")
    path = _user_file(setup, host)
    if host == "codex":
        path.write_text(
            path.read_text().replace("required = true", "required = true\nenabled = false")
        )
    else:
        path.write_text(path.read_text().replace('"enabled": true', '"enabled": false'))
    assert _problems(setup, host) == [
        "the pyro entry is disabled (enabled = false)"
        if host == "codex"
        else "the pyro entry is disabled (enabled: false)"
    ]
    result = connect(setup, host, "workspace-core", None, "user")
    assert result["changes"] == ["enabled: false -> true"]
    assert _servers(host, path)["pyro"]["enabled"] is True


def test_doctor_names_what_is_wrong_with_the_arguments(setup: Setup) -> None:
    pyro = setup.launcher.command
    gone = str(setup.cwd / "gone")
    args = ["mcp", "serve", "--profile", "everything", "--root", gone, "--http", "127.0.0.1:1"]
    _write_claude_entry(setup, {"command": pyro, "args": args, "env": _pinned(setup)})
    assert _problems(setup, "claude-code") == [
        "the entry serves HTTP (--http); the host speaks stdio",
        "profile 'everything' is not one of vm-run, workspace-core, workspace-full",
        f"root {gone} does not exist",
    ]
    (setup.cwd / "a-file").write_text("")
    args = ["mcp", "serve", "--root", str(setup.cwd / "a-file"), "--root", "data", "--verbose"]
    _write_claude_entry(setup, {"command": pyro, "args": args, "env": _pinned(setup)})
    assert _problems(setup, "claude-code") == [
        "`mcp serve` does not take --verbose",
        f"root {setup.cwd / 'a-file'} is not a directory",
        "root data is relative to wherever the host starts the server",
    ]
    _write_claude_entry(setup, {"command": pyro, "args": ["mcp", "serve"], "env": _pinned(setup)})
    [problem] = diagnose(setup, ["claude-code"])["hosts"]["claude-code"]["problems"]
    assert problem["problem"].startswith("no --root: the server would confine host paths to")
    assert problem["fix"].startswith("pyro host connect claude-code --root DIR")
    _write_claude_entry(setup, {"command": pyro, "args": ["doctor"], "env": _pinned(setup)})
    assert _problems(setup, "claude-code") == ["the arguments do not run `pyro mcp serve`: doctor"]


def test_doctor_sees_that_codex_drops_the_shells_directories(setup: Setup) -> None:
    """The shell has PYRO_CACHE_DIR and XDG_STATE_HOME; Codex passes neither on, so an
    entry that does not pin them points the server at other directories. Claude Code
    passes its whole environment on: the same entry is fine there."""
    environ = {
        **setup.environ,
        "PYRO_CACHE_DIR": str(setup.here["PYRO_CACHE_DIR"]),
        "PYRO_STATE_DIR": str(setup.here["PYRO_STATE_DIR"]),
        "PYRO_RUN_DIR": str(setup.here["PYRO_RUN_DIR"]),
        "PYRO_KEY_DIR": str(setup.here["PYRO_KEY_DIR"]),
    }
    shell = Setup(setup.launcher, setup.here, environ, setup.cwd)
    args = ["mcp", "serve", "--root", str(setup.cwd)]
    codex_file = _user_file(setup, "codex")
    codex_file.parent.mkdir()
    codex_file.write_text(
        toml_text.table(
            ("mcp_servers", "pyro"),
            {
                "command": setup.launcher.command,
                "args": args,
                "required": True,
            },
        )
    )
    _write_claude_entry(setup, {"command": setup.launcher.command, "args": args})
    assert _problems(shell, "claude-code") == []
    codex = diagnose(shell, ["codex"])["hosts"]["codex"]["problems"]
    home = _home(setup)
    assert [p["problem"].split(":")[0] for p in codex] == [
        "PYRO_CACHE_DIR is not pinned",
        "PYRO_STATE_DIR is not pinned",
        "PYRO_RUN_DIR is not pinned",
        "PYRO_KEY_DIR is not pinned",
        f"the runtime cache {home}/.cache/pyro-mcp is missing or unreadable",
    ]
    assert (
        f"in {home}/.cache/pyro-mcp, not in {setup.here['PYRO_CACHE_DIR']}" in codex[0]["problem"]
    )
    assert (
        codex[0]["fix"]
        == f"pyro host repair codex (pins PYRO_CACHE_DIR={setup.here['PYRO_CACHE_DIR']})"
    )


def test_doctor_sees_an_entry_that_moves_home(setup: Setup, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    args = ["mcp", "serve", "--root", str(setup.cwd)]
    env = {"HOME": str(elsewhere)}
    _write_claude_entry(setup, {"command": setup.launcher.command, "args": args, "env": env})
    environ = {**setup.environ, **{k: str(v) for k, v in setup.here.items()}}
    problems = _problems(Setup(setup.launcher, setup.here, environ, setup.cwd), "claude-code")
    assert problems == []  # the shell's PYRO_* reach the server: HOME does not matter
    problems = _problems(setup, "claude-code")
    assert (
        f"keep its runtime cache (kernels, environment images) in {elsewhere}/.cache/pyro-mcp"
        in (problems[0])
    )


def test_doctor_sees_a_claude_local_entry_that_shadows_pyros(setup: Setup) -> None:
    connect(setup, "claude-code", "workspace-core", None, "user")
    path = _user_file(setup, "claude-code")
    document = json.loads(path.read_text())
    local = {"mcpServers": {"pyro": {"command": "/old/pyro", "args": []}}}
    document["projects"] = {str(setup.cwd): local, "/elsewhere": {}}
    path.write_text(json.dumps(document))
    [problem] = diagnose(setup, ["claude-code"])["hosts"]["claude-code"]["problems"]
    assert problem["problem"] == (
        f"a local-scope pyro entry for {setup.cwd} (in this file's projects) takes "
        "precedence over the others here"
    )
    assert problem["fix"] == f"claude mcp remove pyro -s local (run in {setup.cwd})"


def test_a_pyro_started_as_a_python_module_is_recognised(setup: Setup) -> None:
    module = Setup(
        Launcher(sys.executable, ("-m", "pyro_mcp.cli.main")), setup.here, setup.environ, setup.cwd
    )
    connect(module, "codex", "workspace-core", None, "user")
    entry = _servers("codex", _user_file(setup, "codex"))["pyro"]
    assert entry["command"] == sys.executable
    assert entry["args"][:4] == ["-m", "pyro_mcp.cli.main", "mcp", "serve"]
    assert _problems(module, "codex") == []
    assert _problems(setup, "codex") == [
        f"the entry starts {sys.executable} -m pyro_mcp.cli.main, not this pyro "
        f"({setup.launcher.command})"
    ]


def test_a_project_in_the_home_directory_is_one_file_checked_once(setup: Setup) -> None:
    at_home = Setup(setup.launcher, setup.here, setup.environ, _home(setup))
    connect(at_home, "codex", "workspace-core", None, "user")
    report = diagnose(at_home, ["codex"])["hosts"]["codex"]
    assert report["entries"] == [{"scope": "user", "file": str(_user_file(setup, "codex"))}]


def test_doctor_wants_a_state_directory_it_can_create(setup: Setup, tmp_path: Path) -> None:
    (tmp_path / "plain-file").write_text("")
    state = tmp_path / "plain-file" / "state"
    env = {**_pinned(setup), "PYRO_STATE_DIR": str(state)}
    args = ["mcp", "serve", "--root", str(setup.cwd)]
    _write_claude_entry(setup, {"command": setup.launcher.command, "args": args, "env": env})
    assert _problems(setup, "claude-code") == [f"the state directory {state} cannot be written"]


def test_doctor_wants_codex_entries_required(setup: Setup) -> None:
    connect(setup, "codex", "workspace-core", None, "user")
    path = _user_file(setup, "codex")
    path.write_text(path.read_text().replace("required = true", "required = false"))
    [problem] = diagnose(setup, ["codex"])["hosts"]["codex"]["problems"]
    assert problem["problem"].startswith("required is not true: Codex starts the server in the")
    assert problem["fix"] == "pyro host repair codex (sets required = true)"


@pytest.mark.parametrize("host", HOSTS)
def test_repair_clears_what_doctor_found_and_says_what_it_changed(
    setup: Setup, host: str, tmp_path: Path
) -> None:
    old = tmp_path / "old-pyro"
    old.write_text("#!/bin/sh\n")
    old.chmod(0o755)
    connect(
        Setup(Launcher(str(old)), setup.here, setup.environ, setup.cwd),
        host,
        "vm-run",
        None,
        "user",
    )
    path = _user_file(setup, host)
    text = path.read_text().replace(str(setup.here["PYRO_CACHE_DIR"]), str(tmp_path / "gone"))
    text = text.replace("required = true", "required = false")
    path.write_text(text)
    assert diagnose(setup, [host])["hosts"][host]["ok"] is False
    result = repair(setup, [host])["hosts"][host]
    assert (result["ok"], result["problems"]) == (True, [])
    [repaired] = result["repaired"]
    assert f"PYRO_CACHE_DIR: {json.dumps(str(tmp_path / 'gone'))} -> " in " ".join(
        repaired["changes"]
    )
    entry = _servers(host, path)["pyro"]
    assert _argv(host, entry) == [
        setup.launcher.command,
        *("mcp", "serve", "--profile", "vm-run", "--root", str(setup.cwd)),
    ]
    assert _env(host, entry) == _pinned(setup)
    assert repair(setup, [host])["hosts"][host]["repaired"] == []  # nothing left to do


def test_repair_says_what_it_cannot_fix(setup: Setup, tmp_path: Path) -> None:
    """This pyro's own cache holds no runtime: no pin helps, the fix is to build it."""
    here = {**setup.here, "PYRO_CACHE_DIR": tmp_path / "empty-cache"}
    bare = Setup(setup.launcher, here, setup.environ, setup.cwd)
    connect(bare, "claude-code", "workspace-core", None, "user")
    result = repair(bare, ["claude-code"])["hosts"]["claude-code"]
    assert (result["found"], result["ok"], result["repaired"]) == (True, False, [])
    [problem] = result["problems"]
    assert problem["problem"] == (
        f"the runtime cache {tmp_path / 'empty-cache'} is missing or unreadable: no runtime"
    )
    assert problem["fix"].startswith("pyro runtime materialize")


def test_repair_keeps_valid_pins_and_the_users_variables(setup: Setup, tmp_path: Path) -> None:
    mine = tmp_path / "my-cache"
    mine.mkdir()
    env = {"PYRO_CACHE_DIR": str(mine), "PYRO_BACKEND": "qemu"}
    _write_claude_entry(setup, {"command": "/gone", "args": ["mcp", "serve"], "env": env})
    repair(setup, ["claude-code"])
    entry = _servers("claude-code", _user_file(setup, "claude-code"))["pyro"]
    assert entry["env"] == {**_pinned(setup), "PYRO_CACHE_DIR": str(mine), "PYRO_BACKEND": "qemu"}
    assert entry["command"] == setup.launcher.command
    assert read_serve_args(entry["args"]).roots == [str(setup.cwd)]  # type: ignore[union-attr]
    kept, gone = tmp_path / "kept", tmp_path / "gone"
    kept.mkdir()
    args = ["mcp", "serve", "--profile", "workspace-full", "--root", str(gone), "--root", str(kept)]
    _write_claude_entry(setup, {"command": "/gone", "args": args, "env": _pinned(setup)})
    repair(setup, ["claude-code"])
    entry = _servers("claude-code", _user_file(setup, "claude-code"))["pyro"]
    assert entry["args"] == ["mcp", "serve", "--profile", "workspace-full", "--root", str(kept)]


def test_results_hide_the_users_other_variables(setup: Setup) -> None:
    _write_claude_entry(setup, {"command": "x", "env": {"GITHUB_TOKEN": "ghp_s3cret"}})
    result = connect(setup, "claude-code", "workspace-core", None, "user")
    assert "ghp_s3cret" not in json.dumps(result)
    assert result["entry"]["env"]["GITHUB_TOKEN"] == "(hidden)"


def test_this_pyro_is_the_script_that_runs_else_the_one_beside_python(tmp_path: Path) -> None:
    script = tmp_path / "bin" / "pyro"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    python = tmp_path / "bin" / "python"
    assert this_pyro(str(script), "/usr/bin/python3") == Launcher(str(script))
    assert this_pyro("/x/pytest", str(python)) == Launcher(str(script))
    alone = tmp_path / "alone" / "python"
    assert this_pyro("/x/main.py", str(alone)) == Launcher(str(alone), ("-m", "pyro_mcp.cli.main"))


@pytest.mark.parametrize(
    "text", ['quote " and \\ backslash', "tab\tnewline\n", "ünïcode ✓", "del \x7f bell \x07", ""]
)
def test_toml_strings_and_keys_round_trip(text: str) -> None:
    written = toml_text.table(("a b", text or "k"), {text or "empty": text, "n": [1, 2.5, True]})
    assert tomllib.loads(written) == {
        "a b": {text or "k": {text or "empty": text, "n": [1, 2.5, True]}}
    }


def test_cli_print_config_prints_only_the_snippet(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(setup.cwd)
    monkeypatch.setenv("HOME", setup.environ["HOME"])
    assert main(["host", "print-config", "codex", "--profile", "vm-run"]) == 0
    entry = tomllib.loads(capsys.readouterr().out)["mcp_servers"]["pyro"]
    assert entry["args"][-4:] == ["--profile", "vm-run", "--root", str(setup.cwd)]
    assert main(["host", "connect", "opencode", "--print", "--json"]) == 0
    assert "mcp" in json.loads(json.loads(capsys.readouterr().out)["text"])
    assert not _user_file(setup, "opencode").exists()  # --print writes nothing


def test_cli_refuses_a_broken_file_with_its_name_and_line(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(setup.cwd)
    monkeypatch.setenv("HOME", setup.environ["HOME"])
    monkeypatch.delenv("CLAUDE_CONFIG_DIR", raising=False)
    path = _user_file(setup, "claude-code")
    path.write_text("{\n  nope\n}\n")
    assert main(["host", "connect", "claude-code"]) == 1
    err = capsys.readouterr().err
    assert f"pyro: error: {path}: line 2, column 3: Expecting property name" in err


def test_sdk_refuses_an_unknown_host_by_name() -> None:
    with pytest.raises(InvalidArgument, match="host"):
        Pyro().connect_host("vscode")
