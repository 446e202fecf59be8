// Uses every export, option, method and event of relayhub-client as a TypeScript user would, installed from
// ../../web like `npm install ./web`. `tsc --noEmit` must accept it; each `@ts-expect-error` line is a misuse the
// types must reject (tsc fails when such a line compiles), so the types cannot silently decay into `any`.

import {
  DEFAULTS,
  RelayHub,
  backoffDelay,
  isPattern,
  isValidChannel,
  namespaceOf,
  type AuthedInfo,
  type ErrorInfo,
  type GapInfo,
  type Member,
  type MessageMeta,
  type PresenceAnswer,
  type PresenceEvent,
  type PublishError,
  type RelayHubOptions,
  type Status,
  type StatusDetail,
  type Transport,
} from "relayhub-client";

const options: RelayHubOptions = {
  backoffBase: 500,
  backoffMax: 10_000,
  maxAttempts: Infinity,
  heartbeatInterval: 10_000,
  heartbeatTimeout: 25_000,
  connectTimeout: 10_000,
  fallback: true,
  sse: true,
  fallbackInterval: 3_000,
  drainJitter: 5_000,
  maxQueue: 1_000,
  restBase: "http://127.0.0.1:8080",
  WebSocket: globalThis.WebSocket,
  fetch: globalThis.fetch,
  tokenRefreshBefore: 30_000,
  EventSource: globalThis.EventSource,
};

// A token from the app's own backend, fetched before each connect and again before it expires.
const withToken = new RelayHub("/ws", {
  token: async () => (await (await fetch("/realtime-token", { method: "POST" })).json()).token as string,
});
withToken.on("authed", (info: AuthedInfo) => console.log(info.user, info.expiresAt));
withToken.close();
const fixedToken = new RelayHub("/ws", { token: "eyJ.fixed.token" });
fixedToken.close();

const queueBound: number = DEFAULTS.maxQueue + DEFAULTS.drainJitter;
const hub = new RelayHub("ws://127.0.0.1:8080/ws", options);
const plain = new RelayHub();
plain.close();

interface Price {
  symbol: string;
  price: number;
}

const off = hub.subscribe<Price>("prices:BTC", (data, meta: MessageMeta) => {
  const line: string = `${meta.channel} ${meta.seq ?? "-"} ${meta.ts ?? "-"} ${data.symbol} ${data.price}`;
  const how: "socket" | "sse" | "rest" = meta.source;
  const replayed: boolean = meta.recovered;
  console.log(line, how, meta.snapshot ? "snapshot" : "live", replayed ? "recovered" : "");
});
const offPattern = hub.subscribe("prices:*", (data: unknown, meta) => console.log(meta.channel, data));

const offStatus = hub.on("status", (state: Status, detail: StatusDetail) => {
  console.log(state, detail.code, detail.reason, detail.attempt, detail.delay, detail.gaveUp);
});
hub.on("latency", (ms: number) => console.log(ms.toFixed(1)));
const onError = (info: ErrorInfo) => console.log(info.code, info.message, info.channel, info.op, info.dropped);
hub.on("error", onError);
hub.on("fallback", (active: boolean) => console.log(active));
hub.on("gap", (info: GapInfo) => {
  const where: "socket" | "sse" | "rest" = info.source;
  console.log(`${info.channel}: messages missed (${where}); the latest value follows`);
});
hub.on("join", (info: PresenceEvent) => console.log(`${info.member.client} joined ${info.channel}`));
hub.on("leave", (info: PresenceEvent) => console.log(info.member.user ?? "anonymous", "left", info.channel));
hub.off("error", onError);

async function main(): Promise<void> {
  try {
    const reply = await hub.publish("chat:lobby", { text: "hi" });
    const seq: number | null = reply.seq;
    console.log(reply.channel, seq);
  } catch (err) {
    console.log((err as PublishError).code);
  }
  const present: PresenceAnswer = await hub.presence("chat:lobby");
  const members: Member[] = present.members;
  console.log(members.map((m) => m.info), present.truncated);
  const state: Status = hub.status;
  const latency: number | null = hub.latency;
  const polling: boolean = hub.fallbackActive;
  const transport: Transport | null = hub.transport;
  const wanted: string[] = hub.channels();
  const where: string = `${hub.url} ${hub.restBase} ${hub.options.maxQueue}`;
  console.log(state, latency, polling, transport, wanted, where, queueBound);
  console.log(isValidChannel("chat:lobby"), isPattern("prices:*"), namespaceOf("chat:lobby"), backoffDelay(3, 500, 10_000));
  off();
  offPattern();
  offStatus();
  hub.connect();
  hub.close();
}

void main();

// --- misuses the types must reject ---------------------------------------------------------------------------

// @ts-expect-error a token function returns a promise of the token
new RelayHub("/ws", { token: () => 42 });
// @ts-expect-error maxQueue is a number
new RelayHub("/ws", { maxQueue: "1000" });
// @ts-expect-error no such option
new RelayHub("/ws", { drainJiter: 5_000 });
// @ts-expect-error no such event
hub.on("message", () => {});
// @ts-expect-error a gap listener gets a GapInfo, not a string
hub.on("gap", (channel: string) => console.log(channel));
// @ts-expect-error a status listener gets a Status, not a number
hub.on("status", (state: number) => console.log(state));
// @ts-expect-error status is read-only
hub.status = "open";
// @ts-expect-error there is no unsubscribe method: subscribe returns the function that unsubscribes
hub.unsubscribe("chat:lobby");
// @ts-expect-error a subscription needs a callback
hub.subscribe("chat:lobby");
// @ts-expect-error presence takes a channel name
hub.presence(42);
