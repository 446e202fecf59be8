//! `GET /api/stats`: this replica's counters (each replica reports only itself).

use actix_web::{HttpResponse, web};
use serde_json::{Map, Value, json};

use crate::http::health::redis_health;
use crate::node::hub::Hub;
use crate::stats::Stats;

pub async fn stats(hub: web::Data<Hub>) -> HttpResponse {
    let s = hub.stats();
    let readiness = hub.readiness();
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
    let mut body = json!({
        "instance_id": hub.instance_id(),
        "mode": hub.mode(),
        "pubsub_active": hub.link_active(),
        "ready": readiness.is_ready(),
        "degraded": readiness.degraded(),
        "redis": redis_health(&hub),
        "uptime_seconds": hub.uptime().as_secs(),
        "connections": Stats::get(&s.connections),
        "sse_connections": Stats::get(&s.sse_connections),
        "channels": subscribers.len(),
        "subscriptions": subscriptions,
        "subscribers": subscribers,
        "pattern_subscriptions": pattern_subscriptions,
        "pattern_subscribers": pattern_subscribers,
        "store_evictions": store_evictions,
        "store_expired": store_expired,
        "store_channels": store_channels,
        "store_bytes": store_bytes,
    });
    if let Value::Object(fields) = &mut body {
        for (name, value) in s.counters() {
            fields.insert(name.to_string(), json!(value));
        }
    }
    HttpResponse::Ok().json(body)
}
