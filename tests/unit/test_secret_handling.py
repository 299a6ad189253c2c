"""Secrets without a VM: redaction (whole, streamed, at a cursor), sealing at rest, and
what a caller may give."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from pyro_mcp.api import Context
from pyro_mcp.api.context import HostPathPolicy
from pyro_mcp.api.operations import workspaces as ws
from pyro_mcp.errors import InvalidArgument, InvalidState, NotFound, OutsideRoot
from pyro_mcp.guest.redaction import CallRedaction, Redactor, redact_lines
from pyro_mcp.guest_agent import ops_secrets
from pyro_mcp.guest_agent.calls import CallError
from pyro_mcp.workspace.secret_input import collect_secrets, secret_env_mapping
from pyro_mcp.workspace.store import WorkspaceStore
from pyro_mcp.workspace.vault import Vault

SECRET = "hunter2-s3cret"


def _streamed(redactor: Redactor, chunks: list[bytes]) -> list[bytes]:
    stream = redactor.stream()
    return [stream.feed(c) for c in chunks] + [stream.flush()]


def test_a_value_split_across_chunks_is_never_shown_even_in_part() -> None:
    redactor = Redactor([SECRET])
    data = f"a {SECRET} b {SECRET}".encode()
    for size in range(1, len(data) + 1):
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        shown = _streamed(redactor, chunks)
        assert b"".join(shown) == b"a *** b ***", size
        for part in shown:  # no chunk carries a piece longer than 1 byte of it
            assert b"hunter" not in part and b"s3cret" not in part


def test_output_that_only_looks_like_a_start_is_shown_at_once_or_at_the_end() -> None:
    redactor = Redactor([SECRET])
    assert _streamed(redactor, [b"hello hun", b"gry\n"]) == [b"hello ", b"hungry\n", b""]
    assert _streamed(redactor, [b"ends with hunt"]) == [b"ends with ", b"hunt"]
    assert Redactor([]).stream().feed(b"hunter2") == b"hunter2"


def test_results_errors_and_log_lines_are_redacted_the_same_way() -> None:
    redactor = Redactor([SECRET, "line1\nline2\n"])
    value = {"note": f"x{SECRET}", SECRET: [SECRET, 3]}
    assert redactor.value(value) == {"note": "x***", "***": ["***", 3]}
    lines = [
        {"stream": "stdout", "text": "a"},
        {"stream": "stdout", "text": "line1"},
        {"stream": "stderr", "text": SECRET},
        {"stream": "stdout", "text": "line2"},
    ]
    assert [line["text"] for line in redact_lines(redactor, lines)] == ["a", "***", "***", ""]
    call = CallRedaction(redactor, "get_file")
    assert call.result({"name": SECRET}) == {"name": SECRET}  # file data stays as it is
    assert CallRedaction(redactor, "exec").message(f"bad {SECRET}") == "bad ***"


def test_reads_at_a_cursor_hold_back_a_start_and_find_a_value_begun_before() -> None:
    redactor = Redactor([SECRET])
    data = f"$ x{SECRET[:5]}".encode()
    first = redactor.window(data, lead=0, final=False)
    assert (first.shown, first.consumed) == (b"$ x", 3)
    rest = f"{SECRET[:5]}{SECRET[5:]} done".encode()
    second = redactor.window(data[:3] + rest, lead=3, final=False)
    assert second.shown == b"*** done"
    # A reader that jumps into the middle of a value sees only its ***.
    middle = redactor.window(f"ab{SECRET}z".encode(), lead=6, final=True)
    assert middle.shown == b"***z"
    assert redactor.window(b"hunt", lead=0, final=True).shown == b"hunt"


def test_values_are_sealed_at_rest_with_a_private_key_kept_apart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    vault = Vault(tmp_path / "keys", state)
    blob = vault.seal("abcdef012345", "TOKEN", SECRET)
    assert SECRET.encode() not in blob
    assert vault.open("abcdef012345", "TOKEN", blob) == SECRET
    key = tmp_path / "keys" / "secrets.key"
    assert (key.stat().st_mode & 0o777, key.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    with pytest.raises(InvalidState, match="does not decrypt"):
        vault.open("abcdef012345", "OTHER", blob)  # moved to another name
    key.chmod(0o644)
    with pytest.raises(InvalidState, match="readable by others") as loose:
        vault.open("abcdef012345", "TOKEN", blob)
    assert loose.value.hint == f"chmod 600 {key}"
    key.unlink()
    with pytest.raises(InvalidState, match="is missing"):
        vault.open("abcdef012345", "TOKEN", blob)  # never a new key for old secrets
    with pytest.raises(InvalidState, match="overlaps the state directory"):
        Vault(state / "keys", state).seal("abcdef012345", "TOKEN", SECRET)


def test_the_store_holds_names_and_ciphertext_only(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    vault = Vault(tmp_path / "keys", tmp_path / "state")
    with WorkspaceStore(path) as store:
        record = store.create(environment="debian:12", vcpu_count=1, mem_mib=256, disk_mib=64)
        sealed = vault.seal(record.id, "TOKEN", SECRET)
        store.add_secrets(record.id, {"TOKEN": ("literal", sealed)})
        [row] = store.secrets(record.id)
        assert row.to_dict() == {"name": "TOKEN", "source_kind": "literal"}
    assert SECRET.encode() not in path.read_bytes()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT name FROM secrets").fetchall() == [("TOKEN",)]


def test_bad_secrets_are_refused_by_name_never_showing_the_value(tmp_path: Path) -> None:
    def no_file(path: str) -> bytes:
        raise NotFound(f"secret file {path} does not exist")

    cases = [
        (None, [f"1BAD={SECRET}"], None, "not a valid environment variable name"),
        (None, [f"A={SECRET}", f"A={SECRET}"], None, "given more than once"),
        (None, ["A="], None, "is empty"),
        (None, [f"A{SECRET}"], None, "takes NAME=VALUE"),
        ([{"name": "A", "value": SECRET, "file_path": "x"}], None, None, "exactly one of"),
        ([{"name": "A", "secret": SECRET}], None, None, "unknown key 'secret'"),
        (None, ["A=" + "x" * (64 << 10) + "x"], None, "more than 65536"),
    ]
    for specs, literals, files, message in cases:
        with pytest.raises(InvalidArgument, match=message) as caught:
            collect_secrets(specs, literals, files, no_file)
        assert SECRET not in str(caught.value) and caught.value.hint != SECRET
    with pytest.raises(NotFound, match="does not exist"):
        collect_secrets(None, None, ["A=/nope"], no_file)
    given = collect_secrets([{"name": "B", "value": SECRET}], ["A=1"], None, no_file)
    assert [(s.name, s.source_kind) for s in given] == [("B", "literal"), ("A", "literal")]
    assert SECRET not in repr(given)


def test_secret_files_go_through_the_callers_host_path_policy(tmp_path: Path) -> None:
    inside, outside = tmp_path / "root", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    (outside / "token").write_text(SECRET)
    ctx = Context(state_dir=tmp_path / "state", host_paths=HostPathPolicy.confined_to([inside]))
    with pytest.raises(OutsideRoot):
        ws.read_secret_file(ctx, str(outside / "token"))
    with pytest.raises(NotFound) as missing:
        ws.read_secret_file(ctx, str(inside / "token"))
    assert missing.value.hint and "--secret-file" in missing.value.hint
    (inside / "token").write_text(SECRET)
    assert ws.read_secret_file(ctx, str(inside / "token")) == SECRET.encode()


def test_secret_env_takes_the_cli_and_the_3x_forms_and_names_unknown_secrets() -> None:
    known = ["API_TOKEN", "KEY"]
    assert secret_env_mapping(["API_TOKEN", "KEY=K"], known, workspace="w") == {
        "API_TOKEN": "API_TOKEN",
        "K": "KEY",
    }
    assert secret_env_mapping({"KEY": "MY_KEY"}, known, workspace="w") == {"MY_KEY": "KEY"}
    with pytest.raises(InvalidArgument, match="has no secret 'NOPE' \\(it has API_TOKEN, KEY\\)"):
        secret_env_mapping(["NOPE"], known, workspace="w")
    with pytest.raises(InvalidArgument, match="given twice"):
        secret_env_mapping(["KEY"], known, workspace="w", env_keys=["KEY"])
    with pytest.raises(InvalidArgument, match="not a valid environment variable name"):
        secret_env_mapping(["KEY=1X"], known, workspace="w")


def test_the_agent_keeps_secrets_in_tmpfs_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class _Call:
        def __init__(self, payload: bytes) -> None:
            self.payload = payload

    monkeypatch.setenv(ops_secrets.SECRETS_DIR_ENV, str(tmp_path / "on-disk"))
    if ops_secrets._mount_type(str(tmp_path)) != "tmpfs":
        with pytest.raises(CallError, match="not tmpfs"):
            ops_secrets.secrets_put(_Call(json.dumps({"A": SECRET}).encode()))  # type: ignore[arg-type]
        assert list((tmp_path / "on-disk").iterdir()) == []
    shm = Path("/dev/shm") / f"pyro-test-secrets-{os.getpid()}"
    monkeypatch.setenv(ops_secrets.SECRETS_DIR_ENV, str(shm))
    try:
        ops_secrets.secrets_put(_Call(json.dumps({"A": SECRET, "B": "b"}).encode()))  # type: ignore[arg-type]
        assert ops_secrets.resolve({"X": "A"}) == {"X": SECRET}
        assert (shm.stat().st_mode & 0o777, (shm / "A").stat().st_mode & 0o777) == (0o700, 0o600)
        ops_secrets.secrets_put(_Call(json.dumps({"B": "b"}).encode()))  # type: ignore[arg-type]
        assert sorted(p.name for p in shm.iterdir()) == ["B"]  # replaced as a whole
        with pytest.raises(CallError, match="not given secret 'A'"):
            ops_secrets.resolve({"X": "A"})
    finally:
        for entry in shm.glob("*"):
            entry.unlink()
        shm.rmdir()
