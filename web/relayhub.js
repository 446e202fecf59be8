// relayhub.js: the browser client of a relayhub server. One WebSocket to `/ws`, many channel subscriptions over
// it; reconnects with backoff, resubscribes, queues calls made while offline, keeps a heartbeat, and while the
// socket cannot be had falls back to Server-Sent Events (`/sse`), then to polling the REST API. An ES module with
// no dependencies and no build step.
//
// Layout of this file:
//   constants and functions    defaults, channel-name check, URL derivation, backoff, advance (the position rule)
//   class RelayHub             public API (subscribe, publish, on, close, connect, status, latency)
//     connection               _open, _onOpen, _onFrame, _onSubscribed, _onClose, _scheduleReconnect
//     outgoing                 _enqueue, _resubscribeAndFlush, _send
//     delivery                 _deliver, _admit, _admitPattern
//     heartbeat                _tick, _sendPing, _onPong
//     token                    _openWithToken, _sendAuth, _scheduleRefresh, _refreshToken
//     SSE fallback             _startSse, _openSse, _onSseEvent, _closeSse
//     REST fallback            _startFallback, _startRest, _stopFallback, _poll, _pollChannel
//
// Positions: for every exact channel the client keeps where it stands, the hub's (epoch, seq) of the newest
// message it delivered. A value is handed to the callbacks only when its seq is above that position, which
// then moves to it; values without seq (outside producers) always pass. After a reconnect every channel is
// subscribed again with `since` = its position, so the hub replays exactly what was missed (`recovered:true`)
// or says it cannot (`recovered:false`, a `gap` event, then the snapshot). The SSE fallback opens its stream
// with the same positions as `last_event_id`, and the REST fallback reads the same history with `since_seq`.
// A pattern subscription keeps one position per concrete channel it delivered (at most
// MAX_PATTERN_POSITIONS; the hub names each channel's epoch in an `epoch` frame) and resubscribes with the
// `since` map of those whose epoch it knows: each is replayed (`recovered` per channel) or gets its snapshot.

/** Defaults of every option of {@link RelayHub}. */
export const DEFAULTS = Object.freeze({
  backoffBase: 500,
  backoffMax: 10_000,
  maxAttempts: 10,
  heartbeatInterval: 10_000,
  heartbeatTimeout: 25_000,
  connectTimeout: 10_000,
  fallback: true,
  sse: true,
  fallbackInterval: 3_000,
  drainJitter: 5_000,
  maxQueue: 1_000,
  restBase: null,
  token: null,
  tokenRefreshBefore: 30_000,
});

/**
 * Most channels a pattern subscription keeps a position for: the hub's default `channels.max_pattern_positions`,
 * which also bounds the `since` map a pattern subscribe may send.
 */
const MAX_PATTERN_POSITIONS = 256;
/** What the position rule makes of a value: deliver it, drop it as a copy, or deliver it as the first of a new numbering. */
const PASS = 1;
const DROP = 0;
const RESTART = 2;

/** A value's `ts`, when it has one. */
function tsOf(meta) {
  return typeof meta.ts === "string" ? meta.ts : null;
}

/**
 * The position rule on one channel's position `pos` (`{seq, ts}`, moved in place) for a value with a seq: at
 * or below the position it was delivered already (a replay overlapping the REST fallback, a resent copy) and
 * is dropped (DROP); above it, it is delivered and the position moves to it (PASS). A snapshot is the
 * starting value of a fresh position (it comes right after the position was set), so it passes and only
 * moves the position forward. As on the hub, a value at or below the position that is younger (`ts`) than
 * the newest one given is no copy: the channel's numbering started over (Redis lost its data), so it passes
 * (RESTART) and the position starts again from it.
 */
function advance(pos, meta) {
  const seq = meta.seq;
  const ts = tsOf(meta);
  if (seq <= pos.seq && !meta.snapshot) {
    if (ts === null || pos.ts == null || ts <= pos.ts) return DROP;
    pos.seq = seq;
    pos.ts = ts;
    return RESTART;
  }
  pos.seq = Math.max(pos.seq, seq);
  if (ts !== null && (pos.ts == null || ts > pos.ts)) pos.ts = ts;
  return PASS;
}

/** What a channel name may look like (the server rejects anything else with `invalid_channel`). */
const CHANNEL_RE = /^[A-Za-z0-9_.:@#-]{1,200}$/;

/** A pattern: a channel-name prefix ending in `:`, then `*` (e.g. `prices:*`). */
const PATTERN_RE = /^[A-Za-z0-9_.:@#-]{1,200}(?<=:)\*$/;

/**
 * Close code the server sends when it is going away (restart, deploy). Every client of that hub gets it at the
 * same moment, so the first reconnect waits a random time in [0, drainJitter) rather than stampeding.
 */
const CLOSE_GOING_AWAY = 1001;

/**
 * A channel name as a URL path segment: names hold only URL-path-safe characters but `#` (a user channel),
 * which would start a fragment.
 */
function channelPath(channel) {
  return channel.replace(/#/g, "%23");
}

/** Most history pages one REST fallback round reads for a channel that is far behind. */
const MAX_CATCH_UP_PAGES = 10;
/** Close code the server sends when the connection's token expired: fetch a fresh one and reconnect at once. */
const CLOSE_TOKEN_EXPIRED = 4001;

/** Error codes after which a subscription is dropped instead of retried on every reconnect. */
const FINAL_SUBSCRIBE_ERRORS = new Set(["forbidden", "invalid_channel", "too_many_subscriptions", "bad_request"]);

/**
 * Whether `name` is a valid channel name: 1-200 characters of `[A-Za-z0-9_.:@#-]` (a name ending in `#<user>`
 * is that user's channel).
 * @param {string} name
 * @returns {boolean}
 */
export function isValidChannel(name) {
  return typeof name === "string" && CHANNEL_RE.test(name);
}

/**
 * Whether `name` is a pattern such as `prices:*`: a channel-name prefix ending in `:`, then `*`. Patterns are
 * accepted only in namespaces where the hub allows them.
 * @param {string} name
 * @returns {boolean}
 */
export function isPattern(name) {
  return typeof name === "string" && name.length >= 3 && PATTERN_RE.test(name);
}

/**
 * The namespace of a channel: the part before the first `:` (the whole name when there is none).
 * @param {string} channel
 * @returns {string}
 */
export function namespaceOf(channel) {
  const i = channel.indexOf(":");
  return i < 0 ? channel : channel.slice(0, i);
}

/**
 * Delay before reconnect attempt `attempt` (0-based): exponential backoff with full jitter, a random value in
 * [0, min(max, base * 2^attempt)).
 * @param {number} attempt
 * @param {number} base
 * @param {number} max
 * @returns {number} milliseconds
 */
export function backoffDelay(attempt, base, max) {
  const cap = Math.min(max, base * 2 ** Math.min(attempt, 30));
  return Math.floor(Math.random() * cap);
}

/** Resolves `url` (absolute, or a path like "/ws" relative to the page) into a ws:// or wss:// URL. */
function resolveSocketUrl(url) {
  const base = typeof location !== "undefined" ? location.href : undefined;
  const u = new URL(url ?? "/ws", base);
  if (u.protocol === "http:") u.protocol = "ws:";
  if (u.protocol === "https:") u.protocol = "wss:";
  if (u.protocol !== "ws:" && u.protocol !== "wss:") {
    throw new TypeError(`RelayHub: unsupported URL scheme in ${u.href}`);
  }
  return u.href;
}

/** The HTTP base of the REST API for a socket URL: same host, http(s), the path before the trailing "/ws". */
function restBaseFor(socketUrl) {
  const u = new URL(socketUrl);
  u.protocol = u.protocol === "wss:" ? "https:" : "http:";
  const path = u.pathname.replace(/\/ws\/?$/, "").replace(/\/$/, "");
  return `${u.origin}${path}`;
}

/** Calls `fn` and reports (never rethrows) what it throws, so one bad callback cannot stop the others. */
function safeCall(fn, ...args) {
  try {
    fn(...args);
  } catch (err) {
    if (typeof reportError === "function") reportError(err);
    else console.error(err);
  }
}

/**
 * Metadata handed to a subscription callback with every value.
 * @typedef {object} MessageMeta
 * @property {string} channel  the channel the value belongs to
 * @property {number|null} seq  the hub's sequence number of the value (null for values written by outside producers)
 * @property {string|null} ts  ISO-8601 time the hub stored the value, when known
 * @property {boolean} snapshot  true for the latest value sent on subscribe (or read through the REST fallback),
 *   false for a live message
 * @property {boolean} recovered  true for a message the client missed while disconnected, replayed from the
 *   hub's history (after a resubscribe the hub answered `recovered:true`, or read by the REST fallback)
 * @property {"socket"|"sse"|"rest"} source  how the value arrived: over the WebSocket, the Server-Sent Events
 *   fallback, or the REST fallback
 */

/**
 * Options of {@link RelayHub}; every one is optional.
 * @typedef {object} RelayHubOptions
 * @property {number} [backoffBase=500]  first reconnect delay cap in ms (doubles per attempt, full jitter)
 * @property {number} [backoffMax=10000]  largest reconnect delay cap in ms
 * @property {number} [maxAttempts=10]  failed reconnect attempts in a row before giving up (status `closed`);
 *   `Infinity` never gives up
 * @property {number} [heartbeatInterval=10000]  ms between application-level `ping` frames
 * @property {number} [heartbeatTimeout=25000]  ms without any frame from the server (while a ping waits for its
 *   answer) after which the link is considered dead and is replaced
 * @property {number} [connectTimeout=10000]  ms a connection attempt may take before it is abandoned
 * @property {boolean} [fallback=true]  keep subscribed channels fresh while the socket is down: over Server-Sent
 *   Events (see `sse`), else by polling the REST API
 * @property {boolean} [sse=true]  try the hub's Server-Sent Events stream (`/sse`) before REST polling, where an
 *   `EventSource` exists; when the stream is refused or cannot be reached, REST polling takes over
 * @property {number} [fallbackInterval=3000]  ms between two REST fallback rounds; the fallback starts only after a
 *   connection attempt failed, a random time in [0, fallbackInterval) later
 * @property {number} [drainJitter=5000]  after a close with code 1001 (hub restarting), the first reconnect waits a
 *   random time in [0, drainJitter) ms, so the clients of a restarting hub do not all come back at once
 * @property {number} [maxQueue=1000]  most calls queued while offline; past it the oldest is dropped (a dropped
 *   publish is rejected with code `queue_full`) and an `error` event with code `queue_full` says so
 * @property {string} [restBase]  base URL of the REST API (default: derived from the socket URL, e.g.
 *   `ws://host:8080/ws` gives `http://host:8080`)
 * @property {typeof WebSocket} [WebSocket]  WebSocket implementation (default: the global one)
 * @property {typeof fetch} [fetch]  fetch implementation for the REST fallback (default: the global one)
 * @property {string|(() => Promise<string>)|null} [token=null]  a connection token (JWT) sent in an `auth` frame
 *   first thing on every connection; or an async function returning one, called before each connect and again
 *   `tokenRefreshBefore` ms before the token expires (the fresh token is sent on the open connection). A close
 *   with 4001 (token expired) makes the client reconnect at once, with a fresh token from the function.
 * @property {number} [tokenRefreshBefore=30000]  ms before `expires_at` to fetch a fresh token (at most half
 *   the token's remaining lifetime)
 * @property {typeof EventSource} [EventSource]  EventSource implementation for the SSE fallback (default: the
 *   global one)
 */

/**
 * A connection to a relayhub server.
 *
 * ```js
 * import { RelayHub } from "./relayhub.js";
 * const hub = new RelayHub("/ws");
 * const off = hub.subscribe("prices:BTC", (data, meta) => console.log(meta.channel, meta.seq, data));
 * hub.on("status", (state) => console.log("hub is", state));
 * await hub.publish("chat:lobby", { text: "hi" });
 * off();          // unsubscribe
 * hub.close();
 * ```
 *
 * Status values: `connecting` (first attempt), `open`, `reconnecting` (lost, retrying with backoff; the REST
 * fallback runs once an attempt has failed), `closed` (after {@link RelayHub#close}, or after `maxAttempts`
 * failed attempts;
 * in the latter case the REST fallback keeps polling until `close()`, and {@link RelayHub#connect} tries again).
 *
 * Events (see {@link RelayHub#on}): `status` (state, detail), `latency` (ms), `error` ({code, message, channel,
 * op, dropped}), `fallback` (active: boolean), `gap` ({channel, source}), `authed` ({user, expiresAt}: the hub
 * accepted the token; errors with the token are `error` events with op `auth`, code `invalid_token`, or code
 * `token_failed` when the token function failed). `dropped` is true when the hub refused a subscription for
 * good (forbidden, invalid_channel, too_many_subscriptions, bad_request): the channel is then forgotten.
 * `gap`: the hub no longer holds everything the client missed on a channel (history trimmed or expired, hub
 * or Redis restarted); the channel's latest value follows as a snapshot.
 */
export class RelayHub {
  /**
   * Creates the client and starts connecting at once.
   * @param {string} [url="/ws"]  socket URL: `ws://`, `wss://`, `http(s)://` or a path relative to the page
   * @param {RelayHubOptions} [options]
   */
  constructor(url = "/ws", options = {}) {
    /** @type {Required<RelayHubOptions>} */
    this.options = { ...DEFAULTS, ...options };
    /** The WebSocket URL this client connects to. */
    this.url = resolveSocketUrl(url);
    /** Base URL of the REST API (publish over HTTP is not used; the fallback reads channels from here). */
    this.restBase = (this.options.restBase ?? restBaseFor(this.url)).replace(/\/$/, "");

    this._WebSocket = this.options.WebSocket ?? globalThis.WebSocket;
    this._fetch = this.options.fetch ?? globalThis.fetch?.bind(globalThis);
    this._EventSource = this.options.EventSource ?? globalThis.EventSource;
    if (typeof this._WebSocket !== "function") throw new TypeError("RelayHub: no WebSocket implementation");

    /**
     * channel -> { handlers: Set<Function>, last: {data, meta} | null, prefix, pos: {epoch, seq} | null,
     * replayUntil }: what the user wants, on or offline. `pos` is the position (epoch null until the hub named
     * it); `replayUntil` the hub's newest seq when it answered `recovered:true` (messages up to it are replays).
     */
    this._subs = new Map();
    /** Frames waiting for an open socket, in call order. */
    this._queue = [];
    /** id -> { op, channel, resolve, reject } for frames sent and not yet answered. */
    this._pending = new Map();
    /** event name -> Set of listeners. */
    this._listeners = new Map();
    this._nextId = 1;
    /** How many entries of `_subs` are patterns (delivery skips the pattern scan when none). */
    this._patternCount = 0;

    this._ws = null;
    this._status = "closed";
    this._attempt = 0;
    this._reconnectTimer = null;
    this._connectTimer = null;
    this._heartbeatTimer = null;
    this._lastFrameAt = 0;
    this._lastPingAt = 0;
    /** When the oldest ping sent since the last frame from the server went out; null when none is waiting. */
    this._unansweredSince = null;
    /** ping id -> time sent (performance.now()). */
    this._pings = new Map();
    this._latency = null;
    this._fallbackTimer = null;
    /** The jittered wait before the REST fallback starts; null when none is planned. */
    this._fallbackDelayTimer = null;
    this._fallbackRunning = false;
    /** The SSE fallback's stream (null when none), the channels it was opened for, in its id's order. */
    this._es = null;
    this._esChannels = [];
    /** The stream delivered (or opened): an error after that is a reconnect EventSource makes by itself. */
    this._esAnswered = false;
    /** The SSE fallback is wanted (the socket cannot be had); the stream follows the subscriptions. */
    this._sseWanted = false;
    /** The stream was refused or unreachable: REST polling until the socket is back. */
    this._sseFailed = false;
    /** A reopen of the stream is planned for this tick (after subscription changes). */
    this._sseRefresh = false;
    /**
     * Whether the hub answered on the current socket: its loss is then an outage; a socket lost before any
     * answer (never opened, or closed at once by a proxy) is a failed attempt.
     */
    this._answered = false;
    this._gaveUp = false;
    /** The token sent on the current connection, and the timer that fetches a fresh one before it expires. */
    this._token = null;
    this._refreshTimer = null;
    /** Counts token fetches before a connect; a fetch whose number is no longer current is ignored. */
    this._tokenFetch = 0;
    this._fetchingToken = false;

    this.connect();
  }

  // --- public API --------------------------------------------------------------------------------------------

  /**
   * The connection state: `connecting`, `open`, `reconnecting` or `closed`.
   * @type {string}
   */
  get status() {
    return this._status;
  }

  /**
   * Round-trip time of the last `ping`/`pong` exchange, in ms; null until the first `pong`.
   * @type {number|null}
   */
  get latency() {
    return this._latency;
  }

  /**
   * How values arrive right now: `websocket`, `sse` (the Server-Sent Events fallback), `rest` (REST polling), or
   * null while none of them works (connecting, or everything down).
   * @type {"websocket"|"sse"|"rest"|null}
   */
  get transport() {
    if (this._isOpen()) return "websocket";
    if (this._es !== null && this._esAnswered && this._es.readyState === 1) return "sse";
    if (this._fallbackTimer !== null) return "rest";
    return null;
  }

  /**
   * Whether the REST fallback is polling right now.
   * @type {boolean}
   */
  get fallbackActive() {
    return this._fallbackTimer !== null;
  }

  /**
   * The channels (and patterns) subscribed to, whatever the connection state.
   * @returns {string[]}
   */
  channels() {
    return [...this._subs.keys()];
  }

  /**
   * Subscribes `onMessage` to `channel`. The callback gets the channel's latest value first (a snapshot, when
   * the hub has one) and then every message. Several callbacks may share a channel: the hub is asked once.
   * Works offline too: the subscription is sent when the socket opens, and renewed after every reconnect from
   * the channel's position, so what was missed meanwhile arrives in order with `meta.recovered` (or, when the
   * hub no longer holds it, a `gap` event and then the latest value as a snapshot).
   * `channel` may also be a pattern such as `prices:*` (where the hub allows patterns): the callback then gets
   * the values of every matching channel, `meta.channel` telling which; the REST fallback skips patterns.
   * @param {string} channel  1-200 characters of `[A-Za-z0-9_.:@#-]`, or a pattern `prefix:*`
   * @param {(data: any, meta: MessageMeta) => void} onMessage
   * @returns {() => void} a function that removes this callback (and unsubscribes when it was the last one)
   * @throws {TypeError} when the channel name is invalid or `onMessage` is not a function
   */
  subscribe(channel, onMessage) {
    if (!isValidChannel(channel) && !isPattern(channel)) {
      throw new TypeError(`RelayHub: invalid channel name ${JSON.stringify(channel)}`);
    }
    if (typeof onMessage !== "function") throw new TypeError("RelayHub: onMessage must be a function");

    let sub = this._subs.get(channel);
    if (sub) {
      sub.handlers.add(onMessage);
      // A late callback on a live channel gets the value the others already have.
      const last = sub.prefix === null ? sub.last : null;
      if (last) {
        queueMicrotask(() => {
          if (this._subs.get(channel) === sub && sub.handlers.has(onMessage)) {
            safeCall(onMessage, last.data, { ...last.meta, snapshot: true });
          }
        });
      }
    } else {
      const prefix = isPattern(channel) ? channel.slice(0, -1) : null;
      // A pattern's `positions`: channel -> { epoch, seq, replayUntil }, filled as its channels deliver.
      sub = { handlers: new Set([onMessage]), last: null, prefix, pos: null, replayUntil: 0 };
      if (prefix !== null) sub.positions = new Map();
      if (sub.prefix !== null) this._patternCount += 1;
      this._subs.set(channel, sub);
      // A pattern always sends `since` (empty at first), so the hub names each channel's epoch to resume from.
      this._enqueue(prefix === null ? { op: "subscribe", channel } : { op: "subscribe", channel, since: {} });
      if (this._fallbackTimer !== null) this._poll();
      this._refreshSse();
    }

    let active = true;
    return () => {
      if (!active) return;
      active = false;
      this._removeHandler(channel, sub, onMessage);
    };
  }

  /**
   * Publishes `data` on `channel` (only namespaces the hub opens to clients, e.g. `chat`). Sent at once when
   * the socket is open, otherwise queued and sent in order after (re)connecting.
   * @param {string} channel
   * @param {any} data  any JSON value
   * @returns {Promise<{channel: string, seq: number}>} resolves on the hub's `published` reply; rejects with an
   *   Error carrying `code` when the hub refuses, or when the connection drops before the reply
   */
  publish(channel, data) {
    if (!isValidChannel(channel)) {
      return Promise.reject(new TypeError(`RelayHub: invalid channel name ${JSON.stringify(channel)}`));
    }
    if (this._status === "closed" && !this._gaveUp) {
      return Promise.reject(new Error("RelayHub: closed; call connect() first"));
    }
    const promise = new Promise((resolve, reject) => {
      this._enqueue({ op: "publish", channel, data }, { resolve, reject });
    });
    // Callers that ignore the result must not get "unhandled rejection" noise; those that await still see it.
    promise.catch(() => {});
    return promise;
  }

  /**
   * Who is subscribed to `channel` on every replica (namespaces with `presence = true`): sent at once when open,
   * otherwise queued like a publish.
   * @param {string} channel
   * @returns {Promise<{channel: string, members: Array<{client: string, user: string|null, info: any}>, truncated: boolean}>}
   *   resolves on the hub's `presence` answer (`truncated`: the channel has more members than the hub lists);
   *   rejects with an Error carrying `code` when the hub refuses (`forbidden`: no presence in the namespace, or
   *   the channel may not be read), or when the connection drops before the answer
   */
  presence(channel) {
    if (!isValidChannel(channel)) {
      return Promise.reject(new TypeError(`RelayHub: invalid channel name ${JSON.stringify(channel)}`));
    }
    if (this._status === "closed" && !this._gaveUp) {
      return Promise.reject(new Error("RelayHub: closed; call connect() first"));
    }
    const promise = new Promise((resolve, reject) => {
      this._enqueue({ op: "presence", channel }, { resolve, reject });
    });
    promise.catch(() => {});
    return promise;
  }

  /**
   * Adds a listener. Events: `status` (state, {code, reason, attempt, delay}), `latency` (ms),
   * `error` ({code, message, channel, op, dropped}), `fallback` (active), `gap` ({channel, source}),
   * `join` and `leave` ({channel, member}: another client subscribed to, or left, a channel whose namespace
   * has `join_leave = true`).
   * @param {"status"|"latency"|"error"|"fallback"|"gap"|"authed"|"join"|"leave"} event
   * @param {Function} fn
   * @returns {() => void} a function that removes the listener
   */
  on(event, fn) {
    if (typeof fn !== "function") throw new TypeError("RelayHub: listener must be a function");
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }

  /**
   * Removes a listener added with {@link RelayHub#on}.
   * @param {string} event
   * @param {Function} fn
   */
  off(event, fn) {
    this._listeners.get(event)?.delete(fn);
  }

  /**
   * Connects again after {@link RelayHub#close} or after giving up; does nothing while connected or connecting.
   * Subscriptions are kept across `close()`/`connect()`.
   */
  connect() {
    if (this._ws !== null || this._reconnectTimer !== null || this._fetchingToken) return;
    this._gaveUp = false;
    this._attempt = 0;
    this._open("connecting");
  }

  /**
   * Closes the connection (code 1000) and stops reconnecting, the heartbeat and the REST fallback. Pending
   * publishes are rejected. Subscriptions are kept, so {@link RelayHub#connect} resumes them.
   */
  close() {
    this._gaveUp = false;
    this._tokenFetch += 1;
    this._fetchingToken = false;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    this._stopFallback();
    this._dropSocket(1000, "client closed");
    this._failPending(new Error("RelayHub: closed"));
    this._rejectQueued(new Error("RelayHub: closed"));
    this._setStatus("closed", { code: 1000, reason: "client closed" });
  }

  // --- events ------------------------------------------------------------------------------------------------

  _emit(event, ...args) {
    const set = this._listeners.get(event);
    if (!set) return;
    for (const fn of [...set]) safeCall(fn, ...args);
  }

  _setStatus(state, detail = {}) {
    if (this._status === state) return;
    this._status = state;
    this._emit("status", state, detail);
  }

  // --- connection --------------------------------------------------------------------------------------------

  /** Opens a new socket; `state` is the status shown while it connects. */
  _open(state) {
    this._reconnectTimer = null;
    this._setStatus(state, { attempt: this._attempt });
    if (typeof this.options.token === "function") {
      this._openWithToken();
      return;
    }
    this._token = this.options.token;
    this._openSocket();
  }

  _openSocket() {
    let ws;
    try {
      ws = new this._WebSocket(this.url);
    } catch (err) {
      // A malformed URL or a blocked port throws synchronously; treat it like a failed attempt.
      this._emit("error", { code: "connect_failed", message: String(err?.message ?? err), channel: null, op: null });
      this._scheduleReconnect({ code: 1006, reason: "connect failed", failed: true });
      return;
    }
    this._ws = ws;
    this._answered = false;
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (ev) => this._onFrame(ws, ev.data);
    ws.onclose = (ev) => this._onClose(ws, ev.code, ev.reason);
    // Browsers follow `error` with `close`; some WebSocket implementations never close a socket that failed to
    // connect, so a failed attempt is handled here already (the later `close`, if any, finds it detached).
    ws.onerror = () => {
      if (this._ws === ws && ws.readyState !== 1) this._lose(ws, 1006, "connect failed");
    };
    clearTimeout(this._connectTimer);
    this._connectTimer = setTimeout(() => {
      if (this._ws === ws && ws.readyState !== 1) this._lose(ws, 4000, "connect timeout");
    }, this.options.connectTimeout);
  }

  _onOpen(ws) {
    if (this._ws !== ws) return;
    clearTimeout(this._connectTimer);
    this._connectTimer = null;
    this._lastFrameAt = Date.now();
    this._unansweredSince = null;
    this._pings.clear();
    this._stopFallback();
    this._sseFailed = false;
    this._setStatus("open", {});
    // First, so that the subscriptions after it are judged with this connection's identity.
    if (this._token) this._sendAuth(this._token);
    this._resubscribeAndFlush();
    this._sendPing();
    clearInterval(this._heartbeatTimer);
    this._heartbeatTimer = setInterval(() => this._tick(), Math.min(1000, this.options.heartbeatInterval));
  }

  _onFrame(ws, raw) {
    if (this._ws !== ws) return;
    this._lastFrameAt = Date.now();
    this._unansweredSince = null;
    // A server that answers proves the link works: the next outage starts a fresh backoff series.
    this._attempt = 0;
    this._answered = true;
    if (typeof raw !== "string") return; // the protocol is text frames only
    let frame;
    try {
      frame = JSON.parse(raw);
    } catch {
      this._emit("error", { code: "bad_frame", message: "unparsable frame from server", channel: null, op: null });
      return;
    }
    if (frame === null || typeof frame !== "object") return;

    switch (frame.type) {
      case "message":
      case "snapshot": {
        const seq = typeof frame.seq === "number" ? frame.seq : null;
        const sub = this._subs.get(frame.channel);
        this._deliver(frame.channel, frame.data, {
          channel: frame.channel,
          seq,
          ts: frame.ts ?? null,
          snapshot: frame.type === "snapshot",
          recovered: frame.type === "message" && seq !== null && sub?.prefix === null && seq <= sub.replayUntil,
          source: "socket",
        });
        break;
      }
      case "epoch":
        this._onEpoch(frame);
        break;
      case "pong":
        this._onPong(frame.id);
        break;
      case "published": {
        const p = this._takePending(frame.id);
        p?.resolve({ channel: frame.channel, seq: frame.seq ?? null });
        break;
      }
      case "subscribed":
        this._takePending(frame.id);
        this._onSubscribed(frame);
        break;
      case "presence": {
        const p = this._takePending(frame.id);
        p?.resolve?.({
          channel: frame.channel,
          members: Array.isArray(frame.members) ? frame.members : [],
          truncated: frame.truncated === true,
        });
        break;
      }
      case "join":
        this._emit("join", { channel: frame.channel, member: frame.member ?? null });
        break;
      case "leave":
        this._emit("leave", { channel: frame.channel, member: frame.member ?? null });
        break;
      case "unsubscribed":
        this._takePending(frame.id);
        break;
      case "authed":
        this._takePending(frame.id);
        this._scheduleRefresh(frame.expires_at);
        this._emit("authed", { user: frame.user, expiresAt: frame.expires_at });
        break;
      case "error":
        this._onErrorFrame(frame);
        break;
      default:
        break; // frame types added later by the server are ignored
    }
  }

  /**
   * A channel's subscription is live. `recovered:true`: the missed messages follow, the position stands.
   * Otherwise the position starts afresh at the hub's newest seq (the snapshot that follows is the value at
   * that point), and `recovered:false` (a `since` the hub could not serve) is reported as a gap.
   */
  _onSubscribed(frame) {
    const sub = this._subs.get(frame.channel);
    if (sub?.prefix != null) {
      this._onPatternSubscribed(sub, frame);
      return;
    }
    // Patterns carry no position; an answer to a repeated subscribe carries none either.
    if (!sub || sub.prefix !== null || typeof frame.epoch !== "string") return;
    if (frame.recovered === true && sub.pos?.epoch === frame.epoch) {
      sub.replayUntil = typeof frame.seq === "number" ? frame.seq : 0;
      return;
    }
    // An empty epoch: the hub could not read the channel's state; no position to resume from then.
    sub.pos = { epoch: frame.epoch || null, seq: typeof frame.seq === "number" ? frame.seq : 0 };
    sub.replayUntil = 0;
    if (frame.recovered === false) this._emit("gap", { channel: frame.channel, source: "socket" });
  }

  /**
   * A pattern's subscription is live. A subscribe with `since` is answered per named channel: `recovered`
   * (true: its missed messages follow; false: a gap, then its snapshot) and `positions` (the channel's epoch
   * and newest seq then).
   */
  _onPatternSubscribed(sub, frame) {
    const recovered = frame.recovered !== null && typeof frame.recovered === "object" ? frame.recovered : {};
    const positions = frame.positions !== null && typeof frame.positions === "object" ? frame.positions : {};
    for (const [channel, ok] of Object.entries(recovered)) {
      const at = positions[channel];
      const old = sub.positions.get(channel);
      if (ok === true && at && old && old.epoch === at.epoch) {
        old.replayUntil = typeof at.seq === "number" ? at.seq : 0;
        continue;
      }
      if (at && typeof at.epoch === "string") {
        sub.positions.set(channel, { epoch: at.epoch || null, seq: typeof at.seq === "number" ? at.seq : 0, replayUntil: 0 });
      } else {
        sub.positions.delete(channel);
      }
      if (ok === false) this._emit("gap", { channel, source: "socket" });
    }
  }

  /** The epoch of a channel a pattern delivers: its position can be resumed from now on. */
  _onEpoch(frame) {
    if (typeof frame.channel !== "string" || typeof frame.epoch !== "string") return;
    for (const p of this._subs.values()) {
      if (p.prefix === null || !frame.channel.startsWith(p.prefix)) continue;
      const at = p.positions.get(frame.channel);
      if (at) {
        // A new epoch (a numbering that started over) was already followed by the position rule.
        at.epoch = frame.epoch;
      } else if (p.positions.size < MAX_PATTERN_POSITIONS) {
        p.positions.set(frame.channel, { epoch: frame.epoch, seq: 0, replayUntil: 0 });
      }
    }
  }

  _onErrorFrame(frame) {
    const p = this._takePending(frame.id);
    const info = {
      code: frame.code ?? "unknown",
      message: frame.message ?? "",
      channel: p?.channel ?? frame.channel ?? null,
      op: p?.op ?? null,
    };
    if (p?.op === "publish" || p?.op === "presence") {
      const err = new Error(`RelayHub: ${p.op} refused: ${info.code}: ${info.message}`);
      err.code = info.code;
      p.reject(err);
    }
    const pattern = p?.op === "subscribe" && p.since ? this._subs.get(p.channel) : undefined;
    if (pattern?.prefix != null && info.code === "bad_request" && !pattern.plain) {
      // A hub that takes no `since` for patterns (an older one), or fewer channels than this client keeps:
      // subscribe the pattern plainly from now on (its snapshots again) rather than drop it.
      pattern.plain = true;
      pattern.positions.clear();
      this._enqueue({ op: "subscribe", channel: p.channel });
      return;
    }
    if (p?.op === "subscribe" && FINAL_SUBSCRIBE_ERRORS.has(info.code)) {
      // Retrying on every reconnect would fail the same way: forget the channel.
      this._forget(p.channel);
      info.dropped = true;
    }
    if (p?.op === "unsubscribe" && info.code === "not_subscribed") return; // already gone: nothing to report
    this._emit("error", info);
  }

  _onClose(ws, code, reason) {
    if (this._ws !== ws) return;
    // The hub's 4001 (token expired), not the client's own 4001 for a heartbeat timeout.
    this._lose(ws, code, reason, code === CLOSE_TOKEN_EXPIRED);
  }

  /** Forgets the current socket (closing it if needed) and plans the next attempt. */
  _lose(ws, code, reason, tokenExpired = false) {
    if (this._ws !== ws) return;
    const failed = !this._answered;
    this._dropSocket(4000, "replaced");
    this._failPending(new Error(`RelayHub: connection lost (${code})`));
    this._scheduleReconnect({ code, reason, failed, tokenExpired });
  }

  /** Detaches and closes the current socket; stops the heartbeat. */
  _dropSocket(code, reason) {
    const ws = this._ws;
    this._ws = null;
    clearTimeout(this._connectTimer);
    clearInterval(this._heartbeatTimer);
    clearTimeout(this._refreshTimer);
    this._connectTimer = null;
    this._heartbeatTimer = null;
    this._refreshTimer = null;
    this._pings.clear();
    if (!ws) return;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    if (ws.readyState === 0 || ws.readyState === 1) {
      try {
        ws.close(code, reason);
      } catch {
        ws.close();
      }
    }
  }

  /**
   * Plans the next attempt. `failed`: the socket was lost before the hub answered (a failed attempt), rather than
   * a working link lost.
   * The REST fallback starts only after a failed attempt: a hub that comes straight back (a deploy) costs no
   * round of REST requests from every client.
   */
  _scheduleReconnect({ code, reason, failed, tokenExpired = false }) {
    if (this._attempt >= this.options.maxAttempts) {
      this._gaveUp = true;
      this._setStatus("closed", { code, reason, attempt: this._attempt, gaveUp: true });
      // The socket is given up on; the REST fallback keeps subscribed channels fresh until close().
      this._startFallback();
      return;
    }
    const delay =
      code === CLOSE_GOING_AWAY && this._attempt === 0
        ? Math.floor(Math.random() * this.options.drainJitter)
        : tokenExpired && this._attempt === 0
          ? 0
          : backoffDelay(this._attempt, this.options.backoffBase, this.options.backoffMax);
    this._attempt += 1;
    this._setStatus("reconnecting", { code, reason, attempt: this._attempt, delay });
    if (failed) this._startFallbackSoon();
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => this._open("reconnecting"), delay);
  }

  // --- token -------------------------------------------------------------------------------------------------

  /** Asks the token function for a token, then opens the socket; a failed fetch counts as a failed attempt. */
  _openWithToken() {
    const fetchNumber = ++this._tokenFetch;
    this._fetchingToken = true;
    Promise.resolve()
      .then(() => this.options.token())
      .then(
        (token) => {
          if (fetchNumber !== this._tokenFetch) return; // closed meanwhile
          this._fetchingToken = false;
          this._token = token;
          this._openSocket();
        },
        (err) => {
          if (fetchNumber !== this._tokenFetch) return;
          this._fetchingToken = false;
          this._emit("error", { code: "token_failed", message: String(err?.message ?? err), channel: null, op: "auth" });
          this._scheduleReconnect({ code: 1006, reason: "token fetch failed", failed: true });
        },
      );
  }

  _sendAuth(token) {
    this._send({ op: "auth", token }, null);
  }

  /** Plans the fetch of a fresh token `tokenRefreshBefore` ms before `expiresAt` (an RFC 3339 time). */
  _scheduleRefresh(expiresAt) {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    const left = Date.parse(expiresAt) - Date.now();
    if (typeof this.options.token !== "function" || !Number.isFinite(left)) return;
    const wait = Math.max(0, left - Math.min(this.options.tokenRefreshBefore, left / 2));
    this._refreshTimer = setTimeout(() => this._refreshToken(), wait);
  }

  /** Sends a fresh token on the open connection; if none comes in time, the hub closes with 4001. */
  _refreshToken() {
    this._refreshTimer = null;
    const ws = this._ws;
    Promise.resolve()
      .then(() => this.options.token())
      .then(
        (token) => {
          if (this._ws !== ws || !this._isOpen()) return;
          this._token = token;
          this._sendAuth(token);
        },
        (err) => {
          if (this._ws !== ws) return;
          this._emit("error", { code: "token_failed", message: String(err?.message ?? err), channel: null, op: "auth" });
        },
      );
  }

  // --- outgoing frames ---------------------------------------------------------------------------------------

  /**
   * Sends `frame` now when the socket is open, else queues it. While offline a subscribe and a later
   * unsubscribe of the same channel cancel out; an unsubscribe of a channel subscribed before the outage needs
   * no frame at all (the next connection starts empty).
   */
  _enqueue(frame, promise = null) {
    if (this._isOpen()) {
      this._send(frame, promise);
      return;
    }
    if (frame.op === "unsubscribe") {
      const i = this._queue.findIndex((q) => q.frame.op === "subscribe" && q.frame.channel === frame.channel);
      if (i >= 0) this._queue.splice(i, 1);
      return;
    }
    this._queue.push({ frame, promise });
    while (this._queue.length > Math.max(1, this.options.maxQueue)) this._dropOldestQueued();
  }

  /**
   * Drops the oldest queued call (the queue is full). A dropped publish is rejected; a dropped subscribe loses
   * nothing, since every wanted channel is subscribed again when the socket opens.
   */
  _dropOldestQueued() {
    const { frame, promise } = this._queue.shift();
    const message = `RelayHub: offline queue full (maxQueue ${this.options.maxQueue}): the oldest queued ${frame.op} was dropped`;
    if (promise) {
      const err = new Error(message);
      err.code = "queue_full";
      promise.reject(err);
    }
    this._emit("error", { code: "queue_full", message, channel: frame.channel ?? null, op: frame.op });
  }

  _isOpen() {
    return this._ws !== null && this._ws.readyState === 1;
  }

  /**
   * On open: renew subscriptions from before the outage, each from its position (`since`) when the hub named
   * one, then send what was queued, in call order.
   */
  _resubscribeAndFlush() {
    const queuedSubs = new Set(this._queue.filter((q) => q.frame.op === "subscribe").map((q) => q.frame.channel));
    const subscribe = (channel, sub) => {
      if (sub.prefix !== null && sub.plain) return { op: "subscribe", channel };
      if (sub.prefix !== null) {
        // A pattern: the channels whose epoch the hub named, each from its position.
        const since = {};
        for (const [name, at] of sub.positions) {
          if (at.epoch !== null) since[name] = { epoch: at.epoch, seq: at.seq };
        }
        return { op: "subscribe", channel, since };
      }
      const since = sub.pos?.epoch != null ? { epoch: sub.pos.epoch, seq: sub.pos.seq } : undefined;
      return since ? { op: "subscribe", channel, since } : { op: "subscribe", channel };
    };
    for (const [channel, sub] of this._subs) {
      if (queuedSubs.has(channel)) continue;
      this._send(subscribe(channel, sub), null);
    }
    const queue = this._queue;
    this._queue = [];
    for (const { frame, promise } of queue) {
      if (frame.op === "subscribe") {
        const sub = this._subs.get(frame.channel);
        // A subscribe queued while offline may have a position by now (the SSE or REST fallback delivered).
        if (sub) this._send(subscribe(frame.channel, sub), promise);
        continue;
      }
      this._send(frame, promise);
    }
  }

  _send(frame, promise) {
    const id = this._nextId++;
    const out = { ...frame, id };
    this._pending.set(id, { op: frame.op, channel: frame.channel, since: frame.since !== undefined, ...(promise ?? {}) });
    try {
      this._ws.send(JSON.stringify(out));
    } catch (err) {
      this._pending.delete(id);
      promise?.reject(err);
    }
  }

  _takePending(id) {
    if (id === undefined || id === null) return undefined;
    const p = this._pending.get(id);
    this._pending.delete(id);
    return p;
  }

  /** Rejects publishes sent on a lost connection: whether the hub got them is unknown, so they are not resent. */
  _failPending(err) {
    for (const p of this._pending.values()) p.reject?.(err);
    this._pending.clear();
  }

  /** Rejects publishes still waiting in the queue (used by close()). */
  _rejectQueued(err) {
    const keep = [];
    for (const q of this._queue) {
      if (q.frame.op === "publish" || q.frame.op === "presence") q.promise?.reject(err);
      else keep.push(q);
    }
    this._queue = keep;
  }

  _removeHandler(channel, sub, fn) {
    if (this._subs.get(channel) !== sub) return;
    sub.handlers.delete(fn);
    if (sub.handlers.size > 0) return;
    this._forget(channel);
    this._enqueue({ op: "unsubscribe", channel });
  }

  // --- delivery ----------------------------------------------------------------------------------------------

  /** Removes a channel or pattern from the wanted set. */
  _forget(target) {
    const sub = this._subs.get(target);
    if (!sub) return;
    this._subs.delete(target);
    if (sub.prefix !== null) this._patternCount -= 1;
    this._refreshSse();
  }

  _deliver(channel, data, meta) {
    if (typeof channel !== "string") return;
    const sub = this._subs.get(channel);
    const admitted = sub && sub.prefix === null ? this._admit(sub, meta) : DROP;
    if (admitted !== DROP) {
      // A numbering that started over is new data, never a replay of what the client had.
      const given = admitted === RESTART ? { ...meta, recovered: false } : meta;
      sub.last = { data, meta: given };
      for (const fn of [...sub.handlers]) safeCall(fn, data, given);
    }
    if (this._patternCount === 0) return;
    for (const p of this._subs.values()) {
      if (p.prefix === null || !channel.startsWith(p.prefix)) continue;
      if (!this._admitPattern(p, channel, meta)) continue;
      let given = meta;
      if (meta.source === "socket" && !meta.snapshot && typeof meta.seq === "number") {
        const at = p.positions.get(channel);
        given = { ...meta, recovered: at !== undefined && meta.seq <= at.replayUntil };
      }
      for (const fn of [...p.handlers]) safeCall(fn, data, given);
    }
  }

  /**
   * The position rule for a pattern, per concrete channel (see {@link advance}), on the channel's entry in the
   * pattern's `positions` (created on its first value, while fewer than MAX_PATTERN_POSITIONS are kept; past
   * that the channel's values pass unchecked).
   */
  _admitPattern(p, channel, meta) {
    if (typeof meta.seq !== "number") return true;
    const at = p.positions.get(channel);
    if (at === undefined) {
      if (p.positions.size < MAX_PATTERN_POSITIONS) {
        p.positions.set(channel, { epoch: null, seq: meta.seq, ts: tsOf(meta), replayUntil: 0 });
      }
      return true;
    }
    return advance(at, meta) !== DROP;
  }

  /**
   * The position rule for an exact channel (see {@link advance}). Values without seq always pass and leave the
   * position where it is. The first value with one starts the position. A numbering that started over
   * (RESTART) leaves no epoch to resume from until the hub names one.
   */
  _admit(sub, meta) {
    if (typeof meta.seq !== "number") return PASS;
    if (sub.pos === null) {
      sub.pos = { epoch: null, seq: meta.seq, ts: tsOf(meta) };
      return PASS;
    }
    const admitted = advance(sub.pos, meta);
    if (admitted === RESTART) {
      sub.pos.epoch = null;
      sub.replayUntil = 0;
    }
    return admitted;
  }

  // --- heartbeat ---------------------------------------------------------------------------------------------

  _tick() {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return;
    const { heartbeatInterval, heartbeatTimeout } = this.options;
    const now = Date.now();
    // Dead: nothing at all for heartbeatTimeout, although a ping has been waiting long enough for its answer.
    // The second condition keeps a background tab, whose timers the browser slows to one a minute, from
    // judging the link by a ping it could not send on time.
    const since = this._unansweredSince;
    const waiting = since !== null && now - since > heartbeatTimeout - heartbeatInterval;
    if (waiting && now - this._lastFrameAt > heartbeatTimeout) {
      this._lose(ws, 4001, "heartbeat timeout");
      return;
    }
    if (now - this._lastPingAt >= heartbeatInterval) this._sendPing();
  }

  _sendPing() {
    if (!this._isOpen()) return;
    const id = this._nextId++;
    this._lastPingAt = Date.now();
    this._unansweredSince ??= this._lastPingAt;
    this._pings.set(id, performance.now());
    // Only the latest few pings matter; an unanswered ping must not grow the map for ever.
    if (this._pings.size > 8) this._pings.delete(this._pings.keys().next().value);
    this._ws.send(JSON.stringify({ op: "ping", id }));
  }

  _onPong(id) {
    const sent = this._pings.get(id);
    if (sent === undefined) return;
    this._pings.delete(id);
    this._latency = Math.round((performance.now() - sent) * 10) / 10;
    this._emit("latency", this._latency);
  }

  // --- SSE fallback ------------------------------------------------------------------------------------------

  _sseUsable() {
    return this.options.sse && typeof this._EventSource === "function" && !this._sseFailed;
  }

  /** Starts following the subscriptions over SSE; false when SSE cannot be used (then REST polls). */
  _startSse() {
    if (!this._sseUsable()) return false;
    if (this._sseWanted) return true;
    this._sseWanted = true;
    this._openSse();
    return true;
  }

  /** After subscription changes: one reopen per tick with the new set, from the positions reached. */
  _refreshSse() {
    if (!this._sseWanted || this._sseRefresh) return;
    this._sseRefresh = true;
    queueMicrotask(() => {
      this._sseRefresh = false;
      if (this._sseWanted) this._openSse();
    });
  }

  /**
   * Opens the stream of every subscription, resuming each exact channel from its position: the hub's id
   * format, `<epoch>:<seq>` per channel in the order of the `channel` parameters (empty where there is none).
   * EventSource's own reconnects send the id of the last event instead, which carries the same positions.
   */
  _openSse() {
    this._closeSse();
    const channels = this.channels();
    if (channels.length === 0) return;
    const query = new URLSearchParams();
    for (const c of channels) query.append("channel", c);
    const entries = channels.map((c) => {
      const pos = this._subs.get(c)?.pos;
      return pos && pos.epoch ? `${pos.epoch}:${pos.seq}` : "";
    });
    if (entries.some((e) => e !== "")) query.set("last_event_id", entries.join(","));
    // EventSource cannot send headers: the connection token goes in the URL, as on `/ws?token=`.
    if (this._token) query.set("token", this._token);
    let es;
    try {
      es = new this._EventSource(`${this.restBase}/sse?${query}`);
    } catch {
      this._sseFailed = true;
      this._sseWanted = false;
      this._startRest();
      return;
    }
    this._es = es;
    this._esChannels = channels;
    this._esAnswered = false;
    es.onopen = () => {
      if (this._es !== es) return;
      this._esAnswered = true;
      this._stopRest();
    };
    es.addEventListener("message", (ev) => this._onSseEvent(es, ev, false));
    es.addEventListener("snapshot", (ev) => this._onSseEvent(es, ev, true));
    es.onerror = () => {
      if (this._es !== es) return;
      // Closed (a refusal: not 200, not an event stream) or never reached: REST polling instead. An error on a
      // stream that worked is EventSource reconnecting by itself, with the last event's id.
      if (es.readyState === 2 || !this._esAnswered) {
        this._closeSse();
        this._sseWanted = false;
        this._sseFailed = true;
        this._startRest();
      }
    };
  }

  _closeSse() {
    const es = this._es;
    this._es = null;
    this._esAnswered = false;
    if (!es) return;
    es.onopen = es.onerror = null;
    es.close();
  }

  /** One event of the stream: `data` is the socket's frame; the event's id gives the channel's epoch. */
  _onSseEvent(es, ev, snapshot) {
    if (this._es !== es) return;
    this._esAnswered = true;
    let frame;
    try {
      frame = JSON.parse(ev.data);
    } catch {
      this._emit("error", { code: "bad_frame", message: "unparsable event from server", channel: null, op: null });
      return;
    }
    if (frame === null || typeof frame !== "object" || typeof frame.channel !== "string") return;
    const seq = typeof frame.seq === "number" ? frame.seq : null;
    const sub = this._subs.get(frame.channel);
    if (sub && sub.prefix === null) {
      const entry = (ev.lastEventId ?? "").split(",")[this._esChannels.indexOf(frame.channel)] ?? "";
      const cut = entry.lastIndexOf(":");
      const epoch = cut > 0 ? entry.slice(0, cut) : null;
      const unrecovered = snapshot && frame.recovered === false;
      if (sub.pos === null || unrecovered) {
        // As a `subscribed` answer on the socket: a fresh position; `recovered:false` reports the gap.
        sub.pos = { epoch, seq: 0 };
        sub.replayUntil = 0;
        if (unrecovered) this._emit("gap", { channel: frame.channel, source: "sse" });
      } else if (sub.pos !== null && sub.pos.epoch === null && epoch !== null) {
        sub.pos.epoch = epoch;
      }
    }
    this._deliver(frame.channel, frame.data, {
      channel: frame.channel,
      seq,
      ts: frame.ts ?? null,
      snapshot,
      // The stream does not tell replayed messages from live ones.
      recovered: false,
      source: "sse",
    });
  }

  // --- REST fallback -----------------------------------------------------------------------------------------

  /** Starts the REST fallback a random time in [0, fallbackInterval) from now, so clients do not poll in step. */
  _startFallbackSoon() {
    if (!this.options.fallback || (!this._fetch && !this._sseUsable())) return;
    if (this._fallbackTimer !== null || this._fallbackDelayTimer !== null) return;
    const delay = Math.floor(Math.random() * this.options.fallbackInterval);
    this._fallbackDelayTimer = setTimeout(() => {
      this._fallbackDelayTimer = null;
      this._startFallback();
    }, delay);
  }

  /** The socket cannot be had: the SSE stream where it can be used, else REST polling. */
  _startFallback() {
    clearTimeout(this._fallbackDelayTimer);
    this._fallbackDelayTimer = null;
    if (!this.options.fallback) return;
    if (this._startSse()) return;
    this._startRest();
  }

  _startRest() {
    if (!this.options.fallback || !this._fetch || this._fallbackTimer !== null) return;
    this._fallbackTimer = setInterval(() => this._poll(), this.options.fallbackInterval);
    this._emit("fallback", true);
    this._poll();
  }

  _stopFallback() {
    clearTimeout(this._fallbackDelayTimer);
    this._fallbackDelayTimer = null;
    this._sseWanted = false;
    this._closeSse();
    if (this._fallbackTimer === null) return;
    clearInterval(this._fallbackTimer);
    this._fallbackTimer = null;
    this._emit("fallback", false);
  }

  /** Stops REST polling only (the SSE stream took over). */
  _stopRest() {
    if (this._fallbackTimer === null) return;
    clearInterval(this._fallbackTimer);
    this._fallbackTimer = null;
    this._emit("fallback", false);
  }

  /** One fallback round: reads every subscribed channel and hands changed values to the callbacks. */
  async _poll() {
    if (this._fallbackRunning) return;
    this._fallbackRunning = true;
    try {
      const channels = this.channels().filter((c) => !isPattern(c));
      await Promise.all(channels.map((channel) => this._pollChannel(channel)));
    } finally {
      this._fallbackRunning = false;
    }
  }

  /**
   * One channel's fallback read. Positioned (the hub named an epoch, or a seq was seen): the history after the
   * position, oldest first, page by page, each message through the position rule with `meta.recovered`. When
   * the history no longer holds all of it, a `gap` event and then the latest value as a snapshot, as on the
   * socket. Not positioned yet: the latest value. A value without seq (an outside producer's) is read only
   * while not positioned, and is handed over again on each such round.
   */
  async _pollChannel(channel) {
    const sub = this._subs.get(channel);
    if (!sub || sub.prefix !== null) return;
    const live = () => this._fallbackTimer !== null && this._subs.get(channel) === sub;
    let snapshot = sub.pos === null;
    for (let page = 0; !snapshot && page < MAX_CATCH_UP_PAGES; page++) {
      const query = new URLSearchParams({ since_seq: String(sub.pos.seq) });
      if (sub.pos.epoch !== null) query.set("epoch", sub.pos.epoch);
      const body = await this._getJson(`/api/channels/${channelPath(channel)}/history?${query}`);
      if (!live() || body === null || !Array.isArray(body.items)) return;
      if (body.recovered !== true) {
        // As on the socket: a fresh position at the hub's newest seq, a gap, then the latest value.
        const epoch = typeof body.epoch === "string" ? body.epoch : null;
        sub.pos = { epoch, seq: typeof body.seq === "number" ? body.seq : 0 };
        sub.replayUntil = 0;
        this._emit("gap", { channel, source: "rest" });
        snapshot = true;
        break;
      }
      // A position first seen over REST learns its epoch here.
      if (sub.pos.epoch === null && typeof body.epoch === "string") sub.pos.epoch = body.epoch;
      for (const item of body.items) this._deliverRest(channel, item, false);
      const last = body.items.at(-1)?.seq;
      // Done unless the page was cut by the hub's limit before the channel's newest seq.
      if (typeof last !== "number" || last >= body.seq) return;
    }
    if (!snapshot) return; // still catching up after MAX_CATCH_UP_PAGES: the next round goes on
    // Channel names hold only URL-path-safe characters, so they go into the path as they are.
    const body = await this._getJson(`/api/channels/${channelPath(channel)}`);
    if (!live() || body === null) return;
    this._deliverRest(channel, body, true);
  }

  /** Hands a value read over REST (`{data, seq, ts}`) on: the latest value as a snapshot, or a replayed message. */
  _deliverRest(channel, { data, seq, ts }, snapshot) {
    this._deliver(channel, data, {
      channel,
      seq: typeof seq === "number" ? seq : null,
      ts: ts ?? null,
      snapshot,
      recovered: !snapshot,
      source: "rest",
    });
  }

  /** GET `path` of the REST API as JSON; null on any failure (404: no value yet; the hub unreachable...). */
  async _getJson(path) {
    const ctl = typeof AbortController === "function" ? new AbortController() : null;
    const timer = ctl ? setTimeout(() => ctl.abort(), Math.max(1000, this.options.fallbackInterval)) : null;
    try {
      // A channel that needs a token is read with the connection's token.
      const headers = { Accept: "application/json" };
      if (this._token) headers.Authorization = `Bearer ${this._token}`;
      const res = await this._fetch(`${this.restBase}${path}`, {
        headers,
        cache: "no-store",
        signal: ctl?.signal,
      });
      if (!res.ok) return null;
      const body = await res.json();
      return body !== null && typeof body === "object" ? body : null;
    } catch {
      return null;
    } finally {
      clearTimeout(timer);
    }
  }
}
