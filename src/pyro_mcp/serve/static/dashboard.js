// pyro-mcp dashboard: live pages over the server's own event streams and REST API.
// Every value from the server is put in the page with textContent, never as markup.
"use strict";

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}

function span(seconds) {
  seconds = Math.max(0, Math.floor(seconds));
  for (const [size, unit] of [[86400, "d"], [3600, "h"], [60, "min"]]) {
    if (seconds >= size) return `${Math.floor(seconds / size)} ${unit}`;
  }
  return `${seconds} s`;
}

async function call(tool, args) {
  const answer = await fetch(`/api/v1/${tool}`, {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify(args || {}),
    credentials: "same-origin",
  });
  const body = await answer.json();
  if (!answer.ok) throw new Error(`${body.error}: ${body.message}`);
  return body;
}

function say(text) {
  const status = document.getElementById("status");
  if (status) status.textContent = text;
}

// --- the workspace list ------------------------------------------------------------------

function renderList(rows) {
  const body = document.getElementById("workspaces");
  body.replaceChildren();
  const now = Date.now() / 1000;
  for (const row of rows) {
    const tr = el("tr", null, {"data-workspace": row.workspace_id});
    const link = el("a", row.workspace_id, {href: `/workspaces/${row.workspace_id}`});
    const id = el("td");
    id.append(link);
    const services = Object.values(row.services || {});
    const labels = Object.entries(row.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ");
    const ttl = row.expires_at ? (row.expires_at > now ? `${span(row.expires_at - now)} left` : "expired") : "none";
    tr.append(id, el("td", row.name || ""), el("td", row.state, {"class": "state"}),
      el("td", row.environment), el("td", span(now - row.created_at)), el("td", ttl),
      el("td", labels), el("td", services.length ? `${services.length} (${[...new Set(services.map(s => s.state))].sort().join(", ")})` : "none"));
    body.append(tr);
  }
  document.getElementById("empty").hidden = rows.length > 0;
}

// --- one workspace -----------------------------------------------------------------------

// The VMM's host CPU (percent of one core) and resident memory, the last 120 samples.
const usage = [];

function renderUsage(sample) {
  if (!sample) return;
  const last = usage[usage.length - 1];
  if (last && sample.at <= last.at) return;
  const cpu = last ? Math.max(0, 100 * (sample.cpu_s - last.cpu_s) / (sample.at - last.at)) : 0;
  usage.push({at: sample.at, cpu_s: sample.cpu_s, cpu, rss: sample.rss_bytes});
  while (usage.length > 120) usage.shift();
  document.getElementById("cpu").textContent = `${cpu.toFixed(0)} %`;
  document.getElementById("rss").textContent = `${(sample.rss_bytes / 1048576).toFixed(0)} MiB`;
  const width = 480, height = 80, step = width / 119;
  const maxRss = Math.max(...usage.map(u => u.rss), 1);
  const points = (value, top) => usage.map((u, i) => `${(i * step).toFixed(1)},${(height - height * value(u) / top).toFixed(1)}`).join(" ");
  document.getElementById("cpu-line").setAttribute("points", points(u => Math.min(u.cpu, 100), 100));
  document.getElementById("rss-line").setAttribute("points", points(u => u.rss, maxRss));
  document.getElementById("chart").dataset.samples = String(usage.length);
}

function renderWorkspace(data) {
  renderUsage(data.usage);
  const status = data.status;
  document.getElementById("state").textContent = status.state;
  document.getElementById("environment").textContent = status.environment;
  const services = document.getElementById("services");
  services.replaceChildren();
  for (const service of data.services) {
    const row = el("div", null, {"class": "service", "data-service": service.name});
    row.append(el("h3", `${service.name}: ${service.state}`, {"class": "service-state"}));
    row.append(el("pre", service.log, {"class": "service-log"}));
    services.append(row);
  }
  const ports = document.getElementById("ports");
  ports.replaceChildren();
  for (const port of (status.network && status.network.published_ports) || []) {
    const item = el("li");
    const url = `http://${port.host_ip}:${port.host_port}/`;
    item.append(el("a", `${url} → guest ${port.guest_port}`, {href: url}));
    ports.append(item);
  }
  const journal = document.getElementById("journal");
  journal.replaceChildren();
  for (const command of data.commands) {
    const tr = el("tr");
    const what = command.argv ? command.argv.join(" ") : command.shell;
    tr.append(el("td", what), el("td", command.exit_code), el("td", command.duration_ms === null ? "" : `${Math.round(command.duration_ms)} ms`),
      el("td", (command.stdout_tail || "").slice(-200)), el("td", (command.stderr_tail || "").slice(-200)));
    journal.append(tr);
  }
  const checkpoints = document.getElementById("checkpoints");
  checkpoints.replaceChildren();
  for (const snapshot of data.snapshots) checkpoints.append(el("li", snapshot.snapshot_name || snapshot.name));
}

async function showDiff(id) {
  try {
    const diff = await call("workspace_diff", {workspace_id: id});
    document.getElementById("diff").textContent = diff.patch || "(no changes since the baseline)";
  } catch (error) {
    document.getElementById("diff").textContent = String(error.message);
  }
}

function wireActions(id) {
  const actions = {
    stop: () => call("workspace_stop", {workspace_id: id}),
    start: () => call("workspace_start", {workspace_id: id}),
    checkpoint: () => {
      const name = prompt("checkpoint name");
      return name ? call("snapshot_create", {workspace_id: id, snapshot_name: name}) : null;
    },
    reset: () => confirm("Reset /workspace to its baseline?") ? call("workspace_reset", {workspace_id: id}) : null,
    delete: async () => {
      if (!confirm(`Delete workspace ${id}, its disks and checkpoints?`)) return null;
      await call("workspace_delete", {workspace_id: id});
      location.href = "/";
    },
  };
  for (const [name, action] of Object.entries(actions)) {
    const button = document.getElementById(`action-${name}`);
    if (!button) continue;
    button.addEventListener("click", async () => {
      say(`${name}...`);
      try { await action(); say(`${name}: done`); showDiff(id); } catch (error) { say(String(error.message)); }
    });
  }
}

// A terminal on a PTY shell of the workspace: what the shell prints (without terminal
// escapes), and a line to type into it.
async function wireTerminal(id) {
  const screen = document.getElementById("terminal");
  const input = document.getElementById("terminal-input");
  let shell = null;
  let cursor = 0;
  async function open() {
    const opened = await call("shell_open", {workspace_id: id});
    shell = opened.shell_id;
    read();
  }
  async function read() {
    while (shell) {
      try {
        const got = await call("shell_read", {workspace_id: id, shell_id: shell, cursor, plain: true, wait_for_idle_ms: 300});
        if (got.output) screen.textContent += got.output;
        cursor = got.next_cursor;
        screen.scrollTop = screen.scrollHeight;
        if (!got.alive) { shell = null; break; }
      } catch (error) { say(String(error.message)); shell = null; break; }
    }
  }
  input.addEventListener("keydown", async (event) => {
    if (event.key !== "Enter") return;
    const line = input.value;
    input.value = "";
    if (!shell) await open();
    await call("shell_write", {workspace_id: id, shell_id: shell, input: line});
  });
  document.getElementById("terminal-open").addEventListener("click", () => { if (!shell) open(); });
}

function watch(url, render) {
  const events = new EventSource(url);
  events.addEventListener("update", (event) => render(JSON.parse(event.data)));
  events.addEventListener("gone", () => { say("this workspace is gone"); events.close(); });
  return events;
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "list") {
    watch("/events/workspaces", (data) => renderList(data.workspaces));
  } else if (page === "workspace") {
    const id = document.body.dataset.workspace;
    watch(`/events/workspaces/${id}`, renderWorkspace);
    wireActions(id);
    wireTerminal(id);
    showDiff(id);
  }
});
