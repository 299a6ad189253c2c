"""Backend selection by boot probe, not by the presence of ``/dev/kvm``.

Some hosts expose ``/dev/kvm`` through nested paravirtualization (PVM) that runs only
specially built guest kernels. So ``auto`` boots the real guest on each candidate
(Firecracker, QEMU+KVM, QEMU+TCG) with a bounded wait, runs a command in it, and picks
the fastest that worked. Results are cached in ``probes.json`` under a key made of
everything that could change the answer (host kernel, QEMU version, guest kernel,
environment image, Firecracker digest).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyro_mcp.errors import InvalidArgument, PyroError, RuntimeMissing

if TYPE_CHECKING:
    from pyro_mcp.runtime.paths import RuntimePaths
    from pyro_mcp.vmm.launch import BackendChoice

BACKEND_NAMES = ("auto", "firecracker", "qemu")
BACKEND_ENV = "PYRO_BACKEND"
PROBE_REVISION = 1
PROBE_BOOT_TIMEOUT_S = 30.0
Progress = Callable[[str], None]


def _quiet(_message: str) -> None:
    return None


def candidates(paths: RuntimePaths) -> list[tuple[BackendChoice, str | None]]:
    """Every backend this host might run, with the reason it is skipped (None: probe it)."""
    from pyro_mcp.runtime import binaries
    from pyro_mcp.runtime.host_probe import probe_kvm
    from pyro_mcp.vmm.launch import BackendChoice

    kvm = probe_kvm()
    no_kvm = None if kvm.device_accessible else "/dev/kvm is missing or not accessible"
    fc_skip = no_kvm
    if fc_skip is None and kvm.kind != "hardware":
        # Firecracker has no software fallback: on nested paravirtual KVM (PVM) it runs
        # only the tiny test guest, and a stock kernel dies there after ~36 s.
        fc_skip = f"KVM here is {kvm.kind}: Firecracker cannot boot stock Linux guests on it"
    if fc_skip is None and binaries.installed_binaries(paths) is None:
        fc_skip = "Firecracker is not installed (`pyro runtime fetch`)"
    return [
        (BackendChoice("firecracker", "kvm", "Firecracker on KVM"), fc_skip),
        (BackendChoice("qemu", "kvm", "QEMU with KVM"), no_kvm),
        (BackendChoice("qemu", "tcg", "QEMU with TCG (software emulation)"), None),
    ]


def probe_environment(paths: RuntimePaths) -> str:
    """The environment probes boot: the default one if installed, else any installed one."""
    from pyro_mcp.runtime import environments, pins

    installed = [info.name for info in environments.list_environments(paths) if info.installed]
    if pins.DEFAULT_ENVIRONMENT in installed:
        return pins.DEFAULT_ENVIRONMENT
    if not installed:
        raise RuntimeMissing(
            "no environment is installed to probe backends with",
            hint=f"run `pyro env pull {pins.DEFAULT_ENVIRONMENT}`",
        )
    return installed[0]


def probe_key(paths: RuntimePaths, environment: str) -> str:
    import platform

    from pyro_mcp.runtime import binaries, environments, kernels, lock
    from pyro_mcp.runtime.digests import sha256_json
    from pyro_mcp.runtime.host_probe import probe_kvm

    kernel = kernels.installed_kernel(paths, kernels.default_flavor())
    fc = binaries.installed_binaries(paths)
    return sha256_json(
        {
            "revision": PROBE_REVISION,
            "host_kernel": platform.release(),
            "qemu": lock.qemu_version(),
            "kernel": kernel.key if kernel else None,
            "image": environments.inspect_environment(paths, environment).get("image_sha256"),
            "firecracker": fc.sha256.get("firecracker") if fc else None,
            "kvm": probe_kvm().kind,
        }
    )


def probe_backend(paths: RuntimePaths, choice: BackendChoice, environment: str) -> dict[str, Any]:
    """Boot the real guest on one backend, run ``uname -r`` in it, and time it."""
    from pyro_mcp.runtime import kernels
    from pyro_mcp.vmm.launch import discard_vm, prepare_vm, start_owned

    started = time.monotonic()
    vm = None
    try:
        vm = prepare_vm(paths, environment=environment, choice=choice, mem_mib=256)
        start_owned(vm)
        agent = vm.wait_ready(PROBE_BOOT_TIMEOUT_S)
        boot_ms = (time.monotonic() - started) * 1000
        result = agent.exec(["uname", "-r"], timeout_s=10)
        release = result.stdout.decode().strip()
        expected = kernels.installed_kernel(paths, kernels.default_flavor())
        ok = result.exit_code == 0 and expected is not None and release == expected.release
        return {
            "ok": ok,
            "boot_ms": round(boot_ms, 1),
            "guest_kernel": release,
            "error": None if ok else f"uname -r gave {release!r} (exit {result.exit_code})",
        }
    except PyroError as exc:
        first = str(exc).splitlines()[0]
        return {"ok": False, "boot_ms": None, "error": first[:300]}
    finally:
        if vm is not None:
            discard_vm(vm)


def run_probes(
    paths: RuntimePaths, *, progress: Progress = _quiet, refresh: bool = False
) -> dict[str, Any]:
    """The probe results for this host, from the cache unless anything changed."""
    from pyro_mcp.runtime.jsonfile import read_json, write_json_atomic

    environment = probe_environment(paths)
    key = probe_key(paths, environment)
    cached = read_json(paths.probes_path)
    if not refresh and isinstance(cached, dict) and cached.get("key") == key:
        return cached
    results: dict[str, Any] = {}
    for choice, skip in candidates(paths):
        if skip is not None:
            results[choice.label] = {"ok": False, "skipped": skip}
            continue
        progress(f"boot probe: {choice.reason}")
        results[choice.label] = probe_backend(paths, choice, environment)
    working = [(r["boot_ms"], label) for label, r in results.items() if r.get("ok")]
    chosen = min(working)[1] if working else None
    report = {
        "key": key,
        "environment": environment,
        "probed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
        "chosen": chosen,
    }
    write_json_atomic(paths.probes_path, report)
    return report


def _choice_from_label(label: str, reason: str) -> BackendChoice:
    from pyro_mcp.vmm.launch import BackendChoice

    if label == "firecracker":
        return BackendChoice("firecracker", "kvm", reason)
    backend, accel = label.split("-", 1)
    return BackendChoice(backend, accel, reason)


def choose_backend(
    paths: RuntimePaths, requested: str | None = None, *, progress: Progress = _quiet
) -> BackendChoice:
    """The backend to use: ``requested``, else ``$PYRO_BACKEND``, else the probe's pick."""
    wanted = requested or os.environ.get(BACKEND_ENV) or "auto"
    if wanted not in BACKEND_NAMES:
        raise InvalidArgument(
            f"unknown backend {wanted!r}; choose one of {', '.join(BACKEND_NAMES)}"
        )
    report = run_probes(paths, progress=progress)
    results: dict[str, Any] = report["results"]
    if wanted == "auto":
        if report.get("chosen") is None:
            raise RuntimeMissing(
                "no backend booted a guest on this host",
                hint="see `pyro doctor` for each backend's probe result",
            )
        label = str(report["chosen"])
        return _choice_from_label(label, f"fastest working backend by boot probe ({label})")
    labels = [label for label in results if label.split("-")[0] == wanted]
    working = [label for label in labels if results[label].get("ok")]
    if not working:
        why = "; ".join(
            f"{label}: {results[label].get('skipped') or results[label].get('error')}"
            for label in labels
        )
        raise RuntimeMissing(
            f"backend {wanted} cannot boot guests here: {why}",
            hint="use --backend auto, or see `pyro doctor`",
        )
    best = min(working, key=lambda label: results[label]["boot_ms"])
    return _choice_from_label(best, f"requested {wanted}")
