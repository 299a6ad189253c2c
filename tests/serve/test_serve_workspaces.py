"""The REST API of ``pyro serve`` driven by a plain HTTP client (httpx) through the whole
workspace loop on a real guest, with exec output streamed as server-sent events, and a
client that goes away mid-stream stopping the command it ran."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from bench.serve import Served

pytestmark = pytest.mark.guest


@pytest.fixture
def served(guest_server: Served) -> Served:
    return guest_server


def _call(client: httpx.Client, tool: str, **arguments: Any) -> Any:
    answer = client.post(f"/api/v1/{tool}", json=arguments)
    assert answer.status_code == 200, (tool, answer.status_code, answer.text)
    return answer.json()


def _events(answer: httpx.Response) -> Iterator[tuple[str, Any]]:
    """The (event, data) of a server-sent event stream, as they arrive."""
    event = None
    for line in answer.iter_lines():
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield str(event), json.loads(line.removeprefix("data: "))


def test_the_whole_workspace_loop_over_rest(served: Served) -> None:
    seed = served.root / "seed"
    seed.mkdir()
    (seed / "app.py").write_text("print('hello')\n")
    with served.client() as client:
        created = _call(client, "workspace_create", environment="debian:12", seed_path=str(seed))
        wid = created["workspace_id"]
        assert created["state"] == "running"
        ran = _call(client, "workspace_exec", workspace_id=wid, command="python3 app.py; exit 4")
        assert (ran["stdout"], ran["exit_code"]) == ("hello\n", 4)
        _call(client, "workspace_file_write", workspace_id=wid, path="notes.txt", text="ship it\n")
        read = _call(client, "workspace_file_read", workspace_id=wid, path="notes.txt")
        assert read["content"] == "ship it\n"
        diff = _call(client, "workspace_diff", workspace_id=wid)
        assert diff["summary"]["added"] == 1 and "+++ b/notes.txt" in diff["patch"]
        _call(client, "snapshot_create", workspace_id=wid, snapshot_name="before")
        _call(client, "workspace_exec", workspace_id=wid, command="rm app.py")
        _call(client, "workspace_reset", workspace_id=wid, snapshot="before")
        again = _call(client, "workspace_exec", workspace_id=wid, command=["cat", "app.py"])
        assert again["stdout"] == "print('hello')\n"
        listed = _call(client, "workspace_list")
        assert [row["workspace_id"] for row in listed["workspaces"]] == [wid]
        page = client.get("/")
        assert f'data-workspace="{wid}"' in page.text and "running" in page.text
        _call(client, "workspace_delete", workspace_id=wid)
        gone = client.post("/api/v1/workspace_status", json={"workspace_id": wid})
        assert gone.status_code == 404 and gone.json()["error"] == "not_found"


def test_exec_output_streams_as_events_and_the_result_comes_last(served: Served) -> None:
    with served.client() as client:
        wid = _call(client, "workspace_create", environment="debian:12")["workspace_id"]
        command = "echo one; sleep 1; echo two >&2; exit 3"
        arrived: list[tuple[str, Any, float]] = []
        started = time.monotonic()
        with client.stream(
            "POST", "/api/v1/workspace_exec/stream", json={"workspace_id": wid, "command": command}
        ) as answer:
            assert answer.status_code == 200
            assert answer.headers["content-type"].startswith("text/event-stream")
            for event, data in _events(answer):
                arrived.append((event, data, time.monotonic() - started))
        outputs = [
            (data["stream"], data["text"]) for event, data, _ in arrived if event == "output"
        ]
        assert outputs == [("stdout", "one\n"), ("stderr", "two\n")]
        first_output = next(at for event, _, at in arrived if event == "output")
        last, result, finished = arrived[-1]
        assert last == "result" and result["exit_code"] == 3
        assert finished - first_output > 0.8  # "one" came while the command still ran
        assert result["stdout"] == "one\n" and result["stderr"] == "two\n"
        _call(client, "workspace_delete", workspace_id=wid)


def test_a_stream_of_a_failing_call_ends_with_its_error(served: Served) -> None:
    with served.client() as client, client.stream(
        "POST", "/api/v1/workspace_exec/stream",
        json={"workspace_id": "0123456789ab", "command": "true"},
    ) as answer:  # fmt: skip
        events = list(_events(answer))
    assert events[-1][0] == "error"
    assert events[-1][1]["error"] == "not_found" and events[-1][1]["status"] == 404


def test_a_client_that_goes_away_mid_stream_stops_the_command(served: Served) -> None:
    with served.client() as client:
        wid = _call(client, "workspace_create", environment="debian:12")["workspace_id"]
        command = "echo started; sleep 60; touch /workspace/finished"
        with client.stream(
            "POST", "/api/v1/workspace_exec/stream", json={"workspace_id": wid, "command": command}
        ) as answer:
            for event, data in _events(answer):
                if event == "output" and data["text"] == "started\n":
                    break  # and leave: the response is closed
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            left = _call(client, "workspace_exec", workspace_id=wid, command="pgrep -x sleep")
            if left["exit_code"] == 1:
                break
            time.sleep(0.5)
        assert left["exit_code"] == 1, "the command still runs after its client went away"
        assert not _call(client, "workspace_exec", workspace_id=wid, command="ls")["stdout"].count(
            "finished"
        )
        logs = _call(client, "workspace_logs", workspace_id=wid)["commands"]
        assert logs[0]["exit_code"] != 0
        _call(client, "workspace_delete", workspace_id=wid)


def test_host_paths_are_confined_to_the_root_it_was_given(served: Served, tmp_path: Path) -> None:
    outside = tmp_path / "seed"
    outside.mkdir()
    with served.client() as client:
        answer = client.post(
            "/api/v1/workspace_create", json={"environment": "debian:12", "seed_path": str(outside)}
        )
    assert answer.status_code == 403 and answer.json()["error"] == "outside_root"


def test_service_logs_follow_as_events_until_the_service_exits(served: Served) -> None:
    with served.client() as client:
        wid = _call(client, "workspace_create", environment="debian:12")["workspace_id"]
        command = "for n in 1 2 3; do echo line $n; sleep 0.7; done"
        _call(client, "service_start", workspace_id=wid, service_name="ticker", command=command)
        arrived: list[tuple[str, Any, float]] = []
        started = time.monotonic()
        body = {"workspace_id": wid, "service_name": "ticker", "follow": True}
        with client.stream("POST", "/api/v1/service_logs/stream", json=body) as answer:
            assert answer.status_code == 200
            for event, data in _events(answer):
                arrived.append((event, data, time.monotonic() - started))
        text = "".join(data["text"] for event, data, _ in arrived if event == "output")
        assert [line for line in text.splitlines() if line] == ["line 1", "line 2", "line 3"]
        outputs = [at for event, _, at in arrived if event == "output"]
        assert outputs[-1] - outputs[0] > 0.5  # each line as the service wrote it
        assert arrived[-1][0] == "result"
        _call(client, "workspace_delete", workspace_id=wid)


def test_the_terminal_stream_owns_its_shell_and_closes_it_when_the_page_goes(
    served: Served,
) -> None:
    with served.client() as client:
        wid = _call(client, "workspace_create", environment="debian:12")["workspace_id"]
        with client.stream("GET", f"/events/terminal/{wid}?cols=90&rows=20") as answer:
            events = _events(answer)
            event, opened = next(events)
            assert event == "opened"
            shell = opened["shell_id"]
            assert [
                s["shell_id"] for s in _call(client, "shell_list", workspace_id=wid)["shells"]
            ] == [shell]
            typed = {"workspace_id": wid, "shell_id": shell, "append_newline": False}
            _call(client, "shell_write", **typed, input="stty size\r")
            screen = ""
            for event, data in events:
                if event == "output":
                    screen += data["text"]
                if "20 90" in screen:
                    break  # the size the page asked for, as the shell's terminal has it
        deadline = time.monotonic() + 10
        while (
            _call(client, "shell_list", workspace_id=wid)["shells"] and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        assert _call(client, "shell_list", workspace_id=wid)["shells"] == []
        bad = client.get(f"/events/terminal/{wid}?cols=wide")
        assert bad.status_code == 400 and bad.json()["error"] == "invalid_argument"
        _call(client, "workspace_delete", workspace_id=wid)


def _first_update(client: httpx.Client, path: str, *, holding: str) -> str:
    """The first ``update`` of the event stream ``path`` whose data holds ``holding`` (what
    the page shows once the output has arrived), as JSON text."""
    deadline = time.monotonic() + 30
    with client.stream("GET", path) as answer:
        assert answer.status_code == 200
        for event, data in _events(answer):
            text = json.dumps(data)
            if event == "update" and holding in text:
                return text
            assert time.monotonic() < deadline, f"no update of {path} holds {holding!r}"
    raise AssertionError(f"{path} ended without an update holding {holding!r}")


def test_a_secret_shows_only_as_stars_in_results_streams_pages_and_the_terminal(
    served: Served,
) -> None:
    token = "Tk" + secrets.token_hex(12)
    with served.client() as client:
        created = _call(
            client,
            "workspace_create",
            environment="debian:12",
            secrets=[{"name": "API_TOKEN", "value": token}],
        )
        wid = created["workspace_id"]
        seen: list[str] = [json.dumps(created)]
        ran = _call(
            client,
            "workspace_exec",
            workspace_id=wid,
            command='echo "tok:$API_TOKEN"',
            secret_env=["API_TOKEN"],
        )
        assert ran["stdout"] == "tok:***\n"
        body = {"workspace_id": wid, "command": "printenv API_TOKEN", "secret_env": ["API_TOKEN"]}
        with client.stream("POST", "/api/v1/workspace_exec/stream", json=body) as answer:
            streamed = "".join(answer.iter_text())
        assert '"text": "***\\n"' in streamed
        _call(
            client,
            "service_start",
            workspace_id=wid,
            service_name="app",
            command='echo "svc:$API_TOKEN"; exec sleep 1000',
            secret_env=["API_TOKEN"],
        )
        # What the workspace's page shows: its journal and the service's log tail.
        update = _first_update(client, f"/events/workspaces/{wid}", holding="svc:***")
        assert "tok:***" in update
        page = client.get(f"/workspaces/{wid}")
        assert page.status_code == 200
        # The dashboard's terminal: a person reads the secret's file in the shell.
        with client.stream("GET", f"/events/terminal/{wid}?cols=80&rows=24") as answer:
            events = _events(answer)
            event, opened = next(events)
            assert event == "opened"
            typed = {"workspace_id": wid, "shell_id": opened["shell_id"], "append_newline": False}
            _call(
                client, "shell_write", **typed, input="cat /run/pyro-secrets/API_TOKEN; echo :end\r"
            )
            screen = ""
            for event, data in events:
                if event == "output":
                    screen += data["text"]
                if "***:end" in screen:
                    break
        seen += [streamed, update, page.text, screen]
        seen.append(json.dumps(_call(client, "workspace_logs", workspace_id=wid)))
        seen.append(json.dumps(_call(client, "service_logs", workspace_id=wid, service_name="app")))
        assert [token in text for text in seen] == [False] * len(seen)
        _call(client, "workspace_delete", workspace_id=wid)
