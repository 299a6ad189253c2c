"""Environments through a loopback OCI registry: publish (zstd + chunked upload), publish
again (every blob present), and an anonymous pull into an empty cache, beside the time a
local debootstrap build took on this host."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.registry import registry_pair

from bench.stats import Table
from pyro_mcp.api import Context
from pyro_mcp.api.operations.environments import env_prove, env_publish
from pyro_mcp.runtime import env_obtain, environments
from pyro_mcp.runtime.oci import blobs
from pyro_mcp.runtime.paths import RuntimePaths

MIB = 1 << 20
USER, TOKEN = "bench", "bench-token"


def measure_registry(table: Table, paths: RuntimePaths, environment: str, n: int) -> dict[str, Any]:
    publish = table.row(
        f"env publish {environment} (zstd + chunked upload, empty registry)", "ms", 0
    )
    again = table.row("  env publish again (every blob present)", "ms", 0)
    pull = table.row(f"env pull {environment} into an empty cache (anonymous, verified)", "ms", 0)
    moved = table.row("  bytes downloaded by that pull", "MiB", 1)
    image = table.row("  image installed by that pull (apparent size)", "MiB", 1)
    local = table.row(
        f"local debootstrap build of {environment} (recorded when built here)", "ms", 0
    )
    manifest = environments.read_manifest(paths, environment)
    if manifest is None:
        raise RuntimeError(f"{environment} is not installed")
    if manifest.get("build_seconds"):  # a reused tree's build did not include debootstrap
        seconds = float(manifest["build_seconds"])
        if manifest.get("tree_reused"):
            seconds += float(manifest.get("debootstrap_seconds") or 0)
        local.add(seconds * 1000)
    ctx = Context(paths=paths)
    env_prove(ctx, environment)
    saved = {k: os.environ.get(k) for k in ("PYRO_REGISTRY_USERNAME", "PYRO_REGISTRY_TOKEN")}
    os.environ["PYRO_REGISTRY_USERNAME"], os.environ["PYRO_REGISTRY_TOKEN"] = USER, TOKEN
    info: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="pyro-bench-registry-"))
    try:
        for index in range(n):
            with registry_pair(work / f"registry-{index}", {USER: TOKEN}) as (auth, anonymous):
                record = blobs.oci_dir(paths) / "compressed" / f"{manifest['image_sha256']}.json"
                record.unlink(missing_ok=True)  # compress again: part of what a publish costs
                started = time.monotonic()
                result = env_publish(ctx, environment, to=f"{auth.host}/pyro/{environment}")
                publish.add((time.monotonic() - started) * 1000)
                started = time.monotonic()
                env_publish(ctx, environment, to=f"{auth.host}/pyro/{environment}")
                again.add((time.monotonic() - started) * 1000)
                cache = RuntimePaths(work / f"cache-{index}", paths.run_root)
                started = time.monotonic()
                _, obtained = env_obtain.obtain(
                    cache, environment, registry=f"{anonymous.host}/pyro"
                )
                pull.add((time.monotonic() - started) * 1000)
                moved.add(obtained["bytes_downloaded"] / MIB)
                image.add(int(result["image_size"]) / MIB)
                info = {"publish": result, "pull": obtained}
                shutil.rmtree(cache.cache_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return info
