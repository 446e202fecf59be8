// dashboard.test.mjs: the dashboard (web/index.html) and its client library (web/relayhub.js) in Chromium,
// against the real relayhub binary started by harness.mjs. Run with `node --test` (see package.json).

import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { after, before, describe, test } from "node:test";

import { Hub, launchBrowser, openPage, targetDir, uniqueChannel, waitFor, waitForRow, waitForStatus } from "./harness.mjs";

/** Per-test limit: generous, since every wait inside is bounded by its own timeout. */
const LONG = { timeout: 90_000 };

let hub;
let browser;

/** Kills the hub even when the runner is interrupted or a hook throws. */
process.on("exit", () => hub?.killNow());
for (const signal of ["SIGINT", "SIGTERM"]) {
  process.once(signal, () => {
    hub?.killNow();
    process.exit(130);
  });
}

/**
 * Runs `fn` with a fresh page; on failure adds the page's errors and console and the hub's log to the error.
 * Fails the test when the page threw an uncaught exception.
 */
async function withPage(fn, viewport) {
  const { context, page, pageErrors, consoleLines } = await openPage(browser, viewport);
  try {
    await fn(page);
    assert.deepEqual(pageErrors, [], "the page threw uncaught exceptions");
  } catch (err) {
    err.message +=
      `\n--- page errors ---\n${pageErrors.join("\n") || "(none)"}` +
      `\n--- page console (tail) ---\n${consoleLines.slice(-25).join("\n") || "(none)"}` +
      `\n--- hub log (tail) ---\n${hub.logTail()}`;
    throw err;
  } finally {
    await context.close();
  }
}

/** The dashboard URL with the given channels (instead of the default demo ones) and extra parameters. */
function dashboardUrl(channels, extra = {}) {
  const q = new URLSearchParams({ channels: channels.join(","), ...extra });
  return `${hub.base}/?${q}`;
}

/**
 * Starts a RelayHub of web/relayhub.js inside `page` (imported from the hub), subscribed to `channel`; what it
 * reports is recorded in `window.testEvents` as `status:<state>` and `message:<source>:<json>` strings.
 */
async function startLibraryClient(page, channel, options) {
  await page.evaluate(
    async ({ channel, options }) => {
      const { RelayHub } = await import("/relayhub.js");
      window.testEvents = [];
      const hub = new RelayHub("/ws", options);
      hub.on("status", (state) => window.testEvents.push(`status:${state}`));
      hub.subscribe(channel, (data, meta) => window.testEvents.push(`message:${meta.source}:${JSON.stringify(data)}`));
      window.testHub = hub;
    },
    { channel, options },
  );
}

/** Waits until `window.testEvents` holds `count` entries starting with `prefix`. */
async function waitForEvent(page, prefix, timeout = 10_000, count = 1) {
  await page.waitForFunction(
    ({ prefix, count }) => (window.testEvents ?? []).filter((e) => e.startsWith(prefix)).length >= count,
    { prefix, count },
    { timeout },
  );
}

/** Whether the hub serves the polling API (it answers 404 before that part exists). */
async function pollingAvailable() {
  const r = await hub.request("GET", "/api/polling/status");
  return r.status !== 404;
}

describe("dashboard against a real hub", () => {
  before(async () => {
    hub = new Hub();
    await hub.start();
    browser = await launchBrowser();
  });

  after(async () => {
    await browser?.close().catch(() => {});
    await hub?.kill("SIGTERM");
    hub?.cleanup();
  });

  test("1. the page connects and shows open, latency and hub stats", LONG, async () => {
    await withPage(async (page) => {
      await page.goto(dashboardUrl([]));
      await waitForStatus(page, "open");
      // A pong came back: latency is measured over the hub's own ping/pong frames.
      await page.waitForFunction(() => /\d+(\.\d+)? ms$/.test(document.getElementById("latency").textContent));
      // The stats panel reads GET /api/stats: memory mode, and at least this page's connection.
      await page.waitForFunction(
        () =>
          document.getElementById("stat-mode").textContent === "memory" &&
          Number(document.getElementById("stat-connections").textContent) >= 1,
        null,
        { timeout: 10_000 },
      );
    });
  });

  test("2. a message published with POST /api/publish appears in the table", LONG, async () => {
    const channel = uniqueChannel("live");
    await withPage(async (page) => {
      await page.goto(dashboardUrl([]));
      await waitForStatus(page, "open");
      await page.fill('[data-testid="channel-input"]', channel);
      await page.click('[data-testid="subscribe-button"]');
      await hub.waitForSubscribers(channel);

      const marker = `hello-${Date.now()}`;
      const { seq } = await hub.publish(channel, { text: marker, n: 1 });
      const row = await waitForRow(page, channel, { includes: marker });
      assert.equal(row.source, "socket");
      assert.equal(row.snapshot, "false", "a live message, not a snapshot");
      assert.equal(row.seq, String(seq));
      // Rendered as text: the JSON shows literally, nothing was parsed as HTML.
      assert.equal(row.value, JSON.stringify({ text: marker, n: 1 }));

      const html = `<img src=x onerror="window.__pwned=1">${marker}`;
      await hub.publish(channel, html);
      await waitForRow(page, channel, { includes: "<img src=x" });
      assert.equal(await page.evaluate(() => window.__pwned ?? 0), 0);
      assert.equal(await page.locator(`[data-channel="${channel}"] img`).count(), 0);
    });
  });

  test("3. the hub is killed and restarted: the page reconnects and resubscribes", LONG, async () => {
    const channel = uniqueChannel("restart");
    await withPage(async (page) => {
      await page.goto(dashboardUrl([channel]));
      await waitForStatus(page, "open");
      await hub.waitForSubscribers(channel);
      await hub.publish(channel, { phase: "before" });
      await waitForRow(page, channel, { includes: "before" });

      await hub.kill("SIGKILL");
      await waitForStatus(page, "reconnecting");
      await hub.start(); // same port
      await waitForStatus(page, "open", 30_000);

      // The hub restarted empty (memory mode): a subscriber again means the page resubscribed by itself.
      await hub.waitForSubscribers(channel, 1, 15_000);
      const marker = `after-${Date.now()}`;
      await hub.publish(channel, { phase: marker });
      const row = await waitForRow(page, channel, { includes: marker, data: { source: "socket" } });
      assert.equal(row.snapshot, "false");
    });
  });

  test("4. the REST fallback shows values while the WebSocket is refused", LONG, async () => {
    const channel = uniqueChannel("fallback");
    await hub.publish(channel, { phase: "first" });
    await withPage(async (page) => {
      // Every WebSocket the page opens to /ws is closed before it opens (code 1011), as a proxy that refuses
      // the upgrade would; plain HTTP to the hub (the page, the REST API) goes through untouched.
      let refused = 0;
      await page.routeWebSocket(/\/ws$/, (ws) => {
        refused += 1;
        ws.close({ code: 1011, reason: "refused by the test" });
      });
      // The Server-Sent Events fallback (tried first) is refused too, so the REST fallback takes over.
      await page.route(/\/sse\?/, (route) => route.abort());
      await page.goto(dashboardUrl([channel]));
      await waitForStatus(page, "reconnecting");
      await page.waitForSelector('[data-testid="fallback"]:not([hidden])');

      const first = await waitForRow(page, channel, { includes: "first", data: { source: "rest" } });
      assert.equal(first.snapshot, "true");

      // A value published over HTTP now shows up through polling (every 3 s by default).
      const marker = `second-${Date.now()}`;
      const { seq } = await hub.publish(channel, { phase: marker });
      const second = await waitForRow(page, channel, { includes: marker, data: { source: "rest" } }, 10_000);
      assert.equal(second.seq, String(seq));

      // The socket never opened, and the client kept trying (with backoff) meanwhile.
      assert.notEqual(await page.getAttribute('[data-testid="status"]', "data-state"), "open");
      assert.ok(refused >= 2, `expected repeated WebSocket attempts, saw ${refused}`);
    });
  });

  test("5. the admin panel starts a polling job and the status table shows it", LONG, async (t) => {
    if (!(await pollingAvailable())) {
      t.skip("GET /api/polling/status answers 404: the hub has no polling API yet");
      return;
    }
    await withPage(async (page) => {
      await page.goto(dashboardUrl([]));
      await waitForStatus(page, "open");
      await page.fill('[data-testid="poll-source"]', "demo");
      await page.fill('[data-testid="poll-params"]', "symbol=XRP");
      await page.click('[data-testid="poll-start"]');

      await page.waitForFunction(
        () => /Started job .+ on demo:XRP/.test(document.querySelector('[data-testid="admin-message"]').textContent),
        null,
        { timeout: 10_000 },
      );
      const jobId = await page.waitForFunction(
        () => {
          const row = [...document.querySelectorAll('[data-testid="job-row"]')].find(
            (r) => r.querySelector('[data-testid="job-channel"]')?.textContent === "demo:XRP",
          );
          return row?.dataset.job ?? false;
        },
        null,
        { timeout: 10_000 },
      ).then((h) => h.jsonValue());

      // The hub agrees, and the job's prices reach the channel table (the page subscribed to demo:XRP).
      const status = await hub.request("GET", "/api/polling/status");
      assert.ok(status.json.jobs.some((j) => String(j.id) === jobId && j.channel === "demo:XRP"), status.text);
      await waitForRow(page, "demo:XRP", { includes: '"symbol":"XRP"' }, 15_000);

      // Stop it from the table again.
      await page.click(`[data-testid="job-stop"][data-job="${jobId}"]`);
      await page.waitForFunction(
        (id) => document.querySelector('[data-testid="admin-message"]').textContent.includes(`job ${id}`),
        jobId,
      );
    });
  });

  test("6. relayhub.js replaces a silent connection (heartbeat) and resubscribes", LONG, async () => {
    const channel = uniqueChannel("heartbeat");
    await withPage(async (page) => {
      // The socket goes through the test: connection #1 is forwarded until `silent`, then nothing from the hub
      // reaches the page any more (no pong, no message), like a link that died without a close.
      let connections = 0;
      let silent = false;
      await page.routeWebSocket(/\/ws$/, (ws) => {
        const n = ++connections;
        const server = ws.connectToServer();
        server.onMessage((frame) => {
          if (!(silent && n === 1)) ws.send(frame);
        });
      });
      await page.goto(`${hub.base}/health`); // the hub's origin, without the dashboard's own connection
      await startLibraryClient(page, channel, { heartbeatInterval: 500, heartbeatTimeout: 2000, backoffBase: 100 });
      await waitForEvent(page, "status:open");
      await hub.waitForSubscribers(channel);

      silent = true;
      await waitForEvent(page, "status:reconnecting", 10_000);
      await waitForEvent(page, "status:open", 10_000, 2);
      assert.equal(connections, 2);
      await hub.waitForSubscribers(channel);
      const marker = `alive-${Date.now()}`;
      await hub.publish(channel, marker);
      await waitForEvent(page, `message:socket:${JSON.stringify(marker)}`);
    });
  });

  test("7. relayhub.js sends calls made while offline in order once connected", LONG, async () => {
    const channel = `chat:${uniqueChannel("queue").slice(5)}`;
    await withPage(async (page) => {
      // WebSockets are refused until `allow`; then they reach the hub, and the test records what the page sends.
      let allow = false;
      const sent = [];
      await page.routeWebSocket(/\/ws$/, (ws) => {
        if (!allow) {
          ws.close({ code: 1011, reason: "not yet" });
          return;
        }
        const server = ws.connectToServer();
        ws.onMessage((frame) => {
          sent.push(JSON.parse(frame));
          server.send(frame);
        });
      });
      await page.goto(`${hub.base}/health`);
      await startLibraryClient(page, channel, { backoffBase: 200, backoffMax: 400, fallback: false });
      await waitForEvent(page, "status:reconnecting");
      // Offline: two publishes to the channel subscribed above, then a subscribe and unsubscribe that cancel out.
      await page.evaluate((channel) => {
        const hub = window.testHub;
        for (const n of [1, 2]) {
          hub.publish(channel, { n }).then((r) => window.testEvents.push(`published:${n}:${r.seq}`));
        }
        hub.subscribe(`${channel}-gone`, () => {})();
      }, channel);
      allow = true;
      await waitForEvent(page, "status:open", 15_000);
      await waitForEvent(page, "published:", 10_000, 2);

      // On the wire: the subscription first, then the publishes in call order; nothing for the cancelled channel.
      const ops = sent.filter((f) => f.op !== "ping").map((f) => `${f.op} ${f.channel} ${JSON.stringify(f.data ?? null)}`);
      assert.deepEqual(ops, [
        `subscribe ${channel} null`,
        `publish ${channel} {"n":1}`,
        `publish ${channel} {"n":2}`,
      ]);
      // The hub took them in that order, and this subscriber ends with the last value (live, or folded into
      // its snapshot when it arrived right after subscribing).
      const published = await page.evaluate(() => window.testEvents.filter((e) => e.startsWith("published:")));
      const seqs = Object.fromEntries(published.map((e) => e.split(":").slice(1).map(Number)));
      assert.ok(seqs[1] < seqs[2], `seq of n=1 (${seqs[1]}) precedes seq of n=2 (${seqs[2]})`);
      await waitForEvent(page, `message:socket:${JSON.stringify({ n: 2 })}`);
      assert.equal((await hub.stats()).subscribers?.[`${channel}-gone`] ?? 0, 0);
    });
  });

  test("8. screenshots at 1280x800 and 390x844; no sideways scrolling on a phone", LONG, async () => {
    const symbols = ["BTC", "ETH", "SOL"];
    if (await pollingAvailable()) {
      for (const symbol of symbols) {
        const r = await hub.request("POST", "/api/polling/start", { source: "demo", params: { symbol } });
        assert.equal(r.status, 200, `start demo ${symbol}: ${r.text}`);
      }
    } else {
      for (const [i, symbol] of symbols.entries()) {
        await hub.publish(`demo:${symbol}`, { symbol, price: 100 * (i + 1) });
      }
    }
    const target = targetDir;
    fs.mkdirSync(target, { recursive: true });
    const channels = symbols.map((s) => `demo:${s}`);

    await withPage(async (page) => {
      await page.goto(`${hub.base}/`); // the default channels: demo:BTC, demo:ETH, demo:SOL
      await waitForStatus(page, "open");
      for (const channel of channels) await waitForRow(page, channel, { includes: "symbol" }, 15_000);
      await page.waitForFunction(() => document.getElementById("stat-mode").textContent !== "–");
      if (await pollingAvailable()) {
        // A few seconds of bars in the chart and the jobs in their table, so the picture shows a live hub.
        await page.waitForFunction(() => Number(document.getElementById("rate-chart").dataset.active ?? 0) >= 4, null, {
          timeout: 20_000,
        });
        await page.waitForFunction(() => document.querySelectorAll('[data-testid="job-row"]').length >= 3);
      }
      // The stats panel has caught up with this page's three subscriptions (it refreshes every 3 s).
      await page.waitForFunction(() => Number(document.getElementById("stat-subscribers").textContent) >= 3, null, {
        timeout: 10_000,
      });
      await page.screenshot({ path: path.join(target, "dashboard.png") });
    }, { width: 1280, height: 800 });

    await withPage(async (page) => {
      await page.goto(`${hub.base}/`);
      await waitForStatus(page, "open");
      for (const channel of channels) await waitForRow(page, channel, { includes: "symbol" }, 15_000);
      if (await pollingAvailable()) {
        await page.waitForFunction(() => Number(document.getElementById("rate-chart").dataset.active ?? 0) >= 2, null, {
          timeout: 20_000,
        });
      }
      const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      assert.ok(overflow <= 0, `the page is ${overflow}px wider than a 390px screen`);
      await page.screenshot({ path: path.join(target, "dashboard-mobile.png") });
    }, { width: 390, height: 844 });

    assert.ok(fs.statSync(path.join(target, "dashboard.png")).size > 10_000);
    assert.ok(fs.statSync(path.join(target, "dashboard-mobile.png")).size > 10_000);
  });
});
