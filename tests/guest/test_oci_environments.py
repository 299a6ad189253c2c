"""Environments through a real registry, with real guests: publish debian:12 with
credentials, pull it anonymously into a fresh cache and boot it; a pull killed halfway
resumes to the same digests; an OCI image made here imported and booted."""

from __future__ import annotations

import io
import os
import secrets
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.oci_images import push_layout, write_layout
from tests.registry import Registry, ThrottledProxy, registry_pair

from pyro_mcp.api import Context
from pyro_mcp.api.operations.environments import (
    env_build,
    env_import,
    env_prove,
    env_publish,
    env_pull,
)
from pyro_mcp.api.operations.templates import template_prune
from pyro_mcp.api.operations.vm import vm_run
from pyro_mcp.runtime import env_obtain, environments, rootfs
from pyro_mcp.runtime.oci import blobs
from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.runtime.pins import ENVIRONMENTS

pytestmark = pytest.mark.guest

USER, TOKEN = "publisher", secrets.token_urlsafe(16)
ENV = "debian:12"


def log(message: str) -> None:
    print(f"[oci] {message}", file=sys.stderr, flush=True)


@pytest.fixture(scope="module")
def registries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, Registry]]:
    with registry_pair(tmp_path_factory.mktemp("registry"), {USER: TOKEN}) as pair:
        yield pair


@pytest.fixture(scope="module")
def published(
    runtime: RuntimePaths, registries: tuple[Registry, Registry]
) -> Iterator[dict[str, object]]:
    """debian:12 proven here and published with credentials (once for the module)."""
    saved = {k: os.environ.get(k) for k in ("PYRO_REGISTRY_USERNAME", "PYRO_REGISTRY_TOKEN")}
    os.environ["PYRO_REGISTRY_USERNAME"], os.environ["PYRO_REGISTRY_TOKEN"] = USER, TOKEN
    try:
        ctx = Context(paths=runtime)
        proven = env_prove(ctx, ENV)["capabilities"]
        assert {"guest_exec", "vm_boot"} <= set(proven), proven  # guest_network too, once proven
        result = env_publish(ctx, ENV, to=f"{registries[0].host}/pyro/debian:12")
        log(
            f"publish {ENV}: {result['seconds']} s, {result['bytes_uploaded']} bytes uploaded "
            f"(image {result['image_size']} bytes, zstd {result['compressed_size']})"
        )
        yield result
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def fresh_cache(runtime: RuntimePaths, where: Path) -> RuntimePaths:
    """An empty environment cache sharing the host's kernel and binaries (the artifact
    references its kernel; each host builds it from the same pins)."""
    where.mkdir()
    for shared in ("kernels", "bin"):
        (where / shared).symlink_to(runtime.cache_dir / shared)
    return RuntimePaths(where, runtime.run_root)


def test_publish_then_pull_anonymously_into_a_fresh_cache_and_boot(
    runtime: RuntimePaths,
    registries: tuple[Registry, Registry],
    published: dict[str, object],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, anonymous = registries
    source = environments.read_manifest(runtime, ENV)
    assert source is not None
    assert {"guest_exec", "vm_boot"} <= set(published["capabilities"])  # type: ignore[arg-type]
    monkeypatch.setenv("PYRO_REGISTRY", f"{anonymous.host}/pyro")
    fresh = fresh_cache(runtime, tmp_path / "cache")
    started = time.monotonic()
    result = env_pull(Context(paths=fresh), ENV, no_templates=True)
    seconds = time.monotonic() - started
    obtained = result["obtained"]
    log(
        f"pull {ENV} into a fresh cache: {obtained['seconds']} s to install, "
        f"{obtained['bytes_downloaded']} bytes downloaded; {seconds:.1f} s with the proof "
        f"(local debootstrap build: {source.get('build_seconds')} s, of which debootstrap "
        f"{source.get('debootstrap_seconds')} s)"
    )
    assert obtained["kind"] == "registry"
    assert obtained["manifest_digest"] == published["digest"]
    assert result["image_sha256"] == source["image_sha256"]
    assert environments.verify_environment(fresh, ENV) == []
    assert result["proven"] == ["guest_exec", "vm_boot"]  # booted and ran here
    ran = vm_run(Context(paths=fresh), ENV, ["cat", "/etc/debian_version"])
    assert ran["exit_code"] == 0
    assert ran["stdout"].split(".")[0] == "12"


def test_a_killed_pull_resumes_and_ends_with_the_same_digests(
    runtime: RuntimePaths,
    registries: tuple[Registry, Registry],
    published: dict[str, object],
    tmp_path: Path,
) -> None:
    _, anonymous = registries
    layer = published["blobs"][1]  # type: ignore[index]
    size = int(layer["size"])
    proxy = ThrottledProxy(anonymous.host, rate=size // 6)  # ~6 s for the whole blob
    fresh = fresh_cache(runtime, tmp_path / "cache")
    partial = blobs.partial_path(fresh, layer["digest"])
    env = dict(os.environ, PYRO_CACHE_DIR=str(fresh.cache_dir), PYRO_REGISTRY=f"{proxy.host}/pyro")
    pyro = Path(sys.executable).parent / "pyro"
    process = subprocess.Popen(
        [str(pyro), "env", "pull", ENV, "--no-templates", "--json"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if partial.exists() and partial.stat().st_size >= size // 3:
                break
            assert process.poll() is None, "the pull ended before it could be killed"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        proxy.close()
    held = partial.stat().st_size
    log(f"killed the pull with {held} of {size} bytes downloaded")
    assert 0 < held < size
    assert environments.read_manifest(fresh, ENV) is None  # nothing half-taken
    said: list[str] = []
    _, obtained = env_obtain.obtain(
        fresh, ENV, registry=f"{anonymous.host}/pyro", progress=said.append
    )
    assert f"{ENV} rootfs: resuming at {held / (1 << 20):.1f} of {size / (1 << 20):.1f} MiB" in said
    assert obtained["bytes_downloaded"] == size - held
    source = environments.read_manifest(runtime, ENV)
    pulled = environments.read_manifest(fresh, ENV)
    assert source is not None and pulled is not None
    assert pulled["image_sha256"] == source["image_sha256"]
    assert pulled["source"]["layer_digest"] == layer["digest"]
    assert environments.verify_environment(fresh, ENV) == []


def test_an_oci_image_made_here_imports_and_boots_with_its_whiteout_applied(
    runtime: RuntimePaths, registries: tuple[Registry, Registry], tmp_path: Path
) -> None:
    spec = next(s for s in ENVIRONMENTS if s.name == ENV)
    tree = runtime.rootfs_trees_dir / rootfs.tree_key(spec.packages) / "tree"
    assert (tree / "etc/motd").is_file()  # the lower layer has it; the upper one hides it
    lower = tmp_path / "lower.tar"
    subprocess.run(["tar", "-C", str(tree), "-cf", str(lower), "."], check=True)
    marker = secrets.token_hex(8)
    upper = tmp_path / "upper.tar.gz"
    with tarfile.open(upper, "w:gz") as tar:
        for name, data in (("pyro-marker", f"{marker}\n".encode()), ("etc/.wh.motd", b"")):
            entry = tarfile.TarInfo(name)
            entry.size = len(data)
            entry.mode = 0o644
            tar.addfile(entry, io.BytesIO(data))
    assert upper.read_bytes()[:2] == b"\x1f\x8b"  # a real gzip layer
    image = tmp_path / "image"
    write_layout(image, [lower, upper])
    ctx = Context(paths=runtime)
    name, from_registry = "imported-test:1", "imported-test:2"
    try:
        started = time.monotonic()
        info = env_import(ctx, name, oci_layout=str(image))
        log(f"import of a two-layer image: {time.monotonic() - started:.1f} s")
        assert info["installed"] is True
        assert info["source"]["kind"] == "import"  # type: ignore[index]
        listed = [row.name for row in environments.list_environments(runtime) if row.installed]
        assert name in listed
        ran = vm_run(
            ctx, name, ["sh", "-c", "cat /pyro-marker; ls /etc/motd 2>/dev/null || echo no-motd"]
        )
        assert ran["exit_code"] == 0
        assert ran["stdout"] == f"{marker}\nno-motd\n"
        assert ran["boot"]["mode"] == "warm", ran["boot"]  # a template, like any environment
        # The same image through a registry (--from, pulled anonymously) is the same
        # environment: same layers, same tree, the marker in it and the whiteout applied
        # (the image bytes differ: mke2fs copies each file's ctime).
        auth, anonymous = registries
        push_layout(image, f"{auth.host}/images/marked:1", USER, TOKEN)
        pulled = env_import(ctx, from_registry, source=f"{anonymous.host}/images/marked:1")
        assert pulled["source"]["from"] == f"{anonymous.host}/images/marked:1"  # type: ignore[index]
        first = environments.read_manifest(runtime, name)
        second = environments.read_manifest(runtime, from_registry)
        assert first is not None and second is not None
        assert second["tree_key"] == first["tree_key"]
        assert second["source"]["layers"] == first["source"]["layers"]
        pulled_image = str(environments.image_for(runtime, from_registry))
        inside = subprocess.run(
            ["debugfs", "-R", "cat /pyro-marker", pulled_image], capture_output=True, check=True
        )
        assert inside.stdout == f"{marker}\n".encode()
        motd = subprocess.run(
            ["debugfs", "-R", "stat /etc/motd", pulled_image], capture_output=True, text=True
        )
        assert "File not found by ext2_lookup" in motd.stderr
        assert environments.verify_environment(runtime, from_registry) == []
    finally:
        for imported in (name, from_registry):
            environments.manifest_path(runtime, imported).unlink(missing_ok=True)
        environments.prune(runtime)
        template_prune(ctx)


def test_a_debian_environment_with_an_extra_package_builds_and_boots(
    runtime: RuntimePaths,
) -> None:
    ctx = Context(paths=runtime)
    name = "with-jq:1"
    try:
        started = time.monotonic()
        info = env_build(ctx, name, packages=["jq"])
        log(f"env build debian:12 + jq: {time.monotonic() - started:.1f} s")
        assert info["installed"] is True
        ran = vm_run(ctx, name, ["sh", "-c", "jq --version; dpkg-query -W -f '${Status}' jq"])
        assert ran["exit_code"] == 0, ran["stderr"]
        assert ran["stdout"] == "jq-1.6\ninstall ok installed"
    finally:
        environments.manifest_path(runtime, name).unlink(missing_ok=True)
        environments.prune(runtime)
        template_prune(ctx)
