"""``pyro serve`` on this host's runtime cache, for the tests that boot real guests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from bench.serve import Served, pyro_serve

from pyro_mcp.runtime.paths import RuntimePaths


@pytest.fixture(scope="module")
def guest_server(
    runtime: RuntimePaths, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("serve-guest")
    env = {"PYRO_CACHE_DIR": str(runtime.cache_dir), "PYRO_RUN_DIR": str(runtime.run_root)}
    with pyro_serve(work, env=env) as server:
        yield server
