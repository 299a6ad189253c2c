"""Archives: stream a tar of a workspace path out, extract a tar into one safely.

``archive_get`` {root, path?}
    Streams a POSIX (pax) tar of ``path`` (default: the root) as ``data`` frames, stream
    ``tar``. A directory's contents are named relative to it (the directory itself is not
    an entry: its mode is in the result); a file is named by its base name. Symlinks stay
    symlinks (never followed), hard links within the archive stay hard links; modes,
    mtimes (whole seconds) and numeric owners are kept, owner names dropped; devices,
    fifos and sockets are skipped. Result: ``type``, ``mode``, ``files``, ``dirs``,
    ``symlinks``, ``hardlinks``, ``skipped`` (how many) and ``skipped_paths`` (the first
    100 of them, relative names), ``content_bytes``, ``bytes`` (of tar).

``archive_put`` {root, dest, max_bytes, max_entries, streamed=true}
    Extracts the tar streamed as input (``data`` frames then ``eof``; the call's payload,
    if any, comes first) into ``dest`` (inside the root, symlinks followed; created with
    its parents if missing). Plain, gzip, bzip2 and xz tars are accepted; decompression
    happens here so every limit counts uncompressed bytes. Refused, with nothing of the
    archive left behind:

    - ``outside_root``: absolute names, ``..`` components, a member under a symlink or a
      file of the archive, a symlink whose target resolves outside the root (resolved
      against the tree as it will be), a hard link to an absolute or ``..`` name;
    - ``unsupported_member``: devices, fifos, unknown entry types, hard links to anything
      but a regular file of the archive;
    - ``too_large``: more than ``max_entries`` entries, more than ``max_bytes`` of file
      content, or headers out of proportion (checked as each header arrives: a bomb stops
      at the limit, nothing is written past it);
    - ``invalid_archive``: a corrupt or truncated tar or compressed stream;
    - ``exists``: merging would put a directory where a file is, or the reverse.

    Extraction goes to a hidden staging directory on the same filesystem (inside ``dest``
    when it exists, beside it otherwise), is checked, then moved into place: a new
    ``dest`` by one rename; an existing one by merging (files and symlinks replace files
    and symlinks, directories merge). Directory modes and mtimes are set last. Result:
    ``dest`` (relative), ``created``, ``entries``, ``files``, ``dirs``, ``symlinks``,
    ``hardlinks``, ``bytes`` (content written), ``compression``, ``replaced`` (relative
    paths, first 1000) and ``replaced_count``.

This module holds the two operations and their arguments; the tar producer is in
:mod:`archive_pack`, the decompressing input in :mod:`archive_input`, and extraction,
checks and placing in :mod:`archive_extract`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from pyro_mcp.guest_agent import ops_tree as tree
from pyro_mcp.guest_agent.archive_extract import check_link, extract, finish_dirs, merge
from pyro_mcp.guest_agent.archive_input import HEADER_SLACK, Input
from pyro_mcp.guest_agent.archive_pack import write_tar
from pyro_mcp.guest_agent.calls import Call, CallError
from pyro_mcp.guest_agent.ops_files import sync_filesystem

DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_MAX_ENTRIES = 100_000
HARD_MAX_BYTES = 1 << 40
HARD_MAX_ENTRIES = 10_000_000
ENTRY_OVERHEAD = 16 << 10  # header bytes budgeted per entry in the overall ceiling
REPLACED_LISTED = 1000


def archive_get(call: Call) -> tuple[dict[str, Any], bytes]:
    args = call.args
    real_root = tree.workspace_root(args.get("root"))
    value = args.get("path")
    rel = "" if value is None else tree.parse_path(value, str(args.get("root")), real_root)
    top = tree.resolve_inside(real_root, rel)
    try:
        top_info = os.lstat(top)
    except FileNotFoundError as exc:
        raise CallError("not_found", f"{rel or '.'} does not exist") from exc
    return write_tar(call, top, top_info), b""


def _limit(args: dict[str, Any], name: str, default: int, hard: int) -> int:
    value = args.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CallError("invalid_argument", f"{name} must be a non-negative integer")
    return min(value, hard)


def _make_parents(path: str, created: list[str]) -> None:
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise CallError("not_a_directory", f"{path} is not a directory")
    for directory in reversed(missing):
        os.mkdir(directory, 0o755)
        created.append(directory)


def archive_put(call: Call) -> tuple[dict[str, Any], bytes]:
    args = call.args
    root = args.get("root")
    real_root = tree.workspace_root(root)
    dest = tree.resolve_inside(
        real_root, tree.parse_path(args.get("dest"), str(root), real_root, "dest")
    )
    max_bytes = _limit(args, "max_bytes", DEFAULT_MAX_BYTES, HARD_MAX_BYTES)
    max_entries = _limit(args, "max_entries", DEFAULT_MAX_ENTRIES, HARD_MAX_ENTRIES)
    streamed = args.get("streamed", True)
    if not isinstance(streamed, bool):
        raise CallError("invalid_argument", "streamed must be true or false")
    existed = os.path.lexists(dest)
    if existed and not os.path.isdir(dest):
        raise CallError("not_a_directory", f"{tree.relative(real_root, dest)} is not a directory")
    import shutil  # lazily: the agent starts at every boot
    import tarfile

    created: list[str] = []
    staging = ""
    try:
        parent = dest if existed else os.path.dirname(dest)
        if not existed:
            _make_parents(parent, created)
        staging = os.path.join(parent, call.temp_name("extract"))
        os.mkdir(staging, 0o700)
        ceiling = max_bytes + (max_entries + 1) * ENTRY_OVERHEAD + HEADER_SLACK
        source = Input(call, streamed, ceiling)
        try:
            done = extract(call, tarfile, source, staging, max_bytes, max_entries)
        except tarfile.TarError as exc:
            raise CallError("invalid_archive", f"not a valid tar archive: {exc}") from exc
        for rel, target in done.links:
            check_link(rel, target, dest, staging, real_root)
        if existed:
            replaced, merged = merge(staging, dest)
            shutil.rmtree(staging)
        else:
            os.rename(staging, dest)
            replaced, merged = [], set()
        staging = ""
        finish_dirs(dest, done, merged)
        sync_filesystem(real_root)  # what is acknowledged is on the disk
    except BaseException:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise
    return {
        "dest": tree.relative(real_root, dest),
        "created": not existed,
        "entries": done.entries,
        "files": done.files,
        "dirs": done.dirs,
        "symlinks": done.symlinks,
        "hardlinks": done.hardlinks,
        "bytes": done.bytes,
        "compression": source.kind or "tar",
        "replaced": replaced[:REPLACED_LISTED],
        "replaced_count": len(replaced),
    }, b""
