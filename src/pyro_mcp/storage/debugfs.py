"""Running ``debugfs`` over an ext4 image, read-only, its raw output bounded.

:class:`DebugfsRun` is one debugfs process over an image (a workspace disk), opened
read-only. It runs one request (``debugfs -R``) or a script of commands written to its
stdin; :func:`frame_commands` and :func:`framed_output` tell the output of a script's
commands apart. What each command prints is parsed by the offline readers of
:mod:`~pyro_mcp.storage.workspace_disk`, not here.

The image may be hostile (a guest's root owns it), so every run stays bounded whatever it
holds:

- its output is read as a stream, for the caller to parse as it comes: at most
  ``MAX_DEBUGFS_OUTPUT`` (64 MiB) per run (TooLarge past it, saying what the run was
  doing), handed out in line pieces of at most 64 KiB;
- it has a :class:`Deadline`, shared by the runs of one call, and is killed when it
  passes (ToolFailed saying so);
- it runs under ``prlimit`` with ``DEBUGFS_MEMORY_LIMIT`` (256 MiB) of address space, no
  core dumps and no file writes.
"""

from __future__ import annotations

import math
import os
import secrets
import selectors
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from pyro_mcp.errors import HostToolMissing, InvalidArgument, NotFound, TooLarge, ToolFailed
from pyro_mcp.runtime.host_tools import require

_MIB = 1 << 20
MAX_DEBUGFS_OUTPUT = 64 * _MIB
DEBUGFS_MEMORY_LIMIT = 256 * _MIB  # debugfs needs a few MiB, even on a 16 TiB disk
_PIECE = 64 << 10  # the longest line piece parsed at once
_CHUNK = 64 << 10  # one read from, or write to, a debugfs pipe
_STDERR_KEPT = 64 << 10


def to_disk_bytes(text: str) -> bytes:
    # Names are bytes on disk; a str carries the bytes that are not UTF-8 as surrogates.
    return text.encode("utf-8", "surrogateescape")


def from_disk_bytes(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def quote_path(path: str) -> str:
    # debugfs reads a doubled quote inside quotes as one quote.
    return '"' + path.replace('"', '""') + '"'


def format_size(size: int) -> str:
    return f"{size // _MIB} MiB" if size % _MIB == 0 else f"{size} bytes"


def says_not_found(errors: str) -> bool:
    """True when debugfs's stderr says the path it was given does not exist."""
    return "File not found" in errors or "not found by ext2_lookup" in errors


def max_output_for(size: int) -> int:
    """A ``max_output`` for a run that delivers ``size`` bytes of stdout and is stopped
    there: those bytes, what arrives with the last chunk, and stderr."""
    return size + 2 * _CHUNK + _STDERR_KEPT


class Deadline:
    """The time one public call may take, shared by every debugfs run it makes."""

    def __init__(self, timeout_s: float) -> None:
        if (
            isinstance(timeout_s, bool)
            or not isinstance(timeout_s, int | float)
            or not math.isfinite(timeout_s)
            or timeout_s <= 0
        ):
            raise InvalidArgument(
                f"timeout_s must be a positive number of seconds, got {timeout_s!r}"
            )
        self.timeout_s = float(timeout_s)
        self._end = time.monotonic() + self.timeout_s

    def remaining(self) -> float:
        return self._end - time.monotonic()


def _prlimit() -> str:
    try:
        return require("prlimit")
    except HostToolMissing as exc:
        raise HostToolMissing(
            "host program 'prlimit' is not installed",
            hint="run `apt-get install util-linux`",
        ) from exc


class DebugfsRun:
    """One debugfs process over ``image``, opened read-only, its output read as a stream.

    It runs either one ``request`` (``debugfs -R``) or a ``script`` of commands written to
    its stdin. Bounds: it is killed when ``deadline`` passes (ToolFailed); at most
    ``max_output`` bytes of stdout and stderr together are read (TooLarge past it); lines
    are handed out in pieces of at most 64 KiB; only the first 64 KiB of stderr are kept;
    and it runs under ``prlimit`` with DEBUGFS_MEMORY_LIMIT bytes of address space, no core
    dumps and no file writes. ``doing`` ("listing /src") names the work in every error.
    Use it as a context manager: leaving kills it if it still runs.
    """

    def __init__(
        self,
        image: Path,
        doing: str,
        deadline: Deadline,
        *,
        request: str | None = None,
        script: bytes = b"",
        max_output: int | None = None,
    ) -> None:
        if not image.is_file():
            raise NotFound(f"workspace disk {image} does not exist")
        self.image, self.doing, self.deadline = image, doing, deadline
        self.max_output = MAX_DEBUGFS_OUTPUT if max_output is None else max_output
        argv = [_prlimit(), f"--as={DEBUGFS_MEMORY_LIMIT}", "--core=0", "--fsize=0", "--"]
        argv += [require("debugfs"), *(["-R", request] if request is not None else ["-f", "-"])]
        env = dict(os.environ, DEBUGFS_PAGER="__none__", PAGER="__none__")
        try:
            self._process = subprocess.Popen(
                [*argv, str(image)],
                stdin=subprocess.PIPE if script else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
        except OSError as exc:
            raise ToolFailed(
                f"cannot start debugfs to read the workspace disk {image}: {exc}"
            ) from exc
        self._selector = selectors.DefaultSelector()
        for stream, role in ((self._process.stdout, "out"), (self._process.stderr, "err")):
            assert stream is not None  # PIPE
            os.set_blocking(stream.fileno(), False)
            self._selector.register(stream.fileno(), selectors.EVENT_READ, role)
        if script:
            assert self._process.stdin is not None  # PIPE
            os.set_blocking(self._process.stdin.fileno(), False)
            self._selector.register(self._process.stdin.fileno(), selectors.EVENT_WRITE, "in")
        self._script = memoryview(script)
        self._buffer = bytearray()
        self._stderr = bytearray()
        self._total = 0
        self._open = {"out", "err"}
        self._discard = False
        self._closed = False

    def __enter__(self) -> DebugfsRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill debugfs if it still runs, reap it, and close the pipes (once)."""
        if self._closed:
            return
        self._closed = True
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        self._selector.close()
        for stream in (self._process.stdin, self._process.stdout, self._process.stderr):
            if stream is not None:
                stream.close()

    def readline(self) -> bytes:
        """The next line of stdout with its line end, or the next 64 KiB of a longer one;
        b"" once stdout has ended."""
        while True:
            end = self._buffer.find(b"\n", 0, _PIECE)
            if end >= 0:
                return self._take(end + 1)
            if len(self._buffer) >= _PIECE or "out" not in self._open:
                return self._take(min(_PIECE, len(self._buffer)))
            self._pump()

    def read(self, size: int) -> bytes:
        """The next ``size`` bytes of stdout; fewer only if it ended first."""
        while len(self._buffer) < size and "out" in self._open:
            self._pump()
        return self._take(min(size, len(self._buffer)))

    def finish(self) -> str:
        """Let debugfs end (the rest of stdout is dropped) and return its stderr.

        ToolFailed if it could not open the image, or stopped on a signal or an exit status
        that is not 0 (debugfs itself exits 0 even when a command fails).
        """
        self._discard = True
        self._buffer.clear()
        while self._open:
            self._pump()
        try:
            status = self._process.wait(max(0.0, self.deadline.remaining()))
        except subprocess.TimeoutExpired:
            self._timed_out()
        errors = self.stderr()
        if "while trying to open" in errors or "Filesystem not open" in errors:
            raise ToolFailed(
                f"debugfs cannot open {self.image} as an ext4 filesystem",
                stderr_tail=errors.strip()[-2000:],
            )
        if status != 0:
            how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
            raise ToolFailed(
                f"debugfs stopped ({how}) while {self.doing} on the workspace disk {self.image}",
                hint=self.damaged_hint(),
                stderr_tail=errors.strip()[-2000:],
            )
        return errors

    def stderr(self) -> str:
        return self._stderr.decode("utf-8", "replace")

    def damaged_hint(self) -> str:
        return (
            f"debugfs runs with a {format_size(DEBUGFS_MEMORY_LIMIT)} memory limit; the disk may "
            f"be damaged: check it with `e2fsck -fn {self.image}`"
        )

    def _take(self, size: int) -> bytes:
        with memoryview(self._buffer) as view:
            data = bytes(view[:size])  # one copy: a slice of the bytearray would make two
        del self._buffer[:size]
        return data

    def _pump(self) -> None:
        """Wait once for output (or room for the script), within the deadline and the cap."""
        remaining = self.deadline.remaining()
        if remaining <= 0:
            self._timed_out()
        for key, _ in self._selector.select(remaining):
            if key.data == "in":
                self._feed_script(key.fd)
                continue
            try:
                chunk = os.read(key.fd, _CHUNK)
            except BlockingIOError:
                continue
            if not chunk:
                self._selector.unregister(key.fd)
                self._open.discard(key.data)
                continue
            self._total += len(chunk)
            if self._total > self.max_output:
                self.close()
                raise TooLarge(
                    f"debugfs printed more than {format_size(self.max_output)} while {self.doing} "
                    f"on the workspace disk {self.image}",
                    hint=f"the disk may be damaged or hostile: check it with "
                    f"`e2fsck -fn {self.image}`",
                )
            if key.data == "err":
                self._stderr += chunk[: max(0, _STDERR_KEPT - len(self._stderr))]
            elif not self._discard:
                self._buffer += chunk

    def _feed_script(self, fd: int) -> None:
        try:
            written = os.write(fd, self._script[:_CHUNK])
        except BlockingIOError:
            return
        except BrokenPipeError:
            written = len(self._script)  # debugfs ended early; finish() says why
        self._script = self._script[written:]
        if not self._script:
            self._selector.unregister(fd)
            assert self._process.stdin is not None
            self._process.stdin.close()

    def _timed_out(self) -> NoReturn:
        self.close()
        raise ToolFailed(
            f"the workspace disk {self.image} could not be read in "
            f"{self.deadline.timeout_s:g} s: debugfs was stopped while {self.doing}",
            hint="the disk may be damaged or hold a very large tree: read a smaller part of "
            f"it, or check it with `e2fsck -fn {self.image}`",
        )


def frame_commands(commands: list[str]) -> tuple[bytes, list[bytes]]:
    """A debugfs script of ``commands`` and the marks that frame their output.

    debugfs prints a script's comment lines as they are, in order with the output, so a
    comment holding a random token before each command (and one after the last) frames
    each command's output; the guest cannot guess the token to forge a frame in a name.
    """
    token = secrets.token_hex(16)
    marks = [f"#pyro-{token} {index}\n".encode() for index in range(len(commands) + 1)]
    script = b"".join(
        mark + to_disk_bytes(command) + b"\n"
        for mark, command in zip(marks[:-1], commands, strict=True)
    )
    return script + marks[-1], marks


def framed_output(run: DebugfsRun, marks: list[bytes]) -> Iterator[tuple[int, bytes]]:
    """``(command index, piece)`` for each line piece of each framed command's output, in
    order (the frames themselves are left out). ToolFailed if the output ends before the
    last command's has."""
    index = -1
    while True:
        piece = run.readline()
        if not piece:
            errors = run.finish()
            raise ToolFailed(
                f"debugfs stopped before it finished {run.doing} on the workspace disk {run.image}",
                hint=run.damaged_hint(),
                stderr_tail=errors.strip()[-2000:],
            )
        mark = marks[index + 1]
        if piece.endswith(mark):  # after cat's output, a frame can end a line
            if index >= 0 and len(piece) > len(mark):
                yield index, piece[: -len(mark)]
            index += 1
            if index == len(marks) - 1:
                run.finish()
                return
        elif index >= 0:
            yield index, piece
