"""The records the workspace store keeps: what they hold, how they are checked and stored.

``WorkspaceRecord``, ``CommandRecord`` and ``CheckpointRecord`` are what the store hands out.
Below them are the only code that knows how a field is stored (rows <-> records) and the
checks every field goes through before it reaches the file; ``store`` runs the queries and
``schema`` defines the tables.
"""

from __future__ import annotations

import copy
import json
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final, TypeVar

from pyro_mcp.errors import InvalidArgument
from pyro_mcp.workspace.states import WorkspaceState

LIST_HINT: Final = "list workspaces with `pyro workspace list`"  # for an unknown workspace
TAIL_BYTES: Final = 4096  # how much of a command's stdout and stderr the journal keeps
MAX_LABELS: Final = 64

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
ID_RE: Final = re.compile(r"[0-9a-f]{12}")
"""A whole workspace id: 12 lowercase hex characters."""
_LABEL_KEY_RE = re.compile(r"[a-z0-9][a-z0-9._/-]{0,252}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


# ---------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True, kw_only=True)
class WorkspaceRecord:
    """One persistent workspace, as the store knows it."""

    id: str
    """12 lowercase hex characters, generated at creation; never reused."""
    name: str | None
    """Optional human name, unique among workspaces that are not being deleted."""
    environment: str
    """The environment the root disk was made from (e.g. ``debian:12``)."""
    state: WorkspaceState
    """Where the workspace is in its lifecycle (see ``states.TRANSITIONS``)."""
    state_note: str | None
    """Why the state last changed (e.g. ``VMM exited unexpectedly``), if anyone said."""
    created_at: float
    """Creation time, epoch seconds."""
    updated_at: float
    """Time of the last change to this record, epoch seconds."""
    expires_at: float | None
    """When the workspace may be reclaimed (its TTL), epoch seconds; ``None``: never."""
    vcpu_count: int
    """Virtual CPUs given to the VM."""
    mem_mib: int
    """Guest memory, MiB."""
    disk_mib: int
    """Size of the workspace disk mounted at ``/workspace``, MiB."""
    labels: dict[str, str]
    """Free-form labels for selecting workspaces (``pyro workspace list --label k=v``)."""
    backend: str | None
    """The VMM backend that runs (or last ran) it, e.g. ``qemu-tcg``; ``None`` before boot."""
    vmm_pid: int | None
    """Host process id of the VMM while it runs."""
    run_dir: str | None
    """Host directory of the live VM's sockets and logs while it runs."""
    agent_endpoint: str | None
    """How to reach the guest agent of the running VM (the backend's own encoding)."""
    boot_id: str | None
    """Identifies one boot: a new value on every start, to tell a restarted VM from the last."""
    error: str | None
    """The last error an operation on this workspace hit, if any."""
    baseline_manifest: str | None
    """sha256 of the manifest (in the blob store) of the seeded ``/workspace`` contents."""
    seed: str | None
    """What ``/workspace`` was seeded from (a human description), if anything."""
    services: dict[str, Any] = field(default_factory=dict)
    """The guest's services as last seen (name -> status), mirrored from the agent."""
    owner: str | None = None
    """While it is ``creating``, ``starting`` or ``stopping``: the process doing it, as
    ``pid:start`` (its start time, /proc/PID/stat field 22). Whether that process still
    runs decides whether the change is under way, never a clock."""
    network: dict[str, Any] = field(default_factory=lambda: {"mode": "off"})
    """Its network policy (mode, allow_cidrs, allow_hosts), fixed at creation."""
    kind: str = "workspace"
    """``workspace``, or ``vm`` for a lifecycle VM (``pyro vm create``): no ``/workspace``
    disk, created without booting. Each kind's operations see only records of their kind
    (see ``states.Kind``)."""

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-able data (state as its string value)."""
        data = _plain(self)
        data["state"] = self.state.value
        data["workspace_id"] = self.id  # pyro-mcp 3.x's key, beside ours
        return data


@dataclass(frozen=True, kw_only=True)
class CommandRecord:
    """One command run in a workspace, as kept in its journal.

    Exactly one of ``argv`` and ``shell`` is set. Environment variable values are never
    stored (they may be secrets): only their names.
    """

    workspace_id: str
    """The workspace the command ran in."""
    started_at: float
    """When the command started, epoch seconds."""
    argv: list[str] | None = None
    """The program and its arguments, when run without a shell."""
    shell: str | None = None
    """The shell command line, when run through a shell."""
    cwd: str | None = None
    """Working directory in the guest; ``None``: the default."""
    env_keys: list[str] = field(default_factory=list)
    """Names of the environment variables passed (never their values)."""
    duration_ms: float | None = None
    """Wall-clock run time, milliseconds; ``None`` if it never ran."""
    exit_code: int | None = None
    """The exit status; ``None`` if killed by a signal, timed out or never ran."""
    timed_out: bool = False
    """Whether pyro killed it at its deadline."""
    signal: str | None = None
    """The signal that ended it, by name (e.g. ``SIGKILL``), if one did."""
    stdout_tail: str = ""
    """The last ``TAIL_BYTES`` of its standard output (UTF-8, cut at a character)."""
    stderr_tail: str = ""
    """The last ``TAIL_BYTES`` of its standard error (UTF-8, cut at a character)."""
    stdout_bytes: int = 0
    """Total size of its standard output, bytes."""
    stderr_bytes: int = 0
    """Total size of its standard error, bytes."""
    error: str | None = None
    """Why the call failed before the command produced an exit status, if it did."""
    id: int | None = None
    """Journal sequence number, assigned by the store (``None`` until journaled)."""

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-able data."""
        return _plain(self)


@dataclass(frozen=True, kw_only=True)
class CheckpointRecord:
    """A saved copy of a workspace's ``/workspace`` contents."""

    workspace_id: str
    """The workspace it belongs to."""
    name: str
    """Unique within its workspace; ``baseline`` is the seeded contents."""
    manifest: str
    """sha256 of its manifest in the blob store."""
    created_at: float
    """When it was taken, epoch seconds."""
    file_count: int
    """Number of files it holds."""
    total_bytes: int
    """Total size of those files, bytes."""

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-able data (with pyro-mcp 3.x's ``snapshot_name`` too)."""
        return {**_plain(self), "snapshot_name": self.name}


@dataclass(frozen=True, kw_only=True)
class SecretRecord:
    """One secret of a workspace: its name in the clear, its value only sealed (see
    :mod:`pyro_mcp.workspace.vault`)."""

    workspace_id: str
    """The workspace it belongs to."""
    name: str
    """Its name, a valid environment variable name, unique within the workspace."""
    source_kind: str
    """Where the value came from: ``literal`` or ``file``."""
    sealed: bytes
    """The value, encrypted: nonce + AES-GCM ciphertext."""
    created_at: float
    """When it was stored, epoch seconds."""

    def to_dict(self) -> dict[str, Any]:
        """Its name and where it came from: never the value, sealed or not."""
        return {"name": self.name, "source_kind": self.source_kind}


def _plain(record: WorkspaceRecord | CommandRecord | CheckpointRecord) -> dict[str, Any]:
    # Copies: editing the returned labels or argv must not change the frozen record.
    return {f.name: copy.copy(getattr(record, f.name)) for f in fields(record)}


# ---------------------------------------------------------------------------------------
# Rows <-> records: the only place that knows how a field is stored.

_Record = TypeVar("_Record", WorkspaceRecord, CommandRecord, CheckpointRecord, SecretRecord)

_JSON_COLUMNS: Final = frozenset({"labels", "argv", "env_keys", "services", "network"})
_BOOL_COLUMNS: Final = frozenset({"timed_out"})


def _columns(cls: type[_Record]) -> list[str]:
    return [f.name for f in fields(cls)]


def select_sql(cls: type[_Record], table: str) -> str:
    """``SELECT`` of every field of ``cls`` from ``table`` (add the ``WHERE`` after it)."""
    return f"SELECT {', '.join(_columns(cls))} FROM {table}"


def _to_row(record: _Record) -> dict[str, object]:
    row: dict[str, object] = {}
    for name in _columns(type(record)):
        value = getattr(record, name)
        if value is None:
            row[name] = None
        elif name in _JSON_COLUMNS:
            row[name] = json.dumps(value, sort_keys=True)
        elif name in _BOOL_COLUMNS:
            row[name] = int(value)
        elif isinstance(value, WorkspaceState):
            row[name] = value.value
        else:
            row[name] = value
    return row


def from_row(cls: type[_Record], row: sqlite3.Row) -> _Record:
    """The ``cls`` record a row holds."""
    values: dict[str, Any] = {}
    for name in _columns(cls):
        value = row[name]
        if value is not None and name in _JSON_COLUMNS:
            value = json.loads(value)
        elif name in _BOOL_COLUMNS:
            value = bool(value)
        elif name == "state":
            value = WorkspaceState(value)
        values[name] = value
    return cls(**values)


def insert_record(conn: sqlite3.Connection, table: str, record: _Record) -> int:
    """Insert ``record`` as a row of ``table``; returns the new row id."""
    row = _to_row(record)
    names = ", ".join(row)
    params = ", ".join(f":{name}" for name in row)
    cursor = conn.execute(f"INSERT INTO {table} ({names}) VALUES ({params})", row)
    return cursor.lastrowid or 0


# ---------------------------------------------------------------------------------------
# Validation: every message starts with the field it is about.


def validate_name(value: object, *, field: str = "name") -> str:
    """A workspace or checkpoint name: 1-63 of ``[A-Za-z0-9_.-]``, starting alphanumeric."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise InvalidArgument(
            f"{field}: {value!r} is not a valid name: use 1-63 letters, digits, '_', '.' or "
            "'-', starting with a letter or digit"
        )
    if ID_RE.fullmatch(value):
        raise InvalidArgument(
            f"{field}: {value!r} looks like a workspace id (12 hex characters); choose another"
        )
    return value


def validate_labels(value: object, *, field: str = "labels") -> dict[str, str]:
    """Labels: keys ``[a-z0-9][a-z0-9._/-]*`` up to 253 characters, string values up to 253."""
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field}: expected a mapping of strings to strings")
    if len(value) > MAX_LABELS:
        raise InvalidArgument(f"{field}: at most {MAX_LABELS} labels, got {len(value)}")
    labels: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not _LABEL_KEY_RE.fullmatch(key):
            raise InvalidArgument(
                f"{field}: key {key!r} is invalid: use 1-253 lowercase letters, digits, '.', "
                "'_', '/' or '-', starting with a letter or digit"
            )
        if not isinstance(item, str) or len(item) > 253:
            raise InvalidArgument(
                f"{field}: value of {key!r} must be a string of at most 253 chars"
            )
        labels[key] = item
    return labels


def validate_sha256(value: object, field: str) -> str:
    """A sha256 as 64 lowercase hex characters."""
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise InvalidArgument(f"{field}: expected a sha256 as 64 lowercase hex characters")
    return value


def validate_count(value: object, field: str, *, minimum: int) -> int:
    """An integer (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgument(f"{field}: expected an integer >= {minimum}, got {value!r}")
    return value


def validate_optional_str(value: object, field: str) -> str | None:
    """A string or ``None``; a ``Path`` becomes its string."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    raise InvalidArgument(f"{field}: expected a string or nothing, got {type(value).__name__}")


def _validate_vmm_pid(value: object, field: str) -> int | None:
    return None if value is None else validate_count(value, field, minimum=1)


def _validate_baseline(value: object, field: str) -> str | None:
    return None if value is None else validate_sha256(value, field)


def _validate_services(value: object, name: str) -> str:
    """A name -> status mapping, stored as JSON text."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise InvalidArgument(f"{name}: expected a mapping of service names to their status")
    return json.dumps(value, sort_keys=True)


# The non-state fields ``transition`` and ``set_fields`` may change, and their checks.
_SETTABLE: Final[dict[str, Callable[[object, str], object]]] = {
    "backend": validate_optional_str,
    "vmm_pid": _validate_vmm_pid,
    "run_dir": validate_optional_str,
    "agent_endpoint": validate_optional_str,
    "boot_id": validate_optional_str,
    "error": validate_optional_str,
    "baseline_manifest": _validate_baseline,
    "seed": validate_optional_str,
    "services": _validate_services,
    "owner": validate_optional_str,
}


def validate_fields(values: dict[str, object]) -> dict[str, object]:
    """The non-state fields in ``values``, checked and in their stored form."""
    checked: dict[str, object] = {}
    for name, value in values.items():
        check = _SETTABLE.get(name)
        if check is None:
            raise InvalidArgument(
                f"{name}: not a field that can be set here (one of {', '.join(sorted(_SETTABLE))})"
            )
        checked[name] = check(value, name)
    return checked


def _tail(text: str, limit: int = TAIL_BYTES) -> str:
    # Cutting bytes may split a character: drop the partial one rather than store garbage.
    return text.encode("utf-8", "replace")[-limit:].decode("utf-8", "ignore")


def validate_command(record: CommandRecord) -> CommandRecord:
    """``record`` checked and ready to journal: no id, sorted ``env_keys``, tails cut."""
    if (record.argv is None) == (record.shell is None):
        raise InvalidArgument("argv/shell: a command has exactly one of argv and shell")
    if record.argv is not None and (
        not record.argv or not all(isinstance(a, str) for a in record.argv)
    ):
        raise InvalidArgument("argv: expected a non-empty list of strings")
    for key in record.env_keys:
        # A "KEY=value" here would put a secret on disk.
        if not isinstance(key, str) or "=" in key or not key:
            raise InvalidArgument("env_keys: expected variable names only, never values")
    return replace(
        record,
        id=None,
        env_keys=sorted(record.env_keys),
        stdout_tail=_tail(record.stdout_tail),
        stderr_tail=_tail(record.stderr_tail),
    )
