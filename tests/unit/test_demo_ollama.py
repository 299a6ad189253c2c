"""``pyro demo ollama``: a model on an Ollama server (a scripted stand-in on loopback)
drives pyro's vm-run tools. The tool here is env_list (no VM); the guest test runs vm_run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tests.fake_ollama import answer, calls, fake_ollama, raw, tool_results

from pyro_mcp import InvalidArgument, ModelServerError, NotFound, OperationTimeout, TooLarge
from pyro_mcp.api import Context, ollama
from pyro_mcp.api.operations.demo import demo_ollama
from pyro_mcp.runtime.paths import RuntimePaths


@pytest.fixture
def ctx(tmp_path: Path) -> Context:
    return Context(paths=RuntimePaths(tmp_path / "cache", tmp_path / "run"))


def test_the_model_calls_a_tool_reads_its_result_and_answers(ctx: Context) -> None:
    with fake_ollama(calls(("env_list", {})), answer("There are three.")) as server:
        result = demo_ollama(ctx, base_url=server.url + "/", model="qwen3:4b")
    assert result == {
        "base_url": server.url,
        "model": "qwen3:4b",
        "task": ollama.TASK,
        "answer": "There are three.",
        "rounds": 2,
        "tool_calls": [{"name": "env_list", "arguments": {}, "ok": True, "outcome": "done"}],
    }
    assert server.paths == ["/api/chat", "/api/chat"]
    first, second = server.requests
    assert (first["model"], first["stream"]) == ("qwen3:4b", False)
    assert first["messages"] == [{"role": "user", "content": ollama.TASK}]
    offered = {t["function"]["name"]: t["function"] for t in first["tools"]}
    assert set(offered) == {"env_list", "vm_run"}  # the vm-run profile's tools
    run = offered["vm_run"]["parameters"]
    assert run["required"] == ["environment", "command"]
    assert run["properties"]["timeout_seconds"]["type"] == "number"
    [result_message] = tool_results(second)
    assert result_message["tool_name"] == "env_list"
    names = [row["name"] for row in result_message["content"]["environments"]]
    assert names == ["debian:12-base", "debian:12", "debian:12-build"]


def test_a_bad_call_reaches_the_model_as_an_error_it_can_read(ctx: Context) -> None:
    script = (
        calls(
            ("vm_run", {"environment": "debian:12", "command": "true", "timeout": 5}),
            ("rm_rf", {}),
            ("env_list", '{"bogus": 1}'),  # arguments as JSON text, as some models send
        ),
        answer("I could not."),
    )
    with fake_ollama(*script) as server:
        result = demo_ollama(ctx, base_url=server.url)
    sent = tool_results(server.requests[1])
    assert [m["tool_name"] for m in sent] == ["vm_run", "rm_rf", "env_list"]
    assert sent[0]["content"]["error"] == "invalid_argument"
    assert (
        "vm_run has no parameter 'timeout' (did you mean 'timeout_seconds'?)"
        in (sent[0]["content"]["message"])
    )
    assert sent[1]["content"] == {
        "error": "unknown_tool",
        "message": "there is no tool 'rm_rf'; the tools are env_list, vm_run",
    }
    assert "env_list has no parameter 'bogus'" in sent[2]["content"]["message"]
    assert [c["ok"] for c in result["tool_calls"]] == [False, False, False]


def _fails(ctx: Context, *script: Any, **options: Any) -> None:
    with fake_ollama(*script) as server:
        demo_ollama(ctx, base_url=server.url, **options)


def test_a_missing_model_says_how_to_pull_it(ctx: Context) -> None:
    body = b'{"error":"model \\"nope:1b\\" not found, try pulling it first"}'
    with pytest.raises(NotFound, match="has no model 'nope:1b'") as raised:
        _fails(ctx, raw(404, body), model="nope:1b")
    assert raised.value.hint == "pull it with `ollama pull nope:1b`, or choose another with --model"


@pytest.mark.parametrize(
    ("reply", "error", "message"),
    [
        (raw(500, b'{"error":"out of memory"}'), ModelServerError, "HTTP 500: out of memory"),
        (raw(200, b"<html>"), ModelServerError, "did not answer JSON"),
        (raw(200, b'{"done": true}'), ModelServerError, "has no message"),
        (raw(200, b'{"message": {"content": 7}}'), ModelServerError, "not shaped as Ollama's"),
        (
            raw(200, b'{"message": {"tool_calls": [{"function": {"name": 3}}]}}'),
            ModelServerError,
            "a tool call in the reply of .* is malformed",
        ),
        (calls(*[("env_list", {})] * 5), ModelServerError, "asked for 5 tool calls at once"),
        (raw(200, b" " * (ollama.MAX_REPLY_BYTES + 1)), TooLarge, "sent more than 4194304 bytes"),
    ],
)
def test_what_a_server_must_not_send_is_a_clear_error(
    ctx: Context, reply: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        _fails(ctx, reply)


def test_a_model_that_never_answers_is_stopped_after_the_last_round(ctx: Context) -> None:
    with (
        fake_ollama(*[calls(("env_list", {}))] * ollama.MAX_ROUNDS) as server,
        pytest.raises(ModelServerError, match="made 8 rounds of tool calls without"),
    ):
        demo_ollama(ctx, base_url=server.url, model="m")
    assert len(server.requests) == ollama.MAX_ROUNDS


def test_a_reply_that_does_not_come_fires_the_timeout(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ollama, "REQUEST_TIMEOUT_S", 0.3)
    with (
        fake_ollama(answer("late"), delay_s=3) as server,
        pytest.raises(OperationTimeout, match=r"sent no reply in 0\.3 s"),
    ):
        demo_ollama(ctx, base_url=server.url)


def test_no_server_says_how_to_start_one(ctx: Context) -> None:
    with fake_ollama() as server:
        url = server.url  # a port nothing listens on once it is closed
    with pytest.raises(ModelServerError, match=f"no Ollama server answers at {url}") as raised:
        demo_ollama(ctx, base_url=url)
    assert raised.value.hint == "start one with `ollama serve`, or give its address with --base-url"


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.1:11434", "127.0.0.1:11434", "http://", "http://h:1/?q=1"]
)
def test_a_base_url_that_is_not_http_is_refused(ctx: Context, url: str) -> None:
    with pytest.raises(InvalidArgument, match="base_url"):
        demo_ollama(ctx, base_url=url)


def test_the_cli_prints_the_answer_and_with_v_the_conversation(tmp_path: Path) -> None:
    script = (calls(("env_list", {})), answer("debian:12 and two more."))
    env = {"PYRO_CACHE_DIR": str(tmp_path / "cache"), "PYRO_STATE_DIR": str(tmp_path / "s")}
    with fake_ollama(*script) as server:
        done = subprocess.run(
            [sys.executable, "-m", "pyro_mcp.cli.main", "demo", "ollama", "-v",
             "--base-url", server.url, "--model", "qwen3:4b"],
            capture_output=True, text=True, timeout=60, env={**_environ(), **env},
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "qwen3:4b: debian:12 and two more.\n\n  called env_list: done\n(1 tool calls in 2 rounds)\n"
    )
    assert "qwen3:4b calls env_list {}" in done.stderr  # -v: each call's arguments
    assert "asking qwen3:4b (round 2)" in done.stderr


def test_the_cli_without_a_server_exits_1_with_the_fix(tmp_path: Path) -> None:
    with fake_ollama() as server:
        url = server.url
    done = subprocess.run(
        [sys.executable, "-m", "pyro_mcp.cli.main", "demo", "ollama", "--base-url", url,
         "--json"],
        capture_output=True, text=True, timeout=60, env=_environ(),
    )  # fmt: skip
    assert done.returncode == 1
    assert json.loads(done.stdout)["error"] == "model_server_error"


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)
