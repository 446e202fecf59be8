//! Counters every component bumps and `GET /api/stats` reads. Plain relaxed atomics: each is independent and
//! read only for reporting. State (such as whether the pub/sub link is live) belongs to its owner, not here.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Stats {
    /// Open WebSocket connections.
    pub connections: AtomicU64,
    /// Open Server-Sent Events streams (a gauge, like `connections`).
    pub sse_connections: AtomicU64,
    /// Server-Sent Events streams opened since start.
    pub sse_streams_opened: AtomicU64,
    /// Messages accepted for publishing on this replica (HTTP, client publish, poller).
    pub messages_published: AtomicU64,
    /// Frames handed to local subscribers.
    pub messages_delivered: AtomicU64,
    /// Deliveries dropped because a subscriber's queue was full.
    pub slow_consumer_drops: AtomicU64,
    /// Connections closed for being slow consumers.
    pub slow_consumer_disconnects: AtomicU64,
    /// Messages received from Redis pub/sub and relayed to local subscribers.
    pub relayed_in: AtomicU64,
    /// Messages this replica published to Redis.
    pub relayed_out: AtomicU64,
    /// Times the pub/sub connection was re-established.
    pub redis_reconnects: AtomicU64,
    /// Cluster mode: times sharded subscriptions were renewed because a node changed: a node's connection
    /// dropped (the pub/sub connection is replaced), or a channel's slot moved (it is subscribed again). Each
    /// is followed by a read of the channels' history.
    pub shard_resubscribes: AtomicU64,
    /// Subscribe snapshots served from the local latest value or the cache.
    pub cache_hits: AtomicU64,
    /// Subscribe snapshot look-ups that found nothing.
    pub cache_misses: AtomicU64,
    /// Malformed frames and messages rejected (client frames, raw Redis messages, ingest messages).
    pub rejected_messages: AtomicU64,
    /// WebSocket connections and event streams aborted because their socket took no bytes for
    /// `websocket.write_timeout`.
    pub write_timeouts: AtomicU64,
    /// WebSocket connections closed with 1009: a frame or message over `websocket.max_message_bytes`.
    pub frames_too_big: AtomicU64,
    /// WebSocket connections closed with 1002 or 1007: broken framing, an invalid close, text not UTF-8.
    pub protocol_errors: AtomicU64,
    /// Frames the clients of raw endpoints sent, read and dropped (they do not speak the protocol).
    pub endpoint_frames_ignored: AtomicU64,
    /// WebSocket handshakes refused by `server.max_connections` or `server.max_connections_per_ip`.
    pub connections_refused: AtomicU64,
    /// Client requests refused with `rate_limited`.
    pub requests_rate_limited: AtomicU64,
    /// Connections closed for staying over their request rate.
    pub rate_limit_disconnects: AtomicU64,
    /// Pattern subscriptions refused by `websocket.max_patterns_per_connection`.
    pub patterns_refused: AtomicU64,
    /// Messages given to a pattern subscriber without a position: its connection already tracked
    /// `channels.max_pattern_positions` channels (not deduplicated, not recoverable).
    pub pattern_positions_untracked: AtomicU64,
    /// Subscriptions refused by `websocket.max_subscriptions_per_connection`.
    pub subscriptions_refused: AtomicU64,
    /// Connections closed with 1008 for sending nothing, not even a pong, for `websocket.client_timeout`.
    pub heartbeat_timeouts: AtomicU64,
    /// Polling jobs not created because `poller.max_jobs` were stored (API starts and auto-starts).
    pub jobs_refused: AtomicU64,
    /// Ingested messages the route's lease holder could not take into the sequenced path (its queue of
    /// 10,000 was full, or the publish script failed): lost.
    pub ingest_cache_dropped: AtomicU64,
    /// Polls answered 304 Not Modified (conditional requests; nothing published).
    pub poll_not_modified: AtomicU64,
    /// Polls whose value equalled the last one published under `publish = "on_change"` (nothing published).
    pub poll_unchanged: AtomicU64,
    /// Polls put off because their source's `max_requests_per_minute` budget was spent (delayed, not dropped).
    pub poll_delayed: AtomicU64,
    /// Upstream 429 / 503 answers with a `Retry-After` that put the next fetch off.
    pub poll_retry_after: AtomicU64,
    /// Split fetches whose array had more elements than `max_split_elements` (the rest were dropped).
    pub poll_split_over_limit: AtomicU64,
    /// Pattern snapshot look-ups stopped by `channels.max_pattern_scan` before Redis was scanned to the end.
    pub pattern_scans_truncated: AtomicU64,
    /// Subscribes with `since` answered `recovered:true` (every missed message replayed).
    pub subscribes_recovered: AtomicU64,
    /// Subscribes with `since` answered `recovered:false` (history no longer held it: a snapshot instead).
    pub subscribes_unrecovered: AtomicU64,
    /// Messages replayed from history: to recovering subscribers and after pub/sub outages.
    pub messages_replayed: AtomicU64,
    /// Copies a subscriber had been given already (by seq), dropped by the ordering rule.
    pub duplicates_dropped: AtomicU64,
    /// Messages given to a subscriber past a gap that history could no longer fill (the ones before are lost).
    pub gaps_unfilled: AtomicU64,
    /// Channels of pattern subscribers not read by a catch-up after an outage: past its cap of channels.
    pub pattern_catch_ups_truncated: AtomicU64,
    /// Subscribe answers, snapshots, replays and `epoch` frames past a connection's queue bound: handled as
    /// its slow-consumer overflow (closed, or kept in a slot where the namespace conflates), never dropped unseen.
    pub replies_refused: AtomicU64,
    /// Messages a conflating subscriber over its queue bound never got: a newer one of the channel replaced them.
    pub messages_conflated: AtomicU64,
    /// Tokens that did not verify: at the upgrade (401), in `auth` frames and with subscribes.
    pub tokens_rejected: AtomicU64,
    /// Subscribes and client publishes refused by the token rules (`unauthorized`, `forbidden`).
    pub auth_refused: AtomicU64,
    /// Connections closed with 4001: their token expired and no fresh one came.
    pub tokens_expired: AtomicU64,
    /// JWKS fetches that installed a key set.
    pub jwks_fetches: AtomicU64,
    /// JWKS fetches that failed (unreachable, timeout, too big, no usable key); the old keys stay.
    pub jwks_fetch_failures: AtomicU64,
    /// Presence answers given (WebSocket `presence`, REST presence and presence stats).
    pub presence_queries: AtomicU64,
    /// Presence answers cut at `channels.max_presence_members`.
    pub presence_truncated: AtomicU64,
    /// Clients of this replica that joined a channel's presence (subscribed in a namespace with presence or
    /// join_leave).
    pub presence_joins: AtomicU64,
    /// Clients of this replica that left it (unsubscribed, revoked or disconnected).
    pub presence_leaves: AtomicU64,
    /// Presence changes not written: the write queue was full, or the backend refused them. The periodic
    /// refresh re-adds a lost join and a lost leave expires within `channels.presence_ttl`.
    pub presence_dropped: AtomicU64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Every counter but the gauges `connections` and `sse_connections`, by the name `/api/stats` reports it under, in declaration
    /// order. A new counter needs a field above and a line here; nothing else lists them.
    pub fn counters(&self) -> [(&'static str, u64); 49] {
        [
            ("messages_published", &self.messages_published),
            ("messages_delivered", &self.messages_delivered),
            ("slow_consumer_drops", &self.slow_consumer_drops),
            ("slow_consumer_disconnects", &self.slow_consumer_disconnects),
            ("relayed_in", &self.relayed_in),
            ("relayed_out", &self.relayed_out),
            ("redis_reconnects", &self.redis_reconnects),
            ("shard_resubscribes", &self.shard_resubscribes),
            ("cache_hits", &self.cache_hits),
            ("cache_misses", &self.cache_misses),
            ("rejected_messages", &self.rejected_messages),
            ("write_timeouts", &self.write_timeouts),
            ("frames_too_big", &self.frames_too_big),
            ("protocol_errors", &self.protocol_errors),
            ("endpoint_frames_ignored", &self.endpoint_frames_ignored),
            ("connections_refused", &self.connections_refused),
            ("requests_rate_limited", &self.requests_rate_limited),
            ("rate_limit_disconnects", &self.rate_limit_disconnects),
            ("patterns_refused", &self.patterns_refused),
            (
                "pattern_positions_untracked",
                &self.pattern_positions_untracked,
            ),
            ("subscriptions_refused", &self.subscriptions_refused),
            ("heartbeat_timeouts", &self.heartbeat_timeouts),
            ("jobs_refused", &self.jobs_refused),
            ("ingest_cache_dropped", &self.ingest_cache_dropped),
            ("poll_not_modified", &self.poll_not_modified),
            ("poll_unchanged", &self.poll_unchanged),
            ("poll_delayed", &self.poll_delayed),
            ("poll_retry_after", &self.poll_retry_after),
            ("poll_split_over_limit", &self.poll_split_over_limit),
            ("pattern_scans_truncated", &self.pattern_scans_truncated),
            ("subscribes_recovered", &self.subscribes_recovered),
            ("subscribes_unrecovered", &self.subscribes_unrecovered),
            ("messages_replayed", &self.messages_replayed),
            ("duplicates_dropped", &self.duplicates_dropped),
            ("gaps_unfilled", &self.gaps_unfilled),
            (
                "pattern_catch_ups_truncated",
                &self.pattern_catch_ups_truncated,
            ),
            ("replies_refused", &self.replies_refused),
            ("messages_conflated", &self.messages_conflated),
            ("tokens_rejected", &self.tokens_rejected),
            ("auth_refused", &self.auth_refused),
            ("tokens_expired", &self.tokens_expired),
            ("jwks_fetches", &self.jwks_fetches),
            ("jwks_fetch_failures", &self.jwks_fetch_failures),
            ("sse_streams_opened", &self.sse_streams_opened),
            ("presence_queries", &self.presence_queries),
            ("presence_truncated", &self.presence_truncated),
            ("presence_joins", &self.presence_joins),
            ("presence_leaves", &self.presence_leaves),
            ("presence_dropped", &self.presence_dropped),
        ]
        .map(|(name, counter)| (name, Self::get(counter)))
    }
}
