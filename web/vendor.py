"""Vendor what the dashboard takes from npm into the package: ``npm ci`` here (the
versions ``package-lock.json`` pins, checked against its integrity digests), then copy
the files the pages load into ``src/pyro_mcp/serve/static/vendor/``.

Run by ``make npm-packages`` (so ``make test`` and a development checkout have them) and
by the wheel's build (``setup.py``), so an installed package serves them itself: the
dashboard loads nothing from a CDN. ``python web/vendor.py [--check]``: with ``--check``,
only say whether the vendored copies match ``node_modules`` (exit 1 when not).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = HERE.parent / "src" / "pyro_mcp" / "serve" / "static" / "vendor"
# What the pages load, from each package: (file in node_modules, name served as).
FILES = (
    ("@xterm/xterm/lib/xterm.js", "xterm.js"),
    ("@xterm/xterm/css/xterm.css", "xterm.css"),
    ("@xterm/xterm/LICENSE", "xterm.LICENSE.txt"),
)


def install() -> None:
    """``npm ci`` unless ``node_modules`` already holds what the lock file pins."""
    installed = HERE / "node_modules" / ".package-lock.json"
    lock = HERE / "package-lock.json"
    if installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime:
        return
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("web/vendor.py: npm is needed (Debian's npm: `pyro runtime install-host-packages`)")
    argv = [npm, "ci", "--prefix", str(HERE), "--no-audit", "--no-fund", "--loglevel=error"]
    subprocess.run(argv, check=True)


def stale() -> list[str]:
    """The vendored files missing or unlike their ``node_modules`` source."""
    modules = HERE / "node_modules"
    return [
        name
        for source, name in FILES
        if not (TARGET / name).exists()
        or (TARGET / name).read_bytes() != (modules / source).read_bytes()
    ]


def vendor() -> None:
    install()
    TARGET.mkdir(parents=True, exist_ok=True)
    for source, name in FILES:
        shutil.copyfile(HERE / "node_modules" / source, TARGET / name)


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        left = stale()
        print("vendored files current" if not left else f"stale or missing: {', '.join(left)}")
        sys.exit(1 if left else 0)
    vendor()
