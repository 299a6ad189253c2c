"""The dashboard in a real browser: Debian's chromium, headless, driven by Playwright (the
system browser: nothing is downloaded), against ``pyro serve`` on a real guest. Each step's
screenshot is saved under ``test-artifacts/dashboard/``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from bench.serve import Served, pyro_serve
from tests import net_topology as net

from pyro_mcp.runtime.paths import RuntimePaths

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.guest
CHROMIUM = shutil.which("chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"


# True once a line of the terminal's screen (its buffer, whatever renders it) reads ``arg``.
SCREEN_HAS_LINE = """(wanted) => {
  const buffer = window.pyroTerminal.buffer.active;
  for (let i = 0; i < buffer.length; i++) {
    const line = buffer.getLine(i);
    if (line && line.translateToString(true) === wanted) return true;
  }
  return false;
}"""


@pytest.fixture
def served(guest_server: Served) -> Served:
    return guest_server


@contextmanager
def _browser_page() -> Iterator[Page]:
    """A page of Debian's chromium, headless (screenshots go to ARTIFACTS)."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser.new_page()
        finally:
            browser.close()


def _pyro(served: Served, runtime: RuntimePaths, *args: str) -> str:
    """``pyro ARGS`` in another process, on the server's state (as a user at a terminal)."""
    env = dict(
        os.environ,
        PYRO_STATE_DIR=str(served.state_dir),
        PYRO_CACHE_DIR=str(runtime.cache_dir),
        PYRO_RUN_DIR=str(runtime.run_root),
    )
    done = subprocess.run(
        [sys.executable, "-m", "pyro_mcp.cli.main", *args],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is installed by `make host-packages`")
def test_a_person_watches_a_workspace_live_types_in_its_terminal_and_deletes_it(
    served: Served, runtime: RuntimePaths
) -> None:
    from playwright.sync_api import expect

    with _browser_page() as page:

        def shot(name: str) -> None:
            page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

        # Without the token there is nothing to see; with it, the login keeps it.
        assert page.goto(served.url + "/").status == 401
        page.goto(f"{served.url}/login?token={served.token}")
        assert page.url == served.url + "/"
        expect(page.locator("h1")).to_have_text("Workspaces")
        shot("1-empty")

        # A workspace made in another process appears within a second of its creation.
        wid = _pyro(served, runtime, "workspace", "create", "debian:12", "--id-only").strip()
        created = time.monotonic()
        row = page.locator(f'tr[data-workspace="{wid}"]')
        expect(row).to_be_visible(timeout=1000)
        assert time.monotonic() - created < 1.0
        expect(row.locator("td").nth(2)).to_have_text("running")
        shot("2-listed")

        # Its page: a service started elsewhere turns ready, and its log line arrives.
        row.locator("a").click()
        page.wait_for_url(f"{served.url}/workspaces/{wid}")
        _pyro(
            served, runtime, "workspace", "service", "start", wid, "web",
            "--ready-file", "/tmp/web.ready", "--",
            "sh", "-c", "echo hello-from-the-service; touch /tmp/web.ready; sleep 600",
        )  # fmt: skip
        service = page.locator('[data-service="web"]')
        expect(service.locator(".service-state")).to_have_text("web: ready", timeout=10_000)
        expect(service.locator(".service-log")).to_contain_text(
            "hello-from-the-service", timeout=10_000
        )
        # Its VMM's host CPU and memory, sampled as the page follows it.
        expect(page.locator("#rss")).to_have_text(re.compile(r"^\d+ MiB$"), timeout=5000)
        expect(page.locator("#cpu")).to_have_text(re.compile(r"^\d+ %$"))
        samples = re.compile(r"^([3-9]|\d{2,})$")  # a line of at least three points
        expect(page.locator("#chart")).to_have_attribute("data-samples", samples, timeout=5000)
        shot("3-service-ready")

        # A command run elsewhere: its journal row, and a bar of how long it took.
        _pyro(served, runtime, "workspace", "exec", wid, "--", "sleep", "0.2")
        expect(page.locator("#journal tr").first.locator("td").first).to_have_text(
            "sleep 0.2", timeout=5000
        )
        expect(page.locator("#timings")).to_have_attribute("data-bars", "1", timeout=5000)

        # The terminal (xterm.js, served by the package): a PTY shell in the guest
        # computes what the page never saw, on a line of its own.
        page.locator("#terminal").click()
        page.wait_for_function("() => window.pyroTerminal !== undefined")
        expect(page.locator("#terminal")).to_have_attribute("data-shell", re.compile("."))
        first_shell = page.locator("#terminal").get_attribute("data-shell")
        page.keyboard.type("echo $((6*7))")
        page.keyboard.press("Enter")
        page.wait_for_function(SCREEN_HAS_LINE, arg="42", timeout=15_000)
        shot("4-terminal")

        # The buttons: each asks what it needs (a checkpoint's name), and a destructive
        # one for a confirmation.
        page.on(
            "dialog",
            lambda dialog: dialog.accept("before") if dialog.type == "prompt" else dialog.accept(),
        )
        # A change, rendered as a diff once checkpointed; a reset takes it away.
        _pyro(served, runtime, "workspace", "exec", wid, "--", "sh", "-c", "echo x > notes.txt")
        page.locator("#action-snapshot_create").click()
        expect(page.locator("#checkpoints li")).to_contain_text(["before"], timeout=10_000)
        expect(page.locator("#diff")).to_contain_text("+++ b/notes.txt", timeout=10_000)
        shot("5-checkpointed")
        page.locator("#action-workspace_reset").click()
        expect(page.locator("#diff")).to_have_text(
            "(no changes since the baseline)", timeout=30_000
        )
        _pyro(served, runtime, "workspace", "exec", wid, "--", "test", "!", "-e", "notes.txt")
        # Stop, then start again: the page follows the state.
        page.locator("#action-workspace_stop").click()
        expect(page.locator("#state")).to_have_text("stopped", timeout=30_000)
        page.locator("#action-workspace_start").click()
        expect(page.locator("#state")).to_have_text("running", timeout=60_000)
        # The terminal's shell ended with the VM; the page opens a new one.
        expect(page.locator("#terminal")).not_to_have_attribute(
            "data-shell", first_shell or "", timeout=10_000
        )
        page.locator("#terminal").click()
        page.keyboard.type("echo $((6*7+1))")
        page.keyboard.press("Enter")
        page.wait_for_function(SCREEN_HAS_LINE, arg="43", timeout=15_000)
        shot("6-started-again")

        # Delete, confirmed: back to the list, where it is gone.
        page.locator("#action-workspace_delete").click()
        page.wait_for_url(served.url + "/", timeout=60_000)
        expect(page.locator(f'tr[data-workspace="{wid}"]')).to_have_count(0, timeout=5000)
        shot("7-deleted")
    listed = _pyro(served, runtime, "workspace", "list", "--json")
    assert wid not in listed


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is installed by `make host-packages`")
def test_a_published_port_is_a_link_on_its_workspace_page(
    runtime: RuntimePaths, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    env = {
        "PYRO_CACHE_DIR": str(runtime.cache_dir),
        "PYRO_RUN_DIR": str(runtime.run_root),
        "PYRO_DNS_UPSTREAMS": net.WEB_IP,
    }
    with net.topology() as topo:
        env["PYRO_NET_NAMESPACE"] = topo.host
        with pyro_serve(tmp_path, env=env) as served, served.client() as client:
            created = client.post(
                "/api/v1/workspace_create",
                json={"environment": "debian:12", "network_policy": "egress+published-ports"},
            )
            assert created.status_code == 200, created.text
            wid = created.json()["workspace_id"]
            try:
                started = client.post(
                    "/api/v1/service_start",
                    json={
                        "workspace_id": wid,
                        "service_name": "web",
                        "command": "python3 -m http.server 8080",
                        "ready_tcp": "127.0.0.1:8080",
                        "publish": ["0:8080"],
                    },
                )
                assert started.status_code == 200, started.text
                [port] = [p["host_port"] for p in started.json()["published_ports"]]
                with _browser_page() as page:
                    page.goto(f"{served.url}/login?token={served.token}")
                    page.goto(f"{served.url}/workspaces/{wid}")
                    link = page.locator("#ports a")
                    url = f"http://127.0.0.1:{port}/"
                    expect(link).to_have_attribute("href", url, timeout=10_000)
                    expect(link).to_have_text(f"{url} \u2192 guest 8080")
                    page.screenshot(path=str(ARTIFACTS / "ports.png"), full_page=True)
            finally:
                client.post("/api/v1/workspace_delete", json={"workspace_id": wid})
    assert net.namespaces_left(topo.prefix) == []
