//! The WebSocket protocol against a real hub on port 0 with real clients (memory mode).

mod common;

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use common::{TestHub, Ws, close_code, eventually};

#[actix_web::test]
async fn subscribe_receive_unsubscribe() {
    let hub = TestHub::start("").await;
    let mut ws = hub.connect().await;
    ws.send(json!({"op": "subscribe", "channel": "prices:BTC", "id": 1}))
        .await;
    let ack = ws.recv().await;
    let epoch = ack["epoch"].as_str().expect("subscribed names the epoch");
    assert!(!epoch.is_empty());
    assert_eq!(
        ack,
        json!({"type": "subscribed", "id": 1, "channel": "prices:BTC", "epoch": epoch, "seq": 0})
    );

    let published = hub
        .publish("prices:BTC", json!({"price": 64000.5, "tags": ["a", null]}))
        .await;
    assert_eq!(published["seq"], 1);
    let msg = ws.recv_type("message").await;
    assert_eq!(msg["channel"], "prices:BTC");
    assert_eq!(msg["data"], json!({"price": 64000.5, "tags": ["a", null]}));
    assert_eq!(msg["seq"], 1);
    assert!(chrono::DateTime::parse_from_rfc3339(msg["ts"].as_str().unwrap()).is_ok());

    ws.send(json!({"op": "unsubscribe", "channel": "prices:BTC", "id": "u"}))
        .await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "unsubscribed", "id": "u", "channel": "prices:BTC"})
    );
    // After unsubscribing, a BTC publish must not arrive: the next frame is the barrier channel's message.
    ws.subscribe("prices:ETH").await;
    hub.publish("prices:BTC", json!(2)).await;
    hub.publish("prices:ETH", json!(3)).await;
    let next = ws.recv_type("message").await;
    assert_eq!(next["channel"], "prices:ETH");
}

#[actix_web::test]
async fn one_publish_reaches_500_clients_exactly_once() {
    let hub = TestHub::start("").await;
    let mut clients = Vec::new();
    for _ in 0..500 {
        let mut ws = hub.connect().await;
        ws.subscribe("fanout:one").await;
        clients.push(ws);
    }
    eventually(
        Duration::from_secs(10),
        "500 subscribers registered",
        || async { hub.stats().await["subscribers"]["fanout:one"] == 500 },
    )
    .await;
    let out = hub.publish("fanout:one", json!({"n": 1})).await;
    assert_eq!(out["delivered"], 500);
    hub.publish("fanout:one", json!({"n": 2})).await;
    for ws in &mut clients {
        // Exactly once: the first message is n=1, the very next one is n=2 (no duplicate in between).
        let first = ws.recv_type("message").await;
        assert_eq!(first["data"]["n"], 1);
        let second = ws.recv_type("message").await;
        assert_eq!(second["data"]["n"], 2);
    }
}

#[actix_web::test]
async fn snapshot_follows_subscribed() {
    let hub = TestHub::start("").await;
    hub.publish("prices:SOL", json!({"p": 1})).await;
    hub.publish("prices:SOL", json!({"p": 2})).await;
    let mut ws = hub.connect().await;
    ws.send(json!({"op": "subscribe", "channel": "prices:SOL", "id": 7}))
        .await;
    ws.recv_type("subscribed").await;
    let snapshot = ws.recv_type("snapshot").await;
    assert_eq!(snapshot["data"], json!({"p": 2}));
    assert_eq!(snapshot["seq"], 2);
    hub.publish("prices:SOL", json!({"p": 3})).await;
    let msg = ws.recv_type("message").await;
    assert_eq!(
        (msg["seq"].clone(), msg["data"]["p"].clone()),
        (json!(3), json!(3))
    );
    // A second client on the same worker's registry gets the snapshot from the local latest value.
    let mut other = hub.connect().await;
    other.subscribe("prices:SOL").await;
    assert_eq!(other.recv_type("snapshot").await["seq"], 3);
}

#[actix_web::test]
async fn client_publish_follows_the_namespace() {
    let hub = TestHub::start("").await;
    let mut reader = hub.connect().await;
    reader.subscribe("chat:lobby").await;
    let mut writer = hub.connect().await;
    writer
        .send(json!({"op": "publish", "channel": "chat:lobby", "data": {"text": "hi"}, "id": 3}))
        .await;
    let ack = writer.recv_type("published").await;
    assert_eq!(
        (ack["id"].clone(), ack["seq"].clone()),
        (json!(3), json!(1))
    );
    assert_eq!(
        reader.recv_type("message").await["data"],
        json!({"text": "hi"})
    );

    writer
        .send(json!({"op": "publish", "channel": "prices:BTC", "data": 1, "id": 4}))
        .await;
    let err = writer.recv_type("error").await;
    assert_eq!(
        (err["code"].clone(), err["id"].clone()),
        (json!("forbidden"), json!(4))
    );
    writer.ping().await;
}

#[actix_web::test]
async fn a_channel_without_a_colon_is_in_the_namespace_of_its_whole_name() {
    let hub = TestHub::start(
        "[channels]\nstrict_namespaces = true\nhistory_size = 3\n[namespaces.news]\nclient_publish = true\nhistory_size = 1\n",
    )
    .await;
    let mut reader = hub.connect().await;
    reader.subscribe("news").await;
    let mut writer = hub.connect().await;
    for n in 1..=3 {
        writer
            .send(json!({"op": "publish", "channel": "news", "data": n, "id": n}))
            .await;
        assert_eq!(writer.recv_type("published").await["id"], n);
        assert_eq!(reader.recv_type("message").await["data"], n);
    }
    // `[namespaces.news]` set the history of `news` itself to one message.
    let (status, history) =
        common::get_json(&hub.http("/api/channels/news/history?limit=10")).await;
    assert_eq!(status, 200, "{history}");
    assert_eq!(
        history["items"],
        json!([{"data": 3, "seq": 3, "ts": history["items"][0]["ts"]}])
    );
    // `news:sports` is in the same namespace; `predictions` has no table and strict namespaces refuse it.
    writer.subscribe("news:sports").await;
    writer
        .send(json!({"op": "subscribe", "channel": "predictions", "id": "p"}))
        .await;
    let err = writer.recv_type("error").await;
    assert_eq!(
        (err["code"].clone(), err["id"].clone()),
        (json!("invalid_channel"), json!("p"))
    );
}

#[actix_web::test]
async fn bad_input_gets_an_error_and_the_connection_survives() {
    let hub = TestHub::start("[websocket]\nmax_subscriptions_per_connection = 2\n[channels]\nstrict_namespaces = true\n[namespaces.ok]\n").await;
    let mut ws = hub.connect().await;
    let cases: &[(&str, &str)] = &[
        ("not json at all", "bad_request"),
        ("[1,2,3]", "bad_request"),
        ("\"just a string\"", "bad_request"),
        (r#"{"channel":"ok:a"}"#, "bad_request"),
        (r#"{"op":42}"#, "bad_request"),
        (r#"{"op":"subscribe"}"#, "bad_request"),
        (r#"{"op":"subscribe","channel":["x"]}"#, "bad_request"),
        (r#"{"op":"publish","channel":"ok:a"}"#, "bad_request"),
        (
            r#"{"op":"subscribe","channel":"ok:a","id":{"nested":1}}"#,
            "bad_request",
        ),
        (r#"{"op":"teleport","id":5}"#, "unknown_op"),
        (
            r#"{"op":"subscribe","channel":"has space"}"#,
            "invalid_channel",
        ),
        (r#"{"op":"subscribe","channel":""}"#, "invalid_channel"),
        (
            r#"{"op":"subscribe","channel":"nope:a"}"#,
            "invalid_channel",
        ),
        (r#"{"op":"subscribe","channel":"ok:*"}"#, "forbidden"),
        (
            r#"{"op":"unsubscribe","channel":"ok:never"}"#,
            "not_subscribed",
        ),
    ];
    for (frame, code) in cases {
        ws.send_text(frame).await;
        let err = ws.recv_type("error").await;
        assert_eq!(err["code"], *code, "frame {frame} gave {err}");
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
        ws.ping().await;
    }
    let long = format!(r#"{{"op":"subscribe","channel":"ok:{}"}}"#, "x".repeat(200));
    ws.send_text(&long).await;
    assert_eq!(ws.recv_type("error").await["code"], "invalid_channel");

    // Binary frames are refused with bad_request, not a disconnect.
    ws.stream
        .send(Message::binary(vec![1u8, 2, 3]))
        .await
        .unwrap();
    assert_eq!(ws.recv_type("error").await["code"], "bad_request");
    ws.ping().await;

    ws.subscribe("ok:1").await;
    ws.subscribe("ok:2").await;
    ws.send(json!({"op": "subscribe", "channel": "ok:3", "id": 9}))
        .await;
    let err = ws.recv_type("error").await;
    assert_eq!(
        (err["code"].clone(), err["id"].clone()),
        (json!("too_many_subscriptions"), json!(9))
    );
    // The refused subscription was not half-made: publishing to it reaches nobody here.
    hub.publish("ok:3", json!(1)).await;
    hub.publish("ok:1", json!(2)).await;
    assert_eq!(ws.recv_type("message").await["channel"], "ok:1");
    assert_eq!(hub.stats().await["subscriptions_refused"], 1);
}

#[actix_web::test]
async fn oversized_frame_closes_with_1009() {
    let hub = TestHub::start("[websocket]\nmax_message_bytes = 1024\n").await;
    let mut ws = hub.connect().await;
    ws.ping().await;
    let big = format!(
        r#"{{"op":"publish","channel":"chat:x","data":"{}"}}"#,
        "a".repeat(2000)
    );
    ws.send_text(&big).await;
    assert_eq!(close_code(&mut ws).await, 1009);
    // Nothing of it was published.
    let (status, _) = common::get_json(&hub.http("/api/channels/chat:x")).await;
    assert_eq!(status, 404);
}

/// A client that completes the handshake and then never reads or answers anything: raw TCP, so no library
/// answers pings on its behalf. Returns the close code the server sent, read after the fact.
async fn silent_client_close_code(addr: std::net::SocketAddr, silence: Duration) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    tokio::time::sleep(silence).await;
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut bytes)).await;
    let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    assert!(bytes.starts_with(b"HTTP/1.1 101"), "handshake accepted");
    // Walk the server's (unmasked) frames to the close frame.
    let mut i = head_end;
    while i + 2 <= bytes.len() {
        let opcode = bytes[i] & 0x0f;
        let mut len = (bytes[i + 1] & 0x7f) as usize;
        i += 2;
        if len == 126 {
            len = u16::from_be_bytes([bytes[i], bytes[i + 1]]) as usize;
            i += 2;
        }
        if opcode == 0x8 {
            return Some(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        }
        i += len;
    }
    None
}

#[actix_web::test]
async fn silent_client_is_closed_by_the_heartbeat() {
    let hub =
        TestHub::start("[websocket]\nheartbeat_interval = \"100ms\"\nclient_timeout = \"400ms\"\n")
            .await;
    let addr = hub.addr;
    let silent = tokio::spawn(silent_client_close_code(addr, Duration::from_millis(1200)));
    // A client that keeps reading (tungstenite answers the server's pings) outlives the timeout.
    let mut lively = hub.connect().await;
    let until = tokio::time::Instant::now() + Duration::from_millis(1200);
    while tokio::time::Instant::now() < until {
        lively.ping().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(silent.await.unwrap(), Some(1008));
    lively.ping().await;
    assert_eq!(hub.stats().await["heartbeat_timeouts"], 1);
}

#[actix_web::test]
async fn origins_are_checked() {
    let hub = TestHub::start(
        "[server]\nallowed_origins = [\"https://app.example.com\", \"http://localhost:*\"]\n",
    )
    .await;
    let url = hub.ws_url();
    let err = Ws::connect_with_origin(&url, "https://evil.example.com")
        .await
        .err()
        .expect("refused");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(response) => assert_eq!(response.status(), 403),
        other => panic!("expected HTTP 403, got {other:?}"),
    }
    Ws::connect_with_origin(&url, "https://app.example.com")
        .await
        .unwrap()
        .ping()
        .await;
    Ws::connect_with_origin(&url, "http://localhost:5173")
        .await
        .unwrap()
        .ping()
        .await;
    hub.connect().await.ping().await; // no Origin: not a browser, allowed
}

#[actix_web::test]
async fn shutdown_sends_1001_and_ready_turns_503() {
    let mut hub = TestHub::start("").await;
    let mut ws = hub.connect().await;
    ws.subscribe("prices:X").await;
    let ready_url = hub.http("/ready");
    assert_eq!(common::get_json(&ready_url).await.0, 200);
    let running = hub.running.take().unwrap();
    let hub_handle = running.hub.clone();
    hub_handle.begin_shutdown();
    assert_eq!(common::get_json(&ready_url).await.0, 503);
    assert_eq!(close_code(&mut ws).await, 1001);
    let started = std::time::Instant::now();
    running.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "shutdown within shutdown_timeout"
    );
}

#[actix_web::test]
async fn shutdown_spreads_the_closes_over_the_drain_period_and_keeps_serving() {
    let mut hub =
        TestHub::start("[server]\ndrain_period = \"2s\"\nshutdown_timeout = \"6s\"\n").await;
    let mut clients = Vec::new();
    for _ in 0..40 {
        let mut ws = hub.connect().await;
        ws.ping().await;
        clients.push(ws);
    }
    let running = hub.running.take().unwrap();
    let started = std::time::Instant::now();
    let stopped = actix_web::rt::spawn(running.shutdown());
    // `/ready` turns 503 at once; the replica keeps serving its API while it drains, and refuses newcomers.
    eventually(Duration::from_millis(500), "/ready turns 503", || async {
        let (status, body) = common::get_json(&hub.http("/ready")).await;
        status == 503 && body["reason"] == "draining"
    })
    .await;
    assert_eq!(common::get_json(&hub.http("/health")).await.0, 200);
    match tokio_tungstenite::connect_async(hub.ws_url()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503)
        }
        other => panic!(
            "a draining replica took a new WebSocket: {:?}",
            other.map(|_| ())
        ),
    }
    let closes = futures_util::future::join_all(clients.into_iter().map(|mut ws| async move {
        let code = close_code(&mut ws).await;
        (code, started.elapsed())
    }))
    .await;
    assert!(closes.iter().all(|(code, _)| *code == 1001), "{closes:?}");
    let first = closes.iter().map(|(_, at)| *at).min().unwrap();
    let last = closes.iter().map(|(_, at)| *at).max().unwrap();
    // Spread over the 2 s, not all in one instant.
    assert!(
        last - first >= Duration::from_millis(1200) && last <= Duration::from_millis(3000),
        "closes from {first:?} to {last:?}"
    );
    stopped.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "shutdown within shutdown_timeout"
    );
}

#[actix_web::test]
async fn a_client_that_never_reads_is_dropped_and_others_keep_up() {
    let hub = TestHub::start("[websocket]\nmailbox_size = 16\n[server]\nworkers = 1\n").await;
    let mut stuck = hub.connect().await;
    stuck.subscribe("feed:x").await;
    let mut healthy = hub.connect().await;
    healthy.subscribe("feed:x").await;
    let payload = json!({"pad": "p".repeat(32 * 1024)});
    let handle = hub.hub().clone();
    let data = payload.to_string();
    // The healthy client reads each message before the next is published; the stuck one never reads, so its
    // socket buffers fill, its session stops being polled and its bounded mailbox overflows.
    for i in 1..=600 {
        handle.publish("feed:x", &data).await.unwrap();
        // Subscribed means live: even the first one arrives as a message, not as a snapshot.
        assert_eq!(healthy.recv_type("message").await["seq"], i);
    }
    eventually(
        Duration::from_secs(10),
        "the slow consumer is dropped",
        || async { hub.stats().await["slow_consumer_disconnects"].as_u64() >= Some(1) },
    )
    .await;
    let stats = hub.stats().await;
    assert_eq!(stats["subscribers"]["feed:x"], 1, "{stats}");
    healthy.ping().await;
    // When the stuck client finally reads, it finds a policy close after what was queued.
    assert_eq!(close_code(&mut stuck).await, 1008);
}

#[actix_web::test]
async fn messages_published_while_a_subscription_starts_are_not_lost() {
    let hub = TestHub::start("").await;
    for round in 0..20 {
        let channel = format!("chat:race{round}");
        let mut ws = hub.connect().await;
        // Subscribe and publish back to back, without waiting for the acknowledgement.
        ws.send(json!({"op": "subscribe", "channel": channel}))
            .await;
        ws.send(json!({"op": "publish", "channel": channel, "data": {"n": 1}}))
            .await;
        ws.send(json!({"op": "publish", "channel": channel, "data": {"n": 2}}))
            .await;
        let mut seqs = Vec::new();
        while seqs.last() != Some(&2) {
            let frame = ws.recv().await;
            match frame["type"].as_str() {
                Some("message" | "snapshot") => seqs.push(frame["seq"].as_u64().unwrap()),
                Some("subscribed" | "published") => {}
                _ => panic!("unexpected {frame}"),
            }
        }
        // Each message exactly once, in order, whether it came as the snapshot or as a message.
        assert_eq!(seqs, [1, 2], "round {round}");
    }
}
