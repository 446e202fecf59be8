//! Drop-in endpoints (`[[endpoints]]`) as an existing front end uses them: it opens a path, sends nothing and
//! reads raw values, against a real Redis fed by outside producers (an ingest route's stream job, a worker's
//! counters read by a Redis-key source), with real WebSocket clients; and the config errors an operator sees.

mod common;

use std::time::Duration;

use deadpool_redis::redis;
use futures_util::SinkExt;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::Message;

use common::process::{ConfigFile, Process, relayhub};
use common::{RedisServer, TestHub, Ws, close_code, eventually, get_json, post_json, wait_ready};

/// A hub on its own Redis (required), with `rest` of the config, once it is ready.
async fn hub_on(redis: &RedisServer, rest: &str) -> TestHub {
    let url = redis.url();
    let hub = TestHub::start(&format!(
        "[redis]\nurl = \"{url}\"\nrequired = true\n{rest}"
    ))
    .await;
    wait_ready(&hub).await;
    hub
}

fn ws_url(hub: &TestHub, path: &str) -> String {
    format!("ws://{}{path}", hub.addr)
}

/// The stream job: its own key set, then the update published, in one transaction.
async fn produce(conn: &mut redis::aio::MultiplexedConnection, symbol: &str, price: f64) {
    let update = json!({"symbol": symbol, "price": price}).to_string();
    let _: () = redis::pipe()
        .atomic()
        .set(format!("price:{symbol}"), &update)
        .ignore()
        .publish("crypto:updates", &update)
        .ignore()
        .query_async(conn)
        .await
        .unwrap();
}

const PRICES: &str = r#"
[namespaces.crypto]
patterns = true

[[ingest]]
redis_channel = "crypto:updates"
channel = "crypto:{symbol}"
cache = true

[[endpoints]]
path = "/ws/prices/{symbol}"
channel = "crypto:{symbol}"
alias = { ALL = "*" }
format = "raw"
snapshot = true

[[endpoints]]
path = "/v2/prices/{symbol}"
channel = "crypto:{symbol}"
format = "envelope"
snapshot = true
"#;

#[actix_web::test]
async fn price_endpoints_push_raw_values_with_the_snapshot_first() {
    let redis = RedisServer::start();
    let hub = hub_on(&redis, PRICES).await;
    let mut producer = redis.client().await;
    produce(&mut producer, "BTC", 64000.5).await;
    eventually(Duration::from_secs(5), "BTC cached", || async {
        get_json(&hub.http("/api/channels/crypto:BTC")).await.1["data"]["price"] == json!(64000.5)
    })
    .await;

    // The front ends connect and send nothing: the latest value comes first, as the data alone.
    let mut btc = Ws::connect(&ws_url(&hub, "/ws/prices/BTC")).await;
    assert_eq!(btc.recv().await, json!({"symbol": "BTC", "price": 64000.5}));
    let mut all = Ws::connect(&ws_url(&hub, "/ws/prices/ALL")).await;
    assert_eq!(all.recv().await, json!({"symbol": "BTC", "price": 64000.5}));
    // The same channel in relayhub's own frames.
    let mut enveloped = Ws::connect(&ws_url(&hub, "/v2/prices/BTC")).await;
    assert_eq!(
        enveloped.recv_type("subscribed").await["channel"],
        "crypto:BTC"
    );
    let snapshot = enveloped.recv_type("snapshot").await;
    assert_eq!(snapshot["data"]["price"], json!(64000.5));

    produce(&mut producer, "ETH", 3150.2).await;
    produce(&mut producer, "BTC", 64001.0).await;
    assert_eq!(btc.recv().await, json!({"symbol": "BTC", "price": 64001.0}));
    assert_eq!(all.recv().await, json!({"symbol": "ETH", "price": 3150.2}));
    assert_eq!(all.recv().await, json!({"symbol": "BTC", "price": 64001.0}));
    let message = enveloped.recv_type("message").await;
    assert_eq!(
        (message["channel"].clone(), message["data"]["price"].clone()),
        (json!("crypto:BTC"), json!(64001.0))
    );
    // A message published through the API reaches the raw front ends as its data too.
    hub.publish("crypto:BTC", json!({"symbol": "BTC", "price": 1.5}))
        .await;
    assert_eq!(btc.recv().await["price"], json!(1.5));
    assert_eq!(all.recv().await["price"], json!(1.5));

    // Paths no endpoint matches are 404, as before; a `*` in a captured value makes no pattern.
    for path in ["/ws/prices", "/ws/prices/BTC/x", "/ws/prices/*", "/nope/x"] {
        let refused = tokio_tungstenite::connect_async(ws_url(&hub, path)).await;
        match refused {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 404, "{path}")
            }
            other => panic!("{path}: expected a 404, got {other:?}"),
        }
    }
}

#[actix_web::test]
async fn a_worker_stats_endpoint_pushes_each_change_and_ignores_what_the_client_sends() {
    let redis = RedisServer::start();
    let config = r#"
[[sources]]
name = "worker-stats"
kind = "redis"
channel = "stats:worker"
interval = "100ms"
[sources.fields]
total_messages = "GET total_messages"
queue_depth = "LLEN pending_messages"

[[endpoints]]
path = "/ws/stats"
channel = "stats:worker"
"#;
    let hub = hub_on(&redis, config).await;
    let mut front = Ws::connect(&ws_url(&hub, "/ws/stats")).await;
    eventually(
        Duration::from_secs(5),
        "the endpoint subscribed",
        || async { hub.stats().await["subscriptions"].as_u64() == Some(1) },
    )
    .await;
    let (status, started) = post_json(
        &hub.http("/api/polling/start"),
        &json!({"source": "worker-stats"}),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{started}");
    assert_eq!(
        front.recv().await,
        json!({"total_messages": null, "queue_depth": 0})
    );

    // What the old front end sends (a protocol request, junk, a binary frame) is read and dropped.
    front
        .send(json!({"op": "subscribe", "channel": "stats:other"}))
        .await;
    front.send_text("hello?").await;
    front
        .stream
        .send(Message::binary(vec![1u8, 2, 3]))
        .await
        .unwrap();

    let mut worker = redis.client().await;
    let _: () = redis::pipe()
        .atomic()
        .set("total_messages", 12)
        .rpush("pending_messages", "job-1")
        .query_async(&mut worker)
        .await
        .unwrap();
    // The next frame is the update itself: no answer to anything the client sent.
    assert_eq!(
        front.recv().await,
        json!({"total_messages": 12, "queue_depth": 1})
    );
    let stats = hub.stats().await;
    assert_eq!(stats["endpoint_frames_ignored"], 3, "{stats}");
    assert_eq!(stats["subscriptions"], 1, "{stats}");
    let text = common::request("GET", &hub.http("/metrics"), &[], None)
        .await
        .text();
    assert!(
        text.contains("relayhub_endpoint_frames_ignored_total 3"),
        "{text}"
    );

    // A protocol error still closes the connection: an unmasked client frame.
    let MaybeTlsStream::Plain(tcp) = front.stream.get_mut() else {
        panic!("plain TCP");
    };
    tcp.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
    assert_eq!(close_code(&mut front).await, 1002);
}

#[actix_web::test]
async fn endpoints_keep_the_rules_of_ws() {
    // A namespace closed to anonymous connections: a front end without a token is refused with the reason.
    let config = r#"
[auth]
jwt_hs256_secret = "0123456789abcdef0123456789abcdef"

[namespaces.team]
anonymous = false

[[endpoints]]
path = "/ws/team/{room}"
channel = "team:{room}"
"#;
    let hub = TestHub::start(config).await;
    let mut refused = Ws::connect(&ws_url(&hub, "/ws/team/a")).await;
    let frame = refused.expect_close().await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1008);
    // A bad connection token is refused at the upgrade, as on /ws.
    let bad = tokio_tungstenite::connect_async(ws_url(&hub, "/ws/team/a?token=nope")).await;
    match bad {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401)
        }
        other => panic!("expected a 401, got {other:?}"),
    }
    // Origins are checked on endpoint paths too; `snapshot` is off unless asked for.
    let hub = TestHub::start(
        "[server]\nallowed_origins = [\"https://ok.example\"]\n[[endpoints]]\npath = \"/ws/feed\"\nchannel = \"feed\"\n",
    )
    .await;
    hub.publish("feed", json!("before")).await;
    let foreign = Ws::connect_with_origin(&ws_url(&hub, "/ws/feed"), "https://evil.example").await;
    assert!(foreign.is_err(), "a foreign origin must be refused");
    let mut ok = Ws::connect_with_origin(&ws_url(&hub, "/ws/feed"), "https://ok.example")
        .await
        .expect("an allowed origin connects");
    eventually(
        Duration::from_secs(5),
        "the endpoint subscribed",
        || async { hub.stats().await["subscriptions"].as_u64() == Some(1) },
    )
    .await;
    hub.publish("feed", json!([1, 2])).await;
    // The first frame is the new message, not the value published before the connection.
    assert_eq!(ok.recv().await, json!([1, 2]));
}

#[test]
fn bad_endpoints_exit_2_and_name_the_key() {
    let cases = [
        ("path = \"/ws\"\nchannel = \"a\"", "endpoints[0].path"),
        (
            "path = \"/api/prices/{s}\"\nchannel = \"a:{s}\"",
            "endpoints[0].path",
        ),
        ("path = \"/sse\"\nchannel = \"a\"", "endpoints[0].path"),
        ("path = \"/health\"\nchannel = \"a\"", "endpoints[0].path"),
        (
            "path = \"/relayhub.js\"\nchannel = \"a\"",
            "endpoints[0].path",
        ),
        ("path = \"/ws/{s\"\nchannel = \"a\"", "endpoints[0].path"),
        (
            "path = \"/ws/p/{s}\"\nchannel = \"a:{symbol}\"",
            "endpoints[0].channel",
        ),
        (
            "path = \"/ws/p/{s}\"\nchannel = \"a:{s}\"\nformat = \"json\"",
            "endpoints[0].format",
        ),
    ];
    for (table, key) in cases {
        let text = format!("[[endpoints]]\n{table}\n");
        let file = ConfigFile::new(&text);
        let mut process = Process::spawn(relayhub(&["check-config", "--config", file.path()], &[]));
        let code = process.exit_code();
        let output = process.output();
        assert_eq!(code, 2, "{text:?}:\n{output}");
        assert!(
            output.contains(key),
            "{text:?} must name `{key}`:\n{output}"
        );
    }
    let good = ConfigFile::new(
        "[[endpoints]]\npath = \"/ws/prices/{symbol}\"\nchannel = \"crypto:{symbol}\"\nalias = { ALL = \"*\" }\n",
    );
    let mut process = Process::spawn(relayhub(&["check-config", "--config", good.path()], &[]));
    assert_eq!(process.exit_code(), 0, "{}", process.output());
}

#[actix_web::test]
async fn a_raw_client_that_stops_reading_is_dropped_as_a_slow_consumer() {
    let hub = TestHub::start(
        "[websocket]\nmax_message_bytes = 300000\nmax_queued_bytes = 400000\nwrite_timeout = \"30s\"\n\
         [[endpoints]]\npath = \"/ws/feed\"\nchannel = \"feed\"\n",
    )
    .await;
    // Connected, then never read from again.
    let _stuck = Ws::connect(&ws_url(&hub, "/ws/feed")).await;
    eventually(
        Duration::from_secs(5),
        "the endpoint subscribed",
        || async { hub.stats().await["subscriptions"].as_u64() == Some(1) },
    )
    .await;
    let text = "s".repeat(100_000);
    let mut published = 0;
    while published < 400 && hub.stats().await["slow_consumer_disconnects"] != 1 {
        hub.publish("feed", json!({ "text": text })).await;
        published += 1;
    }
    let stats = hub.stats().await;
    assert_eq!(
        stats["slow_consumer_disconnects"], 1,
        "after {published}: {stats}"
    );
    assert_eq!(stats["subscriptions"], 0, "{stats}");
}

#[actix_web::test]
async fn an_endpoint_path_asked_for_as_an_event_stream_streams_its_channel() {
    let hub = TestHub::start(
        "[namespaces.crypto]\npatterns = true\n[[endpoints]]\npath = \"/ws/prices/{symbol}\"\n\
         channel = \"crypto:{symbol}\"\nalias = { ALL = \"*\" }\nsnapshot = true\n",
    )
    .await;
    hub.publish("crypto:BTC", json!({"price": 1})).await;
    let accept = [("Accept", "text/event-stream")];
    let mut btc = common::sse::Stream::open(&hub.http("/ws/prices/BTC"), &accept)
        .await
        .expect("a stream");
    btc.subscribed(&["crypto:BTC"]).await;
    let snapshot = btc.event().await;
    assert_eq!(snapshot.event.as_deref(), Some("snapshot"));
    assert_eq!(snapshot.data["data"], json!({"price": 1}));
    let mut all = common::sse::Stream::open(&hub.http("/ws/prices/ALL"), &accept)
        .await
        .expect("a stream");
    all.subscribed(&["crypto:*"]).await;
    assert_eq!(all.event().await.data["channel"], "crypto:BTC");
    hub.publish("crypto:ETH", json!({"price": 2})).await;
    hub.publish("crypto:BTC", json!({"price": 3})).await;
    assert_eq!(btc.event().await.data["data"], json!({"price": 3}));
    assert_eq!(all.event().await.data["channel"], "crypto:ETH");
    assert_eq!(all.event().await.data["data"], json!({"price": 3}));
    // The path names its channel; without the Accept header, or on no endpoint, it is the 404 it was.
    let named = common::sse::Stream::open(&hub.http("/ws/prices/BTC?channel=x"), &accept).await;
    assert_eq!(named.err().map(|(status, _)| status), Some(400));
    for (path, headers) in [("/ws/prices/BTC", &[][..]), ("/nope/x", &accept[..])] {
        let reply = common::request("GET", &hub.http(path), headers, None).await;
        assert_eq!(reply.status, 404, "{path}");
    }
}
