"""Custom environments without a VM: images imported from a real loopback registry and
from a docker archive, and Debian environments with extra packages (a stand-in
debootstrap). The guest tests boot what these make."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from tests.oci.conftest import TOKEN, USER, make_cache
from tests.oci_images import push_layout, write_layout
from tests.registry import Registry
from tests.unit.test_oci_layers import fake_python_tree

from pyro_mcp.api import Context
from pyro_mcp.api.operations.environments import env_build, env_import, env_publish
from pyro_mcp.errors import InvalidArgument, InvalidState, NotFound
from pyro_mcp.runtime import environments, rootfs
from pyro_mcp.runtime.paths import RuntimePaths

Pair = tuple[Registry, Registry]


def tree_tar(root: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(root.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(root)), recursive=False)
    return buffer.getvalue()


@pytest.fixture
def agent_ready_layer(tmp_path: Path) -> bytes:
    """A layer with what the agent needs (python3 and its modules, /bin/sh) and a file."""
    root = tmp_path / "image-tree"
    fake_python_tree(root)
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=madehere\n")
    return tree_tar(root)


@pytest.fixture
def cache(tmp_path: Path) -> RuntimePaths:
    return make_cache(tmp_path / "cache")


def test_an_image_from_a_registry_imports_and_lists_like_any_environment(
    registries: Pair, cache: RuntimePaths, agent_ready_layer: bytes, tmp_path: Path
) -> None:
    auth, anonymous = registries
    write_layout(tmp_path / "layout", [agent_ready_layer])
    push_layout(tmp_path / "layout", f"{auth.host}/team/tools:2", USER, TOKEN)
    ctx = Context(paths=cache)
    said: list[str] = []
    ctx.progress = said.append
    info = env_import(ctx, "tools:2", source=f"{anonymous.host}/team/tools:2")
    assert info["installed"] is True
    assert info["source"]["kind"] == "import"  # type: ignore[index]
    assert info["source"]["from"] == f"{anonymous.host}/team/tools:2"  # type: ignore[index]
    assert "applying 1 layers of " + f"{anonymous.host}/team/tools:2" in said
    assert environments.verify_environment(cache, "tools:2") == []
    listed = {row.name: row for row in environments.list_environments(cache)}
    assert listed["tools:2"].installed
    manifest = environments.read_manifest(cache, "tools:2")
    assert manifest is not None
    image = environments.image_for(cache, "tools:2")
    inside = subprocess.run(
        ["debugfs", "-R", "cat /etc/os-release", str(image)], capture_output=True, check=True
    )
    assert inside.stdout == b"ID=madehere\n"  # the layer's file, in the packed image
    with pytest.raises(InvalidState) as caught:  # not proven here, so not published
        env_publish(ctx, "tools:2", to=f"{auth.host}/team/tools:3")
    assert "capabilities were not proven on this host" in caught.value.message
    environments.prune(cache)
    assert environments.image_for(cache, "tools:2") == image  # prune keeps what is installed


def test_an_image_without_python_is_refused_naming_it_and_nothing_is_installed(
    cache: RuntimePaths, tmp_path: Path
) -> None:
    root = tmp_path / "bare"
    (root / "bin").mkdir(parents=True)
    (root / "bin/sh").write_text("#!\n")
    (root / "bin/sh").chmod(0o755)
    layer_tar = tree_tar(root)
    diff_id = "sha256:" + hashlib.sha256(layer_tar).hexdigest()
    config = {"os": "linux", "architecture": "amd64", "rootfs": {"diff_ids": [diff_id]}}
    archive = tmp_path / "bare.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in (
            ("manifest.json", json.dumps([{"Config": "c.json", "Layers": ["l/layer.tar"]}])),
            ("c.json", json.dumps(config)),
            ("l/layer.tar", layer_tar),
        ):
            body = data.encode() if isinstance(data, str) else data
            entry = tarfile.TarInfo(name)
            entry.size = len(body)
            tar.addfile(entry, io.BytesIO(body))
    with pytest.raises(InvalidArgument) as caught:
        env_import(Context(paths=cache), "bare:1", docker_archive=str(archive))
    assert caught.value.message == (
        f"the docker archive {archive} cannot run the pyro guest agent: no usable python3: "
        "/usr/bin/python3 is missing or not executable (the pyro agent runs on the image's "
        "own Python >= 3.10 with its standard library; install python3 in the image)"
    )
    assert environments.read_manifest(cache, "bare:1") is None
    assert list(cache.images_dir.iterdir()) == []
    assert list(cache.work_dir.iterdir()) == []


def test_an_image_for_another_architecture_in_a_registry_is_refused(
    registries: Pair, cache: RuntimePaths, agent_ready_layer: bytes, tmp_path: Path
) -> None:
    auth, anonymous = registries
    write_layout(tmp_path / "layout", [agent_ready_layer], arch="arm64")
    push_layout(tmp_path / "layout", f"{auth.host}/team/arm:1", USER, TOKEN)
    with pytest.raises(InvalidArgument) as caught:
        env_import(Context(paths=cache), "arm:1", source=f"{anonymous.host}/team/arm:1")
    assert caught.value.message == (
        f"{anonymous.host}/team/arm:1 is an image for linux/arm64; pyro runs linux/amd64 guests"
    )
    assert environments.read_manifest(cache, "arm:1") is None


def test_a_tag_the_registry_does_not_have_is_not_found_for_an_import(
    registries: Pair, cache: RuntimePaths
) -> None:
    with pytest.raises(NotFound) as caught:
        env_import(Context(paths=cache), "nothing:1", source=f"{registries[1].host}/team/none:1")
    assert f"{registries[1].host}/team/none:1" in caught.value.message


def test_an_import_names_exactly_one_source_and_not_a_catalog_name(
    cache: RuntimePaths, tmp_path: Path
) -> None:
    ctx = Context(paths=cache)
    with pytest.raises(InvalidArgument) as none:
        env_import(ctx, "x:1")
    assert none.value.message == "name exactly one of --from, --oci-layout, --docker-archive"
    with pytest.raises(InvalidArgument) as catalog:
        env_import(ctx, "debian:12", oci_layout=str(tmp_path))
    assert catalog.value.message == "debian:12 is a catalog environment; import under another name"


def test_env_build_adds_packages_to_its_base(
    cache: RuntimePaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.unit.test_environments import fake_debootstrap

    asked: list[object] = []
    fake = fake_debootstrap([])

    def recording(tree: Path, **kwargs: object) -> None:
        asked.append(kwargs["packages"])
        fake(tree, **kwargs)  # type: ignore[operator]

    monkeypatch.setattr(rootfs, "run_debootstrap", recording)
    info = env_build(Context(paths=cache), "mytools:1", packages=["jq,curl", "jq"])
    base = next(s for s in environments.ENVIRONMENTS if s.name == "debian:12")
    wanted = rootfs.tree_packages(sorted(set(base.packages) | {"jq", "curl"}))
    assert sorted(asked[0]) == sorted(wanted)  # type: ignore[call-overload]
    assert info["installed"] is True
    assert info["source"] == {
        "kind": "debootstrap",
        "from": "debian:12",
        "extra_packages": ["curl", "jq"],
        "suite": "bookworm",
        "mirror": "http://deb.debian.org/debian",
    }
    manifest = environments.read_manifest(cache, "mytools:1")
    assert manifest is not None and "jq" in manifest["packages"]
    assert environments.verify_environment(cache, "mytools:1") == []


@pytest.mark.parametrize(
    ("name", "packages", "base", "message"),
    [
        ("mine:1", ["jq;rm -rf /"], "debian:12", "'jq;rm -rf /' is not a Debian package name"),
        ("mine:1", [" , "], "debian:12", "--packages names no package"),
        (
            "debian:12",
            ["jq"],
            "debian:12",
            "debian:12 is a catalog environment; choose another name",
        ),
        ("Mine/../x", ["jq"], "debian:12", "'Mine/../x' is not a valid environment name"),
    ],
)
def test_env_build_refuses_bad_input_before_anything_runs(
    cache: RuntimePaths,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    packages: list[str],
    base: str,
    message: str,
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("debootstrap was started")

    monkeypatch.setattr(rootfs, "run_debootstrap", refuse)
    with pytest.raises(InvalidArgument) as caught:
        env_build(Context(paths=cache), name, packages=packages, base=base)
    assert caught.value.message == message


def test_env_build_from_an_unknown_base_is_not_found(cache: RuntimePaths) -> None:
    with pytest.raises(NotFound):
        env_build(Context(paths=cache), "mine:1", packages=["jq"], base="nosuch:1")


def test_the_cli_with_json_gives_the_error_on_stdout_and_phase_events_on_stderr(
    tmp_path: Path,
) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    (root / "hello").write_text("hi\n")
    write_layout(tmp_path / "layout", [tree_tar(root)])
    env = dict(os.environ, PYRO_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run(
        [sys.executable, "-m", "pyro_mcp.cli.main", "env", "import", "hello:1",
         "--oci-layout", str(tmp_path / "layout"), "--json"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    error = json.loads(done.stdout)
    assert error["error"] == "invalid_argument"
    assert error["message"].startswith(f"the OCI layout {tmp_path / 'layout'} cannot run the")
    events = [json.loads(line) for line in done.stderr.splitlines()]
    assert [e["message"] for e in events] == [
        f"applying 1 layers of the OCI layout {tmp_path / 'layout'}",
        "layer 1/1 (0.0 MiB)",
    ]
    assert all(e["event"] == "progress" and e["elapsed_s"] >= 0 for e in events)
