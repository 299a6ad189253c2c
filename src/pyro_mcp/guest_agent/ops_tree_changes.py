"""Changes to the workspace's tree: removal and the structural apply.

The path rules are :mod:`ops_tree`'s (confined to ``root``, symlinks never followed).

``remove_paths`` {root, paths, recursive=false, missing_ok=false, sync=true}
    Removes files, symlinks (never their targets) and, with ``recursive``, directories.
    Every path is checked before anything is removed; the root itself is refused. A path
    below something that is no longer a directory counts as missing.
    Result: ``removed`` (count), ``missing`` (paths that did not exist, with missing_ok).

``apply_tree`` {root, removes?, dirs?: [{path, mode}], symlinks?: [{path, target}],
specials?: [{path, type, mode, rdev?}], chmods?: [{path, mode}], sync=true}
    The structural half of "make the tree match a manifest" (file contents go with
    put_file). In order: removes (deepest first, recursive, missing ones ignored), dirs
    (shallowest first, created owner-writable), symlinks (created or atomically replaced;
    a target is data and may point anywhere, only the link itself is confined), specials
    (fifos and device nodes recreated; a socket cannot be: it is skipped and counted in
    ``sockets_skipped``), then the final modes of ``dirs`` and ``chmods`` (deepest first,
    so a read-only directory is locked last; modes of symlinks are skipped: Linux has
    none). Arguments are validated before any change; confinement is checked again as
    each step runs, so a removal that turns a symlink into a directory is followed
    correctly. Not transactional.

``remove_paths`` and ``apply_tree`` flush the filesystem (syncfs) before they answer,
unless ``sync`` is false (a caller making many changes ends them with ``fs_sync``).
"""

from __future__ import annotations

import os
import stat
from typing import Any

from pyro_mcp.guest_agent.calls import Call, CallError
from pyro_mcp.guest_agent.ops_files import sync_filesystem
from pyro_mcp.guest_agent.ops_tree import (
    SPECIAL_TYPES,
    _flag,
    _list,
    _mode,
    entry_inside,
    parse_path,
    workspace_root,
)

# --- removal -------------------------------------------------------------------------


def remove_entry(path: str, recursive: bool) -> bool:
    """Remove one path without following it; False if it did not exist (or lay below
    something that is no longer a directory)."""
    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    if stat.S_ISDIR(info.st_mode):
        if not recursive:
            raise CallError("is_a_directory", f"{path} is a directory (use recursive)")
        import shutil  # lazily: the agent starts at every boot

        shutil.rmtree(path)  # fd-based on Linux: never follows a symlink inside
    else:
        os.unlink(path)
    return True


def _depth(rel: str) -> int:
    return rel.count("/") + 1 if rel else 0


def remove_paths(call: Call) -> tuple[dict[str, Any], bytes]:
    args = call.args
    root = args.get("root")
    real_root = workspace_root(root)
    recursive = _flag(args, "recursive", False)
    missing_ok = _flag(args, "missing_ok", False)
    paths = _list(args, "paths")
    targets: list[tuple[str, str]] = []
    for value in paths:
        rel = parse_path(value, str(root), real_root)
        if not rel:
            raise CallError("invalid_argument", "refusing to remove the root itself")
        targets.append((rel, entry_inside(real_root, rel)))
    missing: list[str] = []
    for rel, path in targets:  # check everything before removing anything
        try:
            info = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            if not missing_ok:
                raise CallError("not_found", f"{rel} does not exist") from None
            missing.append(rel)
            continue
        if stat.S_ISDIR(info.st_mode) and not recursive:
            raise CallError("is_a_directory", f"{rel} is a directory (use recursive)")
    removed = 0
    for _, path in sorted(targets, key=lambda item: -_depth(item[0])):
        removed += remove_entry(path, recursive)
    if _flag(args, "sync", True):
        sync_filesystem(real_root)
    return {"removed": removed, "missing": missing}, b""


# --- apply_tree ----------------------------------------------------------------------


def _items(
    args: dict[str, Any], name: str, field: str, root: str, real_root: str
) -> list[tuple[str, Any]]:
    items = []
    for item in _list(args, name):
        if not isinstance(item, dict):
            raise CallError("invalid_argument", f"{name} holds objects with path and {field}")
        rel = parse_path(item.get("path"), root, real_root, f"{name}[].path")
        if not rel:
            raise CallError("invalid_argument", f"{name} cannot change the root itself")
        items.append((rel, item.get(field)))
    return items


def apply_tree(call: Call) -> tuple[dict[str, Any], bytes]:
    args = call.args
    root = str(args.get("root"))
    real_root = workspace_root(args.get("root"))
    removes = []
    for value in _list(args, "removes"):
        rel = parse_path(value, root, real_root, "removes[]")
        if not rel:
            raise CallError("invalid_argument", "refusing to remove the root itself")
        removes.append(rel)
    dirs = [
        (rel, _mode(mode, "dirs[].mode"))
        for rel, mode in _items(args, "dirs", "mode", root, real_root)
    ]
    links = _items(args, "symlinks", "target", root, real_root)
    for _, target in links:
        if not isinstance(target, str) or not target or "\x00" in target:
            raise CallError("invalid_argument", "symlinks[].target must be a non-empty string")
    specials = [_special(item, root, real_root) for item in _list(args, "specials")]
    chmods = [
        (rel, _mode(mode, "chmods[].mode"))
        for rel, mode in _items(args, "chmods", "mode", root, real_root)
    ]
    sync = _flag(args, "sync", True)

    removed = 0
    for rel in sorted(removes, key=lambda r: (-_depth(r), r)):
        removed += remove_entry(entry_inside(real_root, rel), True)

    created = 0
    for rel, mode in sorted(dirs, key=lambda item: (_depth(item[0]), item[0])):
        path = entry_inside(real_root, rel)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
            os.mkdir(path, 0o700)
            os.chmod(path, mode | 0o700)  # final mode below, after everything inside
            created += 1
            continue
        if not stat.S_ISDIR(info.st_mode):
            raise CallError("exists", f"{rel} exists and is not a directory")

    for rel, target in links:
        path = entry_inside(real_root, rel)
        parent = os.path.dirname(path)
        os.makedirs(parent, 0o755, exist_ok=True)
        if os.path.isdir(path) and not os.path.islink(path):
            raise CallError("exists", f"{rel} is a directory; remove it first")
        temp = os.path.join(parent, call.temp_name("link"))
        os.symlink(target, temp)
        try:
            os.replace(temp, path)
        except OSError:
            os.unlink(temp)
            raise

    sockets_skipped = 0
    for rel, kind, mode, rdev in specials:
        if kind == "socket":
            sockets_skipped += 1  # only a process that listens can make one
            continue
        path = entry_inside(real_root, rel)
        os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
        remove_entry(path, False)
        if kind == "fifo":
            os.mkfifo(path, mode)
        else:
            kind_bits = stat.S_IFCHR if kind == "chardev" else stat.S_IFBLK
            os.mknod(path, kind_bits | mode, os.makedev(*rdev))
        os.chmod(path, mode)  # mkfifo and mknod apply the umask

    final = dict(dirs)
    final.update(chmods)
    changed = skipped = 0
    for rel in sorted(final, key=lambda r: (-_depth(r), r)):
        path = entry_inside(real_root, rel)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            raise CallError("not_found", f"cannot chmod {rel}: it does not exist") from None
        if stat.S_ISLNK(info.st_mode):
            skipped += 1
            continue
        os.chmod(path, final[rel])
        changed += 1
    if sync:
        sync_filesystem(real_root)
    return {
        "removed": removed,
        "dirs_created": created,
        "symlinks": len(links),
        "specials": len(specials) - sockets_skipped,
        "sockets_skipped": sockets_skipped,
        "chmods": changed,
        "skipped": skipped,
    }, b""


def _special(item: Any, root: str, real_root: str) -> tuple[str, str, int, tuple[int, int]]:
    """A checked ``specials`` item: (rel, type, mode, (major, minor))."""
    if not isinstance(item, dict):
        raise CallError("invalid_argument", "specials holds objects with path, type and mode")
    rel = parse_path(item.get("path"), root, real_root, "specials[].path")
    if not rel:
        raise CallError("invalid_argument", "specials cannot change the root itself")
    kind = item.get("type")
    if kind not in SPECIAL_TYPES:
        raise CallError("invalid_argument", f"specials[].type must be one of {SPECIAL_TYPES}")
    mode = _mode(item.get("mode"), "specials[].mode")
    rdev = item.get("rdev", [0, 0])
    if kind in ("chardev", "blockdev") and not (
        isinstance(rdev, list)
        and len(rdev) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 20 for n in rdev)
    ):
        raise CallError("invalid_argument", "specials[].rdev must be [major, minor]")
    return rel, str(kind), mode, (int(rdev[0]), int(rdev[1])) if kind != "fifo" else (0, 0)
