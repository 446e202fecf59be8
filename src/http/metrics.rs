//! `GET /metrics`: this replica's counters in the Prometheus text format, for a scraper (`/api/stats` says
//! the same to the dashboard as JSON). The plain counters of [`Stats`] are read at scrape time and rendered
//! beside the labeled ones of [`crate::metrics::Metrics`]; nothing on the hot paths changes for them.

use actix_web::http::header;
use actix_web::{HttpResponse, web};
use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{Encoder, IntCounter, IntGauge, IntGaugeVec, Opts, TextEncoder};

use crate::engine::Reach;
use crate::node::hub::Hub;
use crate::stats::Stats;

/// Families built from plain numbers, one per call.
#[derive(Default)]
struct Snapshot(Vec<MetricFamily>);

impl Snapshot {
    fn counter(&mut self, name: &str, help: &str, value: u64) {
        let counter = IntCounter::new(name, help).expect("a valid metric name");
        counter.inc_by(value);
        self.0.extend(counter.collect());
    }

    fn gauge(&mut self, name: &str, help: &str, value: i64) {
        let gauge = IntGauge::new(name, help).expect("a valid metric name");
        gauge.set(value);
        self.0.extend(gauge.collect());
    }
}

/// The text exposition of everything this replica counts.
pub fn render(hub: &Hub) -> String {
    let s = hub.stats();
    let (channels, patterns) = hub.subscriber_counts();
    let mut out = Snapshot::default();
    let info = IntGaugeVec::new(
        Opts::new(
            "relayhub_info",
            "Always 1; the labels name this replica and how it runs.",
        ),
        &["instance_id", "mode", "version"],
    )
    .expect("a valid metric definition");
    info.with_label_values(&[hub.instance_id(), hub.mode(), env!("CARGO_PKG_VERSION")])
        .set(1);
    out.0.extend(info.collect());
    out.gauge(
        "relayhub_up",
        "1 while this replica is ready (GET /ready answers 200).",
        hub.readiness().is_ready() as i64,
    );
    out.gauge(
        "relayhub_uptime_seconds",
        "Seconds since this replica started.",
        hub.uptime().as_secs() as i64,
    );
    out.gauge(
        "relayhub_connections",
        "Open WebSocket connections.",
        Stats::get(&s.connections) as i64,
    );
    out.gauge(
        "relayhub_sse_connections",
        "Open Server-Sent Events streams.",
        Stats::get(&s.sse_connections) as i64,
    );
    out.gauge(
        "relayhub_channels",
        "Channels with at least one local subscriber.",
        channels.len() as i64,
    );
    out.gauge(
        "relayhub_subscriptions",
        "Local subscriptions to exact channels.",
        channels.iter().map(|(_, n)| *n as i64).sum(),
    );
    out.gauge(
        "relayhub_pattern_subscriptions",
        "Local pattern subscriptions (prices:*).",
        patterns.iter().map(|(_, n)| *n as i64).sum(),
    );
    out.gauge(
        "relayhub_redis_pubsub_up",
        "1 while the Redis pub/sub link is live (always 0 in memory mode).",
        hub.link_active() as i64,
    );
    out.gauge(
        "relayhub_degraded",
        "1 while this replica serves with something wrong that taking it out would not fix (Redis unreachable).",
        hub.readiness().degraded().is_some() as i64,
    );
    if let Some(link) = hub.link_health() {
        out.gauge(
            "relayhub_redis_up",
            "1 while Redis answers commands (probed every second while the pub/sub link is down).",
            (link.linked || link.reach == Reach::Answering) as i64,
        );
    }
    let counters: [(&str, &str, &std::sync::atomic::AtomicU64); 38] = [
        (
            "relayhub_slow_consumer_drops_total",
            "Deliveries dropped because a subscriber's queue was full.",
            &s.slow_consumer_drops,
        ),
        (
            "relayhub_messages_conflated_total",
            "Messages a conflating subscriber over its queue bound never got: a newer one replaced them.",
            &s.messages_conflated,
        ),
        (
            "relayhub_gaps_unfilled_total",
            "Messages delivered past a gap that history could no longer fill.",
            &s.gaps_unfilled,
        ),
        (
            "relayhub_pattern_catch_ups_truncated_total",
            "Channels of pattern subscribers a catch-up after a pub/sub outage did not read: past its cap.",
            &s.pattern_catch_ups_truncated,
        ),
        (
            "relayhub_replies_refused_total",
            "Subscribe answers, snapshots and replays past a connection's queue bound, handled as its overflow.",
            &s.replies_refused,
        ),
        (
            "relayhub_slow_consumer_disconnects_total",
            "Connections closed for being slow consumers.",
            &s.slow_consumer_disconnects,
        ),
        (
            "relayhub_relayed_in_total",
            "Messages received from Redis pub/sub and relayed to local subscribers.",
            &s.relayed_in,
        ),
        (
            "relayhub_relayed_out_total",
            "Messages this replica published to Redis.",
            &s.relayed_out,
        ),
        (
            "relayhub_redis_reconnects_total",
            "Times the Redis pub/sub connection was re-established.",
            &s.redis_reconnects,
        ),
        (
            "relayhub_shard_resubscribes_total",
            "Cluster mode: times sharded subscriptions were renewed because a node changed.",
            &s.shard_resubscribes,
        ),
        (
            "relayhub_cache_hits_total",
            "Subscribe snapshots served from the local latest value or the cache.",
            &s.cache_hits,
        ),
        (
            "relayhub_cache_misses_total",
            "Subscribe snapshot look-ups that found nothing.",
            &s.cache_misses,
        ),
        (
            "relayhub_rejected_messages_total",
            "Malformed client frames, Redis messages and ingest messages rejected.",
            &s.rejected_messages,
        ),
        (
            "relayhub_write_timeouts_total",
            "Connections (WebSockets and event streams) aborted because their socket took no bytes for websocket.write_timeout.",
            &s.write_timeouts,
        ),
        (
            "relayhub_frames_too_big_total",
            "Connections closed with 1009 (a frame over websocket.max_message_bytes).",
            &s.frames_too_big,
        ),
        (
            "relayhub_protocol_errors_total",
            "Connections closed with 1002 or 1007.",
            &s.protocol_errors,
        ),
        (
            "relayhub_endpoint_frames_ignored_total",
            "Frames the clients of raw endpoints sent, read and dropped.",
            &s.endpoint_frames_ignored,
        ),
        (
            "relayhub_connections_refused_total",
            "WebSocket handshakes refused by server.max_connections or max_connections_per_ip.",
            &s.connections_refused,
        ),
        (
            "relayhub_sse_streams_opened_total",
            "Server-Sent Events streams opened.",
            &s.sse_streams_opened,
        ),
        (
            "relayhub_requests_rate_limited_total",
            "Client requests refused with rate_limited.",
            &s.requests_rate_limited,
        ),
        (
            "relayhub_rate_limit_disconnects_total",
            "Connections closed for staying over their request rate.",
            &s.rate_limit_disconnects,
        ),
        (
            "relayhub_patterns_refused_total",
            "Pattern subscriptions refused by websocket.max_patterns_per_connection.",
            &s.patterns_refused,
        ),
        (
            "relayhub_pattern_positions_untracked_total",
            "Messages given to pattern subscribers without a position (channels.max_pattern_positions reached).",
            &s.pattern_positions_untracked,
        ),
        (
            "relayhub_subscriptions_refused_total",
            "Subscriptions refused by websocket.max_subscriptions_per_connection.",
            &s.subscriptions_refused,
        ),
        (
            "relayhub_heartbeat_timeouts_total",
            "Connections closed with 1008 for sending nothing, not even a pong, for websocket.client_timeout.",
            &s.heartbeat_timeouts,
        ),
        (
            "relayhub_jobs_refused_total",
            "Polling jobs not created because poller.max_jobs were stored.",
            &s.jobs_refused,
        ),
        (
            "relayhub_ingest_cache_dropped_total",
            "Ingested messages the route's lease holder could not sequence (queue full or script failed).",
            &s.ingest_cache_dropped,
        ),
        (
            "relayhub_pattern_scans_truncated_total",
            "Pattern snapshot look-ups stopped by channels.max_pattern_scan.",
            &s.pattern_scans_truncated,
        ),
        (
            "relayhub_tokens_rejected_total",
            "Tokens that did not verify (at the upgrade, in auth frames, with subscribes).",
            &s.tokens_rejected,
        ),
        (
            "relayhub_auth_refused_total",
            "Subscribes and client publishes refused by the token rules.",
            &s.auth_refused,
        ),
        (
            "relayhub_tokens_expired_total",
            "Connections closed with 4001 because their token expired.",
            &s.tokens_expired,
        ),
        (
            "relayhub_jwks_fetches_total",
            "JWKS fetches that installed a key set.",
            &s.jwks_fetches,
        ),
        (
            "relayhub_jwks_fetch_failures_total",
            "JWKS fetches that failed; the keys held before stay in use.",
            &s.jwks_fetch_failures,
        ),
        (
            "relayhub_presence_queries_total",
            "Presence answers given (WebSocket presence, REST presence and presence stats).",
            &s.presence_queries,
        ),
        (
            "relayhub_presence_truncated_total",
            "Presence answers cut at channels.max_presence_members.",
            &s.presence_truncated,
        ),
        (
            "relayhub_presence_joins_total",
            "Clients of this replica that joined a channel's presence.",
            &s.presence_joins,
        ),
        (
            "relayhub_presence_leaves_total",
            "Clients of this replica that left a channel's presence.",
            &s.presence_leaves,
        ),
        (
            "relayhub_presence_dropped_total",
            "Presence changes not written (queue full or backend refused); the refresh repairs them.",
            &s.presence_dropped,
        ),
    ];
    for (name, help, counter) in counters {
        out.counter(name, help, Stats::get(counter));
    }
    if let Some(memory) = hub.memory_usage() {
        out.gauge(
            "relayhub_store_channels",
            "Memory mode: channels whose latest value is kept.",
            memory.channels as i64,
        );
        out.gauge(
            "relayhub_store_bytes",
            "Memory mode: bytes of latest values and snapshots kept.",
            memory.bytes as i64,
        );
        out.counter(
            "relayhub_store_evictions_total",
            "Memory mode: channels evicted by channels.max_channels or max_memory.",
            memory.evictions,
        );
        out.counter(
            "relayhub_store_expired_total",
            "Memory mode: expired values reclaimed.",
            memory.expired,
        );
    }
    out.0.extend(hub.metrics().gather());
    let mut text = Vec::new();
    TextEncoder::new()
        .encode(&out.0, &mut text)
        .expect("encoding into memory cannot fail");
    String::from_utf8(text).expect("the text format is UTF-8")
}

pub async fn metrics(hub: web::Data<Hub>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, prometheus::TEXT_FORMAT))
        .body(render(&hub))
}

/// A server of its own for `server.metrics_listen`: `GET /metrics` only, on one worker, so a scraper can
/// be kept off the public port.
pub fn serve(listen: &str, hub: Hub) -> std::io::Result<actix_web::dev::Server> {
    let server = actix_web::HttpServer::new(move || {
        actix_web::App::new()
            .app_data(web::Data::new(hub.clone()))
            .route("/metrics", web::get().to(metrics))
    })
    .workers(1)
    .disable_signals()
    .bind(listen)?
    .run();
    Ok(server)
}
