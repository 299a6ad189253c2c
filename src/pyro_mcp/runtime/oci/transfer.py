"""What every transfer shares: the ``PYRO_OCI_*`` tunables and a progress meter.

- ``PYRO_OCI_REQUEST_TIMEOUT_SECONDS`` (60): connect, and any wait for an answer or for
  the next bytes of a download;
- ``PYRO_OCI_UPLOAD_TIMEOUT_SECONDS`` (300): sending one upload chunk and its answer;
- ``PYRO_OCI_UPLOAD_CHUNK_SIZE_BYTES`` (8 MiB): the size of each ``PATCH``.

Each is read once per client; a bad value is an InvalidArgument naming the variable.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyro_mcp.errors import InvalidArgument

REQUEST_TIMEOUT_ENV = "PYRO_OCI_REQUEST_TIMEOUT_SECONDS"
UPLOAD_TIMEOUT_ENV = "PYRO_OCI_UPLOAD_TIMEOUT_SECONDS"
CHUNK_SIZE_ENV = "PYRO_OCI_UPLOAD_CHUNK_SIZE_BYTES"

Progress = Callable[[str], None]


def quiet(_message: str) -> None:
    """A progress sink that drops every line."""
    return None


# --- tunables -------------------------------------------------------------------------


@dataclass(frozen=True)
class Tunables:
    request_timeout_s: float = 60.0
    upload_timeout_s: float = 300.0
    chunk_bytes: int = 8 << 20

    @classmethod
    def from_env(cls) -> Tunables:
        """The three ``PYRO_OCI_*`` variables; InvalidArgument names a bad one."""
        default = cls()
        return cls(
            _seconds(REQUEST_TIMEOUT_ENV, default.request_timeout_s),
            _seconds(UPLOAD_TIMEOUT_ENV, default.upload_timeout_s),
            _chunk_bytes(default.chunk_bytes),
        )


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 < value <= 86_400:
        raise InvalidArgument(f"{name}={raw!r} is not a number of seconds in (0, 86400]")
    return value


def _chunk_bytes(default: int) -> int:
    raw = os.environ.get(CHUNK_SIZE_ENV, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not 4096 <= int(raw) <= 1 << 30:
        raise InvalidArgument(f"{CHUNK_SIZE_ENV}={raw!r} is not a byte count in [4096, 1 GiB]")
    return int(raw)


# --- progress -------------------------------------------------------------------------


@dataclass
class Meter:
    """Bytes, rate and ETA of one transfer, told at most once a second."""

    what: str
    total: int
    progress: Progress
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    told: float = 0.0

    def add(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.told >= 1.0 or self.done >= self.total:
            self.told = now
            self.progress(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.started, 1e-6)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else math.inf
        eta_text = f"{eta:.0f} s" if math.isfinite(eta) else "?"
        return (
            f"{self.what}: {mib(self.done)}/{mib(self.total)} MiB, "
            f"{rate / (1 << 20):.1f} MiB/s, ETA {eta_text}"
        )


def mib(count: int) -> str:
    return f"{count / (1 << 20):.1f}"
