"""`pyro doctor`: KVM classification, backend verdicts, and a report that never crashes."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from pyro_mcp.runtime import doctor, host_probe
from pyro_mcp.runtime.paths import RuntimePaths

INTEL_FLAGS = "fpu vme de pse tsc msr pae mce vmx ept lm"
PVM_FLAGS = "fpu vme de pse tsc msr pae mce lm hypervisor"


def fake_root(
    tmp_path: Path,
    *,
    flags: str | None = None,
    proc_modules: list[str] | None = None,
    sys_modules: tuple[str, ...] = (),
    kvm_device: bool = True,
) -> Path:
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    if flags is not None:
        (root / "proc/cpuinfo").write_text(
            f"processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: {flags}\n\n"
            f"processor\t: 1\nflags\t\t: {flags}\n"
        )
    if proc_modules is not None:
        (root / "proc/modules").write_text(
            "".join(f"{name} 1234 0 - Live 0x0000000000000000\n" for name in proc_modules)
        )
    for name in sys_modules:
        (root / "sys/module" / name / "parameters").mkdir(parents=True)
    if kvm_device:
        (root / "dev").mkdir()
        (root / "dev/kvm").touch()
    return root


def allow(path: Path) -> bool:
    return True


# --- KVM kind ---------------------------------------------------------------------------


def test_hardware_kvm_is_recognised_from_flags_and_vendor_module(tmp_path: Path) -> None:
    root = fake_root(tmp_path, flags=INTEL_FLAGS, proc_modules=["kvm_intel", "kvm", "tun"])
    kvm = host_probe.probe_kvm(root, access=allow)
    assert kvm.kind == "hardware"
    assert kvm.hardware
    assert kvm.flags == ["vmx"]
    assert kvm.modules == ["kvm", "kvm_intel"]
    assert any("vmx" in line for line in kvm.evidence)


def test_pvm_built_in_is_nested_paravirtual(tmp_path: Path) -> None:
    # This machine's shape: no /proc/modules (no module support), PVM built in.
    root = fake_root(tmp_path, flags=PVM_FLAGS, sys_modules=("kvm", "kvm_pvm", "virtio"))
    kvm = host_probe.probe_kvm(root, access=allow)
    assert kvm.kind == "nested-paravirtual"
    assert not kvm.hardware
    assert kvm.modules == ["kvm", "kvm_pvm"]
    assert "cpu flags: no vmx/svm" in kvm.evidence
    assert "kvm_pvm" in kvm.summary


def test_pvm_loaded_as_a_module_is_nested_paravirtual(tmp_path: Path) -> None:
    root = fake_root(tmp_path, flags=PVM_FLAGS, proc_modules=["kvm_pvm", "kvm"])
    kvm = host_probe.probe_kvm(root, access=allow)
    assert kvm.kind == "nested-paravirtual"
    assert any("kvm_pvm (/proc/modules)" in line for line in kvm.evidence)


def test_no_dev_kvm_is_absent(tmp_path: Path) -> None:
    root = fake_root(tmp_path, flags=INTEL_FLAGS, proc_modules=[], kvm_device=False)
    kvm = host_probe.probe_kvm(root)
    assert kvm.kind == "absent"
    assert not kvm.device_present and not kvm.device_accessible


def test_dev_kvm_without_evidence_is_unknown(tmp_path: Path) -> None:
    root = fake_root(tmp_path)  # no cpuinfo, no module lists
    kvm = host_probe.probe_kvm(root, access=allow)
    assert kvm.kind == "unknown"
    assert "/proc/cpuinfo unreadable" in kvm.evidence


# --- backends ---------------------------------------------------------------------------

QEMU = {"path": "/usr/bin/qemu-system-x86_64", "version": "7.2.22"}


def verdicts(tmp_path: Path, root: Path, *, binaries_ok: bool, qemu: Any = QEMU) -> Any:
    kvm = host_probe.probe_kvm(root, access=allow)
    paths = RuntimePaths(tmp_path / "cache")
    return doctor.backends_section(kvm, qemu, {"ok": binaries_ok}, paths)


def test_hardware_kvm_with_verified_binaries_selects_firecracker(tmp_path: Path) -> None:
    root = fake_root(tmp_path, flags=INTEL_FLAGS, proc_modules=["kvm_intel", "kvm"])
    result = verdicts(tmp_path, root, binaries_ok=True)
    assert result["firecracker"]["usable"]
    assert result["qemu"]["accel"] == "kvm"
    assert result["selected"] == "firecracker"


def test_hardware_kvm_without_binaries_selects_qemu_with_kvm(tmp_path: Path) -> None:
    root = fake_root(tmp_path, flags=INTEL_FLAGS, proc_modules=["kvm_intel", "kvm"])
    result = verdicts(tmp_path, root, binaries_ok=False)
    assert not result["firecracker"]["usable"]
    assert "pyro runtime fetch" in result["firecracker"]["reason"]
    assert result["selected"] == "qemu (KVM)"


def test_pvm_selects_qemu_with_tcg_and_says_why(tmp_path: Path) -> None:
    root = fake_root(tmp_path, flags=PVM_FLAGS, sys_modules=("kvm", "kvm_pvm"))
    result = verdicts(tmp_path, root, binaries_ok=True)
    firecracker = result["firecracker"]
    assert not firecracker["usable"]
    assert "tiny test guest" in firecracker["reason"]
    assert "stock Linux guests cannot boot" in firecracker["reason"]
    assert firecracker["tiny_guest"]
    assert result["qemu"]["accel"] == "tcg"
    assert result["selected"] == "qemu (TCG)"
    assert result["probe"] == "not run yet"


def test_no_qemu_and_no_hardware_kvm_selects_nothing(tmp_path: Path) -> None:
    root = fake_root(tmp_path, kvm_device=False)
    result = verdicts(tmp_path, root, binaries_ok=False, qemu={"path": None, "version": None})
    assert result["selected"] == "none"
    assert "qemu-system-x86" in result["qemu"]["reason"]


def test_a_cached_boot_probe_is_reported(tmp_path: Path) -> None:
    root = fake_root(tmp_path, flags=PVM_FLAGS, sys_modules=("kvm_pvm",))
    cache = tmp_path / "cache"
    cache.mkdir()
    probe = {
        "chosen": "qemu-tcg",
        "environment": "debian:12",
        "results": {
            "qemu-kvm": {"ok": False, "error": "QEMU exited"},
            "qemu-tcg": {"ok": True, "boot_ms": 2100.0},
        },
    }
    (cache / "probes.json").write_text(json.dumps(probe))
    result = verdicts(tmp_path, root, binaries_ok=True)
    assert result["qemu"]["probe"] == probe["results"]
    assert result["selected"] == "qemu-tcg"
    (cache / "probes.json").write_text("{broken")
    assert verdicts(tmp_path, root, binaries_ok=True)["probe"].startswith("error:")


# --- other probes -----------------------------------------------------------------------


def test_cgroup_layouts(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    (root / "sys/fs/cgroup/unified").mkdir(parents=True)
    (root / "sys/fs/cgroup/unified/cgroup.controllers").write_text("hugetlb\n")
    (root / "proc/cgroups").write_text(
        "#subsys_name\thierarchy\tnum_cgroups\tenabled\n"
        "cpu\t1\t1\t1\nmemory\t4\t50\t1\nhugetlb\t0\t1\t1\n"
    )
    (root / "proc/mounts").write_text(
        "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n"
        "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
    )
    hybrid = host_probe.probe_cgroups(root)
    assert hybrid["version"] == "hybrid"
    assert hybrid["v1_controllers"] == ["cpu", "memory"]
    assert hybrid["v2_controllers"] == ["hugetlb"]

    (root / "proc/mounts").write_text("cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n")
    assert host_probe.probe_cgroups(root)["version"] == "v2"
    (root / "proc/mounts").write_text("")
    assert host_probe.probe_cgroups(root)["version"] == "none"


def test_lock_is_read_as_it_is(tmp_path: Path) -> None:
    paths = RuntimePaths(tmp_path / "cache")
    assert doctor.lock_section(paths)["message"] == "no lock yet: run `pyro runtime bundle`"

    paths.cache_dir.mkdir()
    paths.lock_path.write_text("{not json")
    assert doctor.lock_section(paths)["status"] == "error"

    lock = {
        "components": {"firecracker": {"version": "v1.12.1", "problems": []}},
        "capabilities": {"vm_boot": True, "guest_exec": True, "guest_network": False},
        "capability_reasons": {"guest_network": "no check has proven it on this host"},
    }
    paths.lock_path.write_text(json.dumps(lock))
    section = doctor.lock_section(paths)
    assert section["status"] == "ok"
    assert section["capabilities"] == lock["capabilities"]
    text = doctor.render_text({"lock": section})
    assert "guest_network  no: no check has proven it on this host" in text


def test_kernels_and_environments_are_optional(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = RuntimePaths(tmp_path / "cache")
    monkeypatch.setitem(sys.modules, "pyro_mcp.runtime.kernels", None)
    monkeypatch.setitem(sys.modules, "pyro_mcp.runtime.environments", None)
    assert doctor.kernels_section(paths)["status"] == "unavailable"
    assert doctor.environments_section(paths)["status"] == "unavailable"

    kernels = types.ModuleType("pyro_mcp.runtime.kernels")
    kernels.KERNEL_FLAVORS = ("source", "cloud")  # type: ignore[attr-defined]
    kernels.installed_kernel = lambda p, flavor: (  # type: ignore[attr-defined]
        {"version": "6.1.192", "path": Path("/k")} if flavor == "source" else None
    )
    monkeypatch.setitem(sys.modules, "pyro_mcp.runtime.kernels", kernels)
    section = doctor.kernels_section(paths)
    assert section["flavors"] == {"source": {"version": "6.1.192", "path": "/k"}, "cloud": None}


# --- the whole report -------------------------------------------------------------------


@pytest.fixture
def bare_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host with no programs at all."""
    monkeypatch.setattr(host_probe, "find_program", lambda name: None)
    monkeypatch.setattr(doctor, "find_program", lambda name: None)


def test_a_host_with_everything_missing_still_reports_and_renders(
    tmp_path: Path, bare_host: None
) -> None:
    root = tmp_path / "empty-root"
    root.mkdir()
    report = doctor.diagnose(RuntimePaths(tmp_path / "no-cache"), root=root)

    json.dumps(report)  # JSON-able
    assert report["kvm"]["kind"] == "absent"
    assert report["backends"]["selected"] == "none"
    assert report["lock"]["status"] == "missing"
    assert report["binaries"]["installed"] is False
    assert report["summary"][0].startswith("There is no KVM here: no backend")
    text = doctor.render_text(report)
    assert "[missing] qemu-system-x86_64" in text
    assert "apt-get install qemu-system-x86" in text
    assert "no lock yet: run `pyro runtime bundle`" in text


def test_a_failing_probe_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bare_host: None
) -> None:
    def broken(root: Path = Path("/")) -> Any:
        raise PermissionError("cpuinfo is locked away")

    monkeypatch.setattr(host_probe, "probe_kvm", broken)
    report = doctor.diagnose(RuntimePaths(tmp_path / "cache"), root=tmp_path)

    assert report["kvm"] == {"error": "PermissionError: cpuinfo is locked away"}
    assert "KVM probe failed" in report["summary"][0]
    assert "[error] kvm" in doctor.render_text(report)


def test_render_survives_an_empty_or_malformed_report() -> None:
    assert doctor.render_text({}).startswith("pyro doctor\n")
    text = doctor.render_text({"summary": "odd", "kvm": {"kind": "hardware"}, "cache": []})
    assert "[error] kvm" in text and "cannot render" in text


def test_this_host_in_full(tmp_path: Path) -> None:
    """Runs every real probe; the verdict depends on the machine, the shape does not."""
    report = doctor.diagnose(RuntimePaths(tmp_path / "cache"))
    assert report["kvm"]["kind"] in host_probe.KVM_KINDS
    assert report["backends"]["selected"]
    assert doctor.render_text(report).count("\n") > 20


# --- the runtime's platform (pyro-mcp 3.x's --platform) ---------------------------------


def test_the_platform_section_names_this_host_as_pyro_mcp_named_platforms() -> None:
    section = host_probe.probe_platform()
    assert section["name"] == "linux-x86_64"  # this machine (and CI)
    assert section["runtime_platform"] == "linux-x86_64"
    assert section["runtime_runs_here"] is True


def test_a_host_the_runtime_is_not_built_for_is_the_first_finding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bare_host: None
) -> None:
    monkeypatch.setattr(host_probe.platform, "machine", lambda: "aarch64")
    report = doctor.diagnose(RuntimePaths(tmp_path / "cache"), root=tmp_path)
    assert report["platform"]["runtime_runs_here"] is False
    assert report["summary"][0] == (
        "This host is linux-aarch64: pyro's runtime is built for linux-x86_64 only, "
        "so no guest can run here"
    )


def test_doctor_takes_the_one_platform_it_checks_and_refuses_another(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyro_mcp import InvalidArgument, Pyro
    from pyro_mcp.cli.main import main

    monkeypatch.setenv("PYRO_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["doctor", "--platform", "linux-x86_64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["platform"]["runtime_platform"] == "linux-x86_64"
    with pytest.raises(SystemExit) as exited:
        main(["doctor", "--platform", "linux-aarch64"])
    assert exited.value.code == 2
    assert "invalid choice: 'linux-aarch64' (choose from 'linux-x86_64')" in (
        capsys.readouterr().err
    )
    refused = "platform must be one of 'linux-x86_64', got 'linux-aarch64'"
    with pytest.raises(InvalidArgument, match=refused):
        Pyro().doctor(platform="linux-aarch64")
