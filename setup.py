"""The wheel's build vendors the dashboard's npm files into the package first
(``web/vendor.py``); everything else is declared in pyproject.toml."""

from __future__ import annotations

import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

WEB = Path(__file__).resolve().parent / "web" / "vendor.py"


class BuildWithVendoredFiles(build_py):
    def run(self) -> None:
        if WEB.exists() and not getattr(self, "editable_mode", False):
            runpy.run_path(str(WEB))["vendor"]()
        super().run()


setup(cmdclass={"build_py": BuildWithVendoredFiles})
