//! The labeled metrics behind `GET /metrics`: what [`crate::stats::Stats`] cannot say with one number
//! (messages by namespace, disconnects by close code, refusals by error code, fetches per polling source).
//! The plain counters stay in `Stats` and are read at scrape time (see `http::metrics`).
//!
//! Every label value comes from a closed set, so no client can grow the number of series: namespaces are
//! those configured in `[namespaces.*]` (any other channel counts as `other`), close and error codes are the
//! protocol's own, sources are the configured ones.

use std::collections::BTreeMap;
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts};

use crate::core::config::Config;
use crate::core::protocol::{ErrorCode, close};

/// The label of channels whose namespace has no `[namespaces.*]` table.
pub const OTHER: &str = "other";

/// Close codes counted under their own label; anything else a client sent is `other`. 1006 (never on the
/// wire) stands for a connection that ended without a close frame: an aborted or vanished peer.
const CLOSE_CODES: &[u16] = &[
    close::NORMAL,
    close::GOING_AWAY,
    close::PROTOCOL,
    close::INVALID_DATA,
    close::POLICY,
    close::TOO_BIG,
    close::INTERNAL,
    close::TOKEN_EXPIRED,
    NO_CLOSE_FRAME,
];

/// The code reported for a connection that ended without a close frame (RFC 6455 §7.1.5).
pub const NO_CLOSE_FRAME: u16 = 1006;

const ERROR_CODES: &[ErrorCode] = &[
    ErrorCode::BadRequest,
    ErrorCode::UnknownOp,
    ErrorCode::InvalidChannel,
    ErrorCode::NotSubscribed,
    ErrorCode::Forbidden,
    ErrorCode::TooManySubscriptions,
    ErrorCode::TooManyPatterns,
    ErrorCode::RateLimited,
    ErrorCode::Unavailable,
    ErrorCode::Internal,
];

/// Upper bounds of the fetch-duration histogram, in seconds: upstream calls take milliseconds to the
/// source's timeout (seconds).
const FETCH_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How a fetch of a polling job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchResult {
    /// A value was fetched and published.
    Published,
    /// A value was fetched and equal to the last one (`publish = "on_change"`): nothing published.
    Unchanged,
    /// The upstream answered 304 Not Modified to a conditional request: nothing published.
    NotModified,
    /// The fetch, the transform or the publish failed.
    Error,
}

impl FetchResult {
    fn as_str(self) -> &'static str {
        match self {
            FetchResult::Published => "published",
            FetchResult::Unchanged => "unchanged",
            FetchResult::NotModified => "not_modified",
            FetchResult::Error => "error",
        }
    }
}

/// Per-namespace counters, resolved once at start: the publish and fan-out paths look a namespace up in a
/// map and bump an atomic, allocating nothing.
struct ByNamespace {
    named: BTreeMap<String, IntCounter>,
    other: IntCounter,
}

impl ByNamespace {
    fn new(vec: &IntCounterVec, config: &Config) -> ByNamespace {
        ByNamespace {
            named: config
                .namespaces
                .keys()
                .map(|ns| (ns.clone(), vec.with_label_values(&[ns.as_str()])))
                .collect(),
            other: vec.with_label_values(&[OTHER]),
        }
    }

    fn get(&self, channel: &str) -> &IntCounter {
        self.named
            .get(crate::core::config::namespace_of(channel))
            .unwrap_or(&self.other)
    }
}

/// One replica's labeled metrics, registered in a registry of its own (several hubs may share a process).
pub struct Metrics {
    registry: prometheus::Registry,
    published: ByNamespace,
    delivered: ByNamespace,
    disconnects: IntCounterVec,
    rejected: IntCounterVec,
    fetches: IntCounterVec,
    fetch_seconds: HistogramVec,
    consecutive_failures: IntGaugeVec,
    /// Subscribes to polled channels that found a cached value (`hit`) or none (`miss`), by source.
    cache_reads: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    // The names and labels are constants of this file: a failure is a typo caught by the tests.
    IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric definition")
}

impl Metrics {
    pub fn new(config: &Config) -> Metrics {
        let published = counter_vec(
            "relayhub_messages_published_total",
            "Messages accepted for publishing on this replica, by namespace.",
            &["namespace"],
        );
        let delivered = counter_vec(
            "relayhub_messages_delivered_total",
            "Messages handed to local subscribers, by namespace.",
            &["namespace"],
        );
        let disconnects = counter_vec(
            "relayhub_disconnects_total",
            "WebSocket connections ended, by close code (1006: no close frame).",
            &["code"],
        );
        let rejected = counter_vec(
            "relayhub_requests_rejected_total",
            "WebSocket client requests answered with an error, by error code.",
            &["code"],
        );
        let fetches = counter_vec(
            "relayhub_poller_fetches_total",
            "Fetches of polling jobs owned by this replica, by source and result.",
            &["source", "result"],
        );
        let fetch_seconds = HistogramVec::new(
            HistogramOpts::new(
                "relayhub_poller_fetch_duration_seconds",
                "Time one fetch took (upstream call, transform, publish), by source.",
            )
            .buckets(FETCH_BUCKETS.to_vec()),
            &["source"],
        )
        .expect("a valid metric definition");
        let consecutive_failures = IntGaugeVec::new(
            Opts::new(
                "relayhub_poller_consecutive_failures",
                "Most consecutive failed fetches of any job of the source owned by this replica.",
            ),
            &["source"],
        )
        .expect("a valid metric definition");
        let cache_reads = counter_vec(
            "relayhub_poller_cache_reads_total",
            "Subscribes to a polling source's channels on this replica that found its cached value (hit) or none (miss).",
            &["source", "result"],
        );
        let registry = prometheus::Registry::new();
        for collector in [
            Box::new(published.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(delivered.clone()),
            Box::new(disconnects.clone()),
            Box::new(rejected.clone()),
            Box::new(fetches.clone()),
            Box::new(fetch_seconds.clone()),
            Box::new(consecutive_failures.clone()),
            Box::new(cache_reads.clone()),
        ] {
            registry
                .register(collector)
                .expect("each metric is registered once");
        }
        // Every known label value exists from the start, at 0, so a rate() sees its first increase.
        for code in CLOSE_CODES {
            disconnects.with_label_values(&[&code.to_string()]);
        }
        disconnects.with_label_values(&[OTHER]);
        for code in ERROR_CODES {
            rejected.with_label_values(&[code.as_str()]);
        }
        for source in &config.sources {
            for result in [
                FetchResult::Published,
                FetchResult::Unchanged,
                FetchResult::NotModified,
                FetchResult::Error,
            ] {
                fetches.with_label_values(&[source.name.as_str(), result.as_str()]);
            }
            fetch_seconds.with_label_values(&[source.name.as_str()]);
            consecutive_failures.with_label_values(&[source.name.as_str()]);
            for result in ["hit", "miss"] {
                cache_reads.with_label_values(&[source.name.as_str(), result]);
            }
        }
        Metrics {
            published: ByNamespace::new(&published, config),
            delivered: ByNamespace::new(&delivered, config),
            registry,
            disconnects,
            rejected,
            fetches,
            fetch_seconds,
            consecutive_failures,
            cache_reads,
        }
    }

    /// One message accepted for publishing on `channel`.
    pub fn published(&self, channel: &str) {
        self.published.get(channel).inc();
    }

    /// `n` local deliveries of one message on `channel`.
    pub fn delivered(&self, channel: &str, n: u64) {
        if n > 0 {
            self.delivered.get(channel).inc_by(n);
        }
    }

    /// A WebSocket connection ended with `code` (`None`: without a close frame).
    pub fn disconnected(&self, code: Option<u16>) {
        let label = itoa_close(code.unwrap_or(NO_CLOSE_FRAME));
        self.disconnects.with_label_values(&[label]).inc();
    }

    /// A client request answered with an error.
    pub fn rejected(&self, code: ErrorCode) {
        self.rejected.with_label_values(&[code.as_str()]).inc();
    }

    /// One fetch of a job of `source` ended; `failures` is the most consecutive failures of any of the
    /// source's jobs on this replica.
    pub fn fetched(&self, source: &str, result: FetchResult, took: Duration, failures: u32) {
        self.fetches
            .with_label_values(&[source, result.as_str()])
            .inc();
        self.fetch_seconds
            .with_label_values(&[source])
            .observe(took.as_secs_f64());
        self.consecutive_failures
            .with_label_values(&[source])
            .set(i64::from(failures));
    }

    /// Subscribes to channels of `source`: `hits` found its cached value, `misses` none.
    pub fn cache_read(&self, source: &str, hits: u64, misses: u64) {
        if hits > 0 {
            self.cache_reads
                .with_label_values(&[source, "hit"])
                .inc_by(hits);
        }
        if misses > 0 {
            self.cache_reads
                .with_label_values(&[source, "miss"])
                .inc_by(misses);
        }
    }

    /// Hits and misses counted by `cache_read` for `source` on this replica so far.
    pub fn cache_reads(&self, source: &str) -> (u64, u64) {
        let read = |result: &str| {
            self.cache_reads
                .get_metric_with_label_values(&[source, result])
                .map_or(0, |c| c.get())
        };
        (read("hit"), read("miss"))
    }

    /// The labeled metrics' current values.
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }
}

/// The label of a known close code, without formatting one per disconnect.
fn itoa_close(code: u16) -> &'static str {
    match code {
        close::NORMAL => "1000",
        close::GOING_AWAY => "1001",
        close::PROTOCOL => "1002",
        close::INVALID_DATA => "1007",
        close::POLICY => "1008",
        close::TOO_BIG => "1009",
        close::INTERNAL => "1011",
        close::TOKEN_EXPIRED => "4001",
        NO_CLOSE_FRAME => "1006",
        _ => OTHER,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_outside_the_config_share_one_label() {
        let config = Config::load(None).unwrap();
        let metrics = Metrics::new(&config);
        metrics.published("chat:lobby");
        metrics.published("nobody:a");
        metrics.published("nobody-else:b");
        metrics.disconnected(Some(4321));
        metrics.disconnected(Some(1009));
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&metrics.gather())
            .unwrap();
        assert!(
            text.contains("relayhub_messages_published_total{namespace=\"chat\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("relayhub_messages_published_total{namespace=\"other\"} 2"),
            "{text}"
        );
        assert!(!text.contains("nobody"), "{text}");
        assert!(
            text.contains("relayhub_disconnects_total{code=\"other\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("relayhub_disconnects_total{code=\"1009\"} 1"),
            "{text}"
        );
        for code in CLOSE_CODES {
            assert_eq!(itoa_close(*code), code.to_string());
        }
    }
}
