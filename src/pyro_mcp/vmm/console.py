"""A VM's serial console, kept bounded: one small pump process per VM.

A guest can write to its console as fast as it likes (``cat /dev/zero > /dev/ttyS0``), and
the run directory is usually on a tmpfs (host RAM). So a VMM never writes the console to a
file itself: it writes to a pipe, and the pump appends what arrives to ``console.log``;
once that file passes half of ``max_bytes`` it becomes ``console.log.1`` (replacing the
older half) and a new ``console.log`` starts. The two together never hold more than
``max_bytes`` plus one read, and always the latest output: what a boot error shows.

The pump runs in its own session, so it outlives the pyro process that booted a
workspace, and exits when the VMM closes its end of the pipe (the VMM exited). It is this
file run as a script (stdlib only, ``python -I -S``): a few MiB and milliseconds per VM.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CONSOLE_MAX_BYTES = 2 << 20
READ_SIZE = 64 << 10


def start_pump(log: Path, max_bytes: int = CONSOLE_MAX_BYTES) -> int:
    """Start the pump for ``log``; the write end of its pipe, for the VMM's console.

    The caller passes the fd to the VMM and closes its own copy once the VMM started. The
    log exists when this returns (readers need not wait for the pump).
    """
    os.close(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    read_end, write_end = os.pipe()
    try:
        subprocess.Popen(
            [sys.executable, "-I", "-S", __file__, str(log), str(max_bytes)],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return write_end


def rotated(log: Path) -> Path:
    """Where the older half of the console is kept."""
    return log.with_name(log.name + ".1")


def read_tail(log: Path, max_bytes: int) -> bytes:
    """The last ``max_bytes`` of the console (the rotated half first); b"" when none."""
    parts = []
    for path in (log, rotated(log)):
        try:
            with path.open("rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - max_bytes))
                parts.append(handle.read())
        except OSError:
            parts.append(b"")
        if sum(len(p) for p in parts) >= max_bytes:
            break
    return b"".join(reversed(parts))[-max_bytes:]


def pump(source: int, log: Path, max_bytes: int) -> None:
    """Copy ``source`` into ``log`` until end of file, rotating at half of ``max_bytes``."""
    half = max(READ_SIZE, max_bytes // 2)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    size = os.fstat(out).st_size
    try:
        while chunk := os.read(source, READ_SIZE):
            if size >= half:
                os.replace(log, rotated(log))
                os.close(out)
                out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                size = 0
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view) :]
            size += len(chunk)
    finally:
        os.close(out)


def main(argv: list[str]) -> int:
    try:
        pump(0, Path(argv[1]), int(argv[2]))
    except OSError:
        # The run directory is gone (the VM was cleaned up): drain until the VMM exits,
        # so it never blocks on a full pipe.
        while os.read(0, READ_SIZE):
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
