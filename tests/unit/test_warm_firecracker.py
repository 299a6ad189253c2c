"""Warm starts on Firecracker, against the fake Firecracker (tests/fake_vmm): this host
cannot boot a Linux guest under Firecracker, so what is proven here is pyro's side of it:
the template is a Firecracker snapshot taken after the agent said hello, and a later VM
of the same shape is loaded from it (never booted) and re-identified through its agent."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.fake_vmm.harness import FakeHostFactory

from pyro_mcp.vmm import templates
from pyro_mcp.vmm.firecracker import snapshot as firecracker_snapshot

KINDS = pytest.mark.parametrize("jailed", [True, False], ids=["jailed", "direct"])


@KINDS
def test_a_firecracker_workspace_is_loaded_from_its_template(
    fake_host: FakeHostFactory, jailed: bool
) -> None:
    host = fake_host(jailed=jailed)
    workspaces = host.open()
    first = workspaces.create("debian:12", disk_mib=16)
    plan = workspaces.boot_plans[first.id]
    assert plan.mode == "warm" and "built now" in plan.reason, plan
    second = workspaces.create("debian:12", disk_mib=16)
    again = workspaces.boot_plans[second.id]
    assert again.mode == "warm" and again.template == plan.template
    assert "built now" not in again.reason
    (template,) = templates.installed(host.paths)
    assert template.backend == "firecracker"
    for name in templates.FIRECRACKER_FILES:
        path = template.directory / name
        assert oct(path.stat().st_mode & 0o777) == "0o444", (
            name
        )  # read by any jail, by none written
    assert firecracker_snapshot.Snapshot.load(template.directory).drive_count == 2
    log = Path(f"{host.log}.restored").read_text()
    restored = [line.split()[1] for line in log.splitlines() if line.startswith("restored ")]
    assert restored == [first.id, second.id]  # both were loaded from the snapshot, not booted
    for record in (first, second):
        with workspaces.agent(record.id, "exec") as client:
            assert client.exec(["echo", "up"]).stdout == b"up\n"
    assert not any(t.key != template.key for t in templates.installed(host.paths))


def test_a_firecracker_template_of_another_release_is_not_used(
    fake_host: FakeHostFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = fake_host(jailed=False)
    workspaces = host.open()
    first = workspaces.create("debian:12", disk_mib=16)
    old_key = workspaces.boot_plans[first.id].template
    from dataclasses import replace

    from pyro_mcp.runtime import binaries

    newer = replace(host.binaries, version="v1-fake")
    monkeypatch.setattr(binaries, "installed_binaries", lambda paths: newer)
    second = workspaces.create("debian:12", disk_mib=16)
    plan = workspaces.boot_plans[second.id]
    assert plan.template != old_key and "built now" in plan.reason
