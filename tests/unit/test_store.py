"""The workspace store: records survive, state changes are atomic, many processes share it."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyro_mcp.errors import Conflict, InvalidArgument, InvalidState, NotFound
from pyro_mcp.workspace.states import TRANSITIONS, WorkspaceState
from pyro_mcp.workspace.store import (
    MIGRATIONS,
    TAIL_BYTES,
    CommandRecord,
    Migration,
    WorkspaceRecord,
    WorkspaceStore,
    require_state,
    sql_migration,
)

SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_C = "c" * 64

# Children inherit the test's state by fork: no pickling, and fast.
MP = multiprocessing.get_context("fork")


class Clock:
    """A clock the test moves by hand (epoch seconds)."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "store.sqlite3"


@pytest.fixture
def store(path: Path) -> Iterator[WorkspaceStore]:
    with WorkspaceStore(path) as opened:
        yield opened


def _new(store: WorkspaceStore, **kwargs: Any) -> WorkspaceRecord:
    values: dict[str, Any] = {
        "environment": "debian:12",
        "vcpu_count": 1,
        "mem_mib": 256,
        "disk_mib": 512,
    }
    values.update(kwargs)
    return store.create(**values)


# How to walk a new workspace (state creating) into each state.
_PATHS: dict[WorkspaceState, list[str]] = {
    WorkspaceState.CREATING: [],
    WorkspaceState.CREATED: ["created"],  # a VM's first state; the table allows it
    WorkspaceState.RUNNING: ["running"],
    WorkspaceState.STOPPING: ["running", "stopping"],
    WorkspaceState.STOPPED: ["running", "stopping", "stopped"],
    WorkspaceState.STARTING: ["running", "stopping", "stopped", "starting"],
    WorkspaceState.PAUSING: ["running", "pausing"],
    WorkspaceState.PAUSED: ["running", "pausing", "paused"],
    WorkspaceState.RESUMING: ["running", "pausing", "paused", "resuming"],
    WorkspaceState.FAILED: ["failed"],
    WorkspaceState.DELETING: ["deleting"],
}


def _in_state(store: WorkspaceStore, state: WorkspaceState, **kwargs: Any) -> WorkspaceRecord:
    record = _new(store, **kwargs)
    for step in _PATHS[state]:
        record = store.transition(record.id, step)
    assert record.state is state
    return record


def _command(workspace_id: str, n: int = 0, **kwargs: Any) -> CommandRecord:
    values: dict[str, Any] = {
        "workspace_id": workspace_id,
        "argv": ["echo", str(n)],
        "started_at": 1.0,
        "exit_code": 0,
    }
    values.update(kwargs)
    return CommandRecord(**values)


def _count(path: Path, table: str) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


# -- the file and its schema ---------------------------------------------------------------


def test_the_store_file_is_private_and_in_wal_mode(store: WorkspaceStore, path: Path) -> None:
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.schema_version() == len(MIGRATIONS)


def _counting(calls: list[str], name: str, statement: str) -> Migration:
    def migrate(conn: sqlite3.Connection) -> None:
        calls.append(name)
        conn.execute(statement)

    return migrate


def test_migrations_run_once_each_and_record_the_version(path: Path) -> None:
    calls: list[str] = []
    migrations = [
        _counting(calls, "one", "CREATE TABLE one (x INTEGER)"),
        _counting(calls, "two", "CREATE TABLE two (x INTEGER)"),
    ]
    WorkspaceStore(path, migrations=migrations).close()
    with WorkspaceStore(path, migrations=migrations) as reopened:
        assert reopened.schema_version() == 2
    assert calls == ["one", "two"]


# What a later release adds for services: proof that a migration is one list entry.
_SERVICES = sql_migration(
    """
    CREATE TABLE services (
        workspace_id TEXT NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        PRIMARY KEY (workspace_id, name)
    )
    """,
)


def test_opening_an_older_store_upgrades_it_and_keeps_its_records(path: Path) -> None:
    with WorkspaceStore(path) as old:
        created = _new(old, name="kept")
    with WorkspaceStore(path, migrations=[*MIGRATIONS, _SERVICES]) as upgraded:
        assert upgraded.schema_version() == len(MIGRATIONS) + 1
        assert upgraded.get("kept") == created
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("INSERT INTO services VALUES (?, 'web')", (created.id,))
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO services VALUES ('000000000000', 'web')")


def test_a_failing_migration_leaves_the_store_at_its_last_version(path: Path) -> None:
    WorkspaceStore(path).close()

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half_done (x INTEGER)")
        raise RuntimeError("migration bug")

    with pytest.raises(RuntimeError, match="migration bug"):
        WorkspaceStore(path, migrations=[*MIGRATIONS, broken])
    with WorkspaceStore(path) as store:
        assert store.schema_version() == len(MIGRATIONS)
    with sqlite3.connect(path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert "half_done" not in tables


def test_a_store_written_by_a_newer_pyro_is_refused(path: Path) -> None:
    WorkspaceStore(path, migrations=[*MIGRATIONS, _SERVICES]).close()
    with pytest.raises(InvalidState) as caught:
        WorkspaceStore(path)
    message = str(caught.value)
    assert f"schema version {len(MIGRATIONS) + 1}" in message
    assert f"newer than this pyro-mcp knows ({len(MIGRATIONS)})" in message
    assert "upgrade pyro-mcp" in message


def test_a_file_that_is_not_a_store_is_refused_by_path(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(InvalidState, match="is not a workspace store"):
        WorkspaceStore(path)


def test_a_closed_store_says_so(path: Path) -> None:
    store = WorkspaceStore(path)
    store.close()
    store.close()
    with pytest.raises(InvalidState, match="closed"):
        store.list()


# -- create and look up --------------------------------------------------------------------


def test_a_workspace_is_found_by_id_prefix_and_name(store: WorkspaceStore) -> None:
    created = _new(store, name="web", labels={"team": "a"}, seed="./src")
    assert len(created.id) == 12 and int(created.id, 16) >= 0
    assert created.state == "creating"
    assert created.seed == "./src"
    assert store.get(created.id) == created
    assert store.get(created.id.upper()) == created
    assert store.get(created.id[:4]) == created
    assert store.get("web") == created


def test_a_prefix_shared_by_two_workspaces_asks_for_more(
    store: WorkspaceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = iter(["abcd00000001", "abcd00000001", "abcd00000002"])
    monkeypatch.setattr("secrets.token_hex", lambda _n: next(ids))  # what the store draws ids with
    first, second = _new(store), _new(store)
    assert (first.id, second.id) == ("abcd00000001", "abcd00000002")  # a taken id is redrawn
    with pytest.raises(InvalidArgument, match="matches several workspaces"):
        store.get("abcd")
    assert store.get("abcd00000002") == second


def test_an_unknown_ref_is_not_found_and_says_how_to_list(store: WorkspaceStore) -> None:
    _new(store, name="web")
    for ref in ("nope", "ffff", "ffffffffffff"):
        with pytest.raises(NotFound) as caught:
            store.get(ref)
        assert repr(ref) in caught.value.message
        assert "`pyro workspace list`" in str(caught.value)


def test_a_taken_name_conflicts_until_its_workspace_is_being_deleted(
    store: WorkspaceStore,
) -> None:
    first = _new(store, name="web")
    with pytest.raises(Conflict, match=f"workspace {first.id} is already named 'web'"):
        _new(store, name="web")
    store.transition(first.id, "deleting")
    second = _new(store, name="web")
    assert store.get("web") == second  # the live one wins over the one on its way out


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "-web"}, "name"),
        ({"name": "has space"}, "name"),
        ({"name": "x" * 64}, "name"),
        ({"name": "0123456789ab"}, "name"),  # would read as an id
        ({"labels": {"Team": "a"}}, "labels"),
        ({"labels": {"-team": "a"}}, "labels"),
        ({"labels": {"team": "x" * 254}}, "labels"),
        ({"labels": {"team": 3}}, "labels"),
        ({"vcpu_count": 0}, "vcpu_count"),
        ({"mem_mib": True}, "mem_mib"),
        ({"ttl_seconds": -1}, "ttl_seconds"),
        ({"environment": ""}, "environment"),
    ],
)
def test_invalid_values_are_refused_naming_the_field(
    store: WorkspaceStore, kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _new(store, **kwargs)
    assert caught.value.message.startswith(f"{field}:")
    assert store.list() == []


def test_good_names_and_labels_are_accepted(store: WorkspaceStore) -> None:
    labels = {"team": "a", "pyro.dev/owner": "ci-bot", "a_b-c": "", "x": "y" * 253}
    record = _new(store, name="Web_1.test-x", labels=labels)
    assert store.get(record.id).labels == labels


def test_list_filters_by_all_labels_and_by_states(store: WorkspaceStore) -> None:
    a = _new(store, labels={"team": "a", "tier": "web"})
    b = _in_state(store, WorkspaceState.RUNNING, labels={"team": "a"})
    c = _in_state(store, WorkspaceState.STOPPED, labels={"team": "b"})
    assert [r.id for r in store.list()] == [a.id, b.id, c.id]
    assert [r.id for r in store.list(labels={"team": "a"})] == [a.id, b.id]
    assert [r.id for r in store.list(labels={"team": "a", "tier": "web"})] == [a.id]
    assert [r.id for r in store.list(states={"running", "stopped"})] == [b.id, c.id]
    assert [r.id for r in store.list(labels={"team": "a"}, states={"running"})] == [b.id]
    assert store.list(states=set()) == []
    with pytest.raises(InvalidArgument, match="states: unknown workspace state 'asleep'"):
        store.list(states={"asleep"})


def test_records_turn_into_json(store: WorkspaceStore) -> None:
    record = _new(store, name="web", labels={"team": "a"})
    data = record.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["state"] == "creating" and data["labels"] == {"team": "a"}
    command_id = store.journal_command(_command(record.id))
    assert store.commands(record.id)[0].to_dict()["id"] == command_id
    checkpoint = store.add_checkpoint(record.id, "one", manifest=SHA_A, file_count=1, total_bytes=2)
    assert json.loads(json.dumps(checkpoint.to_dict()))["manifest"] == SHA_A


# -- update --------------------------------------------------------------------------------


def test_update_renames_relabels_and_clears(store: WorkspaceStore) -> None:
    clock = Clock()
    store = WorkspaceStore(store.path, clock=clock)
    record = _new(store, name="web", labels={"team": "a"})
    _new(store, name="db")
    clock.now += 5
    renamed = store.update(record.id, name="api")
    assert (renamed.name, renamed.labels) == ("api", {"team": "a"})
    assert renamed.updated_at == record.updated_at + 5
    with pytest.raises(NotFound):
        store.get("web")
    assert store.update("api", name="api").name == "api"  # its own name is not a conflict
    with pytest.raises(Conflict, match="'db'"):
        store.update("api", name="db")
    relabelled = store.update("api", labels={"tier": "x"})
    assert relabelled.labels == {"tier": "x"}
    cleared = store.update(record.id, name=None, labels=None, expires_at=123.0)
    assert (cleared.name, cleared.labels, cleared.expires_at) == (None, {}, 123.0)
    assert store.update(record.id).expires_at == 123.0  # nothing given: nothing changes
    with pytest.raises(InvalidArgument, match=r"^labels:"):
        store.update(record.id, labels={"BAD": "x"})
    store.close()


def test_a_workspace_being_deleted_cannot_be_renamed(store: WorkspaceStore) -> None:
    record = _in_state(store, WorkspaceState.DELETING)
    with pytest.raises(InvalidState, match="is deleting"):
        store.update(record.id, name="late")


# -- the state machine ---------------------------------------------------------------------


@pytest.mark.parametrize("current", list(WorkspaceState))
@pytest.mark.parametrize("wanted", list(WorkspaceState))
def test_transitions_follow_the_table(
    store: WorkspaceStore, current: WorkspaceState, wanted: WorkspaceState
) -> None:
    record = _in_state(store, current)
    if wanted in TRANSITIONS[current]:
        assert store.transition(record.id, wanted).state is wanted
    else:
        with pytest.raises(InvalidState) as caught:
            store.transition(record.id, wanted)
        assert f"workspace {record.id} is {current.value}; " in caught.value.message
        assert f"moving to {wanted.value} needs it" in caught.value.message
        assert store.get(record.id).state is current


def test_a_refused_operation_names_the_current_state_and_the_way_out(
    store: WorkspaceStore,
) -> None:
    record = _in_state(store, WorkspaceState.STOPPED, name="web")
    with pytest.raises(InvalidState) as caught:
        require_state(record, {"running"}, "exec")
    assert caught.value.message == f"workspace {record.id} (web) is stopped; exec needs it running"
    assert caught.value.hint == f"run `pyro workspace start {record.id}`"
    require_state(record, {"stopped", "failed"}, "start")  # allowed: no error


def test_transition_is_compare_and_set_on_the_expected_states(store: WorkspaceStore) -> None:
    record = _in_state(store, WorkspaceState.FAILED)
    with pytest.raises(InvalidState) as caught:
        store.transition(record.id, "starting", expect={"stopped"}, action="start")
    assert caught.value.message == f"workspace {record.id} is failed; start needs it stopped"
    started = store.transition(record.id, "starting", expect={"stopped", "failed"})
    assert started.state == "starting"


def test_transition_changes_fields_and_note_together(store: WorkspaceStore) -> None:
    record = _in_state(store, WorkspaceState.STARTING)
    running = store.transition(
        record.id,
        "running",
        note="booted",
        vmm_pid=4242,
        run_dir=Path("/run/pyro-mcp/x"),
        agent_endpoint="vsock:3",
        boot_id="b1",
        backend="qemu-tcg",
    )
    assert running.state_note == "booted"
    assert (running.vmm_pid, running.run_dir, running.boot_id) == (4242, "/run/pyro-mcp/x", "b1")
    assert (running.agent_endpoint, running.backend) == ("vsock:3", "qemu-tcg")
    failed = store.transition(
        record.id, "failed", note="VMM exited unexpectedly", error="exit 1", vmm_pid=None
    )
    assert (failed.state_note, failed.error, failed.vmm_pid) == (
        "VMM exited unexpectedly",
        "exit 1",
        None,
    )
    assert failed.boot_id == "b1"  # untouched fields stay
    assert store.transition(record.id, "stopped").state_note is None  # a note is per change


def test_only_known_fields_with_the_right_types_can_be_set(store: WorkspaceStore) -> None:
    record = _new(store)
    with pytest.raises(InvalidArgument, match=r"^state:"):
        store.set_fields(record.id, state="running")
    with pytest.raises(InvalidArgument, match=r"^vmm_pid:"):
        store.set_fields(record.id, vmm_pid="12")
    with pytest.raises(InvalidArgument, match=r"^baseline_manifest:"):
        store.set_fields(record.id, baseline_manifest="not-a-sha")
    with pytest.raises(InvalidArgument, match=r"^name:"):
        store.transition(record.id, "running", name="sneaky")
    assert store.get(record.id) == record
    updated = store.set_fields(record.id, baseline_manifest=SHA_A, error="disk full")
    assert (updated.baseline_manifest, updated.error, updated.state) == (
        SHA_A,
        "disk full",
        "creating",
    )


def test_a_record_is_removed_only_from_deleting(store: WorkspaceStore) -> None:
    record = _in_state(store, WorkspaceState.STOPPED)
    with pytest.raises(InvalidState, match="is stopped; removing its record needs it deleting"):
        store.delete_record(record.id)
    store.transition(record.id, "deleting")
    store.delete_record(record.id)
    with pytest.raises(NotFound):
        store.get(record.id)


# -- many processes, many threads ----------------------------------------------------------


def _race_to_start(path: Path, ref: str, barrier: Any, results: Any) -> None:
    with WorkspaceStore(path) as store:
        barrier.wait()
        try:
            store.transition(ref, "starting", expect={"stopped"})
        except InvalidState as exc:
            results.put(("lost", exc.message))
        except Exception as exc:
            results.put(("error", repr(exc)))
        else:
            results.put(("won", ""))


def test_of_two_processes_racing_to_start_exactly_one_wins(path: Path) -> None:
    with WorkspaceStore(path) as store:
        refs = [_in_state(store, WorkspaceState.STOPPED).id for _ in range(5)]
    for ref in refs:
        barrier, results = MP.Barrier(2), MP.Queue()
        racers = [
            MP.Process(target=_race_to_start, args=(path, ref, barrier, results)) for _ in range(2)
        ]
        for racer in racers:
            racer.start()
        outcomes = sorted(results.get(timeout=30) for _ in racers)
        for racer in racers:
            racer.join(timeout=30)
        assert [kind for kind, _ in outcomes] == ["lost", "won"], outcomes
        assert outcomes[0][1] == f"workspace {ref} is starting; moving to starting needs it stopped"
    with WorkspaceStore(path) as store:
        assert {store.get(ref).state for ref in refs} == {WorkspaceState.STARTING}


def _journal_many(path: Path, ref: str, worker: int, count: int, barrier: Any) -> None:
    with WorkspaceStore(path) as store:
        barrier.wait()
        for n in range(count):
            store.journal_command(_command(ref, worker * 1000 + n))


def test_four_processes_journaling_at_once_all_land(path: Path) -> None:
    with WorkspaceStore(path) as store:
        ref = _new(store).id
    barrier = MP.Barrier(4)
    writers = [
        MP.Process(target=_journal_many, args=(path, ref, worker, 50, barrier))
        for worker in range(4)
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=60)
    assert [w.exitcode for w in writers] == [0, 0, 0, 0]  # no "database is locked"
    with WorkspaceStore(path) as store:
        journal = store.commands(ref, limit=1000)
    assert len(journal) == 200
    assert sorted(int(c.argv[1]) for c in journal if c.argv) == sorted(
        worker * 1000 + n for worker in range(4) for n in range(50)
    )


def _open_and_create(path: Path, barrier: Any) -> None:
    barrier.wait()
    with WorkspaceStore(path) as store:
        _new(store)


def test_processes_opening_a_new_store_at_once_all_succeed(path: Path) -> None:
    barrier = MP.Barrier(4)
    openers = [MP.Process(target=_open_and_create, args=(path, barrier)) for _ in range(4)]
    for opener in openers:
        opener.start()
    for opener in openers:
        opener.join(timeout=60)
    assert [o.exitcode for o in openers] == [0, 0, 0, 0]
    with WorkspaceStore(path) as store:
        assert len(store.list()) == 4
        assert store.schema_version() == len(MIGRATIONS)


def _journal_through_inherited(store: WorkspaceStore, ref: str) -> None:
    store.journal_command(_command(ref, 7))
    store.close()


def test_a_forked_child_can_use_the_store_it_inherited(store: WorkspaceStore) -> None:
    ref = _new(store).id
    child = MP.Process(target=_journal_through_inherited, args=(store, ref))
    child.start()
    child.join(timeout=30)
    assert child.exitcode == 0
    assert [c.argv for c in store.commands(ref)] == [["echo", "7"]]  # parent's handle still works


def test_threads_sharing_one_store_all_land(store: WorkspaceStore) -> None:
    ref = _new(store).id
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            for n in range(25):
                store.journal_command(_command(ref, worker * 100 + n))
                store.get(ref)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(store.commands(ref, limit=1000)) == 100


# -- TTL and admission ---------------------------------------------------------------------


def test_expired_lists_workspaces_past_their_ttl(path: Path) -> None:
    clock = Clock()
    with WorkspaceStore(path, clock=clock) as store:
        short = _new(store, ttl_seconds=60)
        long = _new(store, ttl_seconds=3600)
        _new(store)  # no TTL: never expires
        assert short.expires_at == clock.now + 60
        assert store.expired(clock.now + 59) == []
        assert [r.id for r in store.expired(clock.now + 60)] == [short.id]
        assert [r.id for r in store.expired(clock.now + 7200)] == [short.id, long.id]
        store.update(long.id, expires_at=None)
        assert [r.id for r in store.expired(clock.now + 7200)] == [short.id]


# -- the command journal -------------------------------------------------------------------


def test_the_journal_keeps_output_tails_and_variable_names_only(store: WorkspaceStore) -> None:
    ref = _new(store).id
    big = "é" * 3000 + "end"  # 6003 bytes of UTF-8
    store.journal_command(
        _command(
            ref,
            argv=None,
            shell="make test",
            env_keys=["TOKEN", "HOME"],
            stdout_tail=big,
            stdout_bytes=6003,
            exit_code=None,
            timed_out=True,
            signal="SIGKILL",
            duration_ms=1500.5,
        )
    )
    (entry,) = store.commands(ref)
    assert entry.shell == "make test" and entry.argv is None
    assert entry.env_keys == ["HOME", "TOKEN"]
    assert entry.stdout_tail.endswith("end")
    assert len(entry.stdout_tail.encode()) <= TAIL_BYTES
    assert set(entry.stdout_tail[:-3]) == {"é"}  # no half character at the cut
    assert (entry.stdout_bytes, entry.timed_out, entry.signal) == (6003, True, "SIGKILL")
    assert entry.duration_ms == 1500.5
    with pytest.raises(InvalidArgument, match=r"^env_keys:"):
        store.journal_command(_command(ref, env_keys=["TOKEN=hunter2"]))
    with pytest.raises(InvalidArgument, match=r"^argv/shell:"):
        store.journal_command(_command(ref, shell="ls"))
    with pytest.raises(NotFound):
        store.journal_command(_command("000000000000"))


def test_commands_returns_the_latest_oldest_first(store: WorkspaceStore) -> None:
    ref = _new(store).id
    other = _new(store).id
    ids = [store.journal_command(_command(ref, n)) for n in range(5)]
    store.journal_command(_command(other, 99))
    assert [c.id for c in store.commands(ref, limit=3)] == ids[2:]
    assert [c.argv for c in store.commands(ref, limit=2)] == [["echo", "3"], ["echo", "4"]]


# -- checkpoints, cascade, manifests -------------------------------------------------------


def test_checkpoint_names_are_unique_per_workspace(store: WorkspaceStore) -> None:
    a, b = _new(store, name="a"), _new(store, name="b")
    first = store.add_checkpoint("a", "v1", manifest=SHA_A, file_count=3, total_bytes=10)
    with pytest.raises(Conflict, match="already has a checkpoint 'v1'"):
        store.add_checkpoint("a", "v1", manifest=SHA_B, file_count=1, total_bytes=1)
    store.add_checkpoint("b", "v1", manifest=SHA_B, file_count=1, total_bytes=1)
    assert store.get_checkpoint(a.id, "v1") == first
    assert [c.name for c in store.checkpoints(b.id)] == ["v1"]
    with pytest.raises(InvalidArgument, match=r"^name:"):
        store.add_checkpoint("a", "bad name", manifest=SHA_A, file_count=0, total_bytes=0)
    with pytest.raises(InvalidArgument, match=r"^manifest:"):
        store.add_checkpoint("a", "v2", manifest="abc", file_count=0, total_bytes=0)
    store.delete_checkpoint("a", "v1")
    with pytest.raises(NotFound) as caught:
        store.get_checkpoint("a", "v1")
    assert "has no checkpoint 'v1'" in caught.value.message
    assert f"pyro workspace snapshot list {a.id}" in str(caught.value)


def test_baseline_is_reserved_for_the_seed(store: WorkspaceStore) -> None:
    record = _new(store)
    with pytest.raises(InvalidArgument, match="reserved"):
        store.add_checkpoint(record.id, "baseline", manifest=SHA_A, file_count=0, total_bytes=0)
    baseline = store.add_baseline(record.id, manifest=SHA_A, file_count=2, total_bytes=5)
    assert baseline.name == "baseline"
    assert store.get(record.id).baseline_manifest == SHA_A
    with pytest.raises(Conflict):
        store.add_baseline(record.id, manifest=SHA_B, file_count=0, total_bytes=0)
    with pytest.raises(InvalidArgument, match="lives as long as its workspace"):
        store.delete_checkpoint(record.id, "baseline")


def test_removing_a_workspace_removes_its_journal_and_checkpoints(
    store: WorkspaceStore, path: Path
) -> None:
    gone, kept = _new(store), _new(store)
    for ref in (gone.id, kept.id):
        store.journal_command(_command(ref))
        store.add_checkpoint(ref, "v1", manifest=SHA_A, file_count=0, total_bytes=0)
    store.transition(gone.id, "deleting")
    store.delete_record(gone.id)
    assert (_count(path, "commands"), _count(path, "checkpoints")) == (1, 1)
    assert len(store.commands(kept.id)) == 1


def test_referenced_manifests_covers_baselines_and_checkpoints(store: WorkspaceStore) -> None:
    assert store.referenced_manifests() == set()
    one, two = _new(store), _new(store)
    store.set_fields(one.id, baseline_manifest=SHA_A)
    store.add_baseline(two.id, manifest=SHA_B, file_count=0, total_bytes=0)
    store.add_checkpoint(two.id, "v1", manifest=SHA_C, file_count=0, total_bytes=0)
    store.add_checkpoint(one.id, "v1", manifest=SHA_C, file_count=0, total_bytes=0)
    assert store.referenced_manifests() == {SHA_A, SHA_B, SHA_C}
    store.delete_checkpoint(two.id, "v1")
    store.delete_checkpoint(one.id, "v1")
    assert store.referenced_manifests() == {SHA_A, SHA_B}
    store.transition(two.id, "deleting")
    store.delete_record(two.id)
    assert store.referenced_manifests() == {SHA_A}


def test_processes_and_threads_opening_the_store_at_once_never_see_an_io_error(
    tmp_path: Path,
) -> None:
    """A CLI and an MCP server (each with several threads) open and close the store all
    the time; opening it must never drop the locks other threads' connections hold."""
    import subprocess
    import sys
    import time as clock

    path = tmp_path / "store.sqlite3"
    store = WorkspaceStore(path)
    record = store.create(environment="debian:12", vcpu_count=1, mem_mib=256, disk_mib=64)
    store.close()
    other = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from pyro_mcp.workspace.store import WorkspaceStore\n"
            "end = time.monotonic() + 2\n"
            "while time.monotonic() < end:\n"
            "    s = WorkspaceStore(Path(sys.argv[1])); s.list(); s.close()\n",
            str(path),
        ]
    )
    errors: list[str] = []

    def journal() -> None:
        end = clock.monotonic() + 2
        while clock.monotonic() < end:
            opened = WorkspaceStore(path)
            try:
                opened.journal_command(
                    CommandRecord(workspace_id=record.id, started_at=clock.time(), argv=["x"])
                )
            except sqlite3.Error as exc:
                errors.append(str(exc))
            finally:
                opened.close()

    threads = [threading.Thread(target=journal) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert other.wait(timeout=30) == 0
    assert errors == []
