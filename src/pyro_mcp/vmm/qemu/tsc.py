"""The host's TSC frequency, which a TCG guest must be told to keep true time.

Under TCG a guest's ``rdtsc`` reads the host's TSC, and the guest kernel is given its
frequency on the command line (``tsc_early_khz``) instead of calibrating it: calibration
under emulation is slow and, with several guests booting at once, hangs. A wrong value
makes guest time run fast or slow by the ratio (a 2.6 GHz guess on a 2.1 GHz host gave a
guest clock at 0.81 of real time). So the frequency is measured here, with the same
instruction the guest's reads turn into, against the host's raw monotonic clock.

One measurement takes ~50 ms; it is kept for the life of the host's boot in
``/run/pyro-mcp-tsc-khz`` (root only; /run is emptied at boot) and for this process.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import mmap
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_FILE = Path("/run/pyro-mcp-tsc-khz")
FALLBACK_KHZ = 2_600_000  # when the TSC cannot be read (not x86-64): time may drift
GUEST_HZ = 250  # the guest kernel's CONFIG_HZ (its default, which the build keeps)
SANE_KHZ = range(100_000, 10_000_001)  # 100 MHz .. 10 GHz
MEASURE_S = 0.05
# rdtsc; shl rdx, 32; or rax, rdx; ret: the 64-bit TSC as a C function's return value.
_RDTSC_X86_64 = bytes([0x0F, 0x31, 0x48, 0xC1, 0xE2, 0x20, 0x48, 0x09, 0xD0, 0xC3])


def _rdtsc() -> tuple[mmap.mmap, Callable[[], int]]:
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(_RDTSC_X86_64)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    function: Callable[[], int] = ctypes.CFUNCTYPE(ctypes.c_uint64)(address)
    return page, function


def _sample(rdtsc: Callable[[], int]) -> tuple[int, int]:
    """(tsc, ns): the pair of 20 whose clock reads were closest together."""
    best: tuple[int, int, int] | None = None
    for _ in range(20):
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW)
        tsc = rdtsc()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW)
        if best is None or after - before < best[0]:
            best = (after - before, tsc, (before + after) // 2)
    assert best is not None
    return best[1], best[2]


def measure_khz(duration_s: float = MEASURE_S) -> int:
    """The TSC's frequency in kHz, measured over ``duration_s``."""
    page, rdtsc = _rdtsc()
    try:
        tsc0, ns0 = _sample(rdtsc)
        time.sleep(duration_s)
        tsc1, ns1 = _sample(rdtsc)
    finally:
        del rdtsc
        with contextlib.suppress(BufferError):
            page.close()
    return round((tsc1 - tsc0) * 1_000_000 / (ns1 - ns0))


def _cached() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        khz = int(CACHE_FILE.read_text().strip())
        if khz in SANE_KHZ:
            return khz
    return None


def _remember(khz: int) -> None:
    if os.geteuid() != 0:
        return
    temporary = CACHE_FILE.with_name(f"{CACHE_FILE.name}.{os.getpid()}")
    with contextlib.suppress(OSError):
        temporary.write_text(f"{khz}\n")
        temporary.replace(CACHE_FILE)


@functools.cache
def host_tsc_khz() -> int:
    """The host's TSC frequency in kHz (measured once per host boot)."""
    khz = _cached()
    if khz is not None:
        return khz
    if platform.machine() not in ("x86_64", "AMD64"):
        log.warning("cannot read the TSC on %s: guest time may drift", platform.machine())
        return FALLBACK_KHZ
    khz = measure_khz()
    if khz not in SANE_KHZ:
        log.warning("measured a TSC of %d kHz, which is not plausible: guest time may drift", khz)
        return FALLBACK_KHZ
    _remember(khz)
    return khz


def tcg_clock_args() -> list[str]:
    """Kernel arguments that give a TCG guest the host's TSC frequency (and the matching
    loops-per-jiffy, so it skips that calibration too)."""
    khz = host_tsc_khz()
    return [f"tsc_early_khz={khz}", f"lpj={khz * 1000 // GUEST_HZ}", "tsc=reliable"]
