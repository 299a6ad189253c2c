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
  renderTimings(data.commands);
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

// A button per workspace action (rendered by the server from the registry): it asks for
// the arguments it needs, confirms a destructive one, and calls its REST route.
function wireActions(id) {
  for (const button of document.querySelectorAll("button.action")) {
    button.addEventListener("click", async () => {
      const {tool, title, confirm: confirming} = button.dataset;
      const args = {workspace_id: id};
      for (const ask of JSON.parse(button.dataset.asks || "[]")) {
        const value = prompt(ask.help);
        if (value === null || value === "") return;
        args[ask.name] = value;
      }
      if (confirming && !confirm(`${title} ${id}?`)) return;
      say(`${title}...`);
      try {
        const result = await call(tool, args);
        say(`${title}: done`);
        if (result.workspace_id && result.workspace_id !== id) {
          const status = document.getElementById("status");
          status.append(" ", el("a", result.workspace_id, {href: `/workspaces/${result.workspace_id}`}));
        }
        showDiff(id);
      } catch (error) { say(String(error.message)); }
    });
  }
}

// How long each of the last commands took, as bars (newest right).
function renderTimings(commands) {
  const chart = document.getElementById("timings");
  const took = commands.map(c => c.duration_ms).filter(ms => typeof ms === "number").reverse();
  const width = 480, height = 60, gap = 2, bar = width / Math.max(took.length, 20);
  const top = Math.max(...took, 1);
  chart.replaceChildren();
  took.forEach((ms, i) => {
    const h = Math.max(1, height * ms / top);
    const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    for (const [k, v] of Object.entries({x: i * bar, y: height - h, width: bar - gap, height: h, fill: "#693"})) rect.setAttribute(k, v);
    const label = document.createElementNS("http://www.w3.org/2000/svg", "title");
    label.textContent = `${Math.round(ms)} ms`;
    rect.append(label);
    chart.append(rect);
  });
  chart.dataset.bars = String(took.length);
}

// The terminal: xterm.js on a PTY shell that the server opens for this page and closes
// when the page goes; keystrokes go to the shell as typed, in order. What it returns opens
// a new shell (the old one ended with its VM when the workspace stopped).
function wireTerminal(id) {
  const screen = new Terminal({cols: 100, rows: 24, convertEol: false});
  screen.open(document.getElementById("terminal"));
  window.pyroTerminal = screen;
  let stream = null;
  let shell = null;
  let typing = Promise.resolve();
  function connect() {
    if (stream) stream.close();
    shell = null;
    stream = new EventSource(`/events/terminal/${id}?cols=100&rows=24`);
    const mine = stream;
    stream.addEventListener("opened", (event) => {
      shell = JSON.parse(event.data).shell_id;
      document.getElementById("terminal").dataset.shell = shell;
    });
    stream.addEventListener("output", (event) => screen.write(JSON.parse(event.data).text));
    stream.addEventListener("exit", (event) => {
      screen.write(`\r\n[the shell exited with ${JSON.parse(event.data).exit_code}]\r\n`);
      mine.close();
    });
    stream.addEventListener("error", (event) => {
      if (!event.data) return;  // the connection dropped: the browser connects again
      say(JSON.parse(event.data).message);  // the shell is gone (its VM stopped):
      mine.close();  // a new one opens when the workspace runs again, not on every retry
    });
  }
  screen.onData((data) => {
    if (!shell) return;
    typing = typing.then(() => call("shell_write", {workspace_id: id, shell_id: shell, input: data, append_newline: false}))
      .catch((error) => say(String(error.message)));
  });
  connect();
  return () => {
    screen.write("\r\n[the workspace started again: a new shell]\r\n");
    connect();
  };
}

function watch(url, render) {
  const events = new EventSource(url);
  events.addEventListener("update", (event) => render(JSON.parse(event.data)));
  events.addEventListener("gone", () => {
    events.close();
    if (document.body.dataset.page === "workspace") location.href = "/";  // it was deleted
  });
  return events;
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "list") {
    watch("/events/workspaces", (data) => renderList(data.workspaces));
  } else if (page === "workspace") {
    const id = document.body.dataset.workspace;
    const reopenTerminal = wireTerminal(id);
    let state = null;
    watch(`/events/workspaces/${id}`, (data) => {
      renderWorkspace(data);
      const now = data.status.state;
      if (now === "running" && state !== null && state !== "running") reopenTerminal();
      state = now;
    });
    wireActions(id);
    showDiff(id);
  }
});
