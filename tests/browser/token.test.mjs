// token.test.mjs: relayhub.js's `token` option against the real relayhub binary with token auth, and a small
// token endpoint (node's HTTP server, HS256 signed with node's crypto) standing in for an app's backend.
// The client fetches a token before it connects, a fresh one before the token expires (the connection stays
// up), and after a 4001 (expired, no fresh token in time) it reconnects with a new one. Once in node, and once
// in headless Chromium from an app page on its own origin that imports relayhub.js from the hub, as an app does.

import assert from "node:assert/strict";
import crypto from "node:crypto";
import http from "node:http";
import { after, before, describe, test } from "node:test";

import { Hub, launchBrowser, openPage, waitFor } from "./harness.mjs";
import { RelayHub } from "../../web/relayhub.js";

const SECRET = "browser-test-secret-that-is-long-enough-0123";
const LONG = { timeout: 60_000 };

/** An HS256 JWT for `sub` expiring in `ttl` seconds. */
function mint(sub, ttl) {
  const b64 = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, exp: Math.floor(Date.now() / 1000) + ttl })}`;
  const signature = crypto.createHmac("sha256", SECRET).update(body).digest("base64url");
  return `${body}.${signature}`;
}

let hub;
let server;
/** The app's origin: its page (GET /app.html) and its token endpoint (POST /realtime-token). */
let app;
let endpoint;
/** What the endpoint answers next: a function of the call number (1-based) giving a ttl, or null for a 500. */
let plan = () => 3;
let calls = 0;

process.on("exit", () => hub?.killNow());

/**
 * The app page: imports relayhub.js from the hub (another origin, allowed by the default `allowed_origins`),
 * fetches its tokens from its own origin, subscribes to team:board, and records what the client reports in
 * `window.seen`. `options` (JSON in `?options=`) go to the client.
 */
function appPage() {
  return `<!doctype html>
<meta charset="utf-8">
<title>token test app</title>
<script type="module">
  import { RelayHub } from ${JSON.stringify(`${hub.base}/relayhub.js`)};
  const options = JSON.parse(new URLSearchParams(location.search).get("options") ?? "{}");
  const seen = { statuses: [], authed: [], errors: [], messages: [] };
  const client = new RelayHub(${JSON.stringify(`ws://127.0.0.1:${hub.port}/ws`)}, {
    ...options,
    token: async () => {
      const res = await fetch("/realtime-token", { method: "POST" });
      if (!res.ok) throw new Error("token endpoint answered " + res.status);
      return (await res.json()).token;
    },
  });
  client.on("status", (state, detail) => seen.statuses.push({ state, at: Date.now(), ...detail }));
  client.on("authed", (info) => seen.authed.push(info));
  client.on("error", (info) => seen.errors.push(info));
  client.subscribe("team:board", (data, meta) => seen.messages.push({ data, source: meta.source }));
  window.seen = seen;
  window.client = client;
</script>
`;
}

before(async () => {
  hub = new Hub(`
[auth]
jwt_hs256_secret = "${SECRET}"

[namespaces.team]
anonymous = false
`);
  await hub.start();
  server = http.createServer((req, res) => {
    if (req.method === "GET" && req.url.startsWith("/app.html")) {
      res.writeHead(200, { "Content-Type": "text/html; charset=utf-8" }).end(appPage());
      return;
    }
    calls += 1;
    const ttl = plan(calls);
    if (ttl === null) {
      res.writeHead(500).end();
      return;
    }
    res.writeHead(200, { "Content-Type": "application/json" }).end(JSON.stringify({ token: mint("42", ttl) }));
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  app = `http://127.0.0.1:${server.address().port}`;
  endpoint = `${app}/realtime-token`;
});

after(async () => {
  server?.close();
  await hub?.kill("SIGTERM");
  hub?.cleanup();
});

/**
 * Publishes `{n}` on team:board until `has(n)` holds (the first publish may precede the subscription). team:*
 * needs a token: a message arriving proves the subscription went through with it.
 */
async function messageArrives(has, n) {
  await waitFor(
    async () => {
      await hub.publish("team:board", { n });
      return has(n);
    },
    { message: `team:board message ${n}` },
  );
}

async function tokensExpired() {
  return (await hub.stats()).tokens_expired;
}

describe("relayhub.js token option", () => {
  const clients = [];

  after(() => {
    for (const c of clients) c.close();
  });

  /** A client whose token comes from the endpoint, with what it saw recorded. */
  function tokenClient(options = {}) {
    const seen = { statuses: [], authed: [], errors: [], messages: [] };
    const client = new RelayHub(`ws://127.0.0.1:${hub.port}/ws`, {
      token: async () => {
        const res = await fetch(endpoint, { method: "POST" });
        if (!res.ok) throw new Error(`token endpoint answered ${res.status}`);
        return (await res.json()).token;
      },
      ...options,
    });
    client.on("status", (state, detail) => seen.statuses.push({ state, ...detail }));
    client.on("authed", (info) => seen.authed.push(info));
    client.on("error", (info) => seen.errors.push(info));
    client.subscribe("team:board", (data) => seen.messages.push(data));
    clients.push(client);
    return { client, seen };
  }

  test("1. a fresh token before expires_at keeps the connection and its subscriptions", LONG, async () => {
    calls = 0;
    plan = () => 3; // every token lives 3 s; refreshed 1.5 s before it expires
    const { client, seen } = tokenClient({ tokenRefreshBefore: 1_500 });
    await waitFor(() => seen.authed.length >= 1, { message: "authed" });
    assert.equal(seen.authed[0].user, "42");
    assert.ok(Date.parse(seen.authed[0].expiresAt) > Date.now(), JSON.stringify(seen.authed[0]));
    // Past two expiries of the first token's length: refreshed each time, never closed.
    await waitFor(() => seen.authed.length >= 3, { timeout: 15_000, message: "two refreshes" });
    assert.ok(calls >= 3, `token fetched ${calls} times`);
    assert.equal(client.status, "open");
    assert.deepEqual(
      seen.statuses.filter((s) => s.state === "reconnecting"),
      [],
      "no reconnect while refreshing",
    );
    await messageArrives((n) => seen.messages.some((m) => m?.n === n), 1);
    client.close();
  });

  test("2. after 4001 the client fetches a new token and reconnects at once", LONG, async () => {
    calls = 0;
    // First token: 2 s. Its refresh fails (500), so the hub closes with 4001; the reconnect gets a long one.
    plan = (n) => (n === 1 ? 2 : n === 2 ? null : 3600);
    const { client, seen } = tokenClient({ tokenRefreshBefore: 1_000 });
    await waitFor(() => seen.authed.length >= 1, { message: "authed" });
    await waitFor(() => seen.statuses.some((s) => s.state === "reconnecting" && s.code === 4001), {
      timeout: 10_000,
      message: "a 4001 close",
    });
    const lost = seen.statuses.find((s) => s.code === 4001);
    assert.equal(lost.delay, 0, "reconnects at once after 4001");
    assert.ok(seen.errors.some((e) => e.code === "token_failed" && e.op === "auth"), JSON.stringify(seen.errors));
    await waitFor(() => seen.authed.length >= 2 && client.status === "open", { message: "authed again" });
    assert.equal(calls, 3);
    await messageArrives((n) => seen.messages.some((m) => m?.n === n), 2);
    client.close();
  });
});

describe("relayhub.js token option in Chromium", () => {
  let browser;

  before(async () => {
    browser = await launchBrowser();
  });

  after(async () => {
    await browser?.close();
  });

  /**
   * Opens the app page with client `options` and runs `fn(page, seen)`, where `seen()` reads the page's
   * `window.seen`. On failure the page's errors and console and the hub's log are added to the error.
   */
  async function withAppPage(options, fn) {
    const { context, page, pageErrors, consoleLines } = await openPage(browser);
    try {
      await page.goto(`${app}/app.html?${new URLSearchParams({ options: JSON.stringify(options) })}`);
      await page.waitForFunction(() => window.seen !== undefined, null, { timeout: 10_000 });
      await fn(page, () => page.evaluate(() => window.seen));
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

  test("3. a page refreshes its token before expires_at and keeps receiving on the same connection", LONG, async () => {
    calls = 0;
    plan = () => 5; // every token lives 4-5 s (exp has whole seconds); refreshed 2 s before it expires
    const expiredBefore = await tokensExpired();
    await withAppPage({ tokenRefreshBefore: 2_000 }, async (page, seen) => {
      const has = async (n) => (await seen()).messages.some((m) => m.data?.n === n && m.source === "socket");
      const first = await waitFor(async () => (await seen()).authed[0], { message: "authed" });
      assert.equal(first.user, "42");
      const firstExpiry = Date.parse(first.expiresAt);
      assert.ok(firstExpiry > Date.now(), JSON.stringify(first));
      await messageArrives(has, 1);
      // Past the first token's expiry, with a margin for the hub's expiry timer.
      await waitFor(async () => Date.now() > firstExpiry + 1_000 && (await seen()).authed.length >= 2, {
        timeout: 15_000,
        message: "a refresh and the first token's expiry",
      });
      await messageArrives(has, 2);
      const s = await seen();
      assert.ok(calls >= 2, `token fetched ${calls} times`);
      assert.ok(Date.parse(s.authed.at(-1).expiresAt) > firstExpiry, JSON.stringify(s.authed));
      assert.equal(await page.evaluate(() => window.client.status), "open");
      // ("connecting" was reported in the constructor, before the page listened.)
      assert.deepEqual(
        s.statuses.map((x) => x.state),
        ["open"],
        "one connection, no reconnect while refreshing",
      );
      assert.deepEqual(s.errors, []);
      assert.equal(await tokensExpired(), expiredBefore, "the hub closed no connection for an expired token");
    });
  });

  test("4. while the endpoint fails the hub closes with 4001 at expiry; the page reconnects once it works", LONG, async () => {
    calls = 0;
    let failing = false;
    plan = () => (failing ? null : 5);
    const expiredBefore = await tokensExpired();
    // No REST fallback: every message after the outage must come through the new WebSocket.
    const options = { tokenRefreshBefore: 2_000, backoffBase: 200, backoffMax: 1_000, fallback: false };
    await withAppPage(options, async (page, seen) => {
      const has = async (n) => (await seen()).messages.some((m) => m.data?.n === n && m.source === "socket");
      const first = await waitFor(async () => (await seen()).authed[0], { message: "authed" });
      await messageArrives(has, 1);
      failing = true;
      const closed = await waitFor(
        async () => (await seen()).statuses.find((x) => x.state === "reconnecting" && x.code === 4001),
        { timeout: 10_000, message: "a 4001 close" },
      );
      // Closed at the token's expiry (not before it), and the client tried again at once.
      assert.ok(closed.at >= Date.parse(first.expiresAt) - 250, `${JSON.stringify(closed)} ${first.expiresAt}`);
      assert.equal(closed.delay, 0, "reconnects at once after 4001");
      assert.equal(await tokensExpired(), expiredBefore + 1);
      // The refresh and the reconnect's fetch both failed: no connection without a token.
      await waitFor(async () => (await seen()).errors.filter((e) => e.code === "token_failed").length >= 2, {
        message: "two failed token fetches",
      });
      assert.notEqual(await page.evaluate(() => window.client.status), "open");
      const callsWhileFailing = calls;
      failing = false;
      await waitFor(async () => (await seen()).authed.length >= 2, { message: "authed again" });
      await messageArrives(has, 2);
      const s = await seen();
      assert.equal(s.statuses.at(-1).state, "open");
      assert.ok(calls > callsWhileFailing, `token fetched ${calls} times`);
      assert.ok(Date.parse(s.authed[1].expiresAt) > Date.parse(first.expiresAt), JSON.stringify(s.authed));
    });
  });
});
