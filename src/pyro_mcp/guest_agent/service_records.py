"""Service records: what the agent knows of each service, and adoption after a restart.

A ``Service`` is the record of one name (its command, policy and state); a ``Run`` is one
process of it. ``ServiceRecords`` holds every record of one run directory under one lock
and keeps each in ``<run>/services/<name>/state.json``; the supervisor
(``ops_services.Registry``) builds on it.

State: ``state.json`` in the service's folder is rewritten (atomically) on every change.
A restarted agent reloads every record: a recorded process that still runs (same pid and
the same start time in /proc) is adopted and watched through a pidfd; its exit status
is then unknown (it is no child of the new agent) and it is not restarted. A recorded
process that is gone becomes ``exited`` with a null exit code and a note.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import json
import os
import re
import subprocess
import threading
import time
from typing import Any

from pyro_mcp.guest_agent import ops_secrets
from pyro_mcp.guest_agent.calls import CallError
from pyro_mcp.guest_agent.service_args import NAME_PATTERN, base_environment
from pyro_mcp.guest_agent.service_logs import STREAMS, LogMarks

ACTIVE = ("starting", "ready", "running")


# --- records ---------------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state letter, process group, start time in clock ticks) of a process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return fields[0].decode(), int(fields[2]), int(fields[19])
    except (IndexError, ValueError):
        return None


class Run:
    """One process of a service (a start, a restart, or one adopted after an agent restart)."""

    def __init__(
        self,
        pid: int,
        proc: subprocess.Popen[bytes] | None,
        proc_start: int | None,
        pump_done: int | None,
    ) -> None:
        self.pid = pid
        self.proc = proc  # None when adopted: not our child
        self.proc_start = proc_start
        self.pump_done = pump_done  # read end, at EOF once the log pump ended
        self.began = time.monotonic()
        self.exited = threading.Event()
        self.stop_reason: str | None = None  # "stop", "not_ready", "cancelled"


class Service:
    """The record of one service name: its command, policy and state (``state.json``)."""

    def __init__(self, name: str, folder: str) -> None:
        self.name = name
        self.folder = folder
        self.command: list[str] = []
        self.cwd = "/"
        self.env: dict[str, str] = {}
        self.secret_env: dict[str, str] = {}  # ENVVAR -> secret name (never a value)
        self.probe: dict[str, Any] | None = None
        self.ready_timeout_s = 30.0
        self.ready_interval_ms = 200.0
        self.restart = "no"
        self.state = "stopped"
        self.pid: int | None = None
        self.proc_start: int | None = None
        self.exit_code: int | None = None
        self.signal: str | None = None
        self.started_at: float | None = None
        self.restarts = 0
        self.starts = 0
        self.last_probe_error: str | None = None
        self.ready_ms: float | None = None
        self.note: str | None = None
        self.restart_pending = False
        self.failures = 0  # consecutive, for the backoff
        self.armed = False  # its start succeeded: failures restart it (on-failure)
        self.run: Run | None = None
        self.log_marks: LogMarks | None = None  # where the logs of the latest run begin

    @property
    def busy(self) -> bool:
        return self.state in ACTIVE or self.restart_pending

    def environment(self) -> dict[str, str]:
        """What the service's processes (and its probe) run with: its env and its
        secrets, read from the guest's tmpfs at each start. OSError when a secret is
        gone (it fails the start as a missing program does)."""
        try:
            secrets = ops_secrets.resolve(self.secret_env)
        except CallError as exc:
            raise OSError(errno.ENOENT, exc.message) from None
        return base_environment({**self.env, **secrets})

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "pid": self.pid,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "started_at": self.started_at,
            "restarts": self.restarts,
            "starts": self.starts,
            "command": self.command,
            "cwd": self.cwd,
            "probe": self.probe,
            "last_probe_error": self.last_probe_error,
            "restart": self.restart,
            "restart_pending": self.restart_pending,
            "ready_ms": self.ready_ms,
            "note": self.note,
            "logs": {s: os.path.join(self.folder, f"{s}.log") for s in STREAMS},
        }

    def record(self) -> dict[str, Any]:
        return dict(
            self.status(),
            env=self.env,
            secret_env=self.secret_env,
            ready_timeout_s=self.ready_timeout_s,
            ready_interval_ms=self.ready_interval_ms,
            proc_start=self.proc_start,
            failures=self.failures,
            armed=self.armed,
        )

    def load(self, data: dict[str, Any]) -> None:
        for key in (
            "command", "cwd", "env", "secret_env", "probe", "ready_timeout_s", "ready_interval_ms",
            "restart", "state", "pid", "proc_start", "exit_code", "signal", "started_at",
            "restarts", "starts", "last_probe_error", "ready_ms", "note",
            "restart_pending", "failures", "armed",
        ):  # fmt: skip
            if key in data:
                setattr(self, key, data[key])


# --- the records of one run directory ----------------------------------------------------------


class ServiceRecords(abc.ABC):
    """Every service of one run directory, each saved in its folder; one lock guards them all.

    Adoption hands runs to the supervisor, which supplies ``_watch`` and ``_restart_later``.
    """

    def __init__(self, root: str) -> None:
        self.root = os.path.join(root, "services")
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.services: dict[str, Service] = {}
        self._load()

    # -- persistence -------------------------------------------------------------------------
    def _save(self, svc: Service) -> None:
        if self.services.get(svc.name) is not svc:
            return  # a record replaced by a new start of the name
        with contextlib.suppress(OSError):  # a full /run must not break supervision
            os.makedirs(svc.folder, mode=0o700, exist_ok=True)
            tmp = os.path.join(svc.folder, "state.json.tmp")
            with open(tmp, "w") as handle:
                json.dump(svc.record(), handle)
            os.replace(tmp, os.path.join(svc.folder, "state.json"))

    def _changed(self, svc: Service) -> None:
        self._save(svc)
        self.changed.notify_all()

    def _load(self) -> None:
        try:
            names = sorted(os.listdir(self.root))
        except OSError:
            return
        with self.lock:
            for name in names:
                folder = os.path.join(self.root, name)
                try:
                    with open(os.path.join(folder, "state.json")) as handle:
                        data = json.load(handle)
                except (OSError, ValueError):
                    continue
                if not isinstance(data, dict) or not re.fullmatch(NAME_PATTERN, name):
                    continue
                svc = Service(name, folder)
                svc.load(data)
                self.services[name] = svc
                self._adopt(svc)

    def _adopt(self, svc: Service) -> None:
        """Take over a record written by an earlier agent."""
        if svc.state in ACTIVE and svc.pid:
            stat = proc_stat(svc.pid)
            if stat is not None and stat[0] not in "ZXx" and stat[2] == svc.proc_start:
                run = Run(svc.pid, None, svc.proc_start, None)
                svc.run = run
                svc.armed = True
                if svc.state == "starting":
                    svc.state = "running"
                    svc.note = "adopted after an agent restart while starting: readiness unknown"
                else:
                    svc.note = "adopted after an agent restart"
                threading.Thread(target=self._watch, args=(svc, run), daemon=True).start()
            else:
                svc.state = "exited"
                svc.exit_code = None
                svc.signal = None
                svc.note = "the process ended while the agent was down: exit status unknown"
            self._save(svc)
        elif svc.restart_pending:
            svc.note = "restart resumed after an agent restart"
            threading.Thread(target=self._restart_later, args=(svc, 0.0), daemon=True).start()

    # -- supplied by the supervisor ------------------------------------------------------------
    @abc.abstractmethod
    def _watch(self, svc: Service, run: Run) -> None:
        """Wait for ``run`` to end and record how (in a thread of its own)."""

    @abc.abstractmethod
    def _restart_later(self, svc: Service, ran_s: float) -> None:
        """Start ``svc`` again after its backoff (in a thread of its own)."""
