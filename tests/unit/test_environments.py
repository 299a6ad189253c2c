"""Environments: manifests, the image store, verify and prune (no debootstrap).

The debootstrap step is replaced by a tiny fake tree; copying, packing (mke2fs -d) and
checking (e2fsck) are real.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pyro_mcp.errors import BuildError, HostToolMissing, NotFound, RuntimeMissing, ToolFailed
from pyro_mcp.guest_agent import init as guest_init
from pyro_mcp.runtime import env_obtain, environments, host_tools, rootfs
from pyro_mcp.runtime.digests import sha256_file
from pyro_mcp.runtime.paths import RuntimePaths

pytestmark = pytest.mark.skipif(
    host_tools.find_program("mke2fs") is None or host_tools.find_program("e2fsck") is None,
    reason="needs e2fsprogs (mke2fs, e2fsck)",
)

BASE = "debian:12-base"

STATUS = """Package: bash
Status: install ok installed
Architecture: amd64
Version: 5.2.15-2+b7
Description: GNU Bourne Again SHell
 multi-line description

Package: removed-thing
Status: deinstall ok config-files
Version: 1.0

Package: python3-minimal
Status: install ok installed
Version: 3.11.2-1+b1
"""


def fake_debootstrap(calls: list[str]) -> object:
    def run(tree: Path, *, suite: str, mirror: str, packages: object, deb_cache: Path) -> None:
        calls.append(str(tree))
        for directory in ("usr/bin", "usr/sbin", "etc", "var/lib/dpkg", "var/log/apt", "tmp"):
            (tree / directory).mkdir(parents=True, exist_ok=True)
        (tree / "sbin").symlink_to("usr/sbin")  # merged /usr, as in bookworm
        (tree / "bin").symlink_to("usr/bin")
        (tree / "usr/bin/hello").write_text("#!/bin/sh\necho hello\n")
        (tree / "etc/resolv.conf").write_text("nameserver 10.0.0.1\n")
        (tree / "var/lib/dpkg/status").write_text(STATUS)
        (tree / "var/lib/dpkg/status-old").write_text(STATUS)
        (tree / "var/log/dpkg.log").write_text("install bash\n")
        (tree / "var/log/apt/history.log").write_text("...\n")
        lists = tree / "var/lib/apt/lists"
        (lists / "partial").mkdir(parents=True)
        (lists / "deb.debian.org_Packages").write_text("x" * 1000)
        doc = tree / "usr/share/doc/bash"
        doc.mkdir(parents=True)
        (doc / "copyright").write_text("GPL\n")
        (doc / "changelog.gz").write_bytes(b"\0" * 100)
        (tree / "usr/share/man/man1").mkdir(parents=True)
        (tree / "usr/share/man/man1/bash.1.gz").write_bytes(b"\0" * 100)

    return run


@pytest.fixture
def paths(tmp_path: Path) -> RuntimePaths:
    return RuntimePaths(tmp_path / "cache")


@pytest.fixture
def debootstrap_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(rootfs, "run_debootstrap", fake_debootstrap(calls))
    return calls


def debugfs(image: Path, request: str) -> str:
    result = host_tools.run(["debugfs", "-R", request, str(image)], what="debugfs")
    return str(result.stdout.decode())


def test_manifest_round_trip(
    paths: RuntimePaths, debootstrap_calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    info = env_obtain.pull_environment(paths, BASE)
    assert info.installed and not info.stale
    assert info.image_path is not None and info.image_sha256 is not None
    assert info.image_path == paths.images_dir / f"{info.image_sha256}.ext4"
    assert sha256_file(info.image_path) == info.image_sha256
    assert info.image_size == info.image_path.stat().st_size
    assert info.to_dict()["image_path"] == str(info.image_path)

    manifest = json.loads(environments.manifest_path(paths, BASE).read_text())
    assert manifest["name"] == BASE
    assert manifest["packages"] == list(environments.get_spec(BASE).packages)
    installed = {"bash": "5.2.15-2+b7", "python3-minimal": "3.11.2-1+b1"}
    assert manifest["installed_packages"] == installed
    assert manifest["image_sha256"] == info.image_sha256
    assert manifest["tree_key"] == rootfs.tree_key(environments.get_spec(BASE).packages)
    assert manifest["suite"] == "bookworm" and manifest["build_seconds"] >= 0

    inspected = environments.inspect_environment(paths, BASE)
    assert inspected["installed"] is True and inspected["stale"] is False
    assert inspected["image_sha256"] == info.image_sha256
    assert {row.name: row.installed for row in environments.list_environments(paths)} == {
        "debian:12-base": True,
        "debian:12": False,
        "debian:12-build": False,
    }
    assert environments.image_for(paths, BASE) == info.image_path
    assert environments.verify_environment(paths, BASE) == []

    # Installed and current: a second pull returns at once, without building.
    def no_build(*args: object) -> None:
        raise AssertionError("rebuilt an installed environment")

    monkeypatch.setattr(env_obtain, "_build", no_build)
    assert env_obtain.pull_environment(paths, BASE) == info
    assert len(debootstrap_calls) == 1


def test_image_contents(paths: RuntimePaths, debootstrap_calls: list[str]) -> None:
    image = environments.image_for(paths, env_obtain.pull_environment(paths, BASE).name)
    init = debugfs(image, "stat /usr/sbin/pyro-init")
    assert "Mode:  0755" in init and "User:     0" in init
    listing = debugfs(image, "ls -l /opt/pyro/pyro_mcp/guest_agent")
    assert "init.py" in listing and "__init__.py" in listing
    assert "rootfs.py" not in listing
    assert "GPL" in debugfs(image, "cat /usr/share/doc/bash/copyright")
    docs = debugfs(image, "ls /usr/share/doc/bash")
    assert "changelog.gz" not in docs
    assert "Packages" not in debugfs(image, "ls /var/lib/apt/lists")
    assert debugfs(image, "cat /var/log/dpkg.log") == ""
    assert debugfs(image, "cat /etc/hostname") == "pyro\n"
    assert "10.0.0.1" not in debugfs(image, "cat /etc/resolv.conf")
    assert debugfs(image, "cat /etc/machine-id") == ""
    host_tools.run(["e2fsck", "-fn", str(image)], what="e2fsck")
    label = host_tools.run(["dumpe2fs", "-h", str(image)], what="dumpe2fs").stdout.decode()
    assert "pyro-root" in label


def test_unknown_name(paths: RuntimePaths) -> None:
    with pytest.raises(NotFound) as caught:
        environments.get_spec("debian:12-bas")
    assert "debian:12-base" in str(caught.value.hint)
    assert "debian:12-build" in str(caught.value.hint)
    for call in (
        env_obtain.pull_environment,
        environments.inspect_environment,
        environments.verify_environment,
        environments.image_for,
    ):
        with pytest.raises(NotFound):
            call(paths, "ubuntu:24.04")


def test_not_installed(paths: RuntimePaths) -> None:
    inspected = environments.inspect_environment(paths, "debian:12")
    assert inspected["installed"] is False
    assert "pyro env pull debian:12" in str(inspected["hint"])
    with pytest.raises(RuntimeMissing) as caught:
        environments.image_for(paths, "debian:12")
    assert caught.value.hint == "run `pyro env pull debian:12`"
    assert "not installed" in environments.verify_environment(paths, "debian:12")[0]


def test_corrupted_image_detected_by_verify(
    paths: RuntimePaths, debootstrap_calls: list[str]
) -> None:
    image = environments.image_for(paths, env_obtain.pull_environment(paths, BASE).name)
    image.chmod(0o644)
    with open(image, "r+b") as handle:  # scribble over the superblock, size unchanged
        handle.seek(1024)
        handle.write(b"\xff" * 256)
    assert environments.image_for(paths, BASE) == image  # the cheap check cannot see it
    problems = environments.verify_environment(paths, BASE)
    assert any(p.startswith("sha256 mismatch") for p in problems)
    assert any(p.startswith("e2fsck") for p in problems)
    assert environments.verify_environment(paths, BASE, deep=False) == []


def test_truncated_image_detected(paths: RuntimePaths, debootstrap_calls: list[str]) -> None:
    image = environments.image_for(paths, env_obtain.pull_environment(paths, BASE).name)
    image.chmod(0o644)
    os.truncate(image, image.stat().st_size // 2)
    problems = environments.verify_environment(paths, BASE)
    assert any(p.startswith("size mismatch") for p in problems)
    assert environments.verify_environment(paths, BASE, deep=False)
    assert not environments.list_environments(paths)[0].installed
    with pytest.raises(RuntimeMissing):
        environments.image_for(paths, BASE)
    # pull repairs it from the cached tree (no second debootstrap)
    info = env_obtain.pull_environment(paths, BASE)
    assert info.installed and environments.verify_environment(paths, BASE) == []
    assert len(debootstrap_calls) == 1


def test_half_written_temps_never_listed(
    paths: RuntimePaths, debootstrap_calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An interruption after packing, before the manifest: nothing is installed.
    def interrupted(image: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(rootfs, "check_ext4", interrupted)
    with pytest.raises(KeyboardInterrupt):
        env_obtain.pull_environment(paths, BASE)
    assert not environments.manifest_path(paths, BASE).exists()
    assert not any(row.installed for row in environments.list_environments(paths))
    assert list(paths.work_dir.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(rootfs, "run_debootstrap", fake_debootstrap(debootstrap_calls))

    # What a killed process leaves: a temp manifest, a temp image, a build dir.
    paths.ensure()
    real = env_obtain.pull_environment(paths, "debian:12")
    manifest = json.loads(environments.manifest_path(paths, "debian:12").read_text())
    manifest["name"] = BASE
    temp = paths.environments_dir / f".{environments.safe_name(BASE)}.json.tmp-999"
    temp.write_text(json.dumps(manifest))
    (paths.images_dir / ".tmp-0123-999.ext4").write_bytes(b"\0" * 4096)
    (paths.work_dir / "env-build-debian_12-base-x").mkdir()
    rows = {row.name: row.installed for row in environments.list_environments(paths)}
    assert rows == {"debian:12-base": False, "debian:12": True, "debian:12-build": False}
    with pytest.raises(RuntimeMissing):
        environments.image_for(paths, BASE)
    # the next build clears the leftovers
    env_obtain.pull_environment(paths, BASE)
    assert not temp.exists() and not (paths.work_dir / "env-build-debian_12-base-x").exists()
    assert not list(paths.images_dir.glob(".tmp-*"))
    assert real.installed and len(debootstrap_calls) == 2  # two package sets, two trees


def test_prune_removes_unreferenced_only(paths: RuntimePaths, debootstrap_calls: list[str]) -> None:
    info = env_obtain.pull_environment(paths, BASE)
    assert info.image_path is not None
    orphan = paths.images_dir / ("ab" * 32 + ".ext4")
    orphan.write_bytes(b"x" * 8192)
    stale_work = paths.work_dir / "env-build-old"
    stale_work.mkdir()
    (stale_work / "image.ext4").write_bytes(b"x" * 8192)
    other_work = paths.work_dir / "kernel-build-123"  # not ours: left alone
    other_work.mkdir()
    old_tree = paths.rootfs_trees_dir / ("cd" * 32)
    (old_tree / "tree").mkdir(parents=True)
    (paths.rootfs_trees_dir / ".partial-0000-1").mkdir()
    broken = paths.environments_dir / "junk.json"
    broken.write_text("{not json")

    result = environments.prune(paths)
    assert isinstance(result["removed"], list)
    removed = set(result["removed"])
    assert {str(orphan), str(stale_work), str(old_tree), str(broken)} <= removed
    assert str(info.image_path) not in removed
    assert isinstance(result["bytes_freed"], int) and result["bytes_freed"] >= 16384
    assert other_work.exists() and info.image_path.exists()
    key = rootfs.tree_key(environments.get_spec(BASE).packages)
    assert (paths.rootfs_trees_dir / key / "tree").is_dir()
    assert environments.verify_environment(paths, BASE) == []
    assert environments.prune(paths)["removed"] == []


def test_guest_change_repacks_without_debootstrap(
    paths: RuntimePaths, debootstrap_calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = env_obtain.pull_environment(paths, BASE)
    files = rootfs.guest_files()
    changed = [*files, rootfs.GuestFile("opt/pyro/pyro_mcp/guest_agent/extra.py", b"X = 1\n")]
    monkeypatch.setattr(rootfs, "guest_files", lambda: changed)
    assert environments.list_environments(paths)[0].stale
    second = env_obtain.pull_environment(paths, BASE)
    assert second.installed and not second.stale
    assert second.image_sha256 != first.image_sha256
    assert len(debootstrap_calls) == 1
    # the old image is kept until prune (a running VM may still use it)
    assert first.image_path is not None and first.image_path.exists()
    removed = environments.prune(paths)["removed"]
    assert isinstance(removed, list) and str(first.image_path) in removed


def test_repack_from_cached_tree_and_force_rebuilds(
    paths: RuntimePaths, debootstrap_calls: list[str]
) -> None:
    first = env_obtain.pull_environment(paths, BASE)
    assert first.image_path is not None
    environments.manifest_path(paths, BASE).unlink()
    first.image_path.unlink()
    again = env_obtain.pull_environment(paths, BASE)  # repacked from the cached tree
    assert again.installed and environments.verify_environment(paths, BASE) == []
    assert len(debootstrap_calls) == 1
    env_obtain.pull_environment(paths, BASE, force=True)
    assert len(debootstrap_calls) == 2


def test_read_dpkg_status(tmp_path: Path) -> None:
    (tmp_path / "var/lib/dpkg").mkdir(parents=True)
    (tmp_path / "var/lib/dpkg/status").write_text(STATUS)
    assert rootfs.read_dpkg_status(tmp_path) == {
        "bash": "5.2.15-2+b7",
        "python3-minimal": "3.11.2-1+b1",
    }
    assert rootfs.read_dpkg_status(tmp_path / "missing") == {}


def test_tree_key_covers_inputs() -> None:
    key = rootfs.tree_key(["git", "less"])
    assert key == rootfs.tree_key(["less", "git", "less"])
    assert key != rootfs.tree_key(["less"])
    assert key != rootfs.tree_key(["git", "less"], suite="trixie")
    assert set(rootfs.GUEST_PACKAGES) <= set(rootfs.tree_packages(["git"]))


def test_init_parses_the_kernel_command_line() -> None:
    options = guest_init.parse_cmdline(
        "console=ttyS0 root=/dev/vda rw pyro.shell=1 pyro.hostname=box pyro.debug\n"
    )
    assert options == {"shell": "1", "hostname": "box", "debug": "1"}
    assert guest_init.parse_cmdline("quiet") == {}


def test_out_of_space_names_need_and_place(
    paths: RuntimePaths, debootstrap_calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    class Usage:
        free = 1 << 20

    monkeypatch.setattr(shutil, "disk_usage", lambda where: Usage)
    with pytest.raises(BuildError) as caught:
        env_obtain.pull_environment(paths, BASE)
    message = str(caught.value)
    assert "no space left" in message and str(paths.work_dir) in message
    assert "needs about" in message and "1 MiB free" in message
    assert "PYRO_CACHE_DIR" in str(caught.value.hint)
    assert not environments.list_environments(paths)[0].installed


def test_debootstrap_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keyring = tmp_path / "keyring.gpg"
    keyring.write_bytes(b"")
    monkeypatch.setattr(rootfs, "KEYRING", keyring)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(host_tools, "require", lambda program: f"/usr/sbin/{program}")
    stderr = "E: Couldn't download packages: nosuchpkg"

    def failing(argv: list[str], **kwargs: object) -> None:
        raise ToolFailed("debootstrap: exited with 1", stderr_tail=stderr)

    monkeypatch.setattr(host_tools, "run", failing)

    def attempt() -> None:
        rootfs.run_debootstrap(
            tmp_path / "tree",
            suite="bookworm",
            mirror="http://mirror",
            packages=["nosuchpkg"],
            deb_cache=tmp_path / "debs",
        )

    with pytest.raises(ToolFailed) as caught:
        attempt()
    assert "nosuchpkg" in caught.value.stderr_tail and "http://mirror" in str(caught.value)
    stderr = "tar: ./usr/bin/x: Cannot write: No space left on device"
    with pytest.raises(BuildError, match="no space left on device"):
        attempt()
    monkeypatch.setattr(rootfs, "KEYRING", tmp_path / "missing.gpg")
    with pytest.raises(HostToolMissing, match="debian-archive-keyring"):
        attempt()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_removal_never_deletes_through_mounts(tmp_path: Path) -> None:
    """A killed debootstrap can leave the host's /dev bind-mounted inside its tree."""
    host = tmp_path / "host-dev"
    host.mkdir()
    (host / "null").write_text("precious")
    partial = tmp_path / ".partial-x" / "tree"
    (partial / "dev").mkdir(parents=True)
    (partial / "proc").mkdir()
    host_tools.run(["mount", "--bind", str(host), str(partial / "dev")], what="bind")
    host_tools.run(["mount", "-t", "tmpfs", "tmpfs", str(partial / "proc")], what="tmpfs")
    try:
        assert len(rootfs.mounts_under(tmp_path / ".partial-x")) == 2
        rootfs.remove_path(tmp_path / ".partial-x")
    finally:
        for point in rootfs.mounts_under(tmp_path):
            host_tools.run(["umount", "-l", point], what="cleanup")
    assert not (tmp_path / ".partial-x").exists()
    assert (host / "null").read_text() == "precious"


def test_init_runs_the_agent_module_in_a_forked_interpreter(tmp_path: Path) -> None:
    """run_module is `python3 -m` in a fork: env, argv, exit code, child processes."""
    package = tmp_path / "fakeagent"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "main.py").write_text(
        "import os, subprocess, sys\n"
        "out = os.environ['OUT']\n"
        "child = subprocess.run(['sh', '-c', 'echo $MARK'], capture_output=True, text=True)\n"
        "with open(out, 'w') as f:\n"
        "    f.write(f\"{__name__} {sys.argv[0].endswith('main.py')} \")\n"
        "    f.write(f\"{os.environ.get('MARK')} {child.stdout.strip()} {'HOME' in os.environ}\")\n"
        "raise SystemExit(7)\n"
    )
    out = tmp_path / "out.txt"
    env = {"PATH": "/usr/bin:/bin", "MARK": "m4rk", "OUT": str(out), "PYTHONPATH": str(tmp_path)}
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child leaves through os._exit
        try:
            guest_init.run_module("fakeagent.main", env)
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 7
    assert out.read_text() == "__main__ True m4rk m4rk False"
