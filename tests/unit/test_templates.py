"""The template store: keys, manifests, verification and pruning (no VM)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pyro_mcp.errors import IntegrityError, NotFound
from pyro_mcp.runtime.paths import RuntimePaths
from pyro_mcp.vmm import templates

INPUTS = {"environment": "debian:12", "vmm_version": "7.2.22", "mem_mib": 512}


@pytest.fixture
def paths(tmp_path: Path) -> RuntimePaths:
    return RuntimePaths(tmp_path / "cache", tmp_path / "run")


def _install(paths: RuntimePaths, inputs: dict[str, object] = INPUTS) -> templates.Template:
    staging = templates.staging_dir(paths)
    (staging / templates.STATE).write_bytes(b"device state")
    (staging / templates.ROOT).write_bytes(b"root disk")
    with (staging / templates.RAM).open("wb") as handle:
        handle.truncate(8 << 20)
        handle.seek(3 << 20)
        handle.write(b"guest memory")
    return templates.install(paths, dict(inputs), staging, 1234.5)


def test_an_installed_template_is_found_only_for_exactly_its_inputs(paths: RuntimePaths) -> None:
    template = _install(paths)
    assert templates.find(paths, dict(INPUTS)) == template
    assert templates.find(paths, {**INPUTS, "vmm_version": "8.2.0"}) is None
    assert templates.find(paths, {**INPUTS, "mem_mib": 1024}) is None
    assert template.key == templates.key_of(dict(INPUTS))
    assert template.to_dict()["build_ms"] == 1234.5
    for name in templates.FILES:
        assert oct((template.directory / name).stat().st_mode & 0o777) == "0o400"


def test_a_manifest_copied_under_another_key_is_not_taken_for_it(paths: RuntimePaths) -> None:
    template = _install(paths)
    other = {**INPUTS, "vmm_version": "9.0.0"}
    impostor = templates.templates_dir(paths) / templates.key_of(other)
    impostor.mkdir()
    for name in (*templates.FILES, templates.MANIFEST):
        (impostor / name).write_bytes((template.directory / name).read_bytes())
    assert templates.find(paths, other) is None  # its manifest names the other key
    manifest = json.loads((impostor / templates.MANIFEST).read_text())
    manifest["key"] = impostor.name
    (impostor / templates.MANIFEST).write_text(json.dumps(manifest))
    assert templates.find(paths, other) is None  # and its inputs are not the ones asked for


@pytest.mark.parametrize("name", templates.FILES)
def test_one_changed_byte_in_any_file_fails_verification(paths: RuntimePaths, name: str) -> None:
    template = _install(paths)
    templates.verify(template)  # remembers what it checked
    path = template.directory / name
    path.chmod(0o600)
    with path.open("r+b") as handle:
        offset = (3 << 20) if name == templates.RAM else 0
        handle.seek(offset)
        first = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([first[0] ^ 1]))
    with pytest.raises(IntegrityError, match=f"{name} does not match its manifest"):
        templates.verify(template)


def test_a_missing_file_fails_verification(paths: RuntimePaths) -> None:
    template = _install(paths)
    (template.directory / templates.STATE).unlink()
    with pytest.raises(IntegrityError, match="state is missing"):
        templates.verify(template)


def test_prune_keeps_what_is_current_and_removes_the_rest(paths: RuntimePaths) -> None:
    current = _install(paths)
    stale = _install(paths, {**INPUTS, "vmm_version": "7.1.0"})
    dead_build = templates.templates_dir(paths) / ".build-999999999-1"
    dead_build.mkdir()
    junk = templates.templates_dir(paths) / "not-a-template"
    junk.mkdir()
    removed = templates.prune(paths, keep={current.key})
    assert sorted(removed) == sorted([stale.key, dead_build.name, junk.name])
    assert [t.key for t in templates.installed(paths)] == [current.key]
    assert templates.prune(paths, keep=set(), everything=True) == [current.key]


def test_get_finds_a_template_by_a_unique_key_prefix(paths: RuntimePaths) -> None:
    template = _install(paths)
    assert templates.get(paths, template.key[:8]) == template
    with pytest.raises(NotFound, match="no template with key 'zz'"):
        templates.get(paths, "zz")


def test_a_live_builds_staging_is_not_pruned(paths: RuntimePaths) -> None:
    staging = templates.staging_dir(paths)
    assert str(os.getpid()) in staging.name
    assert templates.prune(paths, keep=set()) == []
    assert staging.is_dir()
