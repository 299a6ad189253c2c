"""A TCG guest is told the host's real TSC frequency, so its clock keeps host time.

The guest's own clock is checked against the host's in
tests/guest/test_agent_guest.py::test_guest_time_keeps_pace_with_the_host (and its drift over a
minute is a row of ``make bench``)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from pyro_mcp.vmm.base import Disk, VMSpec
from pyro_mcp.vmm.qemu import tsc
from pyro_mcp.vmm.qemu.vm import kernel_command_line


def _kernel_tsc_khz() -> float | None:
    """The host kernel's own calibration of its TSC, from its log, if it can be read."""
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.findall(r"(?:Refined TSC clocksource calibration:|tsc: Detected) ([\d.]+) MHz", log)
    return float(found[-1]) * 1000 if found else None


def test_the_measured_tsc_frequency_is_the_one_the_host_kernel_calibrated() -> None:
    reference = _kernel_tsc_khz()
    if reference is None:
        pytest.skip("the host kernel's log does not say its TSC frequency")
    assert abs(tsc.measure_khz() - reference) / reference < 0.001


def test_a_tcg_guest_is_given_the_measured_frequency_and_matching_loops_per_jiffy(
    tmp_path: Path,
) -> None:
    spec = VMSpec("clock", tmp_path, tmp_path / "vmlinux", Disk(tmp_path / "root.ext4"))
    khz = tsc.host_tsc_khz()
    assert abs(khz - tsc.measure_khz()) / khz < 0.001
    args = kernel_command_line(spec, "tcg").split()
    assert f"tsc_early_khz={khz}" in args and f"lpj={khz * 1000 // tsc.GUEST_HZ}" in args
    assert not any(
        a.startswith(("tsc_early_khz", "lpj")) for a in kernel_command_line(spec, "kvm").split()
    )


def test_an_implausible_cached_frequency_is_measured_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "tsc-khz"
    cache.write_text("5\n")
    monkeypatch.setattr(tsc, "CACHE_FILE", cache)
    tsc.host_tsc_khz.cache_clear()
    try:
        assert tsc.host_tsc_khz() in tsc.SANE_KHZ
    finally:
        tsc.host_tsc_khz.cache_clear()
