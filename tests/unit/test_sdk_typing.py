"""mypy, reading the SDK stub, catches a misused SDK call before it runs (an argument
the method does not take, a value of the wrong type, a method or result key that does
not exist) and types the results of a correct one. One mypy run over one program of
calls; each test reads what it says about its own lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PROGRAM = """\
from pyro_mcp import AsyncPyro, Pyro


def unknown_keyword() -> None:
    Pyro().exec_workspace("ws", command=["true"], bogus=1)  # CASE unknown-keyword


def wrong_type() -> None:
    Pyro().exec_workspace("ws", command=["true"], timeout_seconds="x")  # CASE wrong-type


def wrong_choice() -> None:
    Pyro().service_logs("ws", "web", stream="all")  # CASE wrong-choice


def unknown_method() -> None:
    Pyro().exec_workspaces("ws", ["true"])  # CASE unknown-method


def unknown_key() -> None:
    print(Pyro().exec_workspace("ws", ["true"])["exit_status"])  # CASE unknown-key


def async_not_awaited() -> None:
    AsyncPyro().exec_workspace("ws", ["true"])  # CASE not-awaited


def correct() -> None:
    pyro = Pyro(cache_dir="/tmp/cache")
    result = pyro.exec_workspace("ws", command=["true"], timeout_seconds=5, cwd=Path("src"))
    reveal_type(result)  # CASE result
    reveal_type(result["exit_code"])  # CASE exit-code
    reveal_type(result["stdout"])  # CASE stdout
    created = pyro.create_workspace("debian:12", secrets=[{"name": "T", "value": "v"}])
    reveal_type(created["network"]["guest_ip"])  # CASE guest-ip
    reveal_type(created.get("boot"))  # CASE boot


async def correct_async() -> None:
    ran = await AsyncPyro().run_in_vm("debian:12", "uname -r", mem_mib=256)
    reveal_type(ran["timings_ms"])  # CASE timings
"""


@pytest.fixture(scope="module")
def said(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """What mypy says about each CASE line of PROGRAM (its messages, in order)."""
    work = tmp_path_factory.mktemp("sdk-typing")
    program = work / "program.py"
    program.write_text("from pathlib import Path\n" + PROGRAM)
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--no-incremental",
            "--strict",
            "--follow-imports=silent",
            "--no-error-summary",
            "--show-error-codes",
            "--config-file=",
            "--cache-dir",
            str(work / "cache"),
            str(program),
        ],
        capture_output=True,
        text=True,
        cwd=work,
        env={**os.environ, "MYPYPATH": str(SRC)},
        timeout=600,
    )
    cases = {
        number: match.group(1)
        for number, line in enumerate(program.read_text().splitlines(), start=1)
        if (match := re.search(r"# CASE (\S+)$", line))
    }
    found: dict[str, list[str]] = {case: [] for case in cases.values()}
    for line in completed.stdout.splitlines():
        match = re.match(r"^.*program\.py:(\d+): (error|note): (.*)$", line)
        assert match, f"mypy said something about no CASE line: {line}\n{completed.stderr}"
        case = cases.get(int(match.group(1)))
        assert case, f"mypy said something about no CASE line: {line}"
        found[case].append(match.group(3))
    return found


def test_a_keyword_the_method_does_not_take_is_an_error_naming_it(
    said: dict[str, list[str]],
) -> None:
    assert said["unknown-keyword"] == [
        'Unexpected keyword argument "bogus" for "exec_workspace" of "Pyro"  [call-arg]',
        '"exec_workspace" defined in "pyro_mcp._sdk_methods"',
    ]


def test_a_value_of_the_wrong_type_is_an_error_naming_the_argument(
    said: dict[str, list[str]],
) -> None:
    assert said["wrong-type"] == [
        'Argument "timeout_seconds" to "exec_workspace" of "Pyro" has incompatible type '
        '"str"; expected "float"  [arg-type]'
    ]
    assert said["wrong-choice"] == [
        'Argument "stream" to "service_logs" of "Pyro" has incompatible type '
        "\"Literal['all']\"; expected \"Literal['stdout', 'stderr', 'both']\"  [arg-type]"
    ]


def test_a_method_or_result_key_that_does_not_exist_is_an_error(
    said: dict[str, list[str]],
) -> None:
    assert said["unknown-method"] == ['"Pyro" has no attribute "exec_workspaces"  [attr-defined]']
    assert said["unknown-key"] == [
        'TypedDict "WorkspaceExecResult" has no key "exit_status"  [typeddict-item]'
    ]
    assert said["not-awaited"] == [
        'Value of type "Coroutine[Any, Any, WorkspaceExecResult]" must be used  [unused-coroutine]',
        "Are you missing an await?",
    ]


def test_correct_calls_type_check_clean_and_their_results_are_typed(
    said: dict[str, list[str]],
) -> None:
    revealed = {case: messages for case, messages in said.items() if case not in _ERRORS}
    whole = revealed.pop("result")
    assert len(whole) == 1 and whole[0].startswith(
        'Revealed type is "TypedDict(pyro_mcp.api.results.WorkspaceExecResult, '
        "{'exit_code': int, 'stdout': str, 'stderr': str, "
    )
    assert revealed == {
        "exit-code": ['Revealed type is "int"'],
        "stdout": ['Revealed type is "str"'],
        "guest-ip": ['Revealed type is "str | None"'],
        "boot": [
            'Revealed type is "TypedDict(pyro_mcp.api.results.BootPlanInfo, '
            "{'mode': str, 'reason': str, 'template': str | None}) | None\""
        ],
        "timings": ['Revealed type is "dict[str, float]"'],
    }


_ERRORS = {
    "unknown-keyword",
    "wrong-type",
    "wrong-choice",
    "unknown-method",
    "unknown-key",
    "not-awaited",
}
