//! Server-Sent Events against real hubs, a real `redis-server` and a real HTTP client reading the stream:
//! events with every channel's position in their id, heartbeat comments, resuming with `Last-Event-ID`
//! (recovered, on another replica, and not recovered after a restart), and the bounds a WebSocket has.

mod common;

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use common::sse::Stream;
use common::{RedisServer, TestHub, wait_ready, wait_subscribers};

const CHANNELS: &str = "[channels]\nhistory_size = 100\n";

fn redis_config(redis: &RedisServer) -> String {
    format!(
        "[redis]\nurl = \"{}\"\nrequired = true\n{CHANNELS}",
        redis.url()
    )
}

async fn publish_range(hub: &TestHub, channel: &str, from: u64, n: u64) {
    for i in from..from + n {
        hub.publish(channel, json!({"i": i})).await;
    }
}

/// Reads `n` message events of `channel` numbered from `first`; returns the last id.
async fn expect_messages(stream: &mut Stream, channel: &str, first: u64, n: u64) -> String {
    let mut id = String::new();
    for k in 0..n {
        let event = stream.event().await;
        assert_eq!(event.event.as_deref(), Some("message"), "{event:?}");
        assert_eq!(event.data["channel"], channel, "{event:?}");
        assert_eq!(event.data["seq"], first + k, "{event:?}");
        assert_eq!(event.data["data"], json!({"i": first + k}), "{event:?}");
        id = event.id.expect("an id");
    }
    id
}

#[actix_web::test]
async fn events_carry_every_channel_position_and_heartbeats_keep_it_open() {
    let hub = TestHub::start(
        "[websocket]\nheartbeat_interval = \"300ms\"\nclient_timeout = \"5s\"\n[channels]\nhistory_size = 10\n",
    )
    .await;
    let mut stream = Stream::open(&hub.http("/sse?channel=feed:a&channel=feed%3Ab"), &[])
        .await
        .unwrap();
    assert_eq!(
        stream.next().await.unwrap().comment.as_deref(),
        Some("connected")
    );
    stream.subscribed(&["feed:a", "feed:b"]).await;
    hub.publish("feed:a", json!({"i": 1})).await;
    let first = stream.event().await;
    let id = first.id.clone().unwrap();
    let (epoch, rest) = id.split_once(':').unwrap();
    // Memory mode: one epoch for every channel; feed:b is at 0.
    assert_eq!(rest, format!("1,{epoch}:0"), "{first:?}");
    assert!(
        first.data["ts"].is_string(),
        "a message event carries channel, data, seq, ts: {first:?}"
    );
    hub.publish("feed:b", json!({"i": 1})).await;
    let second = stream.event().await;
    assert_eq!(second.data["channel"], "feed:b");
    assert_eq!(second.id.unwrap(), format!("{epoch}:1,{epoch}:1"));
    hub.publish("feed:a", json!({"i": 2})).await;
    assert_eq!(
        stream.event().await.id.unwrap(),
        format!("{epoch}:2,{epoch}:1")
    );
    // Nothing published: a heartbeat comment within a few intervals.
    let beat = tokio::time::timeout(Duration::from_secs(3), stream.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(beat.comment.as_deref(), Some("heartbeat"), "{beat:?}");
    let stats = hub.stats().await;
    assert_eq!(stats["sse_connections"], 1, "{stats}");
    assert_eq!(stats["sse_streams_opened"], 1, "{stats}");
    drop(stream);
    // The client left: the stream's subscriber is gone at the next beat.
    wait_subscribers(&hub, "feed:a", 0).await;
    common::eventually(
        Duration::from_secs(5),
        "sse_connections back to 0",
        || async { hub.stats().await["sse_connections"] == 0 },
    )
    .await;
}

/// A stream read up to seq 3 is dropped, 5 more are published, and it is opened again on `back` with the
/// last id: exactly the 5, in order, no snapshot.
async fn resumes_five(first: &TestHub, back: &TestHub, by_header: bool) {
    let mut stream = Stream::open(&first.http("/sse?channel=feed:r"), &[])
        .await
        .unwrap();
    stream.subscribed(&["feed:r"]).await;
    publish_range(first, "feed:r", 1, 3).await;
    let id = expect_messages(&mut stream, "feed:r", 1, 3).await;
    drop(stream);
    publish_range(back, "feed:r", 4, 5).await;
    let mut stream = if by_header {
        Stream::open(&back.http("/sse?channel=feed:r"), &[("Last-Event-ID", &id)]).await
    } else {
        let query = percent_encode(&id);
        let url = back.http(&format!("/sse?channel=feed:r&last_event_id={query}"));
        Stream::open(&url, &[]).await
    }
    .unwrap();
    let last = expect_messages(&mut stream, "feed:r", 4, 5).await;
    assert!(last.ends_with(":8"), "{last}");
    // Live after the replay, and nothing twice.
    publish_range(first, "feed:r", 9, 1).await;
    expect_messages(&mut stream, "feed:r", 9, 1).await;
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[actix_web::test]
async fn last_event_id_resumes_and_a_restarted_hub_says_not_recovered() {
    let mut hub = TestHub::start(CHANNELS).await;
    resumes_five(&hub, &hub, true).await;
    let mut stream = Stream::open(&hub.http("/sse?channel=feed:r"), &[])
        .await
        .unwrap();
    let snapshot = stream.event().await;
    assert_eq!(snapshot.event.as_deref(), Some("snapshot"), "{snapshot:?}");
    let id = snapshot.id.unwrap();
    drop(stream);
    // A memory hub restarted: its history is gone, under a new epoch.
    hub.kill().await;
    let hub = TestHub::start(CHANNELS).await;
    hub.publish("feed:r", json!({"after": 1})).await;
    let mut stream = Stream::open(&hub.http("/sse?channel=feed:r"), &[("Last-Event-ID", &id)])
        .await
        .unwrap();
    let snapshot = stream.event().await;
    assert_eq!(snapshot.event.as_deref(), Some("snapshot"), "{snapshot:?}");
    assert_eq!(snapshot.data["recovered"], false, "{snapshot:?}");
    assert_eq!(snapshot.data["seq"], 1, "{snapshot:?}");
    assert_ne!(snapshot.id.unwrap(), id);
    let stats = hub.stats().await;
    assert_eq!(stats["subscribes_unrecovered"], 1, "{stats}");
}

#[actix_web::test]
async fn a_stream_resumes_on_another_replica() {
    let redis = RedisServer::start();
    let a = TestHub::start(&redis_config(&redis)).await;
    let b = TestHub::start(&redis_config(&redis)).await;
    wait_ready(&a).await;
    wait_ready(&b).await;
    resumes_five(&a, &b, false).await;
    assert_eq!(b.stats().await["subscribes_recovered"], 1);
}

#[actix_web::test]
async fn streams_have_the_bounds_of_websockets() {
    let hub = TestHub::start(
        "[server]\nmax_connections_per_ip = 2\nallowed_origins = [\"https://app.example\"]\n\
         [websocket]\nheartbeat_interval = \"300ms\"\nmax_subscriptions_per_connection = 2\nmax_message_bytes = 65536\nmax_queued_bytes = 65536\n\
         [namespaces.closed]\npatterns = false\n",
    )
    .await;
    let refused = |r: Result<Stream, (u16, Value)>| r.err().expect("refused");
    let (status, body) =
        refused(Stream::open(&hub.http("/sse?channel=a&channel=b&channel=c"), &[]).await);
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("too_many_subscriptions"))
    );
    let (status, body) = refused(Stream::open(&hub.http("/sse"), &[]).await);
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("bad_request")),
        "{body}"
    );
    let (status, _) = refused(Stream::open(&hub.http("/sse?channel=closed:*"), &[]).await);
    assert_eq!(status, 403);
    let (status, _) = refused(
        Stream::open(
            &hub.http("/sse?channel=a"),
            &[("Last-Event-ID", "nonsense")],
        )
        .await,
    );
    assert_eq!(status, 400);
    let (status, _) = refused(
        Stream::open(
            &hub.http("/sse?channel=a"),
            &[("Origin", "https://evil.example")],
        )
        .await,
    );
    assert_eq!(status, 403);
    let allowed = Stream::open(
        &hub.http("/sse?channel=a"),
        &[("Origin", "https://app.example")],
    )
    .await
    .unwrap();
    assert_eq!(
        allowed
            .response
            .headers()
            .get("access-control-allow-origin")
            .unwrap(),
        "https://app.example"
    );
    // A stream that never reads: a raw socket that sends its request and then only waits.
    let mut slow = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    slow.write_all(b"GET /sse?channel=big:x HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    wait_subscribers(&hub, "big:x", 1).await;
    // The per-address budget (2) is spent by the two open streams, WebSockets included.
    let (status, body) = refused(Stream::open(&hub.http("/sse?channel=a"), &[]).await);
    assert_eq!(
        (status, &body["error"]["code"]),
        (503, &json!("too_many_connections"))
    );
    let big = "x".repeat(60_000);
    let mut published = 0;
    while published < 400 && hub.stats().await["slow_consumer_disconnects"] == 0 {
        hub.publish("big:x", json!(big)).await;
        published += 1;
    }
    let stats = hub.stats().await;
    assert_eq!(
        stats["slow_consumer_disconnects"], 1,
        "after {published}: {stats}"
    );
    wait_subscribers(&hub, "big:x", 0).await;
    drop(slow);
    drop(allowed);
    common::eventually(
        Duration::from_secs(10),
        "the budget is given back",
        || async { hub.stats().await["sse_connections"] == 0 },
    )
    .await;
    assert!(Stream::open(&hub.http("/sse?channel=a"), &[]).await.is_ok());
}

#[actix_web::test]
async fn a_shutdown_ends_every_stream_so_browsers_reconnect_elsewhere() {
    let mut hub = TestHub::start("").await;
    let mut stream = Stream::open(&hub.http("/sse?channel=feed:d"), &[])
        .await
        .unwrap();
    stream.subscribed(&["feed:d"]).await;
    let shutdown = hub.running.take().unwrap().shutdown();
    let read = async {
        let mut last = None;
        while let Some(event) = stream.next().await {
            last = event.comment;
        }
        last
    };
    let (_, last) = tokio::join!(shutdown, read);
    assert_eq!(last.as_deref(), Some("closed: server shutting down"));
}

/// This process's resident set (the hub runs in-process), in KiB.
fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[actix_web::test]
async fn a_stream_whose_client_never_reads_is_dropped_after_the_write_timeout() {
    let hub = TestHub::start(
        "[server]\nmax_connections_per_ip = 1\n\
         [websocket]\nheartbeat_interval = \"300ms\"\nwrite_timeout = \"1s\"\nmax_message_bytes = 300000\nmax_queued_bytes = 1000000\n",
    )
    .await;
    // A raw client with the smallest receive buffer the kernel allows: it sends its request, then never
    // reads and never goes away.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(1024).unwrap();
    let mut stuck = socket.connect(hub.addr).await.unwrap();
    stuck
        .write_all(b"GET /sse?channel=big:stuck HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    wait_subscribers(&hub, "big:stuck", 1).await;
    let before = vm_rss_kib();
    // 40 MB at a client that takes nothing: far past the 1 MB queue bound.
    let big = "s".repeat(200_000);
    for _ in 0..200 {
        hub.publish("big:stuck", json!(big)).await;
    }
    let grown_mib = vm_rss_kib().saturating_sub(before) / 1024;
    assert!(grown_mib < 32, "RSS grew by {grown_mib} MiB");
    // The hub lets go of the socket itself: the budget of one connection comes back while the client
    // still holds its end, and the client then reads what was in flight and the end (or a reset).
    common::eventually(
        Duration::from_secs(10),
        "the stuck stream's connection is dropped",
        || async { hub.stats().await["write_timeouts"] == 1 },
    )
    .await;
    let stats = hub.stats().await;
    assert_eq!(stats["slow_consumer_disconnects"], 1, "{stats}");
    assert_eq!(stats["sse_connections"], 0, "{stats}");
    assert_eq!(stats["subscriptions"], 0, "{stats}");
    assert!(Stream::open(&hub.http("/sse?channel=a"), &[]).await.is_ok());
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        use tokio::io::AsyncReadExt;
        match tokio::time::timeout(Duration::from_secs(5), stuck.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => {}
            Err(_) => panic!("the hub still holds the socket"),
        }
    }
}

#[actix_web::test]
async fn a_stalled_stream_under_its_queue_bound_is_dropped_after_the_write_timeout() {
    let hub = TestHub::start(
        "[websocket]\nwrite_timeout = \"1s\"\nmax_message_bytes = 300000\nmax_queued_bytes = 100000000\n",
    )
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(1024).unwrap();
    let mut stuck = socket.connect(hub.addr).await.unwrap();
    stuck
        .write_all(b"GET /sse?channel=big:held HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    wait_subscribers(&hub, "big:held", 1).await;
    // Enough to fill the socket buffers on both sides, far too little to count as a slow consumer: only the
    // write timeout can end this stream.
    let text = "h".repeat(200_000);
    for _ in 0..40 {
        hub.publish("big:held", json!(text)).await;
    }
    common::eventually(
        Duration::from_secs(10),
        "the stalled stream is dropped",
        || async { hub.stats().await["sse_connections"] == 0 },
    )
    .await;
    let stats = hub.stats().await;
    assert_eq!(stats["write_timeouts"], 1, "{stats}");
    assert_eq!(stats["slow_consumer_disconnects"], 0, "{stats}");
    assert_eq!(stats["subscriptions"], 0, "{stats}");
}
