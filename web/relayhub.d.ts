// Types of relayhub.js, the browser client of a relayhub server: every export, option, method and event. Kept
// by hand beside the JavaScript (which has no build step); tests/typescript checks an example that uses all of
// it, with `tsc --noEmit`.

/** Metadata handed to a subscription callback with every value. */
export interface MessageMeta {
  /** The channel the value belongs to (for a pattern subscription: the matching channel). */
  channel: string;
  /** The hub's sequence number of the value; null for values written by outside producers. */
  seq: number | null;
  /** ISO-8601 time the hub stored the value, when known. */
  ts: string | null;
  /** True for the latest value sent on subscribe (or read through the REST fallback), false for a live message. */
  snapshot: boolean;
  /** True for a message the client missed while disconnected, replayed from the hub's history (after a
   * resubscribe the hub answered `recovered:true`, or read by the REST fallback). */
  recovered: boolean;
  /** How the value arrived: over the WebSocket, the Server-Sent Events fallback, or the REST fallback. (Over
   * SSE, replayed messages are not told apart from live ones: `recovered` is false.) */
  source: "socket" | "sse" | "rest";
}

/** What the client needs of a WebSocket object; the browser's and node's WebSocket both fit. */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: any) => any) | null;
  onmessage: ((event: any) => any) | null;
  onclose: ((event: any) => any) | null;
  onerror: ((event: any) => any) | null;
}

/** A WebSocket constructor (the global `WebSocket`, or a test's own). */
export type WebSocketConstructor = new (url: string) => WebSocketLike;

/** What the SSE fallback needs of an `EventSource`; the global one fits. */
export interface EventSourceLike {
  readonly readyState: number;
  onopen: ((event: any) => any) | null;
  onerror: ((event: any) => any) | null;
  addEventListener(type: string, listener: (event: { data: string; lastEventId: string }) => void): void;
  close(): void;
}

/** An EventSource constructor (the global `EventSource`, or a test's own). */
export type EventSourceConstructor = new (url: string) => EventSourceLike;

/** How values arrive right now (see {@link RelayHub.transport}). */
export type Transport = "websocket" | "sse" | "rest";

/** What the REST fallback needs of `fetch`; the global `fetch` fits. */
export type FetchLike = (
  url: string,
  init: { headers: Record<string, string>; cache: "no-store"; signal?: any },
) => Promise<{ ok: boolean; json(): Promise<any> }>;

/** Options of {@link RelayHub}; every one is optional. Defaults are in {@link DEFAULTS}. */
export interface RelayHubOptions {
  /** First reconnect delay cap in ms (doubles per attempt, full jitter). Default 500. */
  backoffBase?: number;
  /** Largest reconnect delay cap in ms. Default 10000. */
  backoffMax?: number;
  /** Failed reconnect attempts in a row before giving up (status `closed`); `Infinity` never gives up. Default 10. */
  maxAttempts?: number;
  /** Ms between application-level `ping` frames. Default 10000. */
  heartbeatInterval?: number;
  /** Ms without any frame from the server (while a ping waits) after which the link is replaced. Default 25000. */
  heartbeatTimeout?: number;
  /** Ms a connection attempt may take before it is abandoned. Default 10000. */
  connectTimeout?: number;
  /** Keep subscribed channels fresh while the socket is down: over Server-Sent Events (see `sse`), else by
   * polling the REST API. Default true. */
  fallback?: boolean;
  /** Try the hub's Server-Sent Events stream (`/sse`) before REST polling, where an EventSource exists; when
   * the stream is refused or unreachable, REST polling takes over. Default true. */
  sse?: boolean;
  /** Ms between two REST fallback rounds (the first starts a random time in [0, fallbackInterval) after a failed
   * attempt). Default 3000. */
  fallbackInterval?: number;
  /** After a close with code 1001 (hub restarting), the first reconnect waits a random time in [0, drainJitter)
   * ms. Default 5000. */
  drainJitter?: number;
  /** Most calls queued while offline; past it the oldest is dropped (a dropped publish is rejected with code
   * `queue_full`) and an `error` event with code `queue_full` says so. Default 1000. */
  maxQueue?: number;
  /** Base URL of the REST API (default null: derived from the socket URL, `ws://host:8080/ws` gives
   * `http://host:8080`). */
  restBase?: string | null;
  /** WebSocket implementation (default: the global one). */
  WebSocket?: WebSocketConstructor;
  /** fetch implementation for the REST fallback (default: the global one). */
  fetch?: FetchLike;
  /** A connection token (JWT) sent in an `auth` frame first thing on every connection; or an async function
   * returning one, called before each connect and again `tokenRefreshBefore` ms before the token expires. A
   * close with 4001 from the hub (token expired) makes the client reconnect at once. Default null. */
  token?: string | (() => Promise<string>) | null;
  /** Ms before `expires_at` to fetch a fresh token (at most half the remaining lifetime). Default 30000. */
  tokenRefreshBefore?: number;
  /** EventSource implementation for the SSE fallback (default: the global one). */
  EventSource?: EventSourceConstructor;
}

/** The defaults of every option of {@link RelayHub} that has one. */
export declare const DEFAULTS: Readonly<{
  backoffBase: number;
  backoffMax: number;
  maxAttempts: number;
  heartbeatInterval: number;
  heartbeatTimeout: number;
  connectTimeout: number;
  fallback: boolean;
  sse: boolean;
  fallbackInterval: number;
  drainJitter: number;
  maxQueue: number;
  restBase: string | null;
  token: null;
  tokenRefreshBefore: number;
}>;

/** The connection state. */
export type Status = "connecting" | "open" | "reconnecting" | "closed";

/** Second argument of a `status` event; which fields are set depends on the transition. */
export interface StatusDetail {
  /** Close code of the socket that was lost (1000 after `close()`, 1006 when a connection failed, 4000 on a
   * connect timeout, 4001 on a heartbeat timeout, or the server's code: 4001 with reason `token expired` when
   * the connection's token expired). */
  code?: number;
  /** Close reason. */
  reason?: string;
  /** Reconnect attempt number. */
  attempt?: number;
  /** Ms until the next attempt (`reconnecting`). */
  delay?: number;
  /** True when `closed` because `maxAttempts` attempts failed; `connect()` tries again. */
  gaveUp?: boolean;
}

/** Payload of an `error` event. */
export interface ErrorInfo {
  /** The hub's error code (e.g. `forbidden`, `invalid_channel`, `rate_limited`), or the client's own:
   * `connect_failed`, `bad_frame`, `queue_full`, `token_failed` (the token function threw or rejected);
   * `unknown` when the hub gave none. */
  code: string;
  message: string;
  /** The channel concerned, when known. */
  channel: string | null;
  /** The operation refused (`subscribe`, `unsubscribe`, `publish`, `auth`), when known. */
  op: string | null;
  /** True when the hub refused a subscription for good and the channel was forgotten. */
  dropped?: boolean;
}

/** Payload of a `gap` event: the hub no longer holds everything the client missed on `channel` (history
 * trimmed or expired, hub or Redis restarted); the channel's latest value follows as a snapshot. */
export interface GapInfo {
  channel: string;
  /** Where the gap was found: on resubscribing over the WebSocket, on the SSE stream, or by the REST fallback. */
  source: "socket" | "sse" | "rest";
}

/** Listener signatures by event name. */
export interface RelayHubEvents {
  status: (state: Status, detail: StatusDetail) => void;
  latency: (ms: number) => void;
  error: (info: ErrorInfo) => void;
  fallback: (active: boolean) => void;
  gap: (info: GapInfo) => void;
  authed: (info: AuthedInfo) => void;
  /** Another client subscribed to a channel of a namespace with `join_leave = true`. */
  join: (info: PresenceEvent) => void;
  /** A client unsubscribed from such a channel, or disconnected. */
  leave: (info: PresenceEvent) => void;
}

/** One subscriber of a channel, as presence lists it. */
export interface Member {
  /** The connection's id, unique across the hub's replicas. */
  client: string;
  /** Its connection token's `sub`; null when anonymous. */
  user: string | null;
  /** Its connection token's `info` claim; null when none. */
  info: unknown;
}

/** Payload of `join` and `leave` events. */
export interface PresenceEvent {
  channel: string;
  member: Member;
}

/** What {@link RelayHub.presence} resolves with. */
export interface PresenceAnswer {
  channel: string;
  members: Member[];
  /** The channel has more members than the hub lists (`channels.max_presence_members`). */
  truncated: boolean;
}

/** Payload of an `authed` event: the hub accepted the connection token. */
export interface AuthedInfo {
  /** The token's `sub`. */
  user: string;
  /** When the token expires (RFC 3339). */
  expiresAt: string;
}

/** The error a refused or failed publish rejects with; `code` is set when the hub (or a full queue) refused. */
export interface PublishError extends Error {
  code?: string;
}

/** Whether `name` is a valid channel name: 1-200 characters of `[A-Za-z0-9_.:@#-]`. */
export declare function isValidChannel(name: unknown): name is string;

/** Whether `name` is a pattern such as `prices:*`: a channel-name prefix ending in `:`, then `*`. */
export declare function isPattern(name: unknown): name is string;

/** The namespace of a channel: the part before the first `:` (the whole name when there is none). */
export declare function namespaceOf(channel: string): string;

/** Delay in ms before reconnect attempt `attempt` (0-based): a random value in [0, min(max, base * 2^attempt)). */
export declare function backoffDelay(attempt: number, base: number, max: number): number;

/** A connection to a relayhub server; starts connecting when constructed. */
export declare class RelayHub {
  /**
   * @param url socket URL: `ws://`, `wss://`, `http(s)://` or a path relative to the page (default "/ws")
   * @throws {TypeError} on an unsupported URL scheme or when there is no WebSocket implementation
   */
  constructor(url?: string, options?: RelayHubOptions);

  /** The options in force: the defaults overlaid with those given. */
  readonly options: typeof DEFAULTS & RelayHubOptions;
  /** The WebSocket URL this client connects to. */
  readonly url: string;
  /** Base URL of the REST API the fallback reads channels from. */
  readonly restBase: string;
  /** The connection state. */
  readonly status: Status;
  /** Round-trip time of the last `ping`/`pong` exchange, in ms; null until the first `pong`. */
  readonly latency: number | null;
  /** How values arrive right now: `websocket`, `sse`, `rest`, or null while none works. */
  readonly transport: Transport | null;
  /** Whether the REST fallback is polling right now. */
  readonly fallbackActive: boolean;

  /** The channels (and patterns) subscribed to, whatever the connection state. */
  channels(): string[];

  /**
   * Subscribes `onMessage` to a channel or a pattern (`prefix:*`): the latest value first (a snapshot, when the
   * hub has one), then every message. Works offline; renewed after every reconnect from the channel's
   * position, so missed messages arrive with `meta.recovered` (or a `gap` event, then a snapshot).
   * @returns a function that removes this callback (and unsubscribes when it was the last one)
   * @throws {TypeError} when the channel name is invalid or `onMessage` is not a function
   */
  subscribe<T = any>(channel: string, onMessage: (data: T, meta: MessageMeta) => void): () => void;

  /**
   * Publishes `data` (any JSON value) on `channel`; sent at once when open, otherwise queued.
   * Resolves on the hub's `published` reply; rejects with a {@link PublishError}.
   */
  publish(channel: string, data: unknown): Promise<{ channel: string; seq: number | null }>;

  /**
   * The members of `channel` on every replica (namespaces with `presence = true`); sent at once when open,
   * otherwise queued. Rejects with a {@link PublishError} carrying `code` when the hub refuses.
   */
  presence(channel: string): Promise<PresenceAnswer>;

  /** Adds a listener; returns a function that removes it. */
  on<E extends keyof RelayHubEvents>(event: E, fn: RelayHubEvents[E]): () => void;

  /** Removes a listener added with {@link RelayHub.on}. */
  off<E extends keyof RelayHubEvents>(event: E, fn: RelayHubEvents[E]): void;

  /** Connects again after `close()` or after giving up; does nothing while connected or connecting. */
  connect(): void;

  /** Closes the connection (code 1000), stops reconnecting, the heartbeat and the fallback; rejects pending
   * publishes. Subscriptions are kept for `connect()`. */
  close(): void;
}
