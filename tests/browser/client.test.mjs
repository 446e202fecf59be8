// client.test.mjs: web/relayhub.js in node (its WebSocket and fetch), against the real relayhub binary started by
// harness.mjs: what many clients do when their hub restarts, and the bound on calls queued while offline. Run
// with `node --test` (node 20 needs --experimental-websocket; see scripts/test-browser.sh).

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Hub, freePort, waitFor } from "./harness.mjs";
import { RelayHub, namespaceOf } from "../../web/relayhub.js";

const LONG = { timeout: 90_000 };

let hub;
const clients = [];

process.on("exit", () => hub?.killNow());

/**
 * A client of `hub` whose statuses, fallback switches, errors, REST requests and failed connection attempts
 * are recorded in order in `events` (each `{at, what, ...}`). The real WebSocket and fetch do the work; they are
 * only watched.
 */
function recordedClient(url, options = {}) {
  const events = [];
  const fetchCounted = (...args) => {
    events.push({ at: Date.now(), what: "fetch" });
    return fetch(...args);
  };
  class WatchedWebSocket extends globalThis.WebSocket {
    constructor(...args) {
      super(...args);
      let opened = false;
      this.addEventListener("open", () => (opened = true));
      const failed = () => {
        if (!opened) events.push({ at: Date.now(), what: "attempt-failed" });
        opened = true; // once per socket
      };
      this.addEventListener("error", failed);
      this.addEventListener("close", failed);
    }
  }
  const client = new RelayHub(url, { WebSocket: WatchedWebSocket, fetch: fetchCounted, ...options });
  client.on("status", (state, detail) => events.push({ at: Date.now(), what: `status:${state}`, ...detail }));
  client.on("fallback", (active) => events.push({ at: Date.now(), what: `fallback:${active}` }));
  client.on("error", (info) => events.push({ at: Date.now(), what: `error:${info.code}`, ...info }));
  clients.push(client);
  return { client, events };
}

/** Waits until every client's status is `open`. */
async function allOpen(list, timeout = 30_000) {
  await waitFor(() => list.every(({ client }) => client.status === "open"), {
    timeout,
    message: "every client open",
  });
}

/** No REST request and no fallback after the 1001 before one of the client's reconnect attempts failed. */
function assertNoFallbackBeforeAFailedAttempt(events, since) {
  const after1001 = events.filter((e) => e.at >= since);
  const failed = after1001.findIndex((e) => e.what === "attempt-failed");
  const firstPoll = after1001.findIndex((e) => e.what === "fetch" || e.what === "fallback:true");
  if (firstPoll >= 0) {
    assert.ok(
      failed >= 0 && failed < firstPoll,
      `REST fallback before a failed reconnect: ${JSON.stringify(after1001)}`,
    );
  }
}

describe("relayhub.js against a restarting hub", () => {
  before(async () => {
    hub = new Hub();
    await hub.start();
  });

  after(async () => {
    for (const c of clients) c.close();
    await hub?.kill("SIGTERM");
    hub?.cleanup();
  });

  test("1. after a close 1001 the clients come back spread over drainJitter, not at once", LONG, async () => {
    const url = `ws://127.0.0.1:${hub.port}/ws`;
    const list = Array.from({ length: 20 }, () => recordedClient(url, { drainJitter: 3000 }));
    for (const { client } of list) client.subscribe("test:drain", () => {});
    await allOpen(list);
    const since = Date.now();
    await hub.kill("SIGTERM");
    await hub.start();
    await allOpen(list);
    const delays = list.map(({ events }) => {
      const first = events.find((e) => e.at >= since && e.what === "status:reconnecting");
      assert.equal(first?.code, 1001, JSON.stringify(events));
      return first.delay;
    });
    for (const d of delays) assert.ok(d >= 0 && d < 3000, `delay ${d} outside [0, 3000)`);
    // 20 uniform draws over 3 s: a range under 750 ms has a probability around 1e-11.
    const spread = Math.max(...delays) - Math.min(...delays);
    assert.ok(spread >= 750, `reconnect delays ${JSON.stringify(delays)} are not spread`);
    for (const { events } of list) assertNoFallbackBeforeAFailedAttempt(events, since);
    for (const { client } of list) client.close();
  });

  test("2. with the hub gone the REST fallback starts only after the first failed reconnect", LONG, async () => {
    const url = `ws://127.0.0.1:${hub.port}/ws`;
    const list = Array.from({ length: 5 }, () =>
      recordedClient(url, {
        drainJitter: 300,
        backoffBase: 200,
        backoffMax: 400,
        maxAttempts: Infinity,
        fallbackInterval: 1000,
      }),
    );
    for (const { client } of list) client.subscribe("test:gone", () => {});
    await allOpen(list);
    const since = Date.now();
    await hub.kill("SIGTERM");
    await waitFor(() => list.every(({ client }) => client.fallbackActive), {
      timeout: 20_000,
      message: "every client polling over REST",
    });
    for (const { events } of list) {
      assert.ok(events.some((e) => e.at >= since && e.what === "fetch"), JSON.stringify(events));
      assertNoFallbackBeforeAFailedAttempt(events, since);
    }
    await hub.start();
    await allOpen(list);
    for (const { client } of list) assert.equal(client.fallbackActive, false);
    for (const { client } of list) client.close();
  });

  test("3. calls queued offline are bounded by maxQueue: the oldest go, an error says so", LONG, async () => {
    // A port nobody listens on yet; a second hub starts there later.
    const late = new Hub();
    late.port = await freePort();
    const { client, events } = recordedClient(`ws://127.0.0.1:${late.port}/ws`, {
      maxQueue: 3,
      backoffBase: 100,
      backoffMax: 300,
      maxAttempts: Infinity,
      fallback: false,
    });
    const outcomes = [];
    const publishes = [0, 1, 2, 3, 4].map((n) =>
      client.publish("chat:queue", { n }).then(
        () => outcomes.push(`ok:${n}`),
        (err) => outcomes.push(`${err.code}:${n}`),
      ),
    );
    const full = events.filter((e) => e.what === "error:queue_full");
    assert.equal(full.length, 2, JSON.stringify(events));
    assert.ok(full.every((e) => e.op === "publish" && e.channel === "chat:queue"));
    try {
      await late.start();
      await Promise.all(publishes);
      assert.deepEqual(outcomes.sort(), ["ok:2", "ok:3", "ok:4", "queue_full:0", "queue_full:1"]);
      const r = await late.request("GET", "/api/channels/chat:queue/history?limit=10");
      assert.equal(r.status, 200, r.text);
      assert.deepEqual(
        r.json.items.map((i) => i.data.n),
        [4, 3, 2],
        "only the three newest calls reached the hub",
      );
    } finally {
      client.close();
      await late.kill("SIGTERM");
      late.cleanup();
    }
  });

  test("4. namespaceOf follows the hub's rule: a name without ':' is its own namespace", LONG, async () => {
    const names = [
      ["chat", "chat"],
      ["chat:lobby", "chat"],
      ["news", "news"],
      ["option-chain:NIFTY:2025-11-28", "option-chain"],
    ];
    for (const [channel, namespace] of names) assert.equal(namespaceOf(channel), namespace, channel);
    // The harness config opens [namespaces.chat] to client publishes: the hub applies it to `chat` itself,
    // and refuses `news`, which has no table.
    const { client } = recordedClient(`ws://127.0.0.1:${hub.port}/ws`, { fallback: false });
    try {
      const ack = await client.publish("chat", { hello: 1 });
      assert.equal(ack.channel, "chat");
      await assert.rejects(client.publish("news", 1), (err) => err.code === "forbidden");
    } finally {
      client.close();
    }
  });
});
