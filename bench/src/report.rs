//! The run's figures: [`Report`] is built by `run`, printed as a table for people and as one JSON line
//! (the last line of stdout) for scripts.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

/// Everything one run measured. Times in seconds unless the name says otherwise.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// `--scenario` label.
    pub scenario: String,
    /// `redis`, `http` or `none`.
    pub publish: String,
    pub connections: usize,
    pub channels: usize,
    /// Source addresses the connections were spread over (0 = kernel's choice).
    pub sources: usize,
    /// Receiver threads.
    pub threads: usize,
    /// Publishes per second asked for.
    pub rate: f64,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub payload_bytes: usize,
    pub connect: ConnectFigures,
    /// From the subscribe phase's start to the last ack.
    pub subscribe_s: f64,
    /// The measured window: first measured publish to end of drain (or the idle hold).
    pub window_s: f64,
    pub publisher: Option<PublisherFigures>,
    pub deliveries: Option<DeliveryFigures>,
    pub latency_ms: Option<LatencyFigures>,
    pub server: Option<ServerFigures>,
    pub bench: BenchFigures,
    /// Subscribed connections the hub closed or broke during the run.
    pub dropped: usize,
    /// How dropped connections ended: close code, `eof` or `error`, with counts.
    pub endings: BTreeMap<String, u64>,
    pub first_error: Option<String>,
    /// `--hostile`: what the misbehaving clients did and how the hub ended them.
    pub hostile: Option<crate::hostile::HostileFigures>,
    /// Things a reader must know before trusting the figures.
    pub warnings: Vec<String>,
    /// Nothing lost, nothing dropped, no publish or error frames.
    pub ok: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct ConnectFigures {
    /// First connect started to last handshake done.
    pub seconds: f64,
    /// Connections accepted per second over that time.
    pub per_second: f64,
    /// The hub's CPU over the connect phase.
    pub server_cpu_seconds: Option<f64>,
    /// Connections accepted per hub CPU-second: steadier than `per_second` on a shared machine.
    pub per_server_cpu_second: Option<f64>,
    /// The bench's CPU over the connect phase / its length (near 1.0: the bench limited the rate).
    pub bench_cpu_share: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct PublisherFigures {
    /// Publishes sent, warmup included.
    pub published: u64,
    /// Publishes the path accepted (HTTP 2xx, Redis reply).
    pub succeeded: u64,
    /// Publishes refused, failed or unanswered.
    pub errors: u64,
    /// Sent more than 1 ms after their due time.
    pub late: u64,
    pub max_lag_ms: f64,
    /// Measured publishes divided by the time they took.
    pub achieved_rate: f64,
    /// Publishes Redis reported as reaching no subscriber.
    pub no_receivers: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct DeliveryFigures {
    /// Measured publishes times the subscribers of their channel.
    pub expected: u64,
    pub received: u64,
    /// Expected but not received by the end of the drain.
    pub missing: u64,
    /// Received divided by the time from the first measured publish to the last measured delivery.
    pub per_second: f64,
    pub warmup_received: u64,
    pub out_of_order: u64,
    pub unexpected: u64,
    /// Connections that missed at least one measured message.
    pub incomplete_connections: u64,
    pub error_frames: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct LatencyFigures {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct ServerFigures {
    pub pid: u32,
    pub rss_before_connect_kib: u64,
    /// At the start of the measured window.
    pub rss_start_kib: u64,
    pub rss_end_kib: u64,
    /// The hub's peak RSS over its whole life (`VmHWM`), read at the end of the window.
    pub peak_rss_kib: u64,
    /// Idle mode: (RSS at the end - RSS before connecting) / connections.
    pub rss_per_connection_bytes: Option<f64>,
    /// utime + stime over the window.
    pub cpu_seconds: f64,
    /// cpu_seconds / window_s (1.0 = one core busy).
    pub cpu_share: f64,
    /// Measured deliveries per server CPU-second.
    pub deliveries_per_cpu_second: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct BenchFigures {
    pub cpu_seconds: f64,
    pub cpu_share: f64,
    pub rss_kib: u64,
    /// The bench used >= 90 % of a core: server figures are lower bounds.
    pub bottleneck: bool,
}

impl Report {
    /// The table for people.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut row = |name: &str, value: String| {
            // Writing into a String cannot fail.
            writeln!(out, "  {name:<28} {value}").expect("writing to a String");
        };
        let label = if self.scenario.is_empty() {
            "(unnamed)"
        } else {
            &self.scenario
        };
        row("scenario", format!("{label}  publish={}", self.publish));
        row(
            "shape",
            format!(
                "{} connections, {} channels, {} sources, {} receiver threads",
                self.connections, self.channels, self.sources, self.threads
            ),
        );
        row(
            "connect",
            format!(
                "{:.3} s  ({:.0} connections/s; {} per hub CPU-s; bench {:.0} % of a core)",
                self.connect.seconds,
                self.connect.per_second,
                self.connect
                    .per_server_cpu_second
                    .map_or("-".to_string(), |rate| format!("{rate:.0}")),
                self.connect.bench_cpu_share * 100.0
            ),
        );
        row("subscribe", format!("{:.3} s", self.subscribe_s));
        row("measured window", format!("{:.3} s", self.window_s));
        if let Some(publisher) = &self.publisher {
            row(
                "publishes",
                format!(
                    "{} at {:.1}/s (asked {:.1}/s), {} errors, {} late, max lag {:.2} ms",
                    publisher.published,
                    publisher.achieved_rate,
                    self.rate,
                    publisher.errors,
                    publisher.late,
                    publisher.max_lag_ms
                ),
            );
        }
        if let Some(deliveries) = &self.deliveries {
            row("deliveries/s", format!("{:.0}", deliveries.per_second));
            row(
                "delivered / expected",
                format!(
                    "{} / {}  ({} missing, {} connections incomplete)",
                    deliveries.received,
                    deliveries.expected,
                    deliveries.missing,
                    deliveries.incomplete_connections
                ),
            );
            row(
                "other frames",
                format!(
                    "{} warmup, {} out of order, {} unexpected, {} error frames",
                    deliveries.warmup_received,
                    deliveries.out_of_order,
                    deliveries.unexpected,
                    deliveries.error_frames
                ),
            );
        }
        if let Some(latency) = &self.latency_ms {
            row(
                "latency ms",
                format!(
                    "p50 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}",
                    latency.p50, latency.p99, latency.p999, latency.max, latency.mean
                ),
            );
        }
        if let Some(server) = &self.server {
            row(
                "server RSS",
                format!(
                    "{} KiB before connect, {} KiB at start, {} KiB at end, peak {} KiB",
                    server.rss_before_connect_kib,
                    server.rss_start_kib,
                    server.rss_end_kib,
                    server.peak_rss_kib
                ),
            );
            if let Some(per_connection) = server.rss_per_connection_bytes {
                row(
                    "server RSS/connection",
                    format!(
                        "{per_connection:.0} bytes ({:.2} KiB)",
                        per_connection / 1024.0
                    ),
                );
            }
            row(
                "server CPU",
                format!(
                    "{:.2} s ({:.0} % of a core), pid {}",
                    server.cpu_seconds,
                    server.cpu_share * 100.0,
                    server.pid
                ),
            );
            if let Some(per_cpu) = server.deliveries_per_cpu_second {
                row("deliveries/server CPU-s", format!("{per_cpu:.0}"));
            }
        }
        row(
            "bench CPU",
            format!(
                "{:.2} s ({:.0} % of a core), RSS {} KiB",
                self.bench.cpu_seconds,
                self.bench.cpu_share * 100.0,
                self.bench.rss_kib
            ),
        );
        if let Some(hostile) = &self.hostile {
            for (name, kind) in [
                ("hostile stuck readers", &hostile.stuck_reader),
                ("hostile giant frames", &hostile.giant_frame),
                ("hostile ping floods", &hostile.ping_flood),
                ("hostile churn", &hostile.churn),
                ("hostile malformed", &hostile.malformed),
            ] {
                row(
                    name,
                    format!(
                        "{} clients, {} connects, {} refused, {} ended by the hub, close codes {:?}",
                        kind.clients,
                        kind.connects,
                        kind.refused,
                        kind.closed_by_hub,
                        kind.close_codes
                    ),
                );
            }
        }
        row(
            "dropped connections",
            format!("{} {:?}", self.dropped, self.endings),
        );
        if let Some(error) = &self.first_error {
            row("first error", error.clone());
        }
        for warning in &self.warnings {
            writeln!(out, "WARNING: {warning}").expect("writing to a String");
        }
        writeln!(
            out,
            "RESULT: {}",
            if self.ok { "ok" } else { "FAILED (see above)" }
        )
        .expect("writing to a String");
        out
    }

    /// The one-line JSON form.
    pub fn json_line(&self) -> String {
        // Plain data with string keys: serializing cannot fail.
        serde_json::to_string(self).expect("the report serializes")
    }
}
