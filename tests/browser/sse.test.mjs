// sse.test.mjs: web/relayhub.js on its Server-Sent Events fallback, against the real relayhub binary
// (harness.mjs) in Redis mode with a private redis-server: while WebSockets are refused the client follows its
// channels over `/sse` (`hub.transport === "sse"`), its hub is killed and restarted under it while another
// hub takes the publishes, EventSource reconnects by itself with its Last-Event-ID, and every message arrives
// exactly once, in order; when WebSockets work again it moves back to one, still with nothing twice. A
// memory-mode hub restarted under the stream gives a `gap` event and the snapshot. Once in
// node (undici's EventSource: node 20 needs --experimental-eventsource, see scripts/test-browser.sh) and once
// in headless Chromium.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Hub, RedisServer, launchBrowser, openPage, uniqueChannel, waitFor } from "./harness.mjs";
import { RelayHub } from "../../web/relayhub.js";

const LONG = { timeout: 90_000 };
const HISTORY = "\n[channels]\nhistory_size = 100\n";
/** Reconnects quickly and for as long as the test needs; the fallback starts soon after a failed attempt. */
const QUICK = { backoffBase: 100, backoffMax: 300, drainJitter: 100, maxAttempts: Infinity, fallbackInterval: 300 };

const hubs = [];
process.on("exit", () => hubs.forEach((h) => h.killNow()));

async function startHub(options) {
  const hub = new Hub(options);
  hubs.push(hub);
  await hub.start();
  return hub;
}

async function publishRange(hub, channel, from, to) {
  for (let n = from; n <= to; n++) await hub.publish(channel, { n });
}

/** The values delivered, as `[n, seq, snapshot, source]` rows. */
const rows = (got) => got.map((m) => [m.data.n, m.seq, m.snapshot, m.source]);

/** Rows 1..`to` (seq = n + 1: the first value `{n: 0}` is seq 1), each with its transport. */
function expected(ranges) {
  return ranges.flatMap(([from, to, source]) =>
    Array.from({ length: to - from + 1 }, (_, i) => [from + i, from + i + 1, false, source]),
  );
}

after(async () => {
  for (const h of hubs) {
    await h.kill("SIGTERM");
    h.cleanup();
  }
});

describe("relayhub.js falls back to Server-Sent Events", () => {
  let redis;
  let browser;

  before(async () => {
    redis = new RedisServer();
    await redis.start();
  });

  after(async () => {
    await browser?.close().catch(() => {});
    redis?.stop();
  });

  test("1. node: over SSE across a hub restart, every message once, in order, then back on the WebSocket", LONG, async () => {
    assert.equal(typeof globalThis.EventSource, "function", "run node with --experimental-eventsource");
    const a = await startHub({ redisUrl: redis.url, instanceId: "sse-a", extra: HISTORY });
    const b = await startHub({ redisUrl: redis.url, instanceId: "sse-b", extra: HISTORY });
    const channel = uniqueChannel("sse");
    await a.publish(channel, { n: 0 });
    const gate = { held: true };
    class Gated extends globalThis.WebSocket {
      constructor(url, ...rest) {
        super(gate.held ? "ws://127.0.0.1:9/ws" : url, ...rest);
      }
    }
    // REST polling must not be what delivers: every fetch fails.
    const client = new RelayHub(`ws://127.0.0.1:${a.port}/ws`, {
      ...QUICK,
      WebSocket: Gated,
      fetch: () => Promise.reject(new Error("no REST in this test")),
    });
    const got = [];
    const gaps = [];
    client.subscribe(channel, (data, meta) => got.push({ data, ...meta }));
    client.on("gap", (info) => gaps.push(info));
    try {
      await waitFor(() => got.length >= 1, { timeout: 20_000, message: "the snapshot over SSE" });
      assert.deepEqual(rows(got), [[0, 1, true, "sse"]]);
      assert.equal(client.transport, "sse");
      got.length = 0;
      await publishRange(a, channel, 1, 3);
      await waitFor(() => got.length >= 3, { timeout: 20_000, message: "live messages over SSE" });

      await a.kill("SIGKILL");
      await publishRange(b, channel, 4, 13);
      await a.start();
      await waitFor(() => got.length >= 13, { timeout: 30_000, message: "the outage's messages after EventSource reconnected" });
      assert.equal(client.transport, "sse");
      await b.publish(channel, { n: 14 });
      await waitFor(() => got.length >= 14, { timeout: 20_000, message: "a live message after the restart" });

      gate.held = false;
      await waitFor(() => client.transport === "websocket", { timeout: 20_000, message: "back on the WebSocket" });
      await b.publish(channel, { n: 15 });
      await waitFor(() => got.length >= 15, { timeout: 20_000, message: "a message over the WebSocket" });
      await new Promise((r) => setTimeout(r, 300));
      assert.deepEqual(rows(got), expected([[1, 14, "sse"], [15, 15, "socket"]]), "each message once, in order");
      assert.deepEqual(gaps, []);
    } finally {
      client.close();
    }
  });

  test("2. node: a memory-mode hub restarted under the stream cannot recover: a gap, then the snapshot", LONG, async () => {
    const hub = await startHub({ extra: HISTORY });
    const channel = uniqueChannel("sse-gap");
    await hub.publish(channel, { n: 0 });
    const client = new RelayHub(`ws://127.0.0.1:${hub.port}/ws`, {
      ...QUICK,
      WebSocket: class extends globalThis.WebSocket {
        constructor(url, ...rest) {
          super("ws://127.0.0.1:9/ws", ...rest);
        }
      },
      fetch: () => Promise.reject(new Error("no REST in this test")),
    });
    const got = [];
    const gaps = [];
    client.subscribe(channel, (data, meta) => got.push({ data, ...meta }));
    client.on("gap", (info) => gaps.push(info));
    try {
      await waitFor(() => got.length >= 1, { timeout: 20_000, message: "the snapshot over SSE" });
      await publishRange(hub, channel, 1, 2);
      await waitFor(() => got.length >= 3, { timeout: 20_000, message: "live messages" });
      await hub.kill("SIGKILL");
      await hub.start();
      // Numbering starts over under a new epoch: seq 1 again.
      await hub.publish(channel, { n: 100 });
      await waitFor(() => got.length >= 4, { timeout: 30_000, message: "the snapshot after the restart" });
      assert.deepEqual(rows(got), [[0, 1, true, "sse"], ...expected([[1, 2, "sse"]]), [100, 1, true, "sse"]]);
      assert.deepEqual(gaps, [{ channel, source: "sse" }]);
      await hub.publish(channel, { n: 101 });
      await waitFor(() => got.length >= 5, { timeout: 20_000, message: "a live message under the new epoch" });
      assert.deepEqual(rows(got).at(-1), [101, 2, false, "sse"]);
    } finally {
      client.close();
    }
  });

  test("3. Chromium: an EventSource receives every message once across a hub restart", LONG, async () => {
    browser = await launchBrowser();
    const a = await startHub({ redisUrl: redis.url, instanceId: "sse-page-a", extra: HISTORY });
    const b = await startHub({ redisUrl: redis.url, instanceId: "sse-page-b", extra: HISTORY });
    const channel = uniqueChannel("sse-page");
    await a.publish(channel, { n: 0 });
    const { context, page, pageErrors } = await openPage(browser);
    try {
      await page.goto(`${a.base}/?channels=`);
      await page.evaluate(async ({ channel, options }) => {
        const { RelayHub } = await import("/relayhub.js");
        window.got = [];
        window.gaps = [];
        // Every WebSocket is refused (a network that breaks them); REST polling would fail too.
        class Refused extends WebSocket {
          constructor(url, ...rest) {
            super("ws://127.0.0.1:9/ws", ...rest);
          }
        }
        const fetch = () => Promise.reject(new Error("no REST in this test"));
        const hub = new RelayHub("/ws", { ...options, WebSocket: Refused, fetch });
        hub.subscribe(channel, (data, meta) => window.got.push({ data, ...meta }));
        hub.on("gap", (info) => window.gaps.push(info));
        window.testHub = hub;
      }, { channel, options: QUICK });
      const count = (n, what) =>
        page.waitForFunction((n) => window.got.length >= n, n, { timeout: 30_000 }).catch((err) => {
          throw new Error(`${what}: ${err.message}`);
        });
      const pageRows = () => page.evaluate(() => window.got.map((m) => [m.data.n, m.seq, m.snapshot, m.source]));
      await count(1, "the snapshot over SSE");
      assert.deepEqual(await pageRows(), [[0, 1, true, "sse"]]);
      assert.equal(await page.evaluate(() => window.testHub.transport), "sse");
      await publishRange(a, channel, 1, 3);
      await count(4, "live messages");
      await a.kill("SIGKILL");
      await publishRange(b, channel, 4, 13);
      await a.start();
      await count(14, "the outage's messages after EventSource reconnected");
      await b.publish(channel, { n: 14 });
      await count(15, "a live message after the restart");
      await new Promise((r) => setTimeout(r, 300));
      assert.deepEqual(await pageRows(), [[0, 1, true, "sse"], ...expected([[1, 14, "sse"]])]);
      assert.deepEqual(await page.evaluate(() => window.gaps), []);
      assert.deepEqual(pageErrors, []);
    } finally {
      await page.evaluate(() => window.testHub?.close()).catch(() => {});
      await context.close();
    }
  });
});
