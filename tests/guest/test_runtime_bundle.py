"""The runtime bundle on this host: lock, capabilities proven by real guests, integrity."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.leftovers import network_leftovers

from pyro_mcp.api import Context
from pyro_mcp.api.operations.runtime import runtime_bundle
from pyro_mcp.api.operations.vm import vm_run
from pyro_mcp.runtime import kernel_artifact, kernels
from pyro_mcp.runtime.digests import sha256_file
from pyro_mcp.runtime.host_probe import probe_kvm
from pyro_mcp.runtime.jsonfile import read_json
from pyro_mcp.runtime.paths import RuntimePaths

pytestmark = pytest.mark.guest
PYRO = [sys.executable, "-m", "pyro_mcp.cli.main"]


def _pyro(
    paths: RuntimePaths, *args: str, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYRO_CACHE_DIR=str(paths.cache_dir), PYRO_RUN_DIR=str(paths.run_root))
    return subprocess.run([*PYRO, *args], capture_output=True, text=True, env=env, timeout=timeout)


def _clone_cache(
    runtime: RuntimePaths, destination: Path, *, copy_images: bool = False
) -> RuntimePaths:
    """A private cache sharing the built artifacts (hard links; images copied on request)."""
    clone = RuntimePaths(destination, runtime.run_root)
    clone.ensure()
    for name in ("bin", "kernels", "environments", "downloads"):
        source = runtime.cache_dir / name
        if source.exists():
            shutil.rmtree(clone.cache_dir / name)
            shutil.copytree(source, clone.cache_dir / name, copy_function=os.link)
    shutil.rmtree(clone.images_dir)
    shutil.copytree(
        runtime.images_dir, clone.images_dir, copy_function=shutil.copy2 if copy_images else os.link
    )
    return clone


def test_bundle_proves_boot_and_exec_with_a_real_guest(
    runtime: RuntimePaths, tmp_path: Path
) -> None:
    paths = _clone_cache(runtime, tmp_path / "cache")
    lock = runtime_bundle(Context(paths=paths))
    assert lock["capabilities"]["vm_boot"] is True, lock["capability_reasons"]
    assert lock["capabilities"]["guest_exec"] is True, lock["capability_reasons"]
    assert lock["capabilities"]["guest_network"] is True, lock["capability_reasons"]
    assert "fetched a page from 203.0.113.1" in lock["capability_reasons"]["guest_network"]
    assert network_leftovers(paths.run_root) == []  # the check's namespaces went, whole
    components = lock["components"]
    assert {"firecracker", "jailer", "qemu", "kernel-source", "env:debian:12"} <= set(components)
    assert components["firecracker"]["version"] == "v1.12.1"
    assert all(not c["problems"] for c in components.values())
    assert read_json(paths.lock_path) == json.loads(json.dumps(lock, default=str))


def test_a_placeholder_kernel_forces_every_capability_false(
    runtime: RuntimePaths, tmp_path: Path
) -> None:
    paths = _clone_cache(runtime, tmp_path / "cache")
    assert runtime_bundle(Context(paths=paths))["capabilities"]["guest_exec"] is True
    kernel = kernels.installed_kernel(paths, "source")
    assert kernel is not None
    # A placeholder whose recorded digest matches: only the content check can catch it.
    kernel.vmlinux.unlink()  # a hard link: never write through it into the shared cache
    kernel.vmlinux.write_bytes(b"placeholder kernel\n")
    meta = kernel_artifact.read_metadata(kernel.directory)
    assert meta is not None
    meta["files"]["vmlinux"] = kernel_artifact.file_record(kernel.vmlinux)
    (kernel.directory / kernel_artifact.METADATA_NAME).unlink()
    kernel_artifact.write_metadata(kernel.directory, meta)

    lock = runtime_bundle(Context(paths=paths))
    assert lock["capabilities"] == {"vm_boot": False, "guest_exec": False, "guest_network": False}
    for reason in lock["capability_reasons"].values():
        assert "kernel-source" in reason


def test_verify_fails_clearly_after_one_byte_of_an_image_changes(
    runtime: RuntimePaths, tmp_path: Path
) -> None:
    paths = _clone_cache(runtime, tmp_path / "cache", copy_images=True)
    assert _pyro(paths, "runtime", "verify").returncode == 0
    inspected = json.loads(_pyro(paths, "env", "inspect", "debian:12", "--json").stdout)
    image = Path(inspected["image_path"])
    image.chmod(0o644)
    with image.open("r+b") as handle:
        handle.seek(image.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    result = _pyro(paths, "runtime", "verify")
    assert result.returncode == 1
    assert "env:debian:12" in result.stderr
    assert "sha256" in result.stderr
    assert "pyro env pull" in result.stderr or "materialize" in result.stderr


def test_env_pull_then_inspect_shows_the_digests(runtime: RuntimePaths) -> None:
    pulled = _pyro(runtime, "env", "pull", "debian:12-base")
    assert pulled.returncode == 0, pulled.stderr
    data = json.loads(_pyro(runtime, "env", "inspect", "debian:12-base", "--json").stdout)
    assert data["installed"] is True
    assert data["image_sha256"] == sha256_file(Path(data["image_path"]))
    assert Path(data["image_path"]).name == f"{data['image_sha256']}.ext4"
    assert "python3-minimal" in data["installed_packages"]
    listed = json.loads(_pyro(runtime, "env", "list", "--json").stdout)["environments"]
    assert {row["name"]: row["installed"] for row in listed}["debian:12-base"] is True


def test_doctor_names_the_kvm_kind_and_the_backend_guests_use(runtime: RuntimePaths) -> None:
    result = _pyro(runtime, "doctor", "--json")
    assert result.returncode == 0
    report = json.loads(result.stdout)
    assert report["kvm"]["kind"] == probe_kvm().kind
    probes = read_json(runtime.probes_path)
    assert report["backends"]["selected"] == probes["chosen"]
    text = _pyro(runtime, "doctor").stdout
    if probe_kvm().kind == "nested-paravirtual":
        assert "KVM here is nested paravirtual" in text
        assert "guests will run under QEMU with TCG" in text


def test_the_cloud_kernel_fallback_boots_a_real_guest(
    runtime: RuntimePaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _clone_cache(runtime, tmp_path / "cache")
    monkeypatch.setenv(kernels.FLAVOR_ENV, "cloud")
    kernel = kernels.ensure_kernel(paths, "cloud")
    assert kernel.initramfs is not None
    result = vm_run(Context(paths=paths), "debian:12", ["uname", "-r"])
    assert result["exit_code"] == 0
    assert result["stdout"].strip() == kernel.release
