"""Every operation's result is what its TypedDict (pyro_mcp.api.results) declares: each
key a real result has is declared, every required key is there, every value has its
declared type. Proven here by running the operations that need no VM (a fresh cache,
and a whole workspace life on fake VMs: the real store, disks and guest agent), and
elsewhere (ELSEWHERE) for the ones that need a registry or a real guest."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import jsonschema
import pytest
from tests.fake_ollama import answer, calls, fake_ollama
from tests.result_checks import CheckedCalls

from pyro_mcp.api import Context, all_operations
from pyro_mcp.api import results as r
from pyro_mcp.api.result_shapes import (
    ResultMismatch,
    check_result,
    result_problems,
    result_schema,
    result_type,
)
from pyro_mcp.guest.answers import ExecResult
from pyro_mcp.runtime import host_tools
from pyro_mcp.runtime.environments import EnvironmentInfo
from pyro_mcp.runtime.kernel_artifact import KernelArtifact
from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.workspace.records import CheckpointRecord, CommandRecord, WorkspaceRecord

ROOT = Path(__file__).resolve().parents[2]
OPS = {op.name: op for op in all_operations()}
# The files that prove the results of the operations that need a registry or a real
# guest: each names them in its COVERED (and checks that it ran each one).
ELSEWHERE = ("tests/oci/test_typed_results.py", "tests/guest/test_typed_sdk.py")


call = CheckedCalls()


# --- the declarations --------------------------------------------------------------------


def test_every_operation_declares_a_typeddict_of_its_own_result() -> None:
    for op in all_operations():
        declared = result_type(op)
        camel = "".join(word.capitalize() for word in op.name.split("_"))
        assert declared is getattr(r, f"{camel}Result"), op.name


def test_every_result_schema_is_a_valid_json_schema_of_closed_objects() -> None:
    for op in all_operations():
        schema = result_schema(op)
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        for found in _objects(schema):
            assert found["additionalProperties"] is False, (op.name, found["title"])
            assert set(found["required"]) <= set(found["properties"]), op.name


def _objects(schema: Any) -> list[dict[str, Any]]:
    """Every object schema with declared properties inside ``schema``."""
    found = []
    if isinstance(schema, dict):
        if "properties" in schema:
            found.append(schema)
        for value in schema.values():
            found += _objects(value)
    elif isinstance(schema, list):
        for item in schema:
            found += _objects(item)
    return found


def test_a_result_schema_states_required_and_optional_keys_and_nested_records() -> None:
    schema = result_schema(OPS["workspace_start"])
    assert schema["title"] == "WorkspaceStartResult"
    assert "boot" in schema["properties"] and "boot" not in schema["required"]
    assert {"id", "state", "network", "services"} <= set(schema["required"])
    assert schema["properties"]["expires_at"] == {"anyOf": [{"type": "number"}, {"type": "null"}]}
    service = schema["properties"]["services"]["additionalProperties"]
    assert service["title"] == "ServiceInfo" and service["additionalProperties"] is False
    validator = jsonschema.Draft202012Validator(result_schema(OPS["workspace_exec"]))
    assert not validator.is_valid({"exit_code": 0})  # required keys missing
    encoding = result_schema(OPS["workspace_file_read"])["properties"]["encoding"]
    assert encoding == {"enum": ["utf-8", "base64"]}


# Declared by call, not by class: this module's annotations are strings, and Python
# 3.11 reads NotRequired only in evaluated ones.
Inner = TypedDict("Inner", {"size": int})  # noqa: UP013
Outer = TypedDict(  # noqa: UP013
    "Outer", {"name": str, "inner": Inner, "tags": list[str], "note": NotRequired[str | None]}
)


def test_a_mismatch_names_each_undeclared_key_missing_key_and_wrong_value() -> None:
    good = {"name": "a", "inner": {"size": 1}, "tags": ["x"], "note": None}
    assert result_problems(Outer, good) == []
    assert result_problems(Outer, {k: v for k, v in good.items() if k != "note"}) == []
    bad = {"inner": {"size": True, "extra": 1}, "tags": ["x", 2], "note": 3, "surprise": 0}
    assert result_problems(Outer, bad, "op") == [
        "op: key 'surprise' is not declared in Outer",
        "op: required key 'name' of Outer is missing",
        "op.inner: key 'extra' is not declared in Inner",
        "op.inner.size: expected int, got bool True",
        "op.tags[1]: expected str, got int 2",
        "op.note: int 3 is none of str | None",
    ]
    with pytest.raises(ResultMismatch, match=r"^env_prove returned what it does not declare: "):
        check_result(OPS["env_prove"], {"environment": "debian:12"})


@pytest.mark.parametrize(
    ("record", "declared"),
    [
        (CommandRecord, r.CommandEntry),
        (CheckpointRecord, r.CheckpointInfo),
        (EnvironmentInfo, r.EnvironmentRow),
    ],
)
def test_a_record_type_declares_exactly_the_fields_of_its_dataclass(
    record: type, declared: type
) -> None:
    compat = {"CheckpointInfo": ["snapshot_name"]}.get(declared.__name__, [])  # pyro-mcp's
    fields = [f.name for f in dataclasses.fields(record)]
    assert [*fields, *compat] == list(declared.__annotations__)


def test_the_workspace_records_declare_exactly_the_fields_of_a_workspace() -> None:
    fields = [f.name for f in dataclasses.fields(WorkspaceRecord)] + ["workspace_id"]
    for declared in (r.WorkspaceRecordInfo, r.WorkspaceInfo):
        assert sorted(declared.__annotations__) == sorted(fields), declared.__name__


def test_the_exec_and_kernel_records_declare_exactly_what_to_dict_gives() -> None:
    assert list(ExecResult(0, b"", b"").to_dict()) == list(r.ExecOutcome.__annotations__)
    kernel = KernelArtifact(
        *("source", "linux-source-6.1", "6.1", True, "k"),
        *(Path("/k"), Path("/k/vmlinux"), Path("/k/bzImage"), None),
        files={},
        release="6.1",
        build_seconds=1.0,
    )
    assert list(kernel.to_dict()) == list(r.RuntimeBuildKernelResult.__annotations__)


# --- operations that need no VM ----------------------------------------------------------


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Context:
    """A context on an empty cache and state directory."""
    monkeypatch.setenv("PYRO_CACHE_DIR", str(tmp_path / "cache"))
    paths = RuntimePaths(tmp_path / "cache", tmp_path / "run")
    return Context(paths=paths, state_dir=tmp_path / "state")


def test_catalog_runtime_and_store_results_on_a_fresh_host_are_as_declared(
    fresh: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = call(fresh, "env_list")["environments"]
    assert [row["installed"] for row in rows] == [False, False, False]
    inspected = call(fresh, "env_inspect", "debian:12")
    assert (inspected["installed"], inspected["hint"]) == (False, "run `pyro env pull debian:12`")
    assert call(fresh, "env_prune") == {"removed": [], "bytes_freed": 0}
    assert call(fresh, "template_list") == {"templates": []}
    assert call(fresh, "template_prune") == {"removed": []}
    status = call(fresh, "runtime_status")
    assert status["lock_written"] is False
    assert status["cache_dir"] == str(fresh.paths.cache_dir)
    report = call(fresh, "runtime_doctor")
    assert report["summary"] and all(isinstance(line, str) for line in report["summary"])
    assert call(fresh, "workspace_list") == {"workspaces": [], "count": 0}
    assert call(fresh, "reconcile") == {key: [] for key in r.ReconcileResult.__annotations__}

    # Installing host packages is apt-get's work: here nothing is missing.
    monkeypatch.setattr(host_tools, "install_packages", lambda wanted: [])
    installed = call(fresh, "runtime_install_host_packages")
    assert installed["installed"] == [] and "qemu-system-x86" in installed["packages"]


# --- a workspace's whole life on fake VMs ------------------------------------------------

PATCH = "--- a/app.py\n+++ b/app.py\n@@ -1 +1 @@\n-print('hello')\n+print('hi')\n"


def test_a_workspace_life_on_fake_vms_returns_what_each_operation_declares(
    fake_ctx: Context, tmp_path: Path
) -> None:
    ctx = fake_ctx
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "app.py").write_text("print('hello')\n")
    created = call(
        ctx, "workspace_create", "debian:12", seed_path=str(seed), name="typed", labels=["a=b"]
    )
    wid = created["id"]
    assert (created["state"], created["network"]["policy"]) == ("running", "off")
    assert call(ctx, "workspace_list")["workspaces"][0]["id"] == wid
    assert call(ctx, "workspace_update", wid, ttl_seconds=3600)["expires_at"] is not None
    assert call(ctx, "workspace_network", wid)["workspace_id"] == wid

    ran = call(ctx, "workspace_exec", wid, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (ran["exit_code"], ran["stdout"], ran["stderr"]) == (3, "out\n", "err\n")
    assert call(ctx, "workspace_file_write", wid, "dir/note.txt", text="hi\n")["size"] == 3
    assert call(ctx, "workspace_file_read", wid, "dir/note.txt")["content"] == "hi\n"
    listed = call(ctx, "workspace_file_list", wid, "dir")
    assert [entry["path"] for entry in listed["entries"]] == ["dir/note.txt"]
    assert call(ctx, "workspace_patch_apply", wid, patch=PATCH)["modified"] == ["app.py"]
    pushed = tmp_path / "push"
    pushed.mkdir()
    (pushed / "lib.py").write_text("X = 1\n")
    assert call(ctx, "workspace_sync_push", wid, str(pushed), dest="vendor")["files"] == 1
    diff = call(ctx, "workspace_diff", wid)
    assert diff["summary"]["modified"] == 1 and diff["files"]
    exported = call(ctx, "workspace_export", wid, "app.py", str(tmp_path / "out.py"))
    assert (tmp_path / "out.py").read_text() == "print('hi')\n" and exported["files"] == 1
    assert call(ctx, "snapshot_create", wid, "v1")["name"] == "v1"
    assert [s["name"] for s in call(ctx, "snapshot_list", wid)["snapshots"]] == ["baseline", "v1"]
    assert call(ctx, "workspace_file_delete", wid, "dir", recursive=True)["path"]
    assert call(ctx, "workspace_reset", wid, snapshot="v1")["reset_to"] == "v1"
    assert call(ctx, "snapshot_delete", wid, "v1")["deleted"] == "v1"

    web = ["sh", "-c", "touch up.flag; exec sleep 600"]
    started = call(ctx, "service_start", wid, "web", web, ready_file="up.flag")
    assert (started["state"], started["probe"]) == (
        "ready",
        {"type": "file", "path": "/workspace/up.flag"},
    )
    assert call(ctx, "service_start", wid, "idle", ["sleep", "600"])["state"] == "running"
    assert {s["name"] for s in call(ctx, "service_list", wid)["services"]} >= {"idle"}
    assert call(ctx, "service_status", wid, "idle")["published_ports"] == []
    assert call(ctx, "service_logs", wid, "idle")["lines"] == []
    stopped = call(ctx, "service_stop", wid, "idle")
    assert stopped["was_running"] is True and stopped["state"] != "running"

    shell = call(ctx, "shell_open", wid)["shell_id"]
    assert call(ctx, "shell_write", wid, shell, "echo typed-$((6*7))")["complete"] is True
    read = call(ctx, "shell_read", wid, shell, wait_for_idle_ms=300, plain=True)
    assert read["shell_id"] == shell and read["next_cursor"] >= read["cursor"]
    assert call(ctx, "shell_signal", wid, shell)["signal"] == "INT"
    assert [s["shell_id"] for s in call(ctx, "shell_list", wid)["shells"]] == [shell]
    assert call(ctx, "shell_close", wid, shell)["closed"] is True

    status = call(ctx, "workspace_status", wid)
    assert status["commands"] == 1 and status["checkpoints"] == ["baseline"]
    assert call(ctx, "workspace_logs", wid)["commands"][0]["exit_code"] == 3
    assert call(ctx, "workspace_stop", wid)["state"] == "stopped"
    on_disk = call(ctx, "workspace_disk_list", wid)
    assert "/app.py" in [entry["path"] for entry in on_disk["entries"]]
    assert call(ctx, "workspace_disk_read", wid, "/app.py")["content"] == "print('hi')\n"
    image = tmp_path / "disk.ext4"
    assert call(ctx, "workspace_disk_export", wid, str(image))["size"] == image.stat().st_size
    assert call(ctx, "workspace_start", wid)["state"] == "running"
    assert call(ctx, "workspace_delete", wid) == {
        "deleted": wid,
        "name": "typed",
        "workspace_id": wid,
    }

    vid = call(ctx, "vm_create", "debian:12", ttl_seconds=900)["vm_id"]
    assert call(ctx, "vm_start", vid)["state"] == "started"
    assert call(ctx, "vm_exec", vid, "echo $((6*7))")["stdout"] == "42\n"
    assert call(ctx, "vm_status", vid)["ttl_seconds"] == 900
    assert call(ctx, "vm_network_info", vid)["vm_id"] == vid
    assert call(ctx, "vm_stop", vid)["state"] == "stopped"
    assert call(ctx, "vm_delete", vid) == {"deleted": vid}
    assert call(ctx, "vm_reap_expired") == {"deleted": [], "count": 0}


NETWORK_OFF = {"policy": "off", "allow_cidrs": [], "allow_hosts": [], "guest_ip": None,
               "gateway": None, "mac": None, "tap": None, "published_ports": []}  # fmt: skip


def test_host_and_demo_results_are_as_declared(
    fresh: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyro_mcp.api.operations import demo

    for name in ("HOME", "CODEX_HOME", "XDG_CONFIG_HOME", "CLAUDE_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    ctx = fresh
    printed = call(ctx, "host_print_config", "codex")
    assert printed["host"] == "codex" and "[mcp_servers.pyro]" in printed["text"]
    assert call(ctx, "host_connect", "claude-code", root=str(tmp_path))["changed"] is True
    assert call(ctx, "host_doctor")["hosts"]["claude-code"]["found"] is True
    assert "claude-code" in call(ctx, "host_repair")["hosts"]

    def fake_run(ctx: Context, environment: str, command: list[str], **kwargs: Any) -> Any:
        return {"exit_code": 0, "stdout": "git version 2.39.5\n", "stderr": "",
                "duration_ms": 900.0, "timings_ms": {"boot_ms": 500.0}, "backend": "qemu-tcg",
                "boot": {"mode": "warm", "reason": "restored", "template": "t"},
                "network": NETWORK_OFF}  # fmt: skip

    monkeypatch.setattr(demo, "vm_run", fake_run)
    assert call(ctx, "demo")["stdout"] == "git version 2.39.5\n"
    script = (calls(("env_list", {}), ("no_such_tool", {})), answer("Three."))
    with fake_ollama(*script) as server:
        assert call(ctx, "demo_ollama", base_url=server.url)["answer"] == "Three."


UNIT_COVERED = {
    "demo_ollama",
    "env_list",
    "env_inspect",
    "env_prune",
    "template_list",
    "template_prune",
    "runtime_status",
    "runtime_doctor",
    "runtime_install_host_packages",
    "reconcile",
    "workspace_create",
    "workspace_list",
    "workspace_update",
    "workspace_network",
    "workspace_exec",
    "workspace_file_write",
    "workspace_file_read",
    "workspace_file_list",
    "workspace_patch_apply",
    "workspace_sync_push",
    "workspace_diff",
    "workspace_export",
    "workspace_file_delete",
    "workspace_reset",
    "workspace_status",
    "workspace_logs",
    "workspace_stop",
    "workspace_disk_list",
    "workspace_disk_read",
    "workspace_disk_export",
    "workspace_start",
    "workspace_delete",
    "snapshot_create",
    "snapshot_list",
    "snapshot_delete",
    "service_start",
    "service_list",
    "service_status",
    "service_logs",
    "service_stop",
    "shell_open",
    "shell_write",
    "shell_read",
    "shell_signal",
    "shell_list",
    "shell_close",
    "host_print_config",
    "host_connect",
    "host_doctor",
    "host_repair",
    "demo",
    "vm_create",
    "vm_start",
    "vm_exec",
    "vm_status",
    "vm_network_info",
    "vm_stop",
    "vm_delete",
    "vm_reap_expired",
}


def test_every_operation_s_result_is_proven_here_or_in_one_named_file() -> None:
    """The operations above, plus each file's COVERED, are every operation, once."""
    elsewhere: set[str] = set()
    for path in ELSEWHERE:
        names = _covered(ROOT / path)
        assert names and not elsewhere & names, path
        elsewhere |= names
    assert not UNIT_COVERED & elsewhere
    assert UNIT_COVERED | elsewhere == {op.name for op in all_operations()}


def test_the_scenarios_above_ran_every_operation_they_claim() -> None:
    # Runs after them (file order); nothing was called when they were skipped (no fake VMs).
    if "workspace_create" not in call.called:
        pytest.skip("the fake-VM scenario did not run")
    assert call.called == UNIT_COVERED


def _covered(path: Path) -> set[str]:
    """The literal set a test file assigns to COVERED."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [
            "COVERED"
        ]:
            return set(ast.literal_eval(node.value))
    raise AssertionError(f"{path} assigns no COVERED")
