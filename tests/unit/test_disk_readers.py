"""The offline disk readers stay bounded whatever a hostile guest put on its disk.

A guest's root owns its /workspace disk and can set any inode field, link a directory
back to its ancestor, fill a directory with entries, or name files with any bytes. These
tests build such disks with the project's own ``create_workspace_disk`` and then
``debugfs -w``, and check what a user of ``disk_stat``/``disk_list``/``disk_read`` sees.
Memory is measured in a subprocess (itself capped at 1 GiB of address space, so a reader
that tries to hold a huge answer fails there instead of exhausting the host).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pyro_mcp.errors import InvalidArgument, TooLarge, ToolFailed
from pyro_mcp.runtime.host_tools import find_program
from pyro_mcp.storage import debugfs as debugfs_runner
from pyro_mcp.storage import disk_create, workspace_disk

pytestmark = pytest.mark.skipif(
    find_program("mke2fs") is None or find_program("debugfs") is None,
    reason="needs e2fsprogs (mke2fs, debugfs)",
)

# The stated bound: a process listing any of these hostile disks recursively and stat-ing
# their entries peaks under this resident size (its own, debugfs runs apart under its own
# address-space limit).
PEAK_RSS_BOUND_MIB = 100
LINK_TOO_LONG = (
    "the link's size is {} bytes, more than the 4095 bytes a Linux symlink target can hold: "
    "it was not read"
)


# --- building hostile disks ---------------------------------------------------------------


def build_disk(tmp_path: Path, staging: Path, size_mib: int = 16) -> Path:
    image = tmp_path / f"{staging.name}.ext4"
    disk_create.create_workspace_disk(image, size_mib, staging)
    return image


def staging_dir(tmp_path: Path, name: str = "staging") -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def debugfs_w(image: Path, *commands: str) -> None:
    """Run write commands on the image, failing the test if debugfs complains."""
    debugfs = find_program("debugfs")
    assert debugfs is not None
    script = "".join(f"{command}\n" for command in commands).encode()
    done = subprocess.run(
        [debugfs, "-w", "-f", "-", str(image)], input=script, capture_output=True, check=True
    )
    complaints = [
        line
        for line in done.stderr.decode().splitlines()
        if line.strip() and not line.startswith("debugfs ")
    ]
    assert complaints == []


def inode_of(image: Path, path: str) -> int:
    debugfs = find_program("debugfs")
    assert debugfs is not None
    out = subprocess.run(
        [debugfs, "-R", f"stat {path}", str(image)], capture_output=True, check=True
    ).stdout
    found = re.search(rb"Inode: (\d+)", out)
    assert found is not None, f"{path} is not on {image}"
    return int(found.group(1))


def huge_symlink_disk(tmp_path: Path, size: int) -> Path:
    staging = staging_dir(tmp_path, "huge-link")
    os.symlink("x" * 100, staging / "link")  # a slow link: its target is in a data block
    image = build_disk(tmp_path, staging)
    debugfs_w(image, f"sif /link size {size}")
    return image


def huge_file_disk(tmp_path: Path) -> Path:
    staging = staging_dir(tmp_path, "huge-file")
    (staging / "big").write_bytes(b"x")
    image = build_disk(tmp_path, staging)
    debugfs_w(image, f"sif /big size {1 << 60}")
    return image


def small_directory_disk(tmp_path: Path, entries: int) -> Path:
    staging = staging_dir(tmp_path, f"dir-{entries}")
    (staging / "d").mkdir()
    for i in range(entries):
        (staging / "d" / f"f{i:05d}").touch()
    return build_disk(tmp_path, staging)


def first_blocks(image: Path, path: str) -> tuple[int, int]:
    """(first physical block, number of blocks) of the one extent holding ``path``'s data."""
    debugfs = find_program("debugfs")
    assert debugfs is not None
    out = subprocess.run(
        [debugfs, "-R", f"stat {path}", str(image)], capture_output=True, check=True
    ).stdout
    extent = re.search(rb"EXTENTS:\n\(0(?:-(\d+))?\):(\d+)(?:-\d+)?\n", out)
    assert extent is not None, out
    return int(extent.group(2)), int(extent.group(1) or 0) + 1


def big_directory_disk(tmp_path: Path, names: int = 200, copies: int = 250) -> Path:
    """A disk whose /d holds ``names * copies`` entries (50,000): its one directory block
    of ``names`` files copied ``copies`` times over the data of /blob, and /d's extent
    pointed at them. A guest makes a huge directory this cheaply; filling one name by name
    through mke2fs -d would take minutes (each insertion scans the directory)."""
    staging = staging_dir(tmp_path, "big-directory")
    (staging / "d").mkdir()
    for i in range(names):
        (staging / "d" / f"f{i:03d}").touch()
    (staging / "blob").write_bytes(b"\xff" * copies * 4096)  # not zeros: mke2fs makes holes
    image = build_disk(tmp_path, staging)
    directory, _ = first_blocks(image, "/d")
    blob, blob_blocks = first_blocks(image, "/blob")
    assert blob_blocks == copies
    with image.open("r+b") as disk:
        disk.seek(directory * 4096)
        block = disk.read(4096)
        disk.seek(blob * 4096)
        disk.write(block * copies)  # its checksum covers /d's inode, not the block's place
    # i_block holds the extent header, then one extent: block[4] is its length (and the
    # high 16 bits of its start, 0), block[5] the low 32 bits of its start.
    debugfs_w(
        image,
        f"sif /d block[4] {copies}",
        f"sif /d block[5] {blob}",
        f"sif /d size {copies * 4096}",
    )
    return image


def cycle_disk(tmp_path: Path) -> Path:
    """/a/b/up is a second link to /a; /c a second link to /a/b (a hard-linked directory)."""
    staging = staging_dir(tmp_path, "cycle")
    (staging / "a" / "b").mkdir(parents=True)
    (staging / "a" / "b" / "f").write_bytes(b"f")
    image = build_disk(tmp_path, staging)
    debugfs_w(image, "link /a /a/b/up", "link /a/b /c")
    return image


# --- measuring in a subprocess ----------------------------------------------------------

MEASURE = r"""
import json, resource, sys, time
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from pyro_mcp.storage import workspace_disk

def short(value):
    if isinstance(value, str) and len(value) > 200:
        return f"<{len(value)} characters>"
    if isinstance(value, dict):
        return {key: short(item) for key, item in value.items()}
    if isinstance(value, list):
        return [short(item) for item in value]
    return value

calls = []
for name, args, kwargs in json.loads(sys.argv[1]):
    started = time.monotonic()
    try:
        value = getattr(workspace_disk, name)(Path(args[0]), *args[1:], **kwargs)
        if isinstance(value, bytes):
            outcome = {"bytes": len(value)}
        elif isinstance(value, list):
            outcome = {"entries": len(value), "first": value[:5],
                       "unlisted": getattr(value, "unlisted", None)}
        else:
            outcome = {"value": value}
    except BaseException as exc:
        outcome = {"error": type(exc).__name__, "message": str(exc)[:500]}
    calls.append({"call": [name, args, kwargs], "seconds": time.monotonic() - started,
                  **short(outcome)})
# VmHWM, not ru_maxrss: the latter keeps the forked parent's peak across exec.
status = Path("/proc/self/status").read_text()
peak_mib = int(status.split("VmHWM:")[1].split()[0]) / 1024
print(json.dumps({"calls": calls, "peak_rss_mib": peak_mib}))
"""


def measure(calls: list[tuple[str, list[Any], dict[str, Any]]]) -> dict[str, Any]:
    """Run reader calls in a fresh Python capped at 1 GiB of address space; their outcomes
    and its peak resident size in MiB (debugfs runs apart, under its own limit)."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(calls)],
        capture_output=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=str(Path(workspace_disk.__file__).parents[2])),
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# --- 1. sizes are checked before reading -------------------------------------------------


@pytest.mark.parametrize("size", [64 << 20, 2 << 30], ids=["64MiB", "2GiB"])
def test_a_symlink_declaring_a_huge_size_is_reported_without_reading_its_target(
    tmp_path: Path, size: int
) -> None:
    image = huge_symlink_disk(tmp_path, size)
    report = measure(
        [
            ("disk_list", [str(image), "/"], {"recursive": True}),
            ("disk_stat", [str(image), "/link"], {}),
            ("disk_read", [str(image), "/link", 10], {}),
        ]
    )
    listed, stat, read = report["calls"]
    inode = inode_of(image, "/link")
    expected = {
        "path": "/link",
        "name": "link",
        "type": "symlink",
        "mode": 0o777,
        "size": size,
        "inode": inode,
        "target": None,
        "target_error": LINK_TOO_LONG.format(size),
    }
    assert listed["entries"] == 1 and listed["first"] == [expected]
    assert stat["value"]["target"] is None
    assert stat["value"]["target_error"] == LINK_TOO_LONG.format(size)
    assert read["error"] == "InvalidArgument"
    assert read["message"] == (
        f"/link is a symbolic link whose target cannot be shown ({LINK_TOO_LONG.format(size)})"
    )
    assert report["peak_rss_mib"] < PEAK_RSS_BOUND_MIB


def test_debugfs_output_past_the_byte_cap_is_too_large_naming_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    staging = staging_dir(tmp_path)
    (staging / "src").mkdir()
    for i in range(500):
        (staging / "src" / f"file-{i:03d}").touch()
    image = build_disk(tmp_path, staging)
    monkeypatch.setattr(debugfs_runner, "MAX_DEBUGFS_OUTPUT", 4096)
    with pytest.raises(TooLarge) as caught:
        workspace_disk.disk_list(image, "/src")
    assert caught.value.message == (
        f"debugfs printed more than 4096 bytes while listing /src on the workspace disk {image}"
    )
    assert (
        caught.value.hint
        == f"the disk may be damaged or hostile: check it with `e2fsck -fn {image}`"
    )


@pytest.fixture(scope="module")
def big_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A disk whose /d holds 50,000 entries: about 1.2 MB of debugfs listing."""
    return big_directory_disk(tmp_path_factory.mktemp("big-directory"))


def test_a_listing_stops_reading_as_soon_as_it_passes_max_entries(
    big_directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = big_directory
    # Had the reader taken the whole listing before counting, it would hit this cap first
    # (it reads ahead of the parser by at most a 64 KiB pipe read).
    monkeypatch.setattr(debugfs_runner, "MAX_DEBUGFS_OUTPUT", 256 << 10)
    with pytest.raises(TooLarge) as caught:
        workspace_disk.disk_list(image, "/d", max_entries=100)
    assert caught.value.message == "/d holds more than 100 entries"
    with pytest.raises(TooLarge, match="/ holds more than 100 entries"):
        workspace_disk.disk_list(image, "/", recursive=True, max_entries=100)


def test_max_entries_is_checked(tmp_path: Path) -> None:
    image = small_directory_disk(tmp_path, 3)
    for bad in (0, -1, 100_001, True, 1.5):
        with pytest.raises(InvalidArgument) as caught:
            workspace_disk.disk_list(image, "/", max_entries=bad)  # type: ignore[arg-type]
        assert caught.value.message == f"max_entries must be between 1 and 100000, got {bad!r}"


# --- 2. deadlines and the child's memory limit -------------------------------------------


def fake_debugfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    """Put a shell script named debugfs first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "debugfs"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_a_debugfs_run_past_its_deadline_is_killed_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()  # debugfs may write no file (its file size limit is 0), but can mkdir
    fake_debugfs(tmp_path, monkeypatch, f'mkdir "{pids}/$$"\nexec sleep 60')
    image = tmp_path / "disk.ext4"
    image.write_bytes(b"\0" * 4096)
    with pytest.raises(ToolFailed) as caught:
        workspace_disk.disk_stat(image, "/x", timeout_s=0.5)
    assert caught.value.message == (
        f"the workspace disk {image} could not be read in 0.5 s: "
        "debugfs was stopped while reading /x"
    )
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left running
        os.kill(int(next(pids.iterdir()).name), 0)
    for bad in (0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(InvalidArgument, match="timeout_s must be a positive number"):
            workspace_disk.disk_list(image, "/", timeout_s=bad)


def test_debugfs_runs_under_its_own_memory_core_and_file_size_limits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_debugfs(tmp_path, monkeypatch, "cat /proc/$$/limits >&2")
    image = tmp_path / "disk.ext4"
    image.write_bytes(b"\0" * 4096)
    with pytest.raises(ToolFailed) as caught:
        workspace_disk.disk_stat(image, "/x")  # the fake prints no report, only its limits
    assert caught.value.message == "cannot read debugfs's report on /x"
    table = {
        line[:26].strip(): line[26:].split()[:2]
        for line in caught.value.stderr_tail.splitlines()[1:]
    }
    assert table["Max address space"] == [str(256 << 20)] * 2
    assert table["Max core file size"] == ["0", "0"]
    assert table["Max file size"] == ["0", "0"]


def test_debugfs_that_dies_at_its_memory_limit_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    staging = staging_dir(tmp_path)
    (staging / "f").write_bytes(b"f")
    image = build_disk(tmp_path, staging)
    monkeypatch.setattr(debugfs_runner, "DEBUGFS_MEMORY_LIMIT", 1 << 20)  # cannot even load
    with pytest.raises(ToolFailed) as caught:
        workspace_disk.disk_stat(image, "/f")
    assert caught.value.message == (
        f"debugfs stopped (exit status 127) while reading /f on the workspace disk {image}"
    )
    assert caught.value.hint == (
        "debugfs runs with a 1 MiB memory limit; the disk may be damaged: "
        f"check it with `e2fsck -fn {image}`"
    )
    assert "error while loading shared libraries" in caught.value.stderr_tail


# --- 3. a hostile directory graph -----------------------------------------------------------


def test_a_directory_cycle_or_hard_linked_directory_is_listed_once_and_flagged(
    tmp_path: Path,
) -> None:
    image = cycle_disk(tmp_path)
    a, b = inode_of(image, "/a"), inode_of(image, "/a/b")
    listing = workspace_disk.disk_list(image, "/", recursive=True, max_entries=100)
    assert [(e["path"], e["inode"], e.get("repeat_of")) for e in listing] == [
        ("/a", a, None),
        ("/a/b", b, "/c"),  # breadth first, /c is met before /a/b: /a/b is the repeat
        ("/c", b, None),
        ("/c/f", inode_of(image, "/c/f"), None),
        ("/c/up", a, "/a"),  # the loop back to an ancestor is not followed
    ]
    assert listing.unlisted == {}
    # Listing the loop's own directory flags the entry that points back at it.
    inside = workspace_disk.disk_list(image, "/a/b", recursive=True, max_entries=100)
    assert [(e["path"], e.get("repeat_of")) for e in inside] == [
        ("/a/b/f", None),
        ("/a/b/up", None),
        ("/a/b/up/b", "/a/b"),
    ]


# --- 4. disk_read's cap ---------------------------------------------------------------------


def test_disk_read_caps_max_bytes_at_64_mib_and_reads_only_what_it_returns(
    tmp_path: Path,
) -> None:
    image = huge_file_disk(tmp_path)
    with pytest.raises(InvalidArgument) as caught:
        workspace_disk.disk_read(image, "/big", (64 << 20) + 1)
    assert caught.value.message == "max_bytes must be between 1 and 67108864 (64 MiB), got 67108865"
    assert workspace_disk.disk_read(image, "/big", 4) == b"x\0\0\0"
    data = workspace_disk.disk_read(image, "/big", 64 << 20)
    assert len(data) == 64 << 20 and data[:2] == b"x\0" and data.count(0) == (64 << 20) - 1
    assert workspace_disk.disk_stat(image, "/big")["size"] == 1 << 60


# --- 5. names -------------------------------------------------------------------------------


def test_names_and_targets_that_are_not_utf8_come_back_losslessly(tmp_path: Path) -> None:
    staging = staging_dir(tmp_path)
    (staging / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"latin-1 name")
    os.symlink(os.fsdecode(b"t\xfe"), staging / "short")
    os.symlink(os.fsdecode(b"\xfe" * 100), staging / "long")
    image = build_disk(tmp_path, staging)
    listing = {e["name"]: e for e in workspace_disk.disk_list(image, "/")}
    assert sorted(listing) == ["caf\udce9.txt", "long", "short"]
    assert listing["caf\udce9.txt"]["path"] == "/caf\udce9.txt"
    assert os.fsencode(listing["caf\udce9.txt"]["name"]) == b"caf\xe9.txt"
    assert listing["short"]["target"] == "t\udcfe"
    assert listing["long"]["target"] == "\udcfe" * 100
    assert workspace_disk.disk_stat(image, "/long")["target"] == "\udcfe" * 100
    assert workspace_disk.disk_read(image, "/caf\udce9.txt", 100) == b"latin-1 name"


def test_names_holding_a_line_end_are_left_out_and_counted(tmp_path: Path) -> None:
    staging = staging_dir(tmp_path)
    (staging / "one\nline").touch()
    (staging / "d").mkdir()
    (staging / "d" / "two\nlines\nhere").touch()
    (staging / "d" / "plain").touch()
    image = build_disk(tmp_path, staging)
    top = workspace_disk.disk_list(image, "/")
    assert [e["path"] for e in top] == ["/d"]
    assert top.unlisted == {"/": 1}
    everything = workspace_disk.disk_list(image, "/", recursive=True)
    assert [(e["path"], e.get("unlisted")) for e in everything] == [
        ("/d", 1),
        ("/d/plain", None),
    ]
    assert everything.unlisted == {"/": 1, "/d": 1}


def test_an_owner_id_past_2_31_does_not_hide_the_entry(tmp_path: Path) -> None:
    staging = staging_dir(tmp_path)
    (staging / "f").write_bytes(b"f")
    image = build_disk(tmp_path, staging)
    debugfs_w(image, "sif /f uid 4294967295", "sif /f gid 4294967295")
    assert [e["path"] for e in workspace_disk.disk_list(image, "/")] == ["/f"]


def test_paths_longer_than_linux_allows_are_refused_or_left_out(tmp_path: Path) -> None:
    staging = staging_dir(tmp_path)
    image = build_disk(tmp_path, staging)
    name = "d" * 255
    debugfs_w(image, *[command for _ in range(17) for command in (f"mkdir {name}", f"cd {name}")])
    listing = workspace_disk.disk_list(image, "/", recursive=True)
    deepest = "/" + "/".join([name] * 15)  # 3840 bytes; one more level would be 4096
    assert [e["path"] for e in listing] == ["/" + "/".join([name] * n) for n in range(1, 16)]
    assert listing[-1]["unlisted"] == 1
    assert listing.unlisted == {deepest: 1}
    with pytest.raises(InvalidArgument) as caught:
        workspace_disk.disk_stat(image, deepest + "/" + name)
    assert caught.value.message.endswith("is longer than the 4095 bytes a path can hold")


# --- 6. the stated bound ------------------------------------------------------------------


def test_the_host_stays_bounded_on_every_hostile_disk(tmp_path: Path, big_directory: Path) -> None:
    """Recursive listing and stat of each hostile disk: peak RSS under PEAK_RSS_BOUND_MIB,
    no call stopped at its deadline."""
    link = huge_symlink_disk(tmp_path, 2 << 30)
    big = huge_file_disk(tmp_path)
    many = big_directory
    cycle = cycle_disk(tmp_path)
    deadline = {"timeout_s": 30.0}
    calls: list[tuple[str, list[Any], dict[str, Any]]] = [
        ("disk_list", [str(link), "/"], {"recursive": True, **deadline}),
        ("disk_stat", [str(link), "/link"], deadline),
        ("disk_list", [str(big), "/"], {"recursive": True, **deadline}),
        ("disk_stat", [str(big), "/big"], deadline),
        ("disk_read", [str(big), "/big", 1 << 20], deadline),
        ("disk_list", [str(many), "/"], {"recursive": True, "max_entries": 60_000, **deadline}),
        ("disk_list", [str(many), "/"], {"recursive": True, **deadline}),
        ("disk_stat", [str(many), "/d"], deadline),
        ("disk_stat", [str(many), "/d/f199"], deadline),
        ("disk_list", [str(cycle), "/"], {"recursive": True, **deadline}),
        *[
            ("disk_stat", [str(cycle), path], deadline)
            for path in ("/a", "/a/b", "/c", "/c/f", "/c/up", "/a/b/up/b/up/b/f")
        ],
    ]
    report = measure(calls)
    outcomes = {(c["call"][0], c["call"][1][0], *c["call"][1][1:]): c for c in report["calls"]}
    for call in report["calls"]:  # none was stopped at its deadline
        assert "could not be read in" not in call.get("message", ""), call
    assert outcomes["disk_list", str(link), "/"]["first"][0]["target"] is None
    assert outcomes["disk_stat", str(big), "/big"]["value"]["size"] == 1 << 60
    assert outcomes["disk_read", str(big), "/big", 1 << 20]["bytes"] == 1 << 20
    whole = [c for c in report["calls"] if c["call"][2].get("max_entries") == 60_000]
    assert whole[0]["entries"] == 50_002  # /blob, /d and its 50,000
    capped = [c for c in report["calls"] if c["call"][:2] == ["disk_list", [str(many), "/"]]][1]
    assert capped["error"] == "TooLarge"
    assert capped["message"].startswith("/ holds more than 10000 entries")
    assert outcomes["disk_list", str(cycle), "/"]["entries"] == 5
    assert outcomes["disk_stat", str(cycle), "/a/b/up/b/up/b/f"]["value"]["size"] == 1
    print(
        f"peak RSS {report['peak_rss_mib']:.0f} MiB; slowest call "
        f"{max(c['seconds'] for c in report['calls']):.2f} s"
    )
    assert report["peak_rss_mib"] < PEAK_RSS_BOUND_MIB
