"""Publish and pull environments through a real registry (Debian's docker-registry on
loopback), with a small environment built by a stand-in debootstrap: no VM here (the
guest tests boot what they pull)."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from tests.oci.conftest import ENV, TOKEN, USER, make_cache, prove
from tests.registry import Registry, free_port
from tests.unit.test_environments import fake_debootstrap

from pyro_mcp.api import Context
from pyro_mcp.api.operations.environments import env_publish
from pyro_mcp.errors import (
    BuildError,
    IntegrityError,
    InvalidState,
    NotFound,
    RegistryError,
)
from pyro_mcp.runtime import env_obtain, environments, lock, rootfs
from pyro_mcp.runtime.oci import blobs
from pyro_mcp.runtime.oci.registry import RegistryClient
from pyro_mcp.runtime.paths import RuntimePaths

Pair = tuple[Registry, Registry]


def publish(paths: RuntimePaths, registry: Registry, repo: str = "pyro") -> dict[str, object]:
    return env_publish(Context(paths=paths), ENV, to=f"{registry.host}/{repo}/debian:12-base")


@pytest.fixture
def published(built: RuntimePaths, registries: Pair, credentials: None) -> dict[str, object]:
    """ENV proven (recorded checks) and published to the registry that needs credentials."""
    prove(built, ENV)
    return publish(built, registries[0])


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RuntimePaths:
    """An empty cache where a local build would fail the test."""
    no_build(monkeypatch)
    return make_cache(tmp_path / "fresh")


def pull_from(registries: Pair) -> str:
    return f"{registries[1].host}/pyro"


def no_build(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a local build was started")

    monkeypatch.setattr(rootfs, "run_debootstrap", refuse)


def blob_data(registry: Registry, digest: str) -> Path:
    hex_digest = digest.removeprefix("sha256:")
    return registry.storage / f"docker/registry/v2/blobs/sha256/{hex_digest[:2]}/{hex_digest}/data"


def test_publish_refuses_an_environment_not_proven_here(
    built: RuntimePaths, registries: Pair, credentials: None
) -> None:
    auth, anonymous = registries
    with pytest.raises(InvalidState) as caught:
        publish(built, auth)
    assert caught.value.message.startswith(f"{ENV}'s capabilities were not proven on this host")
    assert "vm_boot: no check has proven it on this host" in caught.value.message
    assert (
        caught.value.hint
        == f"run `pyro env prove {ENV}` (boots it and runs a command), then publish"
    )
    status, _ = anonymous.get("/v2/pyro/debian/tags/list")
    assert status == 404  # nothing was pushed


def test_publish_refuses_a_proof_of_another_image(
    built: RuntimePaths, registries: Pair, credentials: None
) -> None:
    prove(built, ENV)
    manifest = environments.read_manifest(built, ENV)
    assert manifest is not None
    manifest["image_sha256"] = "0" * 64  # the proof no longer names the installed image
    checks = json.loads(lock.checks_path(built).read_text())
    checks["environments"][ENV]["vm_boot"]["artifacts"][f"env:{ENV}"] = "f" * 64
    lock.checks_path(built).write_text(json.dumps(checks))
    with pytest.raises(InvalidState) as caught:
        publish(built, registries[0])
    assert "vm_boot: proven against other artifacts than those installed: env:debian:12-base" in (
        caught.value.message
    )


def test_publish_without_credentials_says_how_to_give_them(
    built: RuntimePaths, registries: Pair
) -> None:
    prove(built, ENV)
    with pytest.raises(RegistryError) as caught:
        publish(built, registries[0])
    assert caught.value.message == f"publishing to {registries[0].host} needs credentials"
    assert "PYRO_REGISTRY_USERNAME and PYRO_REGISTRY_TOKEN" in str(caught.value.hint)


def test_wrong_credentials_name_the_registry_and_the_fix(
    built: RuntimePaths, registries: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    prove(built, ENV)
    monkeypatch.setenv("PYRO_REGISTRY_USERNAME", USER)
    monkeypatch.setenv("PYRO_REGISTRY_TOKEN", "wrong-token-value")
    with pytest.raises(RegistryError) as caught:
        publish(built, registries[0])
    text = str(caught.value)
    assert f"registry {registries[0].host} refused the credentials of user 'publisher'" in text
    assert "from PYRO_REGISTRY_USERNAME/PYRO_REGISTRY_TOKEN" in text
    assert "401 Unauthorized" in text
    assert "check the user name and token" in text
    assert "wrong-token-value" not in text


def test_publish_then_pull_anonymously_into_a_fresh_cache(
    built: RuntimePaths,
    registries: Pair,
    credentials: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    auth, anonymous = registries
    prove(built, ENV)
    published = publish(built, auth)
    source = environments.read_manifest(built, ENV)
    assert source is not None
    assert published["reference"] == f"{auth.host}/pyro/debian:12-base"
    assert published["capabilities"] == ["guest_exec", "vm_boot"]
    assert [b["action"] for b in published["blobs"]] == ["uploaded", "uploaded"]  # type: ignore[index]

    monkeypatch.delenv("PYRO_REGISTRY_USERNAME")
    monkeypatch.delenv("PYRO_REGISTRY_TOKEN")
    monkeypatch.setenv("PYRO_REGISTRY", f"{anonymous.host}/pyro")
    no_build(monkeypatch)
    fresh = make_cache(tmp_path / "fresh-cache")
    said: list[str] = []
    info, obtained = env_obtain.obtain(fresh, ENV, progress=said.append)
    assert obtained["kind"] == "registry"
    size_mib = f"{published['blobs'][1]['size'] / (1 << 20):.1f}"  # type: ignore[index]
    meter = re.compile(rf"^{re.escape(ENV)} rootfs: [0-9.]+/{size_mib} MiB, [0-9.]+ MiB/s, ETA ")
    told = [line for line in said if meter.match(line)]
    assert told, said  # bytes, rate and ETA were shown
    assert re.fullmatch(
        rf"{re.escape(ENV)} rootfs: {size_mib}/{size_mib} MiB, [0-9.]+ MiB/s, ETA 0 s", told[-1]
    )
    assert obtained["reference"] == f"{anonymous.host}/pyro/debian:12-base"
    assert obtained["manifest_digest"] == published["digest"]
    assert info.installed and not info.stale
    assert info.image_sha256 == source["image_sha256"]
    assert environments.verify_environment(fresh, ENV) == []
    pulled = environments.read_manifest(fresh, ENV)
    assert pulled is not None
    assert pulled["published_capabilities"] == ["guest_exec", "vm_boot"]
    assert pulled["installed_packages"] == source["installed_packages"]
    # The publisher's claims are not this host's: the lock claims nothing until proven here.
    component = lock.collect_components(fresh, deep=False)[f"env:{ENV}"]
    assert component["proven"] == []
    # Installed and current: a second pull asks nobody.
    assert env_obtain.obtain(fresh, ENV)[1] == {"kind": "installed"}


def test_publishing_again_moves_no_bytes_and_another_repository_mounts(
    built: RuntimePaths, registries: Pair, credentials: None
) -> None:
    auth, _ = registries
    prove(built, ENV)
    first = publish(built, auth)
    again = publish(built, auth)
    assert again["digest"] == first["digest"]
    assert again["bytes_uploaded"] == 0
    assert [b["action"] for b in again["blobs"]] == ["present", "present"]  # type: ignore[index]
    other = publish(built, auth, repo="mirror")
    assert other["bytes_uploaded"] == 0
    assert [b["action"] for b in other["blobs"]] == ["mounted", "mounted"]  # type: ignore[index]
    status, _ = auth.get("/v2/mirror/debian/manifests/12-base")
    assert status == 401  # needs credentials: the anonymous instance is the pull side


def test_docker_config_credentials_publish_and_the_secret_is_written_nowhere(
    built: RuntimePaths, registries: Pair, tmp_path: Path
) -> None:
    auth, _ = registries
    prove(built, ENV)
    config = tmp_path / "docker-config" / "config.json"
    config.parent.mkdir()
    encoded = base64.b64encode(f"{USER}:{TOKEN}".encode()).decode()
    config.write_text(json.dumps({"auths": {auth.host: {"auth": encoded}}}))
    result = publish(built, auth)
    assert result["bytes_uploaded"] == result["compressed_size"] + result["blobs"][0]["size"]  # type: ignore[index, operator]
    assert TOKEN not in json.dumps(result)
    found = subprocess.run(
        ["grep", "-rlF", "-e", TOKEN, "-e", encoded, str(built.cache_dir)],
        capture_output=True,
        text=True,
    )
    assert found.stdout == ""


def test_a_tag_that_does_not_exist_is_not_found(
    tmp_path: Path, registries: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_build(monkeypatch)
    fresh = make_cache(tmp_path / "fresh")
    with pytest.raises(NotFound) as caught:
        env_obtain.obtain(fresh, ENV, registry=f"{registries[1].host}/pyro")
    assert caught.value.message.startswith(
        f"{registries[1].host}/pyro/debian:12-base does not exist (MANIFEST_UNKNOWN"
    )
    assert environments.read_manifest(fresh, ENV) is None


def test_a_blob_that_does_not_match_its_digest_is_refused_and_removed(
    published: dict[str, object], registries: Pair, fresh: RuntimePaths
) -> None:
    layer = published["blobs"][1]["digest"]  # type: ignore[index]
    data = blob_data(registries[0], layer)
    original = data.read_bytes()
    data.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, one bit off
    with pytest.raises(IntegrityError) as caught:
        env_obtain.obtain(fresh, ENV, registry=pull_from(registries))
    assert f"{ENV} rootfs from {registries[1].host} hashes to sha256:" in caught.value.message
    assert caught.value.message.endswith(f"not {layer}; the download was removed")
    assert not blobs.partial_path(fresh, layer).exists()
    assert environments.read_manifest(fresh, ENV) is None
    data.write_bytes(original)  # repaired: the next pull starts clean and succeeds
    info, _ = env_obtain.obtain(fresh, ENV, registry=pull_from(registries))
    assert info.installed and environments.verify_environment(fresh, ENV) == []


def test_a_truncated_blob_is_not_taken_and_the_next_pull_resumes(
    published: dict[str, object], registries: Pair, fresh: RuntimePaths
) -> None:
    layer = published["blobs"][1]["digest"]  # type: ignore[index]
    data = blob_data(registries[0], layer)
    original = data.read_bytes()
    half = len(original) // 2
    data.write_bytes(original[:half])
    with pytest.raises(RegistryError) as caught:
        env_obtain.obtain(fresh, ENV, registry=pull_from(registries))
    assert f"ended after {half} of {len(original)} bytes (truncated)" in caught.value.message
    assert environments.read_manifest(fresh, ENV) is None
    assert blobs.partial_path(fresh, layer).stat().st_size == half
    data.write_bytes(original)
    said: list[str] = []
    info, _ = env_obtain.obtain(fresh, ENV, registry=pull_from(registries), progress=said.append)
    assert f"{ENV} rootfs: resuming at {half / (1 << 20):.1f} of" in "\n".join(said)
    assert info.installed and environments.verify_environment(fresh, ENV) == []


def test_a_manifest_whose_digest_does_not_match_is_refused(
    published: dict[str, object], registries: Pair, fresh: RuntimePaths
) -> None:
    digest = str(published["digest"])
    data = blob_data(registries[0], digest)
    document = json.loads(data.read_bytes())
    document["annotations"]["dev.pyro-mcp.environment"] = "tampered"
    data.write_bytes(json.dumps(document).encode())
    with pytest.raises(IntegrityError) as caught:
        env_obtain.obtain(fresh, ENV, registry=pull_from(registries))
    assert caught.value.message.startswith(
        f"the manifest of {registries[1].host}/pyro/debian:12-base hashes to sha256:"
    )
    assert caught.value.message.endswith(f"but the registry says it is {digest}; refused")
    assert environments.read_manifest(fresh, ENV) is None


def test_an_artifact_with_another_agent_is_built_locally_instead(
    published: dict[str, object],
    registries: Pair,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = rootfs.guest_files()
    changed = [*files, rootfs.GuestFile("opt/pyro/pyro_mcp/guest_agent/new.py", b"x = 1\n")]
    monkeypatch.setattr(rootfs, "guest_files", lambda: changed)
    monkeypatch.setattr(rootfs, "run_debootstrap", fake_debootstrap([]))
    paths = make_cache(tmp_path / "other-agent")
    info, obtained = env_obtain.obtain(paths, ENV, registry=pull_from(registries))
    assert obtained["kind"] == "debootstrap"
    assert obtained["why"] == (
        f"{pull_from(registries)}/debian:12-base was built by pyro 4.0.0.dev0 with another "
        "guest agent than this pyro's"
    )
    assert info.installed and not info.stale


def test_no_registry_or_an_unreachable_one_builds_locally_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rootfs, "run_debootstrap", fake_debootstrap([]))
    said: list[str] = []
    paths = make_cache(tmp_path / "one")
    _, obtained = env_obtain.obtain(paths, ENV, progress=said.append)
    assert obtained["why"] == "no registry is configured (PYRO_REGISTRY)"
    assert f"no registry is configured (PYRO_REGISTRY); building {ENV} locally" in said
    port = free_port()  # nothing listens there
    monkeypatch.setenv("PYRO_REGISTRY", f"127.0.0.1:{port}/pyro")
    _, obtained = env_obtain.obtain(make_cache(tmp_path / "two"), ENV)
    assert obtained["kind"] == "debootstrap"
    assert obtained["why"].startswith(
        f"cannot reach registry 127.0.0.1:{port} (the manifest of 127.0.0.1:{port}/pyro/"
        "debian:12-base): Connection refused"
    )


def test_a_disk_that_fills_during_a_pull_is_a_clear_error_and_installs_nothing(
    published: dict[str, object], registries: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_build(monkeypatch)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        paths = make_cache(small / "cache")
        with pytest.raises(BuildError) as caught:
            env_obtain.obtain(paths, ENV, registry=pull_from(registries))
        assert caught.value.message.startswith(
            f"pull {ENV}: no space left on device in {paths.cache_dir}"
        )
        assert caught.value.hint == "free disk space there or point PYRO_CACHE_DIR at a larger disk"
        assert environments.read_manifest(paths, ENV) is None
        assert list(paths.images_dir.iterdir()) == []
        assert list(paths.work_dir.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_registry_files_hold_no_stray_temp_after_a_pull(
    published: dict[str, object], registries: Pair, fresh: RuntimePaths
) -> None:
    env_obtain.obtain(fresh, ENV, registry=pull_from(registries))
    leftovers = [p.name for p in blobs.oci_dir(fresh).rglob("*") if ".partial" in p.name]
    assert leftovers == []
    assert os.listdir(fresh.work_dir) == []


def test_a_catalog_entrys_own_source_wins_over_pyro_registry(
    published: dict[str, object],
    registries: Pair,
    fresh: RuntimePaths,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYRO_REGISTRY", f"127.0.0.1:{free_port()}/nobody-listens")
    pinned = f"{registries[1].host}/pyro/debian:12-base"
    catalog = tuple(
        dataclasses.replace(spec, source=pinned) if spec.name == ENV else spec
        for spec in environments.ENVIRONMENTS
    )
    monkeypatch.setattr(environments, "ENVIRONMENTS", catalog)
    _, obtained = env_obtain.obtain(fresh, ENV)
    assert obtained["kind"] == "registry"
    assert obtained["reference"] == pinned


@pytest.mark.parametrize(
    ("host", "insecure", "scheme"),
    [
        ("registry.example.com", False, "https"),
        ("registry.example.com:5000", False, "https"),
        ("10.1.2.3:5000", False, "https"),
        ("registry.example.com", True, "http"),
        ("127.0.0.1:5000", False, "http"),
        ("127.8.9.10:5000", False, "http"),
        ("localhost:5000", False, "http"),
        ("[::1]:5000", False, "http"),
    ],
)
def test_plain_http_only_for_loopback_or_with_the_insecure_flag(
    host: str, insecure: bool, scheme: str
) -> None:
    client = RegistryClient(host, insecure=insecure)  # no request is sent
    assert client.url("/v2/") == f"{scheme}://{host}/v2/"
