"""The lifecycle of a persistent workspace (or lifecycle VM): its states and the moves.

    from        to
    creating    running, created, failed, deleting
    created     starting, deleting
    running     stopping, pausing, failed, deleting
    pausing     paused, running, failed, stopped
    paused      resuming, deleting
    resuming    running, paused, failed
    stopping    stopped, failed
    stopped     starting, deleting
    starting    running, failed, stopped
    failed      starting, deleting, stopped
    deleting    (the record is removed)

``TRANSITIONS`` is the only table of allowed moves: every state change in the store is
checked against it. ``require_state`` builds the error a caller sees when an operation needs
another state, naming the current one and how to get out of it.

The store holds two kinds of record (``Kind``) on this one lifecycle: workspaces, and the
VMs of ``pyro vm create``. A VM is recorded without booting (``created``: a workspace
boots as it is created, so it never is ``created``) and has no ``/workspace`` disk; a
running VM is shown as ``started``, the word pyro-mcp 3.x used (:func:`shown_state`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from enum import StrEnum
from typing import Protocol

from pyro_mcp.errors import InvalidArgument, InvalidState


class Kind(StrEnum):
    """What a record of the store is (the value is what the store keeps)."""

    WORKSPACE = "workspace"
    VM = "vm"  # a lifecycle VM: ``pyro vm create|start|exec|stop|delete``


NOUNS: Mapping[str, str] = {Kind.WORKSPACE: "workspace", Kind.VM: "VM"}


class WorkspaceState(StrEnum):
    """Where a workspace is in its lifecycle (the value is what the store and users see)."""

    CREATING = "creating"
    CREATED = "created"  # a VM recorded, never booted yet (VMs only)
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    STARTING = "starting"
    PAUSING = "pausing"
    PAUSED = "paused"  # memory and devices saved in its directory; no VMM runs
    RESUMING = "resuming"
    FAILED = "failed"
    DELETING = "deleting"


_S = WorkspaceState

TRANSITIONS: Mapping[WorkspaceState, frozenset[WorkspaceState]] = {
    _S.CREATING: frozenset({_S.RUNNING, _S.CREATED, _S.FAILED, _S.DELETING}),
    _S.CREATED: frozenset({_S.STARTING, _S.DELETING}),
    _S.RUNNING: frozenset({_S.STOPPING, _S.PAUSING, _S.FAILED, _S.DELETING}),
    _S.PAUSING: frozenset({_S.PAUSED, _S.RUNNING, _S.FAILED, _S.STOPPED}),
    _S.PAUSED: frozenset({_S.RESUMING, _S.DELETING}),
    _S.RESUMING: frozenset({_S.RUNNING, _S.PAUSED, _S.FAILED}),
    _S.STOPPING: frozenset({_S.STOPPED, _S.FAILED}),
    _S.STOPPED: frozenset({_S.STARTING, _S.DELETING}),
    _S.STARTING: frozenset({_S.RUNNING, _S.FAILED, _S.STOPPED}),
    _S.FAILED: frozenset({_S.STARTING, _S.DELETING, _S.STOPPED}),
    # Leaving ``deleting`` means removing the row (``WorkspaceStore.delete_record``).
    _S.DELETING: frozenset(),
}

# States whose VM holds (or is about to hold) host memory: what admission counts. A
# stopping VM holds its memory until it has exited.
RESERVING_STATES: frozenset[WorkspaceState] = frozenset(
    {_S.CREATING, _S.STARTING, _S.RUNNING, _S.STOPPING, _S.PAUSING, _S.RESUMING}
)

# How a user moves a workspace (``{cmd}``: ``pyro workspace``) or a VM (``pyro vm``) out of
# a state towards another, if a command does it.
_REMEDIES: Mapping[tuple[WorkspaceState, WorkspaceState], str] = {
    (_S.CREATED, _S.RUNNING): "run `{cmd} start {id}`",
    (_S.STOPPED, _S.RUNNING): "run `{cmd} start {id}`",
    (_S.FAILED, _S.RUNNING): "run `{cmd} start {id}` (`{cmd} status {id}` says what failed)",
    (_S.RUNNING, _S.STOPPED): "run `{cmd} stop {id}`",
    (_S.PAUSED, _S.RUNNING): "run `{cmd} resume {id}`",
    (_S.RUNNING, _S.PAUSED): "run `{cmd} pause {id}`",
    (_S.PAUSING, _S.PAUSED): "wait for it to finish pausing",
    (_S.RESUMING, _S.RUNNING): "wait for it to finish resuming",
    (_S.FAILED, _S.STOPPED): "run `{cmd} stop {id}`",
    (_S.CREATING, _S.RUNNING): "wait for it to finish creating",
    (_S.STARTING, _S.RUNNING): "wait for it to finish starting",
    (_S.STOPPING, _S.STOPPED): "wait for it to finish stopping",
    (_S.STARTING, _S.STOPPED): "wait for it to finish starting, then stop it",
}
COMMANDS: Mapping[str, str] = {Kind.WORKSPACE: "pyro workspace", Kind.VM: "pyro vm"}


class HasState(Protocol):
    """Anything that names a workspace and its state (a ``WorkspaceRecord``)."""

    @property
    def kind(self) -> str: ...

    @property
    def id(self) -> str: ...

    @property
    def name(self) -> str | None: ...

    @property
    def state(self) -> WorkspaceState: ...


def parse_state(value: str, *, field: str = "state") -> WorkspaceState:
    """``value`` as a ``WorkspaceState``; ``InvalidArgument`` naming ``field`` if unknown."""
    try:
        return WorkspaceState(value)
    except ValueError:
        known = ", ".join(s.value for s in WorkspaceState)
        raise InvalidArgument(
            f"{field}: unknown workspace state {value!r} (one of {known})"
        ) from None


def can_transition(current: WorkspaceState, wanted: WorkspaceState) -> bool:
    """Whether the lifecycle allows moving straight from ``current`` to ``wanted``."""
    return wanted in TRANSITIONS[current]


def shown_state(kind: str, state: WorkspaceState) -> str:
    """The state as users see it: a running VM is ``started`` (pyro-mcp 3.x's word)."""
    return "started" if kind == Kind.VM and state is WorkspaceState.RUNNING else state.value


def describe(record: HasState) -> str:
    """How messages name a workspace: its id, with its name when it has one."""
    return f"{record.id} ({record.name})" if record.name else record.id


def state_error(record: HasState, allowed: Collection[str], action: str) -> InvalidState:
    """The error for ``action`` refused because ``record`` is in none of ``allowed``.

    The message names the workspace, its current state and the wanted one(s); the hint says
    how to get there when a command does it, e.g.
    ``workspace ab12cd34ef56 is stopped; exec needs it running (run `pyro workspace start
    ab12cd34ef56`)``.
    """
    wanted = sorted({parse_state(s, field="allowed") for s in allowed})
    kind = record.kind
    needs = " or ".join(shown_state(kind, s) for s in wanted) or "another state"
    message = (
        f"{NOUNS.get(kind, kind)} {describe(record)} is {shown_state(kind, record.state)}; "
        f"{action} needs it {needs}"
    )
    hint = None
    for target in wanted:
        remedy = _REMEDIES.get((record.state, target))
        if remedy:
            hint = remedy.format(cmd=COMMANDS.get(kind, "pyro workspace"), id=record.id)
            break
    return InvalidState(message, hint=hint)


def require_state(record: HasState, allowed: Collection[str], action: str) -> None:
    """Raise ``InvalidState`` (see ``state_error``) unless ``record.state`` is in ``allowed``."""
    if record.state.value not in {str(s) for s in allowed}:
        raise state_error(record, allowed, action)
