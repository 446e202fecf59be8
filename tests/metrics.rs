//! `GET /metrics` read by a real Prometheus text parser while the hub works: the values move with what the
//! hub does (a connection, publishes by namespace, a 1009 close), label sets stay bounded, and
//! `server.metrics_listen` serves the same on a second address.

mod common;

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use common::upstream::{Mode, Upstream};
use common::{TestHub, eventually, free_port, post_json, request};

/// One scrape, parsed.
struct Scrape(prometheus_parse::Scrape);

impl Scrape {
    async fn from(url: &str) -> Scrape {
        let reply = request("GET", url, &[], None).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert!(
            reply
                .header("content-type")
                .is_some_and(|t| t.starts_with("text/plain")),
            "{:?}",
            reply.header("content-type")
        );
        let text = reply.text();
        let lines = text.lines().map(|l| Ok(l.to_string()));
        Scrape(prometheus_parse::Scrape::parse(lines).expect("the Prometheus text format"))
    }

    /// The value of the one sample named `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = self.0.samples.iter().filter(|s| {
            s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        });
        let sample = found.next()?;
        assert!(found.next().is_none(), "{name} {labels:?} is ambiguous");
        match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            ref other => panic!("{name}: not a number: {other:?}"),
        }
    }

    fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter_map(|s| s.labels.get(label).map(str::to_string))
            .collect()
    }
}

#[actix_web::test]
async fn metrics_move_as_the_hub_works() {
    let mut hub = TestHub::start("").await;
    let url = hub.http("/metrics");
    let before = Scrape::from(&url).await;
    assert_eq!(before.value("relayhub_connections", &[]), Some(0.0));
    assert_eq!(
        before.value(
            "relayhub_messages_published_total",
            &[("namespace", "chat")]
        ),
        Some(0.0)
    );
    assert_eq!(
        before.value("relayhub_disconnects_total", &[("code", "1009")]),
        Some(0.0)
    );

    let mut ws = hub.connect().await;
    ws.subscribe("chat:lobby").await;
    let scrape = Scrape::from(&url).await;
    assert_eq!(scrape.value("relayhub_connections", &[]), Some(1.0));
    assert_eq!(scrape.value("relayhub_subscriptions", &[]), Some(1.0));
    assert_eq!(scrape.value("relayhub_channels", &[]), Some(1.0));

    const N: u64 = 7;
    for i in 0..N {
        hub.publish("chat:lobby", json!({ "n": i })).await;
    }
    // Channels of namespaces without a table, whatever their names, share the label `other`.
    for i in 0..3 {
        hub.publish(&format!("stranger{i}:x"), json!(i)).await;
    }
    for _ in 0..N {
        ws.recv_type("message").await;
    }
    let scrape = Scrape::from(&url).await;
    assert_eq!(
        scrape.value(
            "relayhub_messages_published_total",
            &[("namespace", "chat")]
        ),
        Some(N as f64)
    );
    assert_eq!(
        scrape.value(
            "relayhub_messages_published_total",
            &[("namespace", "other")]
        ),
        Some(3.0)
    );
    assert_eq!(
        scrape.value(
            "relayhub_messages_delivered_total",
            &[("namespace", "chat")]
        ),
        Some(N as f64)
    );
    let namespaces = scrape.label_values("relayhub_messages_published_total", "namespace");
    assert!(
        namespaces.iter().all(|ns| !ns.starts_with("stranger")),
        "{namespaces:?}"
    );

    // A refused request is counted by its error code.
    ws.send(json!({"op": "subscribe", "id": 1, "channel": "bad channel!"}))
        .await;
    ws.recv_type("error").await;
    let scrape = Scrape::from(&url).await;
    assert_eq!(
        scrape.value(
            "relayhub_requests_rejected_total",
            &[("code", "invalid_channel")]
        ),
        Some(1.0)
    );

    // A message over websocket.max_message_bytes closes with 1009: the gauge falls, the close-code counter rises.
    ws.stream
        .send(Message::text("x".repeat(70 * 1024)))
        .await
        .expect("send");
    assert_eq!(common::close_code(&mut ws).await, 1009);
    eventually(Duration::from_secs(10), "the 1009 close counted", || {
        let url = url.clone();
        async move {
            let scrape = Scrape::from(&url).await;
            scrape.value("relayhub_disconnects_total", &[("code", "1009")]) == Some(1.0)
                && scrape.value("relayhub_connections", &[]) == Some(0.0)
        }
    })
    .await;
    let scrape = Scrape::from(&url).await;
    assert_eq!(
        scrape.value("relayhub_frames_too_big_total", &[]),
        Some(1.0)
    );
    assert_eq!(scrape.value("relayhub_up", &[]), Some(1.0));
    assert_eq!(
        scrape.value("relayhub_info", &[("mode", "memory")]),
        Some(1.0)
    );
    hub.shutdown().await;
}

#[actix_web::test]
async fn metrics_listen_serves_metrics_on_a_second_address() {
    let port = free_port();
    let mut hub = TestHub::start(&format!(
        "[server]\nmetrics_listen = \"127.0.0.1:{port}\"\n"
    ))
    .await;
    hub.publish("chat:a", json!(1)).await;
    let url = format!("http://127.0.0.1:{port}/metrics");
    let scrape = Scrape::from(&url).await;
    assert_eq!(
        scrape.value(
            "relayhub_messages_published_total",
            &[("namespace", "chat")]
        ),
        Some(1.0)
    );
    // Only the metrics are there: the API stays on the main port.
    let reply = request(
        "GET",
        &format!("http://127.0.0.1:{port}/api/stats"),
        &[],
        None,
    )
    .await;
    assert_eq!(reply.status, 404);
    hub.shutdown().await;
    // The second listener stops with the hub.
    eventually(
        Duration::from_secs(10),
        "the metrics port released",
        || async move { std::net::TcpStream::connect(("127.0.0.1", port)).is_err() },
    )
    .await;
}

#[actix_web::test]
async fn polling_sources_report_fetches_durations_and_failures() {
    let upstream = Upstream::start();
    upstream.set_mode(Mode::Ok(json!({"price": 1})));
    let mut hub = TestHub::start(&format!(
        "[[sources]]\nname = \"ticker\"\nurl = \"{}\"\nchannel = \"ticker:{{symbol}}\"\n\
         interval = \"200ms\"\ntimeout = \"500ms\"\n",
        upstream.url("/ticker/{symbol}")
    ))
    .await;
    let (status, body) = post_json(
        &hub.http("/api/polling/start"),
        &json!({"source": "ticker", "params": {"symbol": "A"}}),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let url = hub.http("/metrics");
    let fetches = |result: &'static str| {
        let url = url.clone();
        async move {
            Scrape::from(&url)
                .await
                .value(
                    "relayhub_poller_fetches_total",
                    &[("source", "ticker"), ("result", result)],
                )
                .unwrap_or(0.0)
        }
    };
    eventually(Duration::from_secs(10), "a published fetch", || async {
        fetches("published").await >= 1.0
    })
    .await;
    upstream.set_mode(Mode::Status(500));
    eventually(Duration::from_secs(10), "two failures in a row", || {
        let url = url.clone();
        async move {
            Scrape::from(&url)
                .await
                .value(
                    "relayhub_poller_consecutive_failures",
                    &[("source", "ticker")],
                )
                .is_some_and(|n| n >= 2.0)
        }
    })
    .await;
    let scrape = Scrape::from(&url).await;
    let errors = scrape
        .value(
            "relayhub_poller_fetches_total",
            &[("source", "ticker"), ("result", "error")],
        )
        .expect("errors counted");
    assert!(errors >= 2.0, "{errors}");
    // The histogram saw every fetch.
    let observed = scrape.0.samples.iter().find_map(|s| match &s.value {
        prometheus_parse::Value::Histogram(buckets)
            if s.metric == "relayhub_poller_fetch_duration_seconds"
                && s.labels.get("source") == Some("ticker") =>
        {
            buckets.last().map(|b| b.count)
        }
        _ => None,
    });
    assert!(
        observed.is_some_and(|n| n >= 1.0 + errors),
        "{observed:?} {errors}"
    );
    upstream.set_mode(Mode::Ok(json!({"price": 2})));
    eventually(
        Duration::from_secs(10),
        "failures reset by a success",
        || {
            let url = url.clone();
            async move {
                Scrape::from(&url).await.value(
                    "relayhub_poller_consecutive_failures",
                    &[("source", "ticker")],
                ) == Some(0.0)
            }
        },
    )
    .await;
    hub.shutdown().await;
}

#[test]
fn a_bad_metrics_listen_is_a_config_error() {
    let config = relayhub::config::Config::from_toml("[server]\nmetrics_listen = \"nowhere\"\n")
        .expect("parses");
    let e = config.validate().unwrap_err().0;
    assert!(e.contains("server.metrics_listen"), "{e}");
}

/// The shipped Grafana dashboard queries only metrics the hub exports.
#[actix_web::test]
async fn the_grafana_dashboard_uses_exported_names() {
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana-dashboard.json"
    ))
    .expect("deploy/grafana-dashboard.json");
    let _: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let mut hub = TestHub::start(
        "[[sources]]\nname = \"feed\"\nurl = \"http://127.0.0.1:9/{id}\"\nchannel = \"feed:{id}\"\n",
    )
    .await;
    let scrape = Scrape::from(&hub.http("/metrics")).await;
    let exported: std::collections::HashSet<&str> =
        scrape.0.samples.iter().map(|s| s.metric.as_str()).collect();
    let mut used = dashboard
        .match_indices("relayhub_")
        .map(|(at, _)| {
            let rest = &dashboard[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect::<Vec<_>>();
    used.sort_unstable();
    used.dedup();
    assert!(used.len() > 10, "{used:?}");
    for name in used {
        // A histogram is exported as one family; the parser names its samples by the family.
        let family = name.strip_suffix("_bucket").unwrap_or(name);
        assert!(
            exported.contains(family),
            "the dashboard uses {name}, which /metrics does not export"
        );
    }
    hub.shutdown().await;
}

#[actix_web::test]
async fn cache_aside_subscribes_are_counted_per_source() {
    let upstream = Upstream::start();
    upstream.set_mode(Mode::Fixed(json!({"price": 1})));
    let hub = TestHub::start(&format!(
        "[[sources]]\nname = \"ticker\"\nurl = \"{}\"\nchannel = \"ticker:{{symbol}}\"\n\
         interval = \"1h\"\ntimeout = \"500ms\"\nauto_start = true\n",
        upstream.url("/ticker/{symbol}")
    ))
    .await;
    let url = hub.http("/metrics");
    // The first subscriber finds nothing cached: a miss, and the fetch it causes fills the cache.
    let mut first = hub.connect().await;
    first.subscribe("ticker:C").await;
    first.recv_type("snapshot").await;
    // Three more find the value (one in another registry's view is still a read of the same cache).
    for _ in 0..3 {
        let mut ws = hub.connect().await;
        ws.subscribe("ticker:C").await;
        ws.recv_type("snapshot").await;
    }
    // A channel of no source is not counted under any.
    let mut other = hub.connect().await;
    other.subscribe("chat:x").await;
    let scrape = Scrape::from(&url).await;
    let reads = |result| {
        scrape.value(
            "relayhub_poller_cache_reads_total",
            &[("source", "ticker"), ("result", result)],
        )
    };
    assert_eq!(reads("miss"), Some(1.0));
    assert_eq!(reads("hit"), Some(3.0));
    let (status, body) = common::get_json(&hub.http("/api/polling/status")).await;
    assert_eq!(status, 200, "{body}");
    let job = &body["jobs"][0];
    assert_eq!(job["cache_hits"], 3, "{body}");
    assert_eq!(job["cache_misses"], 1, "{body}");
}
