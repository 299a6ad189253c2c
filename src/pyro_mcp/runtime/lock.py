"""runtime.lock.json: what this host's runtime is made of, and what it has proven.

The lock is derived, never edited by hand: ``write_lock`` gathers every component's
version and digests from the artifacts' own metadata, verifies them, and then decides the
capabilities.

Safety rule for capabilities (``vm_boot``, ``guest_exec``, ``guest_network``): one is true
only when

1. a real check proved it on this host (recorded by :func:`record_check` in
   ``checks.json``, together with the digests of the artifacts it ran against), and
2. those digests are still the digests of the installed artifacts, and
3. no component is a placeholder, shim or unverified download (every component verified
   without a problem).

Anything else sets every capability to false, with the reason.

The same rule, per environment, decides what an environment has proven
(:func:`environment_capabilities`): a passed check that names that environment's image
and the installed kernel, from the host-wide checks or from the environment's own
(``pyro env prove``, recorded with ``environment=``). A capability an artifact pulled from
a registry claims is never taken: only checks run here count.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

from pyro_mcp.runtime import binaries, environments, kernels
from pyro_mcp.runtime.host_probe import probe_qemu
from pyro_mcp.runtime.jsonfile import read_json, write_json_atomic
from pyro_mcp.runtime.paths import RuntimePaths

LOCK_SCHEMA = 1
CAPABILITIES = ("vm_boot", "guest_exec", "guest_network")

Component = dict[str, Any]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def qemu_version() -> str | None:
    version = probe_qemu().get("version")
    return str(version) if version else None


def collect_components(paths: RuntimePaths, *, deep: bool) -> dict[str, Component]:
    """Every installed component with its version, digests and problems.

    ``deep`` re-hashes every file (slow for large images); otherwise only cheap checks.
    """
    components: dict[str, Component] = {}

    found = binaries.installed_binaries(paths)
    problems = binaries.verify_binaries(paths) if found else ["not installed"]
    for name in ("firecracker", "jailer"):
        components[name] = {
            "kind": "binary",
            "version": found.version if found else None,
            "sha256": found.sha256.get(name) if found else None,
            "source": found.source if found else None,
            "problems": [p for p in problems if name in p or p == "not installed"],
        }

    for flavor in kernels.KERNEL_FLAVORS:
        kernel = kernels.installed_kernel(paths, flavor)
        if kernel is None:
            continue
        components[f"kernel-{flavor}"] = {
            "kind": "kernel",
            **kernel.to_dict(),
            "problems": kernels.verify_kernel(kernel, deep=deep),
        }

    for info in environments.list_environments(paths):
        if not info.installed:
            continue
        components[f"env:{info.name}"] = {
            "kind": "environment",
            **info.to_dict(),
            "problems": environments.verify_environment(paths, info.name, deep=deep),
        }
    for name, component in components.items():
        if component["kind"] == "environment":
            proven = environment_capabilities(paths, name.removeprefix("env:"), components)
            component["proven"] = sorted(c for c, d in proven.items() if d["proven"])

    qemu = qemu_version()
    components["qemu"] = {
        "kind": "host-package",
        "version": qemu,
        "problems": [] if qemu else ["qemu-system-x86_64 not installed"],
    }
    return components


def artifact_digests(components: dict[str, Component]) -> dict[str, str]:
    """The digest that identifies each component, for binding checks to artifacts."""
    digests: dict[str, str] = {}
    for name, component in components.items():
        for key in ("sha256", "image_sha256", "key"):
            value = component.get(key)
            if isinstance(value, str):
                digests[name] = value
                break
    return digests


# --- checks ------------------------------------------------------------------------------


def checks_path(paths: RuntimePaths) -> Path:
    return paths.cache_dir / "checks.json"


def record_check(
    paths: RuntimePaths,
    capability: str,
    *,
    passed: bool,
    artifacts: dict[str, str],
    detail: str,
    environment: str | None = None,
) -> None:
    """Record the outcome of a real capability check against the given artifact digests
    (host-wide, or one environment's own when ``environment`` is given)."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}")
    checks = read_json(checks_path(paths)) or {}
    record = {
        "passed": passed,
        "artifacts": artifacts,
        "detail": detail,
        "checked_at": _now(),
        "host": platform.node(),
    }
    if environment is None:
        checks[capability] = record
    else:
        per_env = checks.setdefault("environments", {})
        per_env.setdefault(environment, {})[capability] = record
    write_json_atomic(checks_path(paths), checks)


def environment_capabilities(
    paths: RuntimePaths, name: str, components: dict[str, Component] | None = None
) -> dict[str, dict[str, Any]]:
    """Each capability of environment ``name``: proven here against its current image and
    the installed kernel (``proven`` True, with the check), or not (with the reason)."""
    components = components if components is not None else collect_components(paths, deep=False)
    current = artifact_digests(components)
    env_key = f"env:{name}"
    checks = read_json(checks_path(paths)) or {}
    own = dict(dict(checks.get("environments") or {}).get(name) or {})
    decided: dict[str, dict[str, Any]] = {}
    for capability in CAPABILITIES:
        reason = "no check has proven it on this host"
        decided[capability] = {"proven": False, "reason": reason}
        for check in (own.get(capability), checks.get(capability)):
            if not isinstance(check, dict):
                continue
            artifacts = dict(check.get("artifacts") or {})
            if env_key not in artifacts:
                continue
            stale = sorted(n for n, d in artifacts.items() if current.get(n) != d)
            problems = sorted(n for n in artifacts if components.get(n, {}).get("problems"))
            if not check.get("passed"):
                reason = f"its check failed: {check.get('detail', '')}"
            elif stale or problems:
                reason = "proven against other artifacts than those installed: " + ", ".join(
                    stale or problems
                )
            else:
                decided[capability] = {
                    "proven": True,
                    "artifacts": artifacts,
                    "checked_at": check.get("checked_at"),
                    "detail": check.get("detail", ""),
                }
                break
            decided[capability] = {"proven": False, "reason": reason}
    return decided


def decide_capabilities(
    components: dict[str, Component], checks: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Apply the safety rule: each capability with its value and the reason for it."""
    unverified = sorted(name for name, c in components.items() if c.get("problems"))
    current = artifact_digests(components)
    decided: dict[str, dict[str, Any]] = {}
    for capability in CAPABILITIES:
        check = checks.get(capability)
        if unverified:
            reason = "unverified or placeholder components: " + ", ".join(unverified)
            decided[capability] = {"value": False, "reason": reason}
        elif not isinstance(check, dict):
            decided[capability] = {"value": False, "reason": "no check has proven it on this host"}
        elif not check.get("passed"):
            decided[capability] = {
                "value": False,
                "reason": f"its check failed: {check.get('detail', '')}",
            }
        else:
            stale = sorted(
                name
                for name, digest in dict(check.get("artifacts", {})).items()
                if current.get(name) != digest
            )
            if stale or not check.get("artifacts"):
                decided[capability] = {
                    "value": False,
                    "reason": "proven against other artifacts than those installed: "
                    + (", ".join(stale) or "none recorded"),
                }
            else:
                decided[capability] = {
                    "value": True,
                    "reason": f"proven {check.get('checked_at')}: {check.get('detail', '')}",
                }
    return decided


# --- the lock ----------------------------------------------------------------------------


def build_lock(paths: RuntimePaths, *, deep: bool = True) -> dict[str, Any]:
    components = collect_components(paths, deep=deep)
    checks = read_json(checks_path(paths)) or {}
    decided = decide_capabilities(components, checks)
    return {
        "schema": LOCK_SCHEMA,
        "generated_at": _now(),
        "host": {"machine": platform.machine(), "kernel": platform.release()},
        "components": components,
        "capabilities": {name: d["value"] for name, d in decided.items()},
        "capability_reasons": {name: d["reason"] for name, d in decided.items()},
    }


def write_lock(paths: RuntimePaths, *, deep: bool = True) -> dict[str, Any]:
    """Rebuild runtime.lock.json from the installed artifacts and recorded checks."""
    lock = build_lock(paths, deep=deep)
    write_json_atomic(paths.lock_path, lock)
    return lock


def read_lock(paths: RuntimePaths) -> dict[str, Any] | None:
    value = read_json(paths.lock_path)
    return value if isinstance(value, dict) else None
