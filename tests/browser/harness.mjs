// harness.mjs: what the browser tests stand on. Starts and stops the real relayhub binary on a free loopback
// port with a config file written to a temp dir, talks to its HTTP API, launches Debian's Chromium through
// playwright-core, and waits for conditions (never for fixed times). playwright-core is loaded only when a
// browser is launched, so the node-level client tests run without it.

import { spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));

/** The repository root (tests/browser/../..). */
export const repoRoot = path.resolve(here, "..", "..");

/** Cargo's target directory: `RELAYHUB_TARGET_DIR` (scripts/test-browser.sh asks cargo), or target/ here. */
export const targetDir = path.resolve(here, process.env.RELAYHUB_TARGET_DIR ?? "../../target");

/** The hub binary: `RELAYHUB_BIN`, or debug/relayhub in the target directory. */
export const hubBin = process.env.RELAYHUB_BIN
  ? path.resolve(here, process.env.RELAYHUB_BIN)
  : path.join(targetDir, "debug", "relayhub");

/** Debian's Chromium; the tests never download a browser. */
export const chromiumBin = process.env.CHROMIUM_BIN ?? "/usr/bin/chromium";

const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/**
 * Resolves when `check()` returns a truthy value (which is returned), polling every `interval` ms; rejects
 * after `timeout` ms with `message` and the last value or error seen, or at once when `check` throws an error
 * marked `fatal` (waiting longer cannot help).
 */
export async function waitFor(check, { timeout = 10_000, interval = 100, message = "condition" } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
      last = value;
    } catch (err) {
      if (err?.fatal) throw err;
      last = err;
    }
    if (Date.now() > deadline) {
      const detail = last instanceof Error ? last.message : JSON.stringify(last);
      throw new Error(`timed out after ${timeout} ms waiting for ${message} (last: ${detail})`);
    }
    await new Promise((r) => setTimeout(r, interval));
  }
}

/** A TCP port nobody listens on right now (the OS picks it; the listener is closed again). */
/** A channel name no other test uses. */
export function uniqueChannel(prefix) {
  return `test:${prefix}-${Date.now().toString(36)}${Math.floor(Math.random() * 1e6).toString(36)}`;
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/**
 * The TOML config the tests run the hub with: loopback only, memory mode (or the given Redis), the demo
 * source, a chat namespace, and any `extra` TOML (tables not named above).
 */
function testConfig({ redisUrl = "", instanceId = "browser-test", extra = "" } = {}) {
  const webRoot = path.join(repoRoot, "web");
  return `# Written by tests/browser/harness.mjs for one test run.
[server]
host = "127.0.0.1"
web_root = ${JSON.stringify(webRoot)}
instance_id = ${JSON.stringify(instanceId)}
shutdown_timeout = "2s"
drain_period = "0s"

[redis]
url = ${JSON.stringify(redisUrl)}

[demo]
enabled = true
symbols = []          # test 6 starts its demo jobs through the polling API

[namespaces.chat]
client_publish = true
${extra}`;
}

/**
 * A relayhub process started by the tests. `start()` can be called again after `kill()`: same port, same
 * config, same log file (appended). `options`: `redisUrl` (default: memory mode), `instanceId`, `extra` TOML.
 */
export class Hub {
  /** @param {{redisUrl?: string, instanceId?: string, extra?: string} | string} [options] a string: `extra` */
  constructor(options = {}) {
    if (typeof options === "string") options = { extra: options };
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), "relayhub-browser-"));
    this.configPath = path.join(this.dir, "relayhub.toml");
    this.logPath = path.join(this.dir, "hub.log");
    fs.writeFileSync(this.configPath, testConfig(options));
    this.port = null;
    this.proc = null;
    this.exited = null;
  }

  get base() {
    return `http://127.0.0.1:${this.port}`;
  }

  /** Starts the binary and resolves once GET /health answers 200. */
  async start() {
    if (!fs.existsSync(hubBin)) {
      throw new Error(`relayhub binary not found at ${hubBin}: build it (cargo build) or set RELAYHUB_BIN`);
    }
    // A restart reuses the port the killed process had: binding may fail for a moment, so retry a few times.
    const restart = this.port !== null;
    this.port ??= await freePort();
    for (let attempt = 1; ; attempt++) {
      this._spawn();
      try {
        await waitFor(() => this._healthy(), { timeout: 20_000, interval: 100, message: "GET /health" });
        return;
      } catch (err) {
        const exited = this.proc.exitCode !== null || this.proc.signalCode !== null;
        if (restart && exited && attempt < 5) {
          await new Promise((r) => setTimeout(r, 300 * attempt));
          continue;
        }
        await this.kill();
        throw new Error(`${err.message}\n--- hub log (tail) ---\n${this.logTail()}`);
      }
    }
  }

  _spawn() {
    const log = fs.openSync(this.logPath, "a");
    fs.writeSync(log, `\n=== start ${new Date().toISOString()} port ${this.port} ===\n`);
    const proc = spawn(hubBin, ["--config", this.configPath], {
      cwd: repoRoot,
      env: { ...process.env, PORT: String(this.port), RUST_LOG: process.env.RUST_LOG ?? "info" },
      stdio: ["ignore", log, log],
    });
    fs.closeSync(log);
    this.proc = proc;
    this.exited = new Promise((resolve) => proc.once("exit", (code, signal) => resolve({ code, signal })));
    proc.once("error", (err) => fs.appendFileSync(this.logPath, `spawn error: ${err.message}\n`));
  }

  async _healthy() {
    if (this.proc.exitCode !== null || this.proc.signalCode !== null) {
      const err = new Error(`hub exited (code ${this.proc.exitCode}, signal ${this.proc.signalCode})`);
      err.fatal = true;
      throw err;
    }
    const res = await fetch(`${this.base}/health`).catch(() => null);
    return res?.status === 200;
  }

  /** Stops the process (SIGKILL by default: a crash, not a graceful shutdown) and waits for it to exit. */
  async kill(signal = "SIGKILL") {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    proc.kill(signal);
    const timer = setTimeout(() => proc.kill("SIGKILL"), 5_000);
    await this.exited;
    clearTimeout(timer);
  }

  /** Synchronous last-resort kill for process exit handlers. */
  killNow() {
    if (this.proc && this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill("SIGKILL");
  }

  logTail(lines = 40) {
    try {
      return fs.readFileSync(this.logPath, "utf8").trimEnd().split("\n").slice(-lines).join("\n");
    } catch {
      return "(no log)";
    }
  }

  cleanup() {
    fs.rmSync(this.dir, { recursive: true, force: true });
  }

  // --- HTTP API ----------------------------------------------------------------------------------------------

  async request(method, urlPath, body) {
    const res = await fetch(`${this.base}${urlPath}`, {
      method,
      headers: body === undefined ? {} : { "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    let json = null;
    try {
      json = JSON.parse(text);
    } catch {
      // keep null; `text` tells what came back
    }
    return { status: res.status, json, text };
  }

  /** POST /api/publish; throws unless 200. */
  async publish(channel, data) {
    const r = await this.request("POST", "/api/publish", { channel, data });
    if (r.status !== 200) throw new Error(`POST /api/publish ${channel}: ${r.status} ${r.text}`);
    return r.json;
  }

  async stats() {
    const r = await this.request("GET", "/api/stats");
    if (r.status !== 200) throw new Error(`GET /api/stats: ${r.status} ${r.text}`);
    return r.json;
  }

  /** Resolves once the hub counts at least `n` subscribers of `channel` (so a publish reaches them live). */
  async waitForSubscribers(channel, n = 1, timeout = 10_000) {
    return waitFor(async () => ((await this.stats()).subscribers?.[channel] ?? 0) >= n, {
      timeout,
      message: `${n} subscriber(s) of ${channel} in /api/stats`,
    });
  }
}

/**
 * A private redis-server on a free loopback port, without persistence (never the shared one on 6379).
 * `stop()` kills it; a test that needs Redis fails with a clear message when redis-server is not installed.
 */
export class RedisServer {
  constructor() {
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), "relayhub-browser-redis-"));
    this.port = null;
    this.proc = null;
  }

  get url() {
    return `redis://127.0.0.1:${this.port}`;
  }

  /** Starts it and resolves once it answers PING. */
  async start() {
    this.port ??= await freePort();
    const args = ["--port", String(this.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"];
    this.proc = spawn("redis-server", [...args, "--dir", this.dir], { stdio: "ignore" });
    const failed = new Promise((_, reject) =>
      this.proc.once("error", (err) => reject(new Error(`redis-server does not start (is it installed?): ${err.message}`))),
    );
    await Promise.race([failed, waitFor(() => this._pong(), { timeout: 10_000, message: "redis-server PING" })]);
  }

  _pong() {
    return new Promise((resolve) => {
      const socket = net.connect(this.port, "127.0.0.1");
      socket.setTimeout(1000, () => socket.destroy());
      socket.once("error", () => resolve(false));
      socket.once("close", () => resolve(false));
      socket.once("data", (data) => {
        socket.destroy();
        resolve(data.toString().startsWith("+PONG"));
      });
      socket.write("PING\r\n");
    });
  }

  stop() {
    if (this.proc && this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill("SIGKILL");
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Launches Chromium headless with a fresh profile (playwright-core makes a temporary user-data-dir). */
export async function launchBrowser() {
  if (!fs.existsSync(chromiumBin)) {
    throw new Error(`${chromiumBin} not found: run scripts/browser-deps.sh (or set CHROMIUM_BIN)`);
  }
  const { chromium } = await import("playwright-core");
  return chromium.launch({ executablePath: chromiumBin, headless: true, args: CHROMIUM_ARGS });
}

/**
 * Opens a page in a fresh browser context and records what the page logs, so a failing test can show it.
 * @returns {Promise<{context, page, pageErrors: string[], consoleLines: string[]}>}
 */
export async function openPage(browser, viewport = { width: 1280, height: 800 }) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  const pageErrors = [];
  const consoleLines = [];
  page.on("pageerror", (err) => pageErrors.push(String(err?.stack ?? err)));
  page.on("console", (msg) => consoleLines.push(`[${msg.type()}] ${msg.text()}`));
  return { context, page, pageErrors, consoleLines };
}

/** Waits until the dashboard's status indicator shows `state`. */
export async function waitForStatus(page, state, timeout = 15_000) {
  await page.waitForFunction(
    (want) => document.querySelector('[data-testid="status"]')?.dataset.state === want,
    state,
    { timeout },
  );
}

/** Waits until the table row of `channel` satisfies `expected` (value text includes, and optional attributes). */
export async function waitForRow(page, channel, expected, timeout = 10_000) {
  return page.waitForFunction(
    ({ channel, expected }) => {
      const rows = [...document.querySelectorAll('[data-testid="channel-row"]')];
      const row = rows.find((r) => r.dataset.channel === channel);
      if (!row) return false;
      const value = row.querySelector('[data-testid="value"]').textContent;
      if (expected.includes && !value.includes(expected.includes)) return false;
      for (const [k, v] of Object.entries(expected.data ?? {})) if (row.dataset[k] !== v) return false;
      return { value, seq: row.dataset.seq, source: row.dataset.source, snapshot: row.dataset.snapshot };
    },
    { channel, expected },
    { timeout },
  ).then((handle) => handle.jsonValue());
}
