"""Services: long-lived processes the agent starts, watches, restarts and stops.

State and logs live under ``<run>/services/<name>/`` (``<run>`` is ``$PYRO_AGENT_RUN_DIR``,
default ``/run/pyro``, a tmpfs in the guest), never in the workspace.

Operations
----------
``service_start`` {name, argv | shell, cwd?, env?, secret_env?, ready?, ready_timeout_s=30,
ready_interval_ms=200, restart="no"|"on-failure"}
    Starts the service in its own session (process group) and returns once it is ready:
    the status below plus ``ready_ms``. ``ready`` is a probe (see :mod:`probes`); without
    one the service is ``running`` at once. Errors: ``invalid_argument``, ``not_found``
    (cwd), ``exists`` (a service of that name is starting, ready or running, or waits to
    be restarted), ``not_ready`` (the probe did not succeed in time: the service was
    stopped, TERM then KILL, and left ``failed``; the message names the probe, the time
    waited, the last probe error and the tail of the logs), ``exited_before_ready`` (the
    message has the exit code and the log tail; a missing program exits 127),
    ``cancelled``. A name whose previous run ended may be started again (``starts``
    counts the starts of the name; ``restarts`` restarts from scratch).
``service_list`` {} -> {services: [status...]}
``service_status`` {name} -> status (``not_found`` for unknown names)
``service_logs`` {name, tail_lines=100, all=false, stream="both"|"stdout"|"stderr",
follow=false}
    -> {name, lines: [{stream, text}], truncated, paths}; stdout's lines, then stderr's.
    With ``follow`` the tail and then new output stream as ``data`` frames (stream
    stdout/stderr, raw bytes) until the service ends or the call is cancelled; the result
    then has no lines but ``ended`` ("exited" or "cancelled") and ``bytes``.
``service_stop`` {name, signal="TERM", grace_s=10}
    Signals the process group, waits ``grace_s`` for it to empty, then KILLs it: the
    status plus ``was_running``, ``stop_signal`` and ``killed`` (escalated to KILL). A
    service that is not running is no error: ``was_running`` is false.
``service_stop_all`` {signal="TERM", grace_s=10} -> {stopped: [names], results: [...]}

Status: ``name, state`` (starting, ready, running, failed, exited, stopped), ``pid``,
``exit_code`` (128+N when killed by signal N; null when unknown), ``signal``,
``started_at`` (epoch seconds), ``restarts`` (automatic restarts of this start),
``starts``, ``command``, ``cwd``, ``probe``, ``last_probe_error``, ``restart``,
``restart_pending``, ``ready_ms``, ``note``, ``logs`` (paths of the two log files).

Restarts: with ``restart="on-failure"`` a service that ends with a non-zero status (or
a signal) after its start succeeded is started again after a backoff (0.5 s, doubling
to 10 s; back to 0.5 s after a run of 10 s or more), and its probe is run again (a
probe timeout counts as a failure). A failing ``service_start`` never restarts.

Logs (:mod:`service_logs`): each stream goes to ``stdout.log`` / ``stderr.log`` through a
log pump that outlives the agent, capped at ``LOG_CAP`` bytes with one older file kept.
State (:mod:`service_records`): every record is kept in ``state.json``; a restarted agent
adopts the services that still run.

This module holds the supervisor (``Registry``) and the operations; their arguments are
checked in :mod:`service_args`, and the process helpers they use are in :mod:`processes`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from pyro_mcp.guest_agent import ops_secrets, probes
from pyro_mcp.guest_agent.calls import Call, CallError
from pyro_mcp.guest_agent.processes import alive, group_alive, killpg, wait_foreign, wait_readable
from pyro_mcp.guest_agent.service_args import (
    bad_arg,
    base_environment,
    command_arg,
    cwd_arg,
    default_cwd,
    env_arg,
    name_arg,
    number_arg,
    signal_arg,
)
from pyro_mcp.guest_agent.service_logs import (
    LOG_CAP,
    STREAMS,
    Follower,
    fit_lines,
    log_marks,
    log_tail_text,
    marker_count,
    split_lines,
    start_pump,
    tail_lines,
)
from pyro_mcp.guest_agent.service_records import (
    ACTIVE,
    Run,
    Service,
    ServiceRecords,
    proc_stat,
)

__all__ = [
    "DEFAULT_RUN_DIR",
    "LOG_CAP",
    "RUN_DIR_ENV",
    "Handler",
    "Registry",
    "Service",
    "base_environment",
    "default_cwd",
    "handlers",
    "marker_count",
    "registry",
    "run_dir",
    "service_list",
    "service_logs",
    "service_start",
    "service_status",
    "service_stop",
    "service_stop_all",
]

RUN_DIR_ENV = "PYRO_AGENT_RUN_DIR"
DEFAULT_RUN_DIR = "/run/pyro"
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
STABLE_S = 10.0  # a run this long resets the backoff
NOT_READY_GRACE_S = 2.0  # TERM -> KILL when a probe timed out
PUMP_FLUSH_S = 1.0  # wait this long for the pump to write a finished run's last output
FOLLOW_POLL_S = 0.1


def run_dir() -> str:
    return os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR


# The process helpers under the names the unit tests use.
_alive = alive
_group_alive = group_alive


# --- the supervisor ------------------------------------------------------------------------


class Registry(ServiceRecords):
    """The supervisor: starts, watches, restarts and stops the services of its records."""

    # -- processes ---------------------------------------------------------------------------
    def _launch(self, svc: Service) -> tuple[int, str] | None:
        """Spawn the service (under the lock); None, or (exit code, why) if it cannot run."""
        try:
            return self._spawn(svc)
        except OSError as exc:  # no pipes, no folder...: do not leave it "starting"
            svc.state = "failed"
            svc.note = f"cannot start: {exc}"
            self._changed(svc)
            raise

    def _spawn(self, svc: Service) -> tuple[int, str] | None:
        svc.state = "starting"
        svc.started_at = time.time()
        svc.exit_code = svc.signal = svc.last_probe_error = svc.ready_ms = None
        svc.pid = svc.proc_start = None
        os.makedirs(svc.folder, mode=0o700, exist_ok=True)
        svc.log_marks = log_marks(svc.folder)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            proc = subprocess.Popen(
                svc.command,
                cwd=svc.cwd,
                env=svc.environment(),
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            why = "command not found" if code == 127 else (exc.strerror or str(exc))
            if exc.filename == svc.cwd and not os.path.isdir(svc.cwd):
                code, why = 126, f"working directory {svc.cwd} does not exist"
            line = f"pyro-agent: {svc.command[0]}: {why}\n".encode()
            with (
                contextlib.suppress(OSError),
                open(os.path.join(svc.folder, "stderr.log"), "ab") as handle,
            ):
                handle.write(line)
            svc.state = "failed"
            svc.exit_code = code
            self._changed(svc)
            return code, why
        os.close(out_w)
        os.close(err_w)
        done_r, done_w = os.pipe()
        try:
            start_pump(svc.folder, {out_r: "stdout", err_r: "stderr"}, done_w, LOG_CAP)
        finally:
            for fd in (out_r, err_r, done_w):
                os.close(fd)
        stat = proc_stat(proc.pid)
        run = Run(proc.pid, proc, stat[2] if stat else None, done_r)
        svc.run = run
        svc.pid = proc.pid
        svc.proc_start = run.proc_start
        if svc.probe is None:
            svc.state = "running"
            svc.armed = True
        self._changed(svc)
        threading.Thread(
            target=self._watch, args=(svc, run), daemon=True, name=f"service-{svc.name}"
        ).start()
        return None

    def _watch(self, svc: Service, run: Run) -> None:
        """Wait for one run to end, record how, and restart it when the policy says so."""
        code: int | None = None
        if run.proc is not None:
            code = run.proc.wait()  # waits for this pid only (exec reaps its own children)
        else:
            wait_foreign(run.pid)
        if run.pump_done is not None:
            wait_readable(run.pump_done, PUMP_FLUSH_S)
            os.close(run.pump_done)
        with self.lock:
            run.exited.set()
            if svc.run is not run:
                self.changed.notify_all()
                return
            restart = self._ended(svc, run, code)
            self._changed(svc)
        if restart:
            self._restart_later(svc, time.monotonic() - run.began)

    def _ended(self, svc: Service, run: Run, code: int | None) -> bool:
        """Record the end of the current run (under the lock); True to restart it."""
        if code is None:
            svc.exit_code = svc.signal = None
            svc.note = "exit status unknown: the process was adopted after an agent restart"
        elif code < 0:
            svc.exit_code = 128 - code
            svc.signal = signal.Signals(-code).name
        else:
            svc.exit_code = code
            svc.signal = None
        if run.stop_reason in ("stop", "cancelled"):
            svc.state = "stopped"
        elif run.stop_reason == "not_ready" or svc.state == "starting":
            svc.state = "failed"
        elif code is None or code == 0:
            svc.state = "exited"
        else:
            svc.state = "failed"
        if svc.state == "failed" and svc.armed and svc.restart == "on-failure":
            svc.restart_pending = True
            return True
        return False

    def _restart_later(self, svc: Service, ran_s: float) -> None:
        """Back off, then start the service again (in the thread of the run that ended)."""
        while True:
            with self.lock:
                if ran_s >= STABLE_S:
                    svc.failures = 0
                svc.failures += 1
                delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** min(svc.failures - 1, 10))
                deadline = time.monotonic() + delay
                while svc.restart_pending and (left := deadline - time.monotonic()) > 0:
                    self.changed.wait(left)
                if not svc.restart_pending:
                    return  # stopped, or started anew, meanwhile
                svc.restart_pending = False
                svc.restarts += 1
                try:
                    failed = self._launch(svc)
                except OSError:
                    failed = (126, "cannot start")
                if failed is not None:
                    svc.restart_pending = True
                    self._changed(svc)
                    ran_s = 0.0
                    continue
                run = svc.run
            if svc.probe is None or run is None:
                return
            outcome, _ = self._await_ready(svc, run, None)
            if outcome == "timeout":
                self._terminate(run, "not_ready", signal.SIGTERM, NOT_READY_GRACE_S)
            return  # an exit restarts it from its watcher

    def _await_ready(self, svc: Service, run: Run, call: Call | None) -> tuple[str, float]:
        """Probe until ready: ("ready" | "exited" | "timeout" | "cancelled", seconds)."""
        probe = svc.probe
        assert probe is not None
        env = svc.environment()
        began = run.began
        deadline = began + svc.ready_timeout_s
        interval = svc.ready_interval_ms / 1000
        while True:
            with self.lock:
                if svc.run is not run or run.exited.is_set():
                    return "exited", time.monotonic() - began
                if call is not None and call.cancelled.is_set():
                    return "cancelled", time.monotonic() - began
            error = probes.check(probe, svc.cwd, env, deadline - time.monotonic())
            with self.lock:
                now = time.monotonic()
                if svc.run is not run or run.exited.is_set():
                    return "exited", now - began
                if error is None:
                    svc.state = "ready"
                    svc.armed = True
                    svc.last_probe_error = None
                    svc.ready_ms = round((now - began) * 1000, 1)
                    self._changed(svc)
                    return "ready", now - began
                if error != svc.last_probe_error:
                    svc.last_probe_error = error
                    self._changed(svc)
                if now >= deadline:
                    return "timeout", now - began
                if call is not None and call.cancelled.is_set():
                    return "cancelled", now - began
                self.changed.wait(min(interval, deadline - now))

    def _terminate(self, run: Run, reason: str, signum: int, grace_s: float) -> bool:
        """Signal the run's process group, wait for it to empty, KILL it after the grace.

        True if it had to be KILLed."""
        with self.lock:
            if run.stop_reason is None:
                run.stop_reason = reason
        killpg(run.pid, signum)
        deadline = time.monotonic() + grace_s
        while True:
            if run.exited.is_set() and not group_alive(run.pid):
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with self.lock:
                self.changed.wait(min(0.05, left))
        killpg(run.pid, signal.SIGKILL)
        run.exited.wait(10.0)
        return True

    # -- operations --------------------------------------------------------------------------
    def get(self, name: str) -> Service:
        with self.lock:
            svc = self.services.get(name)
        if svc is None:
            raise CallError("not_found", f"no service named {name!r}")
        return svc

    def start(self, call: Call) -> dict[str, Any]:
        args = call.args
        name = name_arg(args)
        command = command_arg(args)
        env = env_arg(args.get("env"))
        secret_env = args.get("secret_env") or {}
        ops_secrets.resolve(secret_env)  # names a secret this guest lacks before it starts
        probe = probes.parse(args.get("ready"))
        timeout = number_arg(args, "ready_timeout_s", 30.0, 0.1, 86400.0)
        interval = number_arg(args, "ready_interval_ms", 200.0, 10.0, 60000.0)
        restart = args.get("restart", "no") or "no"
        if restart not in ("no", "on-failure"):
            raise bad_arg(f"restart must be 'no' or 'on-failure', not {restart!r}")
        cwd = cwd_arg(args.get("cwd"))
        with self.lock:
            old = self.services.get(name)
            if old is not None and old.busy:
                raise CallError(
                    "exists", f"service {name!r} is already {old.state} (pid {old.pid})"
                )
            svc = Service(name, os.path.join(self.root, name))
            svc.starts = (old.starts if old is not None else 0) + 1
            svc.command, svc.cwd, svc.env, svc.probe = command, cwd, env, probe
            svc.secret_env = dict(secret_env)
            svc.ready_timeout_s, svc.ready_interval_ms, svc.restart = timeout, interval, restart
            self.services[name] = svc
            failed = self._launch(svc)
            run = svc.run
        if failed is not None:
            code, why = failed
            raise CallError(
                "exited_before_ready",
                f"service {name!r} exited with code {code} before it was ready "
                f"({command[0]}: {why})\n{log_tail_text(svc.folder, svc.log_marks)}",
            )
        assert run is not None
        if probe is None:
            with self.lock:
                return dict(svc.status(), ready_ms=0.0)
        call.upon_cancel(self._wake)
        outcome, waited = self._await_ready(svc, run, call)
        if outcome == "ready":
            with self.lock:
                return svc.status()
        if outcome == "cancelled":
            self._terminate(run, "cancelled", signal.SIGTERM, NOT_READY_GRACE_S)
            raise CallError("cancelled", f"start of service {name!r} cancelled; it was stopped")
        if outcome == "timeout":
            last = svc.last_probe_error
            self._terminate(run, "not_ready", signal.SIGTERM, NOT_READY_GRACE_S)
            raise CallError(
                "not_ready",
                f"service {name!r} was not ready after {waited:.1f} s: "
                f"{probes.describe(probe)} did not succeed (last error: {last}); "
                f"the service was stopped\n{log_tail_text(svc.folder, svc.log_marks)}",
            )
        run.exited.wait(PUMP_FLUSH_S + 1)
        with self.lock:
            how = (
                "was stopped"
                if svc.state == "stopped"
                else f"exited with code {svc.exit_code}"
                + (f" ({svc.signal})" if svc.signal else "")
            )
            last = f", last error: {svc.last_probe_error}" if svc.last_probe_error else ""
        raise CallError(
            "exited_before_ready",
            f"service {name!r} {how} before it was ready ({probes.describe(probe)}{last})\n"
            + log_tail_text(svc.folder, svc.log_marks),
        )

    def _wake(self) -> None:
        with self.lock:
            self.changed.notify_all()

    def stop(self, name: str, signum: int, signame: str, grace_s: float) -> dict[str, Any]:
        svc = self.get(name)
        with self.lock:
            run = svc.run
            if svc.restart_pending:
                svc.restart_pending = False
                svc.state = "stopped"
                svc.note = "stopped while waiting to restart"
                self._changed(svc)
                return dict(svc.status(), was_running=False, restart_cancelled=True)
            if svc.state not in ACTIVE or run is None or run.exited.is_set():
                return dict(svc.status(), was_running=False)
        killed = self._terminate(run, "stop", signum, grace_s)
        with self.lock:
            while svc.run is run and svc.state in ACTIVE:  # the watcher records the end
                if not self.changed.wait(5.0):
                    break
            return dict(svc.status(), was_running=True, stop_signal=signame, killed=killed)

    def stop_all(self, signum: int, signame: str, grace_s: float) -> dict[str, Any]:
        with self.lock:
            names = [svc.name for svc in self.services.values() if svc.busy]
        results: dict[str, dict[str, Any]] = {}

        def stop_one(name: str) -> None:
            results[name] = self.stop(name, signum, signame, grace_s)

        threads = [threading.Thread(target=stop_one, args=(n,), daemon=True) for n in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return {
            "stopped": [n for n in names if results.get(n, {}).get("was_running")],
            "results": [results[n] for n in names if n in results],
        }

    def logs(self, call: Call) -> dict[str, Any]:
        args = call.args
        svc = self.get(name_arg(args))
        stream = args.get("stream", "both") or "both"
        if stream not in ("both", *STREAMS):
            raise bad_arg(f"stream must be stdout, stderr or both, not {stream!r}")
        streams = STREAMS if stream == "both" else (stream,)
        everything = bool(args.get("all", False))
        count = args.get("tail_lines", 100)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise bad_arg("tail_lines must be a non-negative integer")
        paths = {s: os.path.join(svc.folder, f"{s}.log") for s in streams}
        if args.get("follow"):
            return self._follow(call, svc, streams, None if everything else count, paths)
        lines: list[dict[str, str]] = []
        for name in streams:
            for text in tail_lines(svc.folder, name, None if everything else count):
                lines.append({"stream": name, "text": text})
        kept, truncated = fit_lines(lines)
        return {"name": svc.name, "lines": kept, "truncated": truncated, "paths": paths}

    def _follow(
        self,
        call: Call,
        svc: Service,
        streams: tuple[str, ...],
        count: int | None,
        paths: dict[str, str],
    ) -> dict[str, Any]:
        followers = {name: Follower(svc.folder, name) for name in streams}
        sent = 0
        for name, follower in followers.items():
            lines = split_lines(follower.snapshot())
            lines = lines if count is None else lines[-count:] if count else []
            if lines:
                data = ("\n".join(lines) + "\n").encode()
                call.send_data(name, data)
                sent += len(data)
        call.upon_cancel(self._wake)
        ended = "cancelled"
        while not call.cancelled.is_set():
            with self.lock:
                over = not svc.busy
            for name, follower in followers.items():
                data = follower.poll()
                if data:
                    call.send_data(name, data)
                    sent += len(data)
            if over:
                ended = "exited"
                break
            with self.lock:
                if svc.busy and not call.cancelled.is_set():
                    self.changed.wait(FOLLOW_POLL_S)
        return {
            "name": svc.name,
            "lines": [],
            "truncated": False,
            "paths": paths,
            "ended": ended,
            "bytes": sent,
        }


# --- module state: one registry per run directory ----------------------------------------------

_registries: dict[str, Registry] = {}
_registries_lock = threading.Lock()


def registry() -> Registry:
    root = run_dir()
    with _registries_lock:
        found = _registries.get(root)
        if found is None:
            found = _registries[root] = Registry(root)
        return found


Handler = Callable[[Call], tuple[dict[str, Any], bytes]]


def service_start(call: Call) -> tuple[dict[str, Any], bytes]:
    return registry().start(call), b""


def service_list(call: Call) -> tuple[dict[str, Any], bytes]:
    reg = registry()
    with reg.lock:
        return {"services": [svc.status() for _, svc in sorted(reg.services.items())]}, b""


def service_status(call: Call) -> tuple[dict[str, Any], bytes]:
    reg = registry()
    svc = reg.get(name_arg(call.args))
    with reg.lock:
        return svc.status(), b""


def service_logs(call: Call) -> tuple[dict[str, Any], bytes]:
    return registry().logs(call), b""


def service_stop(call: Call) -> tuple[dict[str, Any], bytes]:
    name = name_arg(call.args)
    signum, signame = signal_arg(call.args.get("signal"), "TERM")
    grace = number_arg(call.args, "grace_s", 10.0, 0.0, 3600.0)
    return registry().stop(name, signum, signame, grace), b""


def service_stop_all(call: Call) -> tuple[dict[str, Any], bytes]:
    signum, signame = signal_arg(call.args.get("signal"), "TERM")
    grace = number_arg(call.args, "grace_s", 10.0, 0.0, 3600.0)
    return registry().stop_all(signum, signame, grace), b""


def handlers() -> dict[str, Handler]:
    """The service operations; also reloads (once) what an earlier agent left running."""
    with contextlib.suppress(OSError):
        registry()
    return {
        "service_start": service_start,
        "service_list": service_list,
        "service_status": service_status,
        "service_logs": service_logs,
        "service_stop": service_stop,
        "service_stop_all": service_stop_all,
    }
