#!/usr/bin/python3 -IS
"""pyro-init: PID 1 of every pyro guest (stdlib only, imports kept to C modules).

The kernel starts it as ``init=/sbin/pyro-init``. It

1. mounts proc, sysfs, devtmpfs, devpts, and tmpfs on /dev/shm, /run and /tmp;
2. sets the hostname (``pyro.hostname=`` on the kernel command line, else "pyro"),
   brings up ``lo`` and, with ``pyro.net=``, the network link (:mod:`netconfig`);
3. prints ``pyro-init: ready <uptime seconds>`` on the console;
4. runs the agent (``python3 -m pyro_mcp.guest_agent.agent`` with
   ``PYTHONPATH=/opt/pyro``, output on the console; forked from this interpreter rather
   than exec'ed, see :func:`spawn`) if
   ``/opt/pyro/pyro_mcp/guest_agent/agent.py`` exists and ``pyro.agent=0`` is not set,
   and a shell on the console if ``pyro.shell=1``; each is restarted with a backoff
   whenever it exits (the shell like a getty).

As PID 1 it reaps every orphan and never exits (that would panic the kernel). SIGTERM or
SIGPWR syncs the disks and powers the machine off; so does the agent or shell exiting
when ``pyro.poweroff=1`` is set (at once after ``ready`` when neither runs).
``pyro.debug=1`` prints a timing line when init starts.

Startup speed matters (it is paid on every cold boot), so this module imports only C
modules (``posix``, ``time``, ``_signal``, ``_ctypes``, ``_socket``, ``fcntl``) and
``/sbin/pyro-init`` is a small stub that imports it from its precompiled ``.pyc``.
Under QEMU TCG the Python interpreter's own start takes ~0.4 s; this module adds ~70 ms
from its import to ``ready``.
"""

import posix as os  # the C module under ``os``: importing os.py costs ~20 ms under TCG
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
else:  # the C module: ``signal`` itself pulls in enum, which costs milliseconds
    import _signal

AGENT_PATH = "/opt/pyro/pyro_mcp/guest_agent/agent.py"
AGENT_MODULE = "pyro_mcp.guest_agent.agent"
AGENT_ARGV = ("/usr/bin/python3", "-m", AGENT_MODULE)  # what it amounts to (see spawn)
SHELL_ARGV = ("/bin/sh",)
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC
LINUX_REBOOT_CMD_RESTART = 0x01234567
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
TIOCSCTTY = 0x540E

# source, target, type, flags, data
MOUNTS: tuple[tuple[str, str, str, int, str | None], ...] = (
    ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
    ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
    ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666"),
    ("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
    ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
)
DEV_LINKS = (
    ("/proc/self/fd", "/dev/fd"),
    ("/proc/self/fd/0", "/dev/stdin"),
    ("/proc/self/fd/1", "/dev/stdout"),
    ("/proc/self/fd/2", "/dev/stderr"),
)
WAITED = (_signal.SIGCHLD, _signal.SIGTERM, _signal.SIGPWR, _signal.SIGINT, _signal.SIGHUP)
RESET_IN_CHILD = (*WAITED, _signal.SIGPIPE, _signal.SIGXFSZ)

_console = 1  # the kernel opens /dev/console as fds 0-2 for init


def say(line: str) -> None:
    """One line on the console, written straight through (no buffering)."""
    try:
        os.write(_console, (line + "\n").encode())
    except OSError:  # no console: nothing to tell
        return


class Libc:
    """mount(2) and reboot(2) through ``_ctypes`` (``ctypes`` itself costs ~2 ms more)."""

    def __init__(self) -> None:
        import _ctypes

        class _Func(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO

        class _Dll:
            _handle = _ctypes.dlopen("libc.so.6")

        self._get_errno = _ctypes.get_errno
        # (name, library) is how ctypes itself builds these; the stub wants a CDLL.
        self._mount = _Func(("mount", _Dll()))  # type: ignore[arg-type]
        self._reboot = _Func(("reboot", _Dll()))  # type: ignore[arg-type]

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            errno = self._get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)}")

    def mount(
        self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None
    ) -> None:
        def enc(value: str | None) -> bytes | None:
            return value.encode() if value is not None else None

        result = self._mount(enc(source), target.encode(), enc(fstype), flags, enc(data))
        self._check(result, f"mount {target}")

    def reboot(self, cmd: int) -> None:
        self._check(self._reboot(cmd), "reboot")


def exists(path: str, *, follow: bool = True) -> bool:
    try:
        (os.stat if follow else os.lstat)(path)
    except OSError:
        return False
    return True


def isdir(path: str) -> bool:
    try:
        return os.stat(path).st_mode & 0o170000 == 0o040000
    except OSError:
        return False


def read_text(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def uptime() -> str:
    """Seconds since boot (the clock of /proc/uptime, read without /proc)."""
    return f"{time.clock_gettime(time.CLOCK_BOOTTIME):.3f}"


def parse_cmdline(text: str) -> dict[str, str]:
    """The ``pyro.*`` options of a kernel command line, without the prefix."""
    options: dict[str, str] = {}
    for word in text.split():
        if word.startswith("pyro."):
            key, _, value = word[5:].partition("=")
            options[key] = value if _ else "1"
    return options


def mount_all(libc: Libc) -> None:
    for source, target, fstype, flags, data in MOUNTS:
        try:
            if not isdir(target):
                os.mkdir(target, 0o755)
            libc.mount(source, target, fstype, flags, data)
        except OSError as exc:
            if exc.errno != 16:  # EBUSY: the kernel mounted it already (devtmpfs.mount=1)
                say(f"pyro-init: {exc}")
    for source, link in DEV_LINKS:
        if not exists(link, follow=False):
            os.symlink(source, link)


WORKSPACE_MOUNT = "/workspace"


BOOT_ERRORS = "/run/pyro/boot-errors"


def boot_error(message: str) -> None:
    """Say what a boot step could not do, on the console and in ``BOOT_ERRORS`` (which
    the agent reports in hello, so the host can refuse the guest with the reason)."""
    say(f"pyro-init: {message}")
    try:
        if not isdir("/run/pyro"):
            os.mkdir("/run/pyro", 0o755)
        fd = os.open(BOOT_ERRORS, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (message.replace("\n", " ") + "\n").encode())
        finally:
            os.close(fd)
    except OSError:
        return


def mount_workspace(libc: Libc, device: str) -> None:
    """Mount the workspace disk (``pyro.workspace=/dev/vdb``) at /workspace.

    A failure is a boot error: the agent then refuses to work in /workspace (it would be
    the root disk's empty directory) and the host refuses to boot such a guest.
    """
    try:
        if not isdir(WORKSPACE_MOUNT):
            os.mkdir(WORKSPACE_MOUNT, 0o755)
        libc.mount(device, WORKSPACE_MOUNT, "ext4", 0, None)
    except OSError as exc:
        boot_error(f"cannot mount {device} at {WORKSPACE_MOUNT}: {exc}")


def open_console() -> None:
    """Make fds 0-2 the console (they are missing when the image had no /dev/console)."""
    global _console
    try:
        fd = os.open("/dev/console", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return
    for target in (0, 1, 2):
        if fd != target:
            os.dup2(fd, target)
    if fd > 2:
        os.close(fd)
    _console = 1


def set_hostname(name: str) -> None:
    try:
        with open("/proc/sys/kernel/hostname", "w") as handle:
            handle.write(name)
    except OSError as exc:
        say(f"pyro-init: cannot set hostname: {exc}")


def loopback_up() -> None:
    import _socket
    import fcntl

    try:
        sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM, 0)
    except OSError as exc:
        say(f"pyro-init: no IPv4 socket, lo stays down: {exc}")
        return
    try:
        name = b"lo".ljust(16, b"\0")
        flags = int.from_bytes(
            fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, name + bytes(24))[16:18], "little"
        )
        request = name + (flags | IFF_UP).to_bytes(2, "little") + bytes(22)
        fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, request)
    except OSError as exc:
        say(f"pyro-init: cannot bring up lo: {exc}")
    finally:
        sock.close()


def network_up(option: str) -> None:
    """The guest's network link (``pyro.net=``, see :mod:`netconfig`); a failure is a
    boot error: the host asked for a network and must not get a guest without one."""
    from pyro_mcp.guest_agent import netconfig

    try:
        netconfig.configure(option)
    except (netconfig.NetConfigError, OSError) as exc:
        boot_error(f"cannot bring up the network: {exc}")  # vmm.base.NETWORK_BOOT_ERROR


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {"PATH": GUEST_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "linux"}
    env.update(extra)
    return env


def spawn(
    argv: tuple[str, ...],
    env: dict[str, str],
    cwd: str,
    *,
    terminal: bool,
    module: str | None = None,
) -> int:
    """fork + exec ``argv`` in a new session, on the console; returns the pid.

    With ``module``, the forked child runs that module as ``__main__`` in this already
    started interpreter instead of exec'ing a new Python: the same as ``python3 -m``
    without a second interpreter start (~0.2-0.3 s under TCG).
    """
    pid = os.fork()
    if pid:
        return pid
    try:  # the child: must never return into the init loop
        os.setsid()
        fd = os.open("/dev/console", os.O_RDWR | os.O_NOCTTY)
        if terminal:
            import fcntl

            fcntl.ioctl(fd, TIOCSCTTY, 1)
            stdin = fd
        else:
            stdin = os.open("/dev/null", os.O_RDONLY)
        os.dup2(stdin, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        for signo in RESET_IN_CHILD:
            _signal.signal(signo, _signal.SIG_DFL)
        _signal.pthread_sigmask(_signal.SIG_SETMASK, ())
        os.chdir(cwd)
        if module is None:
            os.execve(argv[0], argv, env)
        run_module(module, env)
    except BaseException as exc:  # report anything, then leave
        say(f"pyro-init: cannot start {module or argv[0]}: {exc!r}")
    os._exit(127)


def run_module(module: str, env: dict[str, str]) -> None:
    """In a forked child: become ``python3 -m module`` with ``env``; never returns."""
    # Python's own defaults, which a fresh interpreter would set up
    _signal.signal(_signal.SIGPIPE, _signal.SIG_IGN)
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_IGN)
    _signal.signal(_signal.SIGINT, _signal.default_int_handler)
    for key in list(os.environ):
        os.unsetenv(key)
    os.environ.clear()  # os.environ (os.py) is built from this when first imported
    for name, value in env.items():
        os.putenv(name, value)
        os.environ[name.encode()] = value.encode()
    for path in reversed(env.get("PYTHONPATH", "").split(":")):
        if path and path not in sys.path:
            sys.path.insert(0, path)
    sys.argv = [module]
    try:  # ps shows the command line of init; at least the name says what this is
        with open("/proc/self/comm", "w") as handle:
            handle.write(module.rsplit(".", 1)[-1][:15])
    except OSError:
        pass
    code = 0
    try:
        import runpy

        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            continue
    os._exit(code)


class Program:
    """A supervised program: the agent or the console shell."""

    def __init__(
        self,
        name: str,
        argv: tuple[str, ...],
        env: dict[str, str],
        cwd: str,
        terminal: bool,
        module: str | None = None,
    ) -> None:
        self.name = name
        self.module = module
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.terminal = terminal
        self.pid: int | None = None
        self.started = 0.0
        self.next_start = 0.0
        self.backoff = 0.1
        self.starts = 0

    def start(self) -> None:
        self.started = time.monotonic()
        # The program learns how many times it ran before: a restarted agent tells the
        # host that calls in flight were lost.
        env = dict(self.env, PYRO_RESTARTS=str(self.starts))
        self.starts += 1
        try:
            self.pid = spawn(self.argv, env, self.cwd, terminal=self.terminal, module=self.module)
        except OSError as exc:  # fork failed: try again later
            say(f"pyro-init: cannot fork {self.name}: {exc}")
            self._schedule()

    def exited(self, status: int) -> None:
        self.pid = None
        if os.WIFEXITED(status):
            how = f"exited with status {os.WEXITSTATUS(status)}"
        else:
            how = f"was killed by signal {os.WTERMSIG(status)}"
        if time.monotonic() - self.started > 10.0:
            self.backoff = 0.1
        say(f"pyro-init: {self.name} {how}; restarting in {self.backoff:.1f} s")
        self._schedule()

    def _schedule(self) -> None:
        self.next_start = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, 5.0)


class Init:
    def __init__(self) -> None:
        self.libc: Libc | None = None
        self.options: dict[str, str] = {}
        self.programs: list[Program] = []

    def boot(self) -> None:
        self.libc = Libc()
        mount_all(self.libc)
        open_console()
        self.options = parse_cmdline(read_text("/proc/cmdline"))
        if self.options.get("debug") == "1":
            say(f"pyro-init: start {uptime()}")
        set_hostname(self.options.get("hostname") or "pyro")
        loopback_up()
        if self.options.get("net"):
            network_up(self.options["net"])
        workspace = self.options.get("workspace")
        if workspace:
            mount_workspace(self.libc, workspace)
        say(f"pyro-init: ready {uptime()}")
        if self.options.get("agent") != "0" and exists(AGENT_PATH):
            env = child_env({"PYTHONPATH": "/opt/pyro"})
            agent = Program("agent", AGENT_ARGV, env, "/opt/pyro", False, AGENT_MODULE)
            self.programs.append(agent)
        if self.options.get("shell") == "1":
            self.programs.append(Program("shell", SHELL_ARGV, child_env({}), "/root", True))

    def run(self) -> None:
        """The PID 1 loop: start/restart the programs, reap children, handle signals."""
        waited = set(WAITED)
        while True:
            timeout: float | None = None
            now = time.monotonic()
            for program in self.programs:
                if program.pid is None:
                    if program.next_start <= now:
                        program.start()
                    if program.pid is None:
                        wait = max(0.0, program.next_start - now)
                        timeout = wait if timeout is None else min(timeout, wait)
            if timeout is None:
                info = _signal.sigwaitinfo(waited)
            else:
                maybe = _signal.sigtimedwait(waited, timeout)
                if maybe is None:
                    continue
                info = maybe
            if info.si_signo in (_signal.SIGTERM, _signal.SIGPWR):
                self.power_off(f"signal {info.si_signo}")
            self.reap()

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for program in self.programs:
                if pid == program.pid:
                    if self.options.get("poweroff") == "1":
                        self.power_off(f"{program.name} exited")
                    program.exited(status)

    def power_off(self, reason: str) -> None:
        """Stop everything, sync, remount / read-only, power off. Never returns."""
        say(f"pyro-init: {reason}; powering off")
        # TERM for daemons, HUP for interactive shells (they ignore TERM), CONT for the
        # stopped; then KILL whatever is left.
        stages = (
            ((_signal.SIGTERM, _signal.SIGHUP, _signal.SIGCONT), 2.0),
            ((_signal.SIGKILL,), 1.0),
        )
        for signals, grace in stages:
            try:
                for signo in signals:
                    os.kill(-1, signo)
            except ProcessLookupError:  # nothing else is running
                break
            deadline = time.monotonic() + grace
            while self._children_left() and time.monotonic() < deadline:
                _signal.sigtimedwait((_signal.SIGCHLD,), 0.05)
        os.sync()
        libc = self.libc
        if libc is not None:
            try:
                libc.mount(None, "/", None, MS_REMOUNT | MS_RDONLY, None)
            except OSError as exc:
                say(f"pyro-init: {exc}")
            # Without ACPI the kernel cannot power off and would only halt; a restart with
            # reboot=k makes QEMU (-no-reboot) and Firecracker exit instead.
            commands = [LINUX_REBOOT_CMD_RESTART]
            if isdir("/sys/firmware/acpi"):
                commands.insert(0, LINUX_REBOOT_CMD_POWER_OFF)
            for command in commands:
                try:
                    libc.reboot(command)
                except OSError as exc:
                    say(f"pyro-init: {exc}")
        while True:  # PID 1 must not exit
            time.sleep(3600)

    @staticmethod
    def _children_left() -> bool:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True


def main() -> None:
    for signo in WAITED:
        if signo != _signal.SIGCHLD:
            # A handler (not SIG_DFL) so the kernel queues these for PID 1; they stay
            # blocked and are taken with sigwaitinfo, so the handler never runs.
            _signal.signal(signo, _noop)
    _signal.pthread_sigmask(_signal.SIG_BLOCK, WAITED)
    init = Init()
    try:
        init.boot()
        if not init.programs and init.options.get("poweroff") == "1":
            init.power_off("nothing to run")
    except BaseException as exc:  # PID 1 keeps going whatever happens
        say(f"pyro-init: boot step failed: {exc!r}")
    while True:
        try:
            init.run()
        except BaseException as exc:
            say(f"pyro-init: {exc!r}")
            time.sleep(1.0)


def _noop(signo: int, frame: object) -> None:
    return None


if __name__ == "__main__":
    main()
