// app.js: the relayhub dashboard. Wires the page (index.html) to the hub: a RelayHub client for live channel
// values, GET /api/stats for the hub panel, and the admin polling API for the jobs panel. Everything received
// is rendered with textContent, never as HTML.
//
// Page URL parameters (all optional):
//   channels=a,b   channels to show at start instead of the remembered (or default demo) ones
//   ws=URL         WebSocket URL (default: /ws on this origin); the REST API stays on this origin

import { RelayHub, isValidChannel } from "./relayhub.js";
import { RateChart } from "./rate-chart.js";

/** Channels shown on a first visit, so a person sees data moving at once (the hub's demo source). */
const DEFAULT_CHANNELS = ["demo:BTC", "demo:ETH", "demo:SOL"];
const STATS_EVERY_MS = 3_000;
const JOBS_EVERY_MS = 3_000;
const CHANNELS_KEY = "relayhub.channels";
const TOKEN_KEY = "relayhub.adminToken";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const apiBase = location.origin;

// --- DOM building blocks --------------------------------------------------------------------------------------

/** Creates an element with text content and attributes; `text` is always set as text. */
function el(tag, { text, className, attrs } = {}) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs ?? {})) node.setAttribute(k, v);
  return node;
}

function showMessage(node, text, kind = "info") {
  node.textContent = text;
  node.hidden = !text;
  node.classList.toggle("message-error", kind === "error");
  node.classList.toggle("message-ok", kind === "ok");
}

const reduceMotion = window.matchMedia?.("(prefers-reduced-motion: reduce)").matches ?? false;

/** Briefly highlights a changed cell or row. */
function flash(node) {
  node.classList.remove("flash");
  if (reduceMotion) return;
  // Restarting a CSS animation needs a style flush between removing and adding the class.
  void node.offsetWidth;
  node.classList.add("flash");
}

/** Keys shown first when a value is an object, so the figure a person looks for is not cut off. */
const LEADING_KEYS = ["symbol", "name", "price", "value", "last", "change", "status"];

/** Compact one-line JSON for the table: an object's leading keys first, then the rest in their order. */
function preview(data) {
  if (data === null || typeof data !== "object" || Array.isArray(data)) return compact(data);
  const ordered = {};
  for (const k of LEADING_KEYS) if (Object.hasOwn(data, k)) ordered[k] = data[k];
  for (const [k, v] of Object.entries(data)) if (!Object.hasOwn(ordered, k)) ordered[k] = v;
  return compact(ordered);
}

/** Compact one-line JSON of any value; strings show as they are. */
function compact(data) {
  if (typeof data === "string") return data;
  try {
    return JSON.stringify(data) ?? String(data);
  } catch {
    return String(data);
  }
}

function timeOf(ts) {
  const d = ts ? new Date(ts) : new Date();
  if (Number.isNaN(d.getTime())) return { short: String(ts), full: String(ts) };
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  const short = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
  return { short, full: d.toISOString() };
}

function formatUptime(seconds) {
  const s = Math.max(0, Math.floor(Number(seconds) || 0));
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  if (d > 0) return `${d}d ${h}h`;
  if (h > 0) return `${h}h ${m}m`;
  if (m > 0) return `${m}m ${s % 60}s`;
  return `${s}s`;
}

function formatNumber(n) {
  return typeof n === "number" ? n.toLocaleString("en-US") : "–";
}

// --- connection -----------------------------------------------------------------------------------------------

const hub = new RelayHub(params.get("ws") || "/ws", { restBase: apiBase });
const chart = new RateChart($("rate-chart"), { onTick: (n) => ($("rate-now").textContent = String(n)) });

function renderStatus(state, detail = {}) {
  const node = $("status");
  node.textContent = state;
  node.dataset.state = state;
  // The why, for a person hovering the indicator: last close code and reason, next attempt.
  const parts = [];
  if (detail.code) parts.push(`closed with ${detail.code}${detail.reason ? ` (${detail.reason})` : ""}`);
  if (state === "reconnecting" && detail.delay !== undefined) {
    parts.push(`attempt ${detail.attempt} in ${(detail.delay / 1000).toFixed(1)} s`);
  }
  if (detail.gaveUp) parts.push("gave up; press Reconnect");
  node.title = parts.length ? `WebSocket ${parts.join("; ")}` : "WebSocket connection";
  $("reconnect").hidden = state !== "closed";
  if (state !== "open") $("latency").textContent = "–";
}

hub.on("status", renderStatus);
hub.on("latency", (ms) => ($("latency").textContent = `${ms < 10 ? ms.toFixed(1) : Math.round(ms)} ms`));
hub.on("fallback", (active) => ($("fallback").hidden = !active));
hub.on("error", (err) => {
  if (err.op === "subscribe" && err.channel) {
    showMessage($("channel-error"), `${err.channel}: ${err.code}${err.message ? `: ${err.message}` : ""}`, "error");
    if (err.dropped) removeRow(err.channel);
  }
});
$("reconnect").addEventListener("click", () => hub.connect());
renderStatus(hub.status);

// --- channels table -------------------------------------------------------------------------------------------

/** channel -> { row, cells, off, text } */
const rows = new Map();

function saveChannels() {
  try {
    localStorage.setItem(CHANNELS_KEY, JSON.stringify([...rows.keys()]));
  } catch {
    // storage may be disabled; the list is then not remembered
  }
}

function initialChannels() {
  if (params.has("channels")) {
    return params.get("channels").split(",").map((c) => c.trim()).filter(Boolean);
  }
  try {
    const saved = JSON.parse(localStorage.getItem(CHANNELS_KEY) ?? "null");
    if (Array.isArray(saved)) return saved.filter((c) => typeof c === "string");
  } catch {
    // fall through to the defaults
  }
  return DEFAULT_CHANNELS;
}

function updateEmpty() {
  $("channels-empty").hidden = rows.size > 0;
  $("channels-table").hidden = rows.size === 0;
}

function addChannel(channel) {
  if (rows.has(channel)) {
    flash(rows.get(channel).row);
    return;
  }
  const row = el("tr", { attrs: { "data-channel": channel, "data-testid": "channel-row", "data-source": "" } });
  const cell = (className, text, testid, label) =>
    el("td", { className, text, attrs: { "data-testid": testid, "data-label": label } });
  const cells = {
    channel: cell("cell-channel", null, "channel", "Channel"),
    value: cell("cell-value", "waiting…", "value", "Value"),
    seq: cell("num cell-seq", "–", "seq", "Seq"),
    updated: cell("cell-updated", "–", "updated", "Updated"),
    actions: el("td", { className: "cell-actions" }),
  };
  cells.channel.append(el("code", { text: channel }));
  cells.value.classList.add("pending");
  // The text sits in a span so a phone can clamp it to a few lines.
  cells.valueText = el("span", { className: "value-text", text: cells.value.textContent });
  cells.value.replaceChildren(cells.valueText);
  const label = `Unsubscribe from ${channel}`;
  const remove = el("button", {
    text: "×",
    className: "btn-icon",
    attrs: { type: "button", "data-testid": "unsubscribe", title: label, "aria-label": label },
  });
  remove.addEventListener("click", () => removeRow(channel));
  cells.actions.append(remove);
  row.append(cells.channel, cells.value, cells.seq, cells.updated, cells.actions);
  $("channels-body").append(row);

  const entry = { row, cells, text: null, off: null };
  rows.set(channel, entry);
  entry.off = hub.subscribe(channel, (data, meta) => onValue(entry, data, meta));
  saveChannels();
  updateEmpty();
}

function removeRow(channel) {
  const entry = rows.get(channel);
  if (!entry) return;
  entry.off?.();
  entry.row.remove();
  rows.delete(channel);
  saveChannels();
  updateEmpty();
}

function onValue(entry, data, meta) {
  chart.add(1);
  const { cells, row } = entry;
  const text = preview(data);
  const time = timeOf(meta.ts);
  if (text !== entry.text) {
    cells.valueText.textContent = text;
    cells.value.title = compact(data);
    cells.value.classList.remove("pending");
    if (entry.text !== null) flash(cells.value);
    entry.text = text;
  }
  const seq = String(meta.seq ?? "–");
  if (cells.seq.textContent !== seq) {
    if (cells.seq.textContent !== "–") flash(cells.seq);
    cells.seq.textContent = seq;
  }
  cells.updated.textContent = time.short;
  cells.updated.title = meta.ts ? `stored by the hub at ${time.full}` : `received at ${time.full}`;
  row.dataset.seq = meta.seq === null ? "" : String(meta.seq);
  row.dataset.source = meta.source;
  row.dataset.snapshot = String(meta.snapshot);
  row.classList.toggle("via-rest", meta.source === "rest");
}

$("subscribe-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const input = $("channel-input");
  const channel = input.value.trim();
  if (!isValidChannel(channel)) {
    showMessage($("channel-error"), "A channel name is 1-200 characters of letters, digits and _ . : @ # -", "error");
    input.focus();
    return;
  }
  showMessage($("channel-error"), "");
  addChannel(channel);
  input.value = "";
});

for (const channel of initialChannels()) {
  if (isValidChannel(channel)) addChannel(channel);
}
updateEmpty();

// --- hub stats ------------------------------------------------------------------------------------------------

async function fetchJson(path, init = {}) {
  const res = await fetch(`${apiBase}${path}`, { cache: "no-store", ...init });
  let body = null;
  try {
    body = await res.json();
  } catch {
    // not JSON (e.g. a proxy's error page)
  }
  return { res, body };
}

function errorText(res, body) {
  const e = body?.error;
  if (e && typeof e === "object") return `${res.status} ${e.code ?? ""}${e.message ? `: ${e.message}` : ""}`.trim();
  return `${res.status} ${res.statusText}`.trim();
}

async function refreshStats() {
  try {
    const { res, body } = await fetchJson("/api/stats");
    if (!res.ok || !body) throw new Error(errorText(res, body));
    $("stat-mode").textContent = body.mode ?? "–";
    $("stat-pubsub").textContent = body.pubsub_active === undefined ? "–" : body.pubsub_active ? "active" : "inactive";
    $("stat-pubsub").dataset.active = String(Boolean(body.pubsub_active));
    $("stat-connections").textContent = formatNumber(body.connections);
    $("stat-channels").textContent = formatNumber(body.channels);
    // Subscriptions over all channels: the hub's total when it reports one, else the sum per channel.
    let subscribers = typeof body.subscriptions === "number" ? body.subscriptions : undefined;
    if (subscribers === undefined && body.subscribers && typeof body.subscribers === "object") {
      subscribers = Object.values(body.subscribers).reduce((sum, n) => sum + (Number(n) || 0), 0);
    }
    $("stat-subscribers").textContent = formatNumber(subscribers);
    $("stat-published").textContent = formatNumber(body.messages_published);
    $("stat-delivered").textContent = formatNumber(body.messages_delivered);
    $("stat-uptime").textContent = body.uptime_seconds === undefined ? "–" : formatUptime(body.uptime_seconds);
    $("stats-instance").textContent = body.instance_id ? `· ${body.instance_id}` : "";
    showMessage($("stats-error"), "");
    $("stats").classList.remove("stale");
  } catch (err) {
    showMessage($("stats-error"), `Stats unavailable: ${err.message}`, "error");
    $("stats").classList.add("stale");
  }
}

refreshStats();
setInterval(refreshStats, STATS_EVERY_MS);

// --- admin: polling jobs --------------------------------------------------------------------------------------

const tokenInput = $("admin-token");
try {
  tokenInput.value = sessionStorage.getItem(TOKEN_KEY) ?? "";
} catch {
  // storage disabled: the token lives in the field only
}
tokenInput.addEventListener("input", () => {
  try {
    sessionStorage.setItem(TOKEN_KEY, tokenInput.value);
  } catch {
    // see above
  }
});

function adminHeaders(json = false) {
  const headers = { Accept: "application/json" };
  if (json) headers["Content-Type"] = "application/json";
  const token = tokenInput.value.trim();
  if (token) headers.Authorization = `Bearer ${token}`;
  return headers;
}

/**
 * Reads the params field: `key=value` pairs (separated by commas, `&` or spaces) or a JSON object.
 * @returns {Record<string, any>}
 */
function parseParams(text) {
  const t = text.trim();
  if (!t) return {};
  if (t.startsWith("{")) {
    const obj = JSON.parse(t);
    if (obj === null || typeof obj !== "object" || Array.isArray(obj)) throw new Error("params must be a JSON object");
    return obj;
  }
  const out = {};
  for (const part of t.split(/[,&\s]+/).filter(Boolean)) {
    const i = part.indexOf("=");
    if (i <= 0) throw new Error(`"${part}" is not key=value`);
    out[part.slice(0, i).trim()] = part.slice(i + 1).trim();
  }
  return out;
}

function adminProblem(res, body) {
  if (res.status === 401 || res.status === 403) return `${errorText(res, body)} (check the admin token)`;
  if (res.status === 404 && !body?.error) return "this hub has no polling API";
  return errorText(res, body);
}

let jobsInFlight = false;

async function refreshJobs() {
  if (jobsInFlight) return;
  jobsInFlight = true;
  try {
    const { res, body } = await fetchJson("/api/polling/status", { headers: adminHeaders() });
    if (!res.ok || !body) {
      $("jobs-empty").textContent = `Jobs unavailable: ${adminProblem(res, body)}`;
      $("jobs-empty").hidden = false;
      $("jobs-body").replaceChildren();
      $("jobs-table").hidden = true;
      return;
    }
    renderJobs(Array.isArray(body.jobs) ? body.jobs : []);
  } catch (err) {
    $("jobs-empty").textContent = `Jobs unavailable: ${err.message}`;
    $("jobs-empty").hidden = false;
  } finally {
    jobsInFlight = false;
  }
}

function renderJobs(jobs) {
  const body = $("jobs-body");
  const known = new Set([...body.children].map((tr) => tr.dataset.job));
  body.replaceChildren(...jobs.map((job) => jobRow(job, !known.has(String(job.id)))));
  $("jobs-table").hidden = jobs.length === 0;
  $("jobs-empty").textContent = "No polling job.";
  $("jobs-empty").hidden = jobs.length > 0;
}

/** One row of the jobs table; `fresh` rows (not shown before) flash once. */
function jobRow(job, fresh) {
  const id = String(job.id);
  const stateName = String(job.state ?? "unknown");
  const tr = el("tr", { attrs: { "data-job": id, "data-testid": "job-row", "data-state": stateName } });
  const td = (label, attrs = {}) => el("td", { attrs: { "data-label": label, ...attrs } });

  const params = Object.entries(job.params ?? {})
    .map(([k, v]) => `${k}=${typeof v === "string" ? v : compact(v)}`)
    .join(" ");
  const who = td("Job");
  who.append(el("code", { text: id }), el("div", { className: "muted small", text: `${job.source ?? ""} ${params}` }));

  const channel = td("Channel", { "data-testid": "job-channel" });
  channel.append(el("code", { text: job.channel ?? "" }));

  const state = td("State", { "data-testid": "job-state" });
  const badgeClass = `badge state-${stateName.replace(/[^a-z_-]/gi, "")}`;
  state.append(el("span", { className: badgeClass, text: stateName }));
  if (job.interval) state.append(el("span", { className: "muted small", text: ` every ${job.interval}` }));
  if (job.owner) state.title = `owner: ${job.owner}`;
  if (job.last_error) state.append(el("div", { className: "small error-text", text: compact(job.last_error) }));

  const last = td("Last success", { title: job.last_success ?? "" });
  last.textContent = job.last_success ? timeOf(job.last_success).short : "–";
  const failures = td("Failures");
  failures.className = "num";
  failures.textContent = String(job.consecutive_failures ?? 0);
  const subs = td("Subscribers");
  subs.className = "num";
  subs.textContent = String(job.subscribers ?? "–");

  const actions = el("td", { className: "cell-actions" });
  const stop = el("button", {
    text: "Stop",
    className: "btn btn-small btn-danger",
    attrs: { type: "button", "data-testid": "job-stop", "data-job": id },
  });
  stop.addEventListener("click", () => stopJob(job.id, stop));
  actions.append(stop);

  tr.append(who, channel, state, last, failures, subs, actions);
  if (fresh) tr.classList.add("flash");
  return tr;
}

async function startJob(ev) {
  ev.preventDefault();
  const message = $("admin-message");
  const source = $("poll-source").value.trim();
  let jobParams;
  try {
    jobParams = parseParams($("poll-params").value);
  } catch (err) {
    showMessage(message, `Params: ${err.message}`, "error");
    return;
  }
  const button = $("poll-start");
  button.disabled = true;
  try {
    const { res, body } = await fetchJson("/api/polling/start", {
      method: "POST",
      headers: adminHeaders(true),
      body: JSON.stringify({ source, params: jobParams }),
    });
    if (!res.ok || !body) {
      showMessage(message, `Start failed: ${adminProblem(res, body)}`, "error");
      return;
    }
    showMessage(message, `Started job ${body.job} on ${body.channel}`, "ok");
    // Show the job's output at once.
    if (isValidChannel(body.channel)) addChannel(body.channel);
  } catch (err) {
    showMessage(message, `Start failed: ${err.message}`, "error");
  } finally {
    button.disabled = false;
    refreshJobs();
  }
}

async function stopJob(id, button) {
  const message = $("admin-message");
  button.disabled = true;
  try {
    const { res, body } = await fetchJson("/api/polling/stop", {
      method: "POST",
      headers: adminHeaders(true),
      body: JSON.stringify({ job: id }),
    });
    if (!res.ok || !body) {
      showMessage(message, `Stop failed: ${adminProblem(res, body)}`, "error");
      button.disabled = false;
      return;
    }
    showMessage(message, body.stopped === false ? `Job ${id} was not running` : `Stopped job ${id}`, "ok");
  } catch (err) {
    showMessage(message, `Stop failed: ${err.message}`, "error");
    button.disabled = false;
  } finally {
    refreshJobs();
  }
}

async function loadSources() {
  try {
    const { res, body } = await fetchJson("/api/polling/sources", { headers: adminHeaders() });
    if (!res.ok || !Array.isArray(body?.sources)) return;
    const list = $("poll-sources");
    list.replaceChildren(...body.sources.map((s) => el("option", { attrs: { value: String(s.name) } })));
    const describe = (s) =>
      `${s.name}: ${(s.params ?? []).join(", ") || "no params"} → ${s.channel ?? "?"}` +
      (s.interval ? ` every ${s.interval}` : "");
    $("poll-hint").textContent = body.sources.map(describe).join(" · ");
  } catch {
    // the hint stays empty
  }
}

$("admin-form").addEventListener("submit", startJob);
tokenInput.addEventListener("change", () => {
  loadSources();
  refreshJobs();
});
loadSources();
refreshJobs();
setInterval(refreshJobs, JOBS_EVERY_MS);

// For a person poking around in the console.
window.relayhub = { hub, chart };
