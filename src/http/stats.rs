//! `GET /api/stats`: this replica's counters (each replica reports only itself).

use actix_web::{HttpResponse, web};
use serde_json::{Map, Value, json};

use crate::node::hub::Hub;
use crate::stats::Stats;

pub async fn stats(hub: web::Data<Hub>) -> HttpResponse {
    let s = hub.stats();
    let (channels, patterns) = hub.subscriber_counts();
    let subscriptions: usize = channels.iter().map(|(_, n)| n).sum();
    let pattern_subscriptions: usize = patterns.iter().map(|(_, n)| n).sum();
    let subscribers: Map<String, Value> =
        channels.into_iter().map(|(c, n)| (c, json!(n))).collect();
    let pattern_subscribers: Map<String, Value> =
        patterns.into_iter().map(|(c, n)| (c, json!(n))).collect();
    // Memory mode only: what the in-memory backend holds and reclaimed (in Redis mode, Redis's own INFO and
    // key TTLs say it).
    let (store_channels, store_bytes, store_evictions, store_expired) = match hub.memory_usage() {
        Some(m) => (
            json!(m.channels),
            json!(m.bytes),
            json!(m.evictions),
            json!(m.expired),
        ),
        None => (Value::Null, Value::Null, Value::Null, Value::Null),
    };
    HttpResponse::Ok().json(json!({
        "instance_id": hub.instance_id(),
        "mode": hub.mode(),
        "pubsub_active": hub.link_active(),
        "ready": hub.readiness().is_ok(),
        "uptime_seconds": hub.uptime().as_secs(),
        "connections": Stats::get(&s.connections),
        "channels": subscribers.len(),
        "subscriptions": subscriptions,
        "subscribers": subscribers,
        "pattern_subscriptions": pattern_subscriptions,
        "pattern_subscribers": pattern_subscribers,
        "messages_published": Stats::get(&s.messages_published),
        "messages_delivered": Stats::get(&s.messages_delivered),
        "slow_consumer_drops": Stats::get(&s.slow_consumer_drops),
        "slow_consumer_disconnects": Stats::get(&s.slow_consumer_disconnects),
        "relayed_in": Stats::get(&s.relayed_in),
        "relayed_out": Stats::get(&s.relayed_out),
        "redis_reconnects": Stats::get(&s.redis_reconnects),
        "cache_hits": Stats::get(&s.cache_hits),
        "cache_misses": Stats::get(&s.cache_misses),
        "rejected_messages": Stats::get(&s.rejected_messages),
        "write_timeouts": Stats::get(&s.write_timeouts),
        "frames_too_big": Stats::get(&s.frames_too_big),
        "protocol_errors": Stats::get(&s.protocol_errors),
        "connections_refused": Stats::get(&s.connections_refused),
        "requests_rate_limited": Stats::get(&s.requests_rate_limited),
        "rate_limit_disconnects": Stats::get(&s.rate_limit_disconnects),
        "patterns_refused": Stats::get(&s.patterns_refused),
        "subscriptions_refused": Stats::get(&s.subscriptions_refused),
        "heartbeat_timeouts": Stats::get(&s.heartbeat_timeouts),
        "jobs_refused": Stats::get(&s.jobs_refused),
        "ingest_cache_dropped": Stats::get(&s.ingest_cache_dropped),
        "pattern_scans_truncated": Stats::get(&s.pattern_scans_truncated),
        "store_evictions": store_evictions,
        "store_expired": store_expired,
        "store_channels": store_channels,
        "store_bytes": store_bytes,
    }))
}
