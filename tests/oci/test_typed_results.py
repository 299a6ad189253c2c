"""The environment operations that need a registry or a build return what their TypedDicts
declare (pyro_mcp.api.results): a build with the stand-in debootstrap, a publish to the
loopback registry, a pull from it into a fresh cache, an import of an OCI layout, and the
manifest each of them leaves, as inspect shows it. No VM: the proof a pull runs is the
guest tests' business, here it is the recorded one."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.oci.conftest import ENV, make_cache, prove
from tests.oci_images import write_layout
from tests.registry import Registry
from tests.result_checks import CheckedCalls
from tests.unit.test_oci_layers import fake_python_tree

import pyro_mcp
from pyro_mcp.api import Context
from pyro_mcp.api.operations import runtime as runtime_ops
from pyro_mcp.runtime.paths import RuntimePaths

COVERED = {"env_build", "env_publish", "env_pull", "env_import"}
call = CheckedCalls()


def test_build_publish_pull_and_import_return_what_they_declare(
    built: RuntimePaths,
    registries: tuple[Registry, Registry],
    credentials: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    auth, anonymous = registries
    publisher = Context(paths=built)
    custom = call(publisher, "env_build", "typed:1", ["jq"])
    assert (custom["name"], custom["installed"]) == ("typed:1", True)
    assert call(publisher, "env_inspect", "typed:1")["source"]["extra_packages"] == ["jq"]

    prove(built, ENV)
    published = call(publisher, "env_publish", ENV, to=f"{auth.host}/pyro/{ENV}")
    assert [blob["action"] for blob in published["blobs"]] == ["uploaded", "uploaded"]
    again = call(publisher, "env_publish", ENV, to=f"{auth.host}/pyro/{ENV}")
    assert [blob["action"] for blob in again["blobs"]] == ["present", "present"]
    assert again["bytes_uploaded"] == 0

    fresh = Context(paths=make_cache(tmp_path / "fresh"))
    proofs: list[str] = []

    def recorded_proof(ctx: Context, name: str) -> list[str]:
        proofs.append(name)
        return ["guest_exec", "vm_boot"]

    monkeypatch.setattr(runtime_ops, "prove_environment", recorded_proof)
    pulled = call(fresh, "env_pull", ENV, registry=f"{anonymous.host}/pyro", no_templates=True)
    assert pulled["obtained"]["kind"] == "registry"
    assert (pulled["proven"], proofs) == (["guest_exec", "vm_boot"], [ENV])
    assert "templates" not in pulled
    assert call(fresh, "env_inspect", ENV)["published_by"] == pyro_mcp.__version__
    assert call(fresh, "env_pull", ENV, no_templates=True)["obtained"] == {"kind": "installed"}

    tree = tmp_path / "tree"
    fake_python_tree(tree)
    layout = tmp_path / "layout"
    write_layout(layout, [_tar(tree)])
    imported = call(fresh, "env_import", "tools:1", oci_layout=str(layout))
    assert (imported["installed"], imported["source"]["kind"]) == (True, "import")
    inspected = call(fresh, "env_inspect", "tools:1")
    assert inspected["image_config"] is not None and inspected["packages"] == []
    rows = {row["name"]: row for row in call(fresh, "env_list")["environments"]}
    assert rows[ENV]["installed"] and rows["tools:1"]["installed"]
    assert call.called >= COVERED


def _tar(root: Path) -> bytes:
    from tests.oci.test_env_custom import tree_tar

    return tree_tar(root)
