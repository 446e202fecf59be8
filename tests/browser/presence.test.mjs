// presence.test.mjs: relayhub.js's presence() call and its join/leave events, in node, against the real
// relayhub binary (memory mode) with a namespace that keeps presence and announces joins and leaves.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Hub, uniqueChannel, waitFor } from "./harness.mjs";
import { RelayHub } from "../../web/relayhub.js";

let hub;
const clients = [];

process.on("exit", () => hub?.killNow());

before(async () => {
  hub = new Hub({ extra: "\n[namespaces.room]\npresence = true\njoin_leave = true\n" });
  await hub.start();
});

after(async () => {
  for (const client of clients) client.close();
  await hub?.kill("SIGTERM");
  hub?.cleanup();
});

function client() {
  const c = new RelayHub(`ws://127.0.0.1:${hub.port}/ws`);
  clients.push(c);
  return c;
}

test("presence() lists the subscribers; join and leave events tell who comes and goes", { timeout: 30_000 }, async () => {
  const channel = `room:${uniqueChannel("p").slice("test:".length)}`;
  const first = client();
  const events = [];
  first.on("join", (e) => events.push({ kind: "join", ...e }));
  first.on("leave", (e) => events.push({ kind: "leave", ...e }));
  first.subscribe(channel, () => {});
  await hub.waitForSubscribers(channel, 1);

  const second = client();
  second.subscribe(channel, () => {});
  await waitFor(() => events.some((e) => e.kind === "join"), { message: "a join event" });
  const joined = events.find((e) => e.kind === "join");
  assert.equal(joined.channel, channel);
  assert.equal(joined.member.user, null);

  const answer = await first.presence(channel);
  assert.equal(answer.channel, channel);
  assert.equal(answer.truncated, false);
  assert.equal(answer.members.length, 2);
  assert.ok(answer.members.some((m) => m.client === joined.member.client));

  // A namespace without presence is refused with the hub's code.
  await assert.rejects(first.presence("chat:lobby"), (err) => err.code === "forbidden");

  second.close();
  await waitFor(() => events.some((e) => e.kind === "leave"), { message: "a leave event" });
  assert.equal(events.find((e) => e.kind === "leave").member.client, joined.member.client);
  assert.equal((await first.presence(channel)).members.length, 1);
});
