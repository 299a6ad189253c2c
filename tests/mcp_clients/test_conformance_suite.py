"""The official MCP conformance suite against ``pyro mcp serve --http`` (the suite tests a
server over streamable HTTP only; stdio is covered by the Inspector's tests).

Every scenario fails or passes as conformance-baseline.json says: a failure it does not
list is a regression, and a listed scenario that passes must leave the list (the
baseline stays honest). Each listed failure says why the scenario does not apply.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tests.mcp_clients.conftest import BIN

BASELINE = Path(__file__).with_name("conformance-baseline.json")
SCENARIO_DIR = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d{2}-\d{2}T[\d-]+Z$")
SUITE_TIMEOUT_S = 600  # a bound for the whole suite (it takes ~10 s here)


def _baseline() -> dict[str, Any]:
    return dict(json.loads(BASELINE.read_text()))


def _run_suite(url: str, env: dict[str, str], out: Path) -> dict[str, list[dict[str, Any]]]:
    """Each scenario of the suite its baseline names, with the checks it recorded."""
    argv = [str(BIN / "conformance"), "server", "--url", url, "--suite", _baseline()["suite"]]
    subprocess.run(
        [*argv, "--output-dir", str(out)],
        env=env,
        cwd=out.parent,
        capture_output=True,
        text=True,
        timeout=SUITE_TIMEOUT_S,
        check=False,  # it exits 1 when any scenario fails: the checks say which
    )
    results = {}
    for folder in sorted(out.iterdir()):
        match = SCENARIO_DIR.match(folder.name)
        assert match, folder.name
        results[match.group("scenario")] = json.loads((folder / "checks.json").read_text())
    return results


def _listed_scenarios(env: dict[str, str]) -> set[str]:
    listed = subprocess.run(
        [str(BIN / "conformance"), "list", "--server"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return set(re.findall(r"^\s*- (\S+)", listed.stdout, re.MULTILINE))


@pytest.fixture(scope="module")
def outcomes(
    http_url: str, client_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("conformance") / "results"
    out.mkdir()
    return _run_suite(http_url, client_env, out)


def _failed(checks: list[dict[str, Any]]) -> bool:
    return any(check["status"] == "FAILURE" for check in checks)


def test_every_scenario_of_the_suite_ran(
    outcomes: dict[str, list[dict[str, Any]]], client_env: dict[str, str]
) -> None:
    assert set(outcomes) == _listed_scenarios(client_env)


def test_the_suite_fails_exactly_the_scenarios_the_baseline_explains(
    outcomes: dict[str, list[dict[str, Any]]],
) -> None:
    expected = set(_baseline()["expected_failures"])
    failed = {name for name, checks in outcomes.items() if _failed(checks)}
    passed = set(outcomes) - failed
    counts = f"{len(passed)} scenarios passed, {len(failed)} failed (of {len(outcomes)})"
    unexpected = {
        name: [c.get("errorMessage") for c in outcomes[name] if c["status"] == "FAILURE"]
        for name in sorted(failed - expected)
    }
    assert not unexpected, f"failures the baseline does not explain ({counts}): {unexpected}"
    stale = sorted(expected & passed)
    assert not stale, f"baseline entries that now pass, remove them ({counts}): {stale}"
    assert expected <= set(outcomes), sorted(expected - set(outcomes))


def test_the_baseline_gives_a_reason_for_every_entry() -> None:
    baseline = _baseline()
    explained = {**baseline["expected_failures"], **baseline["passing_without_exercising_pyro"]}
    assert not set(baseline["expected_failures"]) & set(baseline["passing_without_exercising_pyro"])
    assert all(isinstance(why, str) and len(why) > 40 for why in explained.values())


def test_the_baseline_names_the_pinned_suite_version() -> None:
    lock = json.loads((BIN.parent.parent / "package-lock.json").read_text())
    pinned = lock["packages"]["node_modules/@modelcontextprotocol/conformance"]["version"]
    assert _baseline()["conformance_version"] == pinned
