//! Counters every component bumps and `GET /api/stats` reads. Plain relaxed atomics: each is independent and
//! read only for reporting. State (such as whether the pub/sub link is live) belongs to its owner, not here.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Stats {
    /// Open WebSocket connections.
    pub connections: AtomicU64,
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
    /// Subscribe snapshots served from the local latest value or the cache.
    pub cache_hits: AtomicU64,
    /// Subscribe snapshot look-ups that found nothing.
    pub cache_misses: AtomicU64,
    /// Malformed frames and messages rejected (client frames, raw Redis messages, ingest messages).
    pub rejected_messages: AtomicU64,
    /// WebSocket connections aborted because their socket took no bytes for `websocket.write_timeout`.
    pub write_timeouts: AtomicU64,
    /// WebSocket connections closed with 1009: a frame or message over `websocket.max_message_bytes`.
    pub frames_too_big: AtomicU64,
    /// WebSocket connections closed with 1002 or 1007: broken framing, an invalid close, text not UTF-8.
    pub protocol_errors: AtomicU64,
    /// WebSocket handshakes refused by `server.max_connections` or `server.max_connections_per_ip`.
    pub connections_refused: AtomicU64,
    /// Client requests refused with `rate_limited`.
    pub requests_rate_limited: AtomicU64,
    /// Connections closed for staying over their request rate.
    pub rate_limit_disconnects: AtomicU64,
    /// Pattern subscriptions refused by `websocket.max_patterns_per_connection`.
    pub patterns_refused: AtomicU64,
    /// Subscriptions refused by `websocket.max_subscriptions_per_connection`.
    pub subscriptions_refused: AtomicU64,
    /// Connections closed with 1008 for sending nothing, not even a pong, for `websocket.client_timeout`.
    pub heartbeat_timeouts: AtomicU64,
    /// Polling jobs not created because `poller.max_jobs` were stored (API starts and auto-starts).
    pub jobs_refused: AtomicU64,
    /// Ingested messages not cached because the queue of cache writes was full.
    pub ingest_cache_dropped: AtomicU64,
    /// Pattern snapshot look-ups stopped by `channels.max_pattern_scan` before Redis was scanned to the end.
    pub pattern_scans_truncated: AtomicU64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
