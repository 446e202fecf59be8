// token.test.mjs: relayhub.js's `token` option in node against the real relayhub binary with token auth, and a
// small token endpoint (node's HTTP server, HS256 signed with node's crypto) standing in for an app's backend.
// The client fetches a token before it connects, a fresh one before the token expires (the connection stays
// up), and after a 4001 (expired, no fresh token in time) it reconnects at once with a new one.

import assert from "node:assert/strict";
import crypto from "node:crypto";
import http from "node:http";
import { after, before, describe, test } from "node:test";

import { Hub, waitFor } from "./harness.mjs";
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
let endpoint;
let server;
/** What the endpoint answers next: a function of the call number (1-based) giving a ttl, or null for a 500. */
let plan = () => 3;
let calls = 0;
const clients = [];

process.on("exit", () => hub?.killNow());

describe("relayhub.js token option", () => {
  before(async () => {
    hub = new Hub(`
[auth]
jwt_hs256_secret = "${SECRET}"

[namespaces.team]
anonymous = false
`);
    await hub.start();
    server = http.createServer((req, res) => {
      calls += 1;
      const ttl = plan(calls);
      if (ttl === null) {
        res.writeHead(500).end();
        return;
      }
      res.writeHead(200, { "Content-Type": "application/json" }).end(JSON.stringify({ token: mint("42", ttl) }));
    });
    await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
    endpoint = `http://127.0.0.1:${server.address().port}/realtime-token`;
  });

  after(async () => {
    for (const c of clients) c.close();
    server?.close();
    await hub?.kill("SIGTERM");
    hub?.cleanup();
  });

  /** Publishes `{n}` on team:board until the client has it (the first publish may precede its subscription). */
  async function messageArrives(seen, n) {
    await waitFor(
      async () => {
        await hub.publish("team:board", { n });
        return seen.messages.some((m) => m?.n === n);
      },
      { message: `team:board message ${n}` },
    );
  }

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
    // team:* needs a token: a message arriving proves the subscription went through with it, and lives on.
    await messageArrives(seen, 1);
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
    await messageArrives(seen, 2);
    client.close();
  });
});
