// recovery.test.mjs: what web/relayhub.js delivers when its hub restarts under it, against the real relayhub
// binary (harness.mjs) and, in Redis mode, a private redis-server. In node (its WebSocket and fetch) and in
// headless Chromium: with Redis every message published during the outage (through another hub) arrives
// exactly once, in order, with meta.recovered; the REST fallback does the same from the history; in memory
// mode the restarted hub cannot recover, so a `gap` event and then the snapshot (over the socket, or found by
// the REST fallback). Run with `node --test`
// (node 20 needs --experimental-websocket; see scripts/test-browser.sh).

import assert from "node:assert/strict";
import fs from "node:fs";
import { after, before, describe, test } from "node:test";

import { Hub, RedisServer, launchBrowser, openPage, uniqueChannel, waitFor } from "./harness.mjs";
import { RelayHub } from "../../web/relayhub.js";

const LONG = { timeout: 90_000 };
/** History long enough for every message of an outage in these tests. */
const HISTORY = "\n[channels]\nhistory_size = 100\n";
/** Reconnects quickly and for as long as the test needs. */
const QUICK = { backoffBase: 100, backoffMax: 300, drainJitter: 100, maxAttempts: Infinity };

const hubs = [];
const clients = [];
process.on("exit", () => hubs.forEach((h) => h.killNow()));

async function startHub(options) {
  const hub = new Hub(options);
  hubs.push(hub);
  await hub.start();
  return hub;
}

/**
 * A WebSocket class whose connections are refused while `gate.held` (they go to a port nobody listens on),
 * so a test decides when a restarted hub gets its clients back; `gatedFetch` does the same for the REST
 * fallback while `gate.restHeld`.
 */
function gatedWebSocket(gate) {
  return class extends globalThis.WebSocket {
    constructor(url, ...rest) {
      super(gate.held ? "ws://127.0.0.1:9/ws" : url, ...rest);
    }
  };
}

function gatedFetch(gate) {
  return (...args) => (gate.restHeld ? Promise.reject(new Error("held by the test")) : fetch(...args));
}

/**
 * A client of `hub` subscribed to `channel`; every delivery and event is recorded in order. The channel gets a
 * first value `{n: 0}` (seq 1) before, so the client's snapshot of it proves the subscription is live (a
 * message published sooner could become the snapshot instead): call `live()` before publishing more.
 */
async function recordingClient(hub, channel, options = {}) {
  await hub.publish(channel, { n: 0 });
  const gate = { held: false, restHeld: false };
  const client = new RelayHub(`ws://127.0.0.1:${hub.port}/ws`, {
    WebSocket: gatedWebSocket(gate),
    fetch: gatedFetch(gate),
    ...options,
  });
  const got = [];
  const gaps = [];
  client.subscribe(channel, (data, meta) => got.push({ data, ...meta }));
  client.on("gap", (info) => gaps.push(info));
  clients.push(client);
  await waitForCount(got, 1, "the first snapshot");
  assert.deepEqual(rows(got), [[0, 1, false, true, "socket"]]);
  got.length = 0;
  return { client, got, gaps, gate };
}

/** The values of `got` from index `from` on, as `[n, seq, recovered, snapshot, source]` rows. */
function rows(got, from = 0) {
  return got.slice(from).map((m) => [m.data.n, m.seq, m.recovered, m.snapshot, m.source]);
}

async function publishRange(hub, channel, from, to) {
  for (let n = from; n <= to; n++) await hub.publish(channel, { n });
}

/** A private redis-server, started before the tests of the `describe` this is called in and stopped after. */
function privateRedis() {
  const redis = new RedisServer();
  before(() => redis.start());
  after(() => redis.stop());
  return redis;
}

async function waitForCount(got, count, what) {
  await waitFor(() => got.length >= count, { timeout: 20_000, message: `${count} values (${what})` });
}

after(async () => {
  for (const c of clients) c.close();
  for (const h of hubs) {
    await h.kill("SIGTERM");
    h.cleanup();
  }
});

describe("relayhub.js recovers what it missed while its hub restarted", () => {
  const redis = privateRedis();

  test("1. Redis mode: messages published through another hub during the outage arrive once, in order, recovered", LONG, async () => {
    const a = await startHub({ redisUrl: redis.url, instanceId: "rec-a", extra: HISTORY });
    const b = await startHub({ redisUrl: redis.url, instanceId: "rec-b", extra: HISTORY });
    const channel = uniqueChannel("redis");
    const { client, got, gaps, gate } = await recordingClient(a, channel, { ...QUICK, fallback: false });
    await publishRange(a, channel, 1, 5);
    await waitForCount(got, 5, "before the outage");
    assert.deepEqual(rows(got), [1, 2, 3, 4, 5].map((n) => [n, n + 1, false, false, "socket"]));

    gate.held = true;
    await a.kill("SIGKILL");
    await waitFor(() => client.status === "reconnecting", { message: "the client notices" });
    await publishRange(b, channel, 6, 25);
    await a.start();
    gate.held = false;
    await waitForCount(got, 25, "the outage's messages");
    assert.deepEqual(
      rows(got, 5),
      Array.from({ length: 20 }, (_, i) => [i + 6, i + 7, true, false, "socket"]),
      "each missed message once, in order, replayed from history, no snapshot",
    );
    // Then live ones, through either hub.
    await b.publish(channel, { n: 26 });
    await waitForCount(got, 26, "a live message");
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(rows(got, 25), [[26, 27, false, false, "socket"]]);
    assert.deepEqual(gaps, []);
    const stats = await a.stats();
    assert.equal(stats.subscribes_recovered, 1, JSON.stringify(stats));
    client.close();
  });

  test("1b. Redis mode: a pattern resumes each channel it delivered, once, in order, recovered", LONG, async () => {
    const extra = `${HISTORY}\n[namespaces.test]\npatterns = true\n`;
    const a = await startHub({ redisUrl: redis.url, instanceId: "pat-a", extra });
    const b = await startHub({ redisUrl: redis.url, instanceId: "pat-b", extra });
    const base = uniqueChannel("pat");
    const [x, y] = [`${base}:x`, `${base}:y`];
    const gate = { held: false, restHeld: false };
    const client = new RelayHub(`ws://127.0.0.1:${a.port}/ws`, {
      WebSocket: gatedWebSocket(gate),
      fetch: gatedFetch(gate),
      ...QUICK,
      fallback: false,
    });
    clients.push(client);
    const got = [];
    const gaps = [];
    client.on("gap", (info) => gaps.push(info));
    client.subscribe(`${base}:*`, (data, meta) => got.push({ data, ...meta }));
    await waitFor(() => client.status === "open", { message: "open" });
    const seen = (channel) => got.filter((m) => m.channel === channel).map((m) => [m.data.n, m.seq, m.recovered]);
    // A first message on x proves the pattern is live before the rest is published.
    await waitFor(async () => {
      await a.publish(x, { n: 0 });
      await new Promise((r) => setTimeout(r, 100));
      return got.length > 0;
    }, { message: "the pattern is live" });
    const before = seen(x).length;
    await publishRange(a, x, 1, 3);
    await publishRange(a, y, 1, 2);
    await waitForCount(got, before + 5, "before the outage");
    // The hub names each channel's epoch in an `epoch` frame; wait until the client holds both.
    const positions = () => client._subs.get(`${base}:*`).positions;
    await waitFor(() => positions().get(x)?.epoch && positions().get(y)?.epoch, { message: "both epochs known" });
    const [xBefore, yBefore] = [seen(x).length, seen(y).length];

    gate.held = true;
    await a.kill("SIGKILL");
    await waitFor(() => client.status === "reconnecting", { message: "the client notices" });
    await publishRange(b, x, 4, 8);
    await publishRange(b, y, 3, 4);
    await a.start();
    gate.held = false;
    await waitForCount(got, before + 12, "the outage's messages");
    const xSeq = seen(x)[xBefore - 1][1];
    const ySeq = seen(y)[yBefore - 1][1];
    assert.deepEqual(
      seen(x).slice(xBefore),
      [4, 5, 6, 7, 8].map((n, i) => [n, xSeq + i + 1, true]),
      "x: each missed message once, in order, replayed",
    );
    assert.deepEqual(seen(y).slice(yBefore), [3, 4].map((n, i) => [n, ySeq + i + 1, true]), "y: the same");
    await b.publish(x, { n: 9 });
    await waitForCount(got, before + 13, "a live message");
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(seen(x).slice(xBefore + 5), [[9, xSeq + 6, false]]);
    assert.equal(got.length, before + 13, "nothing twice, no snapshot of a resumed channel");
    assert.deepEqual(gaps, []);
    client.close();
  });

  test("2. Redis mode: the REST fallback reads the outage's messages from history, then the socket resumes after them", LONG, async () => {
    const a = await startHub({ redisUrl: redis.url, instanceId: "rec-c", extra: HISTORY });
    const b = await startHub({ redisUrl: redis.url, instanceId: "rec-d", extra: HISTORY });
    const channel = uniqueChannel("rest");
    // The socket goes to a; the REST fallback reads b, which stays up.
    const { client, got, gaps, gate } = await recordingClient(a, channel, {
      ...QUICK,
      fallbackInterval: 300,
      restBase: b.base,
    });
    await publishRange(a, channel, 1, 3);
    await waitForCount(got, 3, "before the outage");

    gate.held = true;
    await a.kill("SIGKILL");
    await waitFor(() => client.fallbackActive, { timeout: 20_000, message: "the REST fallback polling" });
    await publishRange(b, channel, 4, 15);
    await waitForCount(got, 15, "the outage's messages over REST");
    assert.deepEqual(
      rows(got, 3),
      Array.from({ length: 12 }, (_, i) => [i + 4, i + 5, true, false, "rest"]),
    );
    await a.start();
    gate.held = false;
    await waitFor(() => client.status === "open" && !client.fallbackActive, { message: "the socket back" });
    // Live once the restarted hub answered the resubscribe (recovered, with nothing to replay).
    await waitFor(async () => (await a.stats()).subscribes_recovered === 1, { message: "the recovered resubscribe" });
    await b.publish(channel, { n: 16 });
    await waitForCount(got, 16, "a live message");
    await new Promise((r) => setTimeout(r, 300));
    // The socket resubscribed from seq 16: nothing replayed twice, no snapshot again.
    assert.deepEqual(rows(got, 15), [[16, 17, false, false, "socket"]]);
    assert.deepEqual(gaps, []);
    client.close();
  });

  test("3. memory mode: the restarted hub cannot recover: a gap event, then the snapshot", LONG, async () => {
    const hub = await startHub({ extra: HISTORY });
    const channel = uniqueChannel("memory");
    const { client, got, gaps, gate } = await recordingClient(hub, channel, { ...QUICK, fallback: false });
    await publishRange(hub, channel, 1, 3);
    await waitForCount(got, 3, "before the restart");

    gate.held = true;
    await hub.kill("SIGKILL");
    await hub.start();
    // Numbering starts over on the new hub: seq 1 again, under a new epoch.
    await hub.publish(channel, { n: 100 });
    gate.held = false;
    await waitForCount(got, 4, "the snapshot");
    assert.deepEqual(gaps, [{ channel, source: "socket" }]);
    assert.deepEqual(rows(got, 3), [[100, 1, false, true, "socket"]]);
    await hub.publish(channel, { n: 101 });
    await waitForCount(got, 5, "a live message");
    assert.deepEqual(rows(got, 4), [[101, 2, false, false, "socket"]]);
    client.close();
  });

  test("4. memory mode: the REST fallback finds the gap too, takes the new epoch, and the socket resumes from it", LONG, async () => {
    const hub = await startHub({ extra: HISTORY });
    const channel = uniqueChannel("memory-rest");
    const { client, got, gaps, gate } = await recordingClient(hub, channel, { ...QUICK, fallbackInterval: 300 });
    await publishRange(hub, channel, 1, 3);
    await waitForCount(got, 3, "before the restart");

    gate.held = true;
    gate.restHeld = true; // no REST read before the restarted hub has the value
    await hub.kill("SIGKILL");
    await hub.start();
    await hub.publish(channel, { n: 100 });
    gate.restHeld = false;
    await waitFor(() => client.fallbackActive, { timeout: 20_000, message: "the REST fallback polling" });
    await waitForCount(got, 4, "the snapshot over REST");
    assert.deepEqual(gaps, [{ channel, source: "rest" }]);
    assert.deepEqual(rows(got, 3), [[100, 1, false, true, "rest"]]);
    // Under the new epoch the history serves the next message.
    await hub.publish(channel, { n: 101 });
    await waitForCount(got, 5, "a message over REST");
    assert.deepEqual(rows(got, 4), [[101, 2, true, false, "rest"]]);
    gate.held = false;
    await waitFor(async () => (await hub.stats()).subscribes_recovered === 1, { message: "the recovered resubscribe" });
    await hub.publish(channel, { n: 102 });
    await waitForCount(got, 6, "a live message");
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(rows(got, 5), [[102, 3, false, false, "socket"]]);
    assert.equal(gaps.length, 1);
    client.close();
  });
});

describe("relayhub.js and a channel whose numbering starts over", () => {
  const redis = privateRedis();

  test("Redis restarts without its data under a connected client: the new numbering is delivered, not dropped as copies", LONG, async () => {
    const hub = await startHub({ redisUrl: redis.url, instanceId: "renumber", extra: HISTORY });
    const channel = uniqueChannel("renumber");
    const { client, got, gaps } = await recordingClient(hub, channel, { ...QUICK, fallback: false });
    await publishRange(hub, channel, 1, 5);
    await waitForCount(got, 5, "before Redis restarts");
    const before = (await hub.stats()).redis_reconnects;

    const exited = new Promise((resolve) => redis.proc.once("exit", resolve));
    redis.proc.kill("SIGKILL");
    await exited;
    await redis.start();
    await waitFor(
      async () => {
        const stats = await hub.stats();
        return stats.redis_reconnects > before && stats.pubsub_active;
      },
      { timeout: 20_000, message: "the hub's pub/sub link back on the empty Redis" },
    );
    // Numbered 1, 2, 3 again: below the client's position (6), but younger than anything it was given.
    await publishRange(hub, channel, 6, 8);
    await waitForCount(got, 8, "the new numbering's messages");
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(
      rows(got, 5),
      [6, 7, 8].map((n) => [n, n - 5, false, false, "socket"]),
      "each once, in order, none taken for a copy",
    );
    assert.equal(client.status, "open");
    assert.deepEqual(gaps, []);
    client.close();
  });
});

describe("relayhub.js and a hub that refuses a pattern's since map", () => {
  test("4b. the pattern is subscribed plainly from then on and keeps delivering", LONG, async () => {
    const extra = "\n[channels]\nmax_pattern_positions = 2\n[namespaces.test]\npatterns = true\n";
    const hub = await startHub({ extra });
    const base = uniqueChannel("plain");
    const client = new RelayHub(`ws://127.0.0.1:${hub.port}/ws`, { ...QUICK, fallback: false });
    clients.push(client);
    const got = [];
    const errors = [];
    client.on("error", (info) => errors.push(info));
    client.subscribe(`${base}:*`, (data, meta) => got.push({ data, ...meta }));
    const positions = () => client._subs.get(`${base}:*`).positions;
    // Two channels delivered, and their epochs known: the next subscribe names both.
    await waitFor(async () => {
      await hub.publish(`${base}:x`, { n: 1 });
      await hub.publish(`${base}:y`, { n: 1 });
      return positions().get(`${base}:x`)?.epoch && positions().get(`${base}:y`)?.epoch;
    }, { message: "both epochs known" });

    // The hub comes back allowing one channel per since map: the two-channel map is refused.
    await hub.kill("SIGKILL");
    fs.writeFileSync(hub.configPath, fs.readFileSync(hub.configPath, "utf8").replace("max_pattern_positions = 2", "max_pattern_positions = 1"));
    await hub.start();
    await waitFor(() => client.status === "open", { message: "reconnected" });
    const before = got.length;
    await waitFor(async () => {
      await hub.publish(`${base}:x`, { n: 2 });
      return got.slice(before).some((m) => m.data.n === 2);
    }, { message: "the pattern delivers again" });
    assert.deepEqual(errors.filter((e) => e.dropped), [], "the pattern was not dropped");
    assert.ok(client.channels().includes(`${base}:*`));
    client.close();
  });
});

describe("the page keeps every message across a hub restart (Chromium)", () => {
  let redis;
  let browser;

  before(async () => {
    redis = new RedisServer();
    await redis.start();
    browser = await launchBrowser();
  });

  after(async () => {
    await browser?.close().catch(() => {});
    redis?.stop();
  });

  /**
   * Opens the hub's page with relayhub.js subscribed to `channel` (connections refused while
   * `window.gateHeld`); what it delivers is recorded in `window.got`, gap events in `window.gaps`. As in
   * `recordingClient`, the snapshot of a first value `{n: 0}` (seq 1) proves the subscription live; it is
   * then cleared from `window.got`.
   */
  async function openSubscribedPage(hub, channel) {
    await hub.publish(channel, { n: 0 });
    const { context, page, pageErrors } = await openPage(browser);
    await page.goto(`${hub.base}/?channels=`);
    await page.evaluate(async ({ channel, options }) => {
      const { RelayHub } = await import("/relayhub.js");
      window.got = [];
      window.gaps = [];
      window.gateHeld = false;
      class Gated extends WebSocket {
        constructor(url, ...rest) {
          super(window.gateHeld ? "ws://127.0.0.1:9/ws" : url, ...rest);
        }
      }
      const hub = new RelayHub("/ws", { ...options, WebSocket: Gated, fallback: false });
      hub.subscribe(channel, (data, meta) => window.got.push({ data, ...meta }));
      hub.on("gap", (info) => window.gaps.push(info));
      window.testHub = hub;
    }, { channel, options: QUICK });
    await waitForPageCount(page, 1, "the first snapshot");
    assert.deepEqual(await pageRows(page, 0), [[0, 1, false, true]]);
    await page.evaluate(() => (window.got.length = 0));
    return { context, page, pageErrors };
  }

  const pageRows = (page, from) =>
    page.evaluate((from) => window.got.slice(from).map((m) => [m.data.n, m.seq, m.recovered, m.snapshot]), from);

  async function waitForPageCount(page, count, what) {
    await page.waitForFunction((count) => window.got.length >= count, count, { timeout: 20_000 }).catch((err) => {
      throw new Error(`${what}: ${err.message}`);
    });
  }

  test("5. Redis mode: recovered:true, every message shown once, in order", LONG, async () => {
    const a = await startHub({ redisUrl: redis.url, instanceId: "page-a", extra: HISTORY });
    const b = await startHub({ redisUrl: redis.url, instanceId: "page-b", extra: HISTORY });
    const channel = uniqueChannel("page-redis");
    const { context, page, pageErrors } = await openSubscribedPage(a, channel);
    try {
      await publishRange(a, channel, 1, 3);
      await waitForPageCount(page, 3, "before the restart");
      await page.evaluate(() => (window.gateHeld = true));
      await a.kill("SIGKILL");
      await publishRange(b, channel, 4, 13);
      await a.start();
      await page.evaluate(() => (window.gateHeld = false));
      await waitForPageCount(page, 13, "the outage's messages");
      await b.publish(channel, { n: 14 });
      await waitForPageCount(page, 14, "a live message");
      assert.deepEqual(await pageRows(page, 0), [
        ...[1, 2, 3].map((n) => [n, n + 1, false, false]),
        ...Array.from({ length: 10 }, (_, i) => [i + 4, i + 5, true, false]),
        [14, 15, false, false],
      ]);
      assert.deepEqual(await page.evaluate(() => window.gaps), []);
      assert.deepEqual(pageErrors, []);
    } finally {
      await context.close();
    }
  });

  test("6. memory mode: recovered:false, a gap, and the snapshot shown", LONG, async () => {
    const hub = await startHub({ extra: HISTORY });
    const channel = uniqueChannel("page-memory");
    const { context, page, pageErrors } = await openSubscribedPage(hub, channel);
    try {
      await publishRange(hub, channel, 1, 2);
      await waitForPageCount(page, 2, "before the restart");
      await page.evaluate(() => (window.gateHeld = true));
      await hub.kill("SIGKILL");
      await hub.start();
      await hub.publish(channel, { n: 50 });
      await page.evaluate(() => (window.gateHeld = false));
      await waitForPageCount(page, 3, "the snapshot");
      await hub.publish(channel, { n: 51 });
      await waitForPageCount(page, 4, "a live message");
      assert.deepEqual(await pageRows(page, 0), [
        [1, 2, false, false],
        [2, 3, false, false],
        [50, 1, false, true],
        [51, 2, false, false],
      ]);
      assert.deepEqual(await page.evaluate(() => window.gaps), [{ channel, source: "socket" }]);
      assert.deepEqual(pageErrors, []);
    } finally {
      await context.close();
    }
  });
});
